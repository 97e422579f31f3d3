"""Adopting an earlier version's single pool group offsets into the band groups (broker.groups),
against a fake AdminClient: what is copied, and when the worker must not start."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from broker.groups import GroupAdoptionError, adopt_pool_group_offsets
from schemas.settings import Settings

TOPICS = {"p.high": "g-high", "p.low": "g-low"}


def done(value: Any = None, error: Exception | None = None) -> Future:
    future: Future = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


class FakeAdmin:
    """Committed offsets per group; ``alter_fails``: the broker refuses the copy (and then
    ``joined_meanwhile`` decides whether another worker's copy is found on reading again)."""

    def __init__(self, committed: dict[str, dict[tuple[str, int], int]], alter_fails: bool = False,
                 joined_meanwhile: bool = False, unreachable: bool = False):
        self.committed = committed
        self.alter_fails, self.joined_meanwhile, self.unreachable = alter_fails, joined_meanwhile, unreachable
        self.altered: dict[str, dict[tuple[str, int], int]] = {}

    def list_topics(self, timeout: float) -> Any:
        return SimpleNamespace(topics={t: SimpleNamespace(partitions={0: None, 1: None}) for t in TOPICS})

    def list_consumer_group_offsets(self, requests: list[Any], request_timeout: float) -> dict[str, Future]:
        (request,) = requests
        if self.unreachable:
            return {request.group_id: done(error=KafkaException(KafkaError(KafkaError._TIMED_OUT)))}
        offsets = self.committed.get(request.group_id, {})
        answer = [TopicPartition(tp.topic, tp.partition, offsets.get((tp.topic, tp.partition), -1001))
                  for tp in request.topic_partitions]
        return {request.group_id: done(SimpleNamespace(topic_partitions=answer))}

    def alter_consumer_group_offsets(self, requests: list[Any], request_timeout: float) -> dict[str, Future]:
        (request,) = requests
        offsets = {(tp.topic, tp.partition): tp.offset for tp in request.topic_partitions}
        if self.alter_fails:
            if self.joined_meanwhile:
                self.committed.setdefault(request.group_id, {}).update(offsets)
            return {request.group_id: done(error=KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID)))}
        self.altered[request.group_id] = offsets
        self.committed.setdefault(request.group_id, {}).update(offsets)
        return {request.group_id: done(SimpleNamespace(topic_partitions=request.topic_partitions))}


def adopt(admin: FakeAdmin) -> dict[str, int]:
    return adopt_pool_group_offsets(Settings(_env_file=None, bootstrap_servers="fake:9092"), "g", TOPICS,
                                    timeout=1, admin=admin)  # type: ignore[arg-type]


def test_the_old_groups_offsets_are_copied_where_a_band_group_has_none():
    admin = FakeAdmin({"g": {("p.high", 0): 5, ("p.low", 0): 7, ("p.low", 1): 9}, "g-low": {("p.low", 1): 12}})
    assert adopt(admin) == {"g-high": 1, "g-low": 1}
    assert admin.altered == {"g-high": {("p.high", 0): 5}, "g-low": {("p.low", 0): 7}}  # p.low[1] kept at 12


def test_nothing_to_adopt_without_an_old_group():
    admin = FakeAdmin({})
    assert adopt(admin) == {} and admin.altered == {}


def test_a_refused_copy_is_fine_when_another_worker_copied_first():
    admin = FakeAdmin({"g": {("p.low", 0): 7}}, alter_fails=True, joined_meanwhile=True)
    assert adopt(admin) == {"g-low": 1}


def test_a_refused_copy_that_leaves_offsets_behind_stops_the_worker():
    with pytest.raises(GroupAdoptionError, match="serve its answered requests again"):
        adopt(FakeAdmin({"g": {("p.low", 0): 7}}, alter_fails=True))


def test_a_broker_that_does_not_answer_stops_the_worker():
    with pytest.raises(GroupAdoptionError, match="cannot read the committed offsets"):
        adopt(FakeAdmin({}, unreachable=True))
