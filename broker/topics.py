"""Topic administration: create what topics.yaml describes, idempotently."""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.settings import Settings
from schemas.topology import Topology


class TopicCreationError(RuntimeError):
    pass


def create_topics(settings: Settings, topology: Topology, timeout: float = 30.0) -> dict[str, str]:
    """Create every topic of ``topology``; return ``{topic: "created" | "exists"}``.

    Existing topics are left alone (their partition count is not changed); any other
    failure raises ``TopicCreationError`` naming each failed topic.
    """
    admin = AdminClient(settings.librdkafka("admin"))
    specs = topology.topic_specs()
    new_topics = [
        NewTopic(spec.name, num_partitions=spec.partitions, replication_factor=topology.replication_factor,
                 config=spec.config)
        for spec in specs
    ]
    futures = admin.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
    outcome: dict[str, str] = {}
    failures: list[str] = []
    for spec in specs:
        try:
            futures[spec.name].result(timeout=timeout)
            outcome[spec.name] = "created"
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                outcome[spec.name] = "exists"
            else:
                failures.append(f"{spec.name}: {error.str()}")
    if failures:
        raise TopicCreationError("could not create topics:\n  " + "\n  ".join(failures))
    return outcome


def wait_for_topics(settings: Settings, topics: list[str], timeout: float = 30.0) -> None:
    """Block until the broker's metadata lists every topic (creation is asynchronous)."""
    admin = AdminClient(settings.librdkafka("admin"))
    deadline = time.monotonic() + timeout
    missing = set(topics)
    while missing and time.monotonic() < deadline:
        metadata = admin.list_topics(timeout=5)
        missing = {t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None}
        if missing:
            time.sleep(0.1)
    if missing:
        raise TopicCreationError(f"topics not visible after {timeout:.0f}s: {', '.join(sorted(missing))}")
