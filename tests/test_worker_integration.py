"""The worker against a real broker and the real vLLM engine on the CPU (tiny local model)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import confluent_kafka
import orjson
import pytest

from schemas.messages import Band, ErrorCode, Status, utc_now
from tests.kafka_helpers import read_to_end, read_topics
from worker.attempts import marker_key
from tests.worker_fixtures import collect, custom_topology, publish, request, spawn_worker

pytestmark = [pytest.mark.integration, pytest.mark.engine]


async def test_every_request_answered_exactly_once(settings, base_topology, start_worker):
    topology = custom_topology(base_topology, settings)
    start_worker(topology)
    docs = [request(priority=band, metadata={"custom_id": f"c{i}"})
            for i, band in enumerate(["high", "medium", "low"] * 8)]
    docs += [request(messages=[{"role": "user", "content": "hi"}], prompt=None, priority="low")]
    docs = [{k: v for k, v in d.items() if v is not None} for d in docs]
    ids = publish(settings, topology, docs)
    replies = await collect(settings, topology, "acme", expect=len(ids))
    assert sorted(r.request_id for r in replies) == sorted(ids)
    for reply in replies:
        assert reply.status is Status.ok, reply.error
        assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens >= 1
        assert reply.timing.queue_ms is not None and reply.timing.e2e_ms >= reply.timing.queue_ms
        assert reply.timing.first_token_at is not None and reply.worker == "test/worker"
        assert reply.served_as is not None and reply.attempt == 1
    assert {r.metadata.get("custom_id") for r in replies} >= {f"c{i}" for i in range(24)}
    # nothing twice on the topic either (the collector would hide duplicates)
    raw = read_topics(settings.bootstrap_servers, [topology.reply_topic("acme")], expect=len(ids) + 1, timeout=3)
    assert len(raw) == len(ids)


async def test_bad_input_gets_a_reply_or_a_dlq_record_and_serving_goes_on(settings, base_topology, start_worker):
    topology = custom_topology(base_topology, settings)
    worker = start_worker(topology)
    past = utc_now() - timedelta(minutes=5)
    low_topic, high_topic = topology.band_topic("default", Band.low), topology.band_topic("default", Band.high)

    def raw_request(rid, **fields):
        doc = {"schema": "tierq.request/v1", "request_id": rid, "tenant_id": "acme", "priority": "low",
               "pool": "default", "prompt": "hello", "submitted_at": utc_now().isoformat(), **fields}
        return orjson.dumps(doc)

    answered = {
        "bad-version": (raw_request("bad-version", schema="tierq.request/v9"), ErrorCode.unsupported_schema),
        "bad-temp": (raw_request("bad-temp", params={"temperature": -1}), ErrorCode.invalid_request),
        "too-long": (raw_request("too-long", prompt="fox " * 2000), ErrorCode.prompt_too_long),
        "too-many-tokens": (raw_request("too-many-tokens", params={"max_tokens": 100000}), ErrorCode.invalid_request),
        "expired": (raw_request("expired", submitted_at=(past - timedelta(minutes=1)).isoformat(),
                                deadline=past.isoformat()), ErrorCode.deadline_exceeded),
        "wrong-pool": (raw_request("wrong-pool", pool="other"), ErrorCode.unknown_pool),
    }
    dead = [b"not json", b"\xff\xfe\xfd", b"[1,2,3]", raw_request("x", tenant_id="nobody"),
            orjson.dumps({"tenant_id": "acme", "prompt": "no id"})]
    raw = confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers})
    for value in dead:
        raw.produce(low_topic, key=b"acme", value=value)
    for rid, (value, _code) in answered.items():
        raw.produce(low_topic, key=b"acme", value=value)
    raw.produce(high_topic, key=b"globex", value=raw_request("globex-high", tenant_id="globex", priority="high"))
    raw.flush(10)
    good = publish(settings, topology, [request() for _ in range(5)])

    replies = {r.request_id: r for r in await collect(settings, topology, "acme", expect=len(answered) + 5)}
    for rid, (_value, code) in answered.items():
        assert replies[rid].error is not None and replies[rid].error.code is code, (rid, replies[rid])
    assert replies["expired"].status is Status.expired
    assert all(replies[rid].status is Status.ok for rid in good)
    globex = await collect(settings, topology, "globex", expect=1)
    assert globex[0].error.code is ErrorCode.forbidden_priority

    dlq = read_topics(settings.bootstrap_servers, [topology.dlq.topic], expect=len(dead))
    assert sorted(m.value() for m in dlq) == sorted(dead)
    for msg in dlq:
        headers = dict(msg.headers())
        assert headers["tierq.source_topic"] == low_topic.encode() and "tierq.reason" in headers
        assert int(headers["tierq.source_offset"]) >= 0
    assert worker.fatal is None


async def test_request_at_its_attempt_limit_is_answered_with_engine_error(settings, base_topology, start_worker):
    """Counts written by earlier (crashed) workers are read back from the compacted attempts topic."""
    from prometheus_client import REGISTRY

    topology = custom_topology(base_topology, settings)
    raw = confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers})
    raw.produce(topology.attempts.topic, key=b"poison-1", value=orjson.dumps({"attempts": 3}))
    raw.flush(10)
    start_worker(topology, max_attempts=3)
    ids = publish(settings, topology, [request(request_id="poison-1"), request()])
    replies = {r.request_id: r for r in await collect(settings, topology, "acme", expect=2)}
    assert replies["poison-1"].error.code is ErrorCode.engine_error
    assert "3 engine attempts" in replies["poison-1"].error.message
    assert replies[ids[1]].status is Status.ok and replies[ids[1]].attempt == 1
    # per-request metrics reach prometheus_client with the gauges (every GAUGE_INTERVAL_S)
    for _ in range(40):
        ok_low = REGISTRY.get_sample_value("tierq_replies_total", {"band": "low", "status": "ok", "tenant": "acme"})
        queued = REGISTRY.get_sample_value("tierq_queue_seconds_count", {"band": "low"})
        if ok_low and queued:
            break
        await asyncio.sleep(0.05)
    assert ok_low is not None and ok_low >= 1
    assert queued is not None and queued >= 1


def leave_marker(settings, topology, group: str, held_to: int) -> None:
    """What a worker that died holding offsets 0..held_to of the low topic leaves behind."""
    low_topic = topology.band_topic("default", Band.low)
    raw = confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers})
    for partition in range(topology.bands[Band.low].partitions):
        raw.produce(topology.attempts.topic, key=marker_key(group, (low_topic, partition)).encode(),
                    value=orjson.dumps({"held_to": held_to}))
    raw.flush(10)


def attempts_records(settings, topology) -> list[tuple[str, dict | None]]:
    return [(m.key().decode(), None if m.value() is None else orjson.loads(m.value()))
            for m in read_to_end(settings.bootstrap_servers, [topology.attempts.topic])]


async def test_requests_a_dead_worker_held_are_counted_once_and_the_rest_are_not(settings, base_topology, engine):
    """Offsets up to a dead predecessor's held-to marker are suspects: attempt 2, counted by request_id
    (count, then tombstone); later offsets are covered by this worker's own markers (attempt 1)."""
    topology = custom_topology(base_topology, settings)
    group = "g-suspects"
    leave_marker(settings, topology, group, held_to=2)
    ids = publish(settings, topology, [request() for _ in range(6)], routing=False)  # one partition, offsets 0-5
    worker, task = spawn_worker(engine, settings.bootstrap_servers, topology, group_id=group, max_attempts=2)
    try:
        replies = {r.request_id: r for r in await collect(settings, topology, "acme", expect=6)}
    finally:
        worker.request_stop()  # a clean stop puts back the marker it inherited
        assert await asyncio.wait_for(task, 60) == 0
    assert [replies[rid].status for rid in ids] == [Status.ok] * 6
    assert [replies[rid].attempt for rid in ids] == [2, 2, 2, 1, 1, 1]

    by_key: dict[str, list] = {}
    for key, value in attempts_records(settings, topology):
        by_key.setdefault(key, []).append(value)
    assert {key: values for key, values in by_key.items() if not key.startswith("held/")} == \
        {rid: [{"attempts": 2}, None] for rid in ids[:3]}
    low_topic = topology.band_topic("default", Band.low)
    last_markers = {key: values[-1]["held_to"] for key, values in by_key.items()
                    if key.startswith(f"held/{group}/{low_topic}/")}
    assert len(last_markers) == topology.bands[Band.low].partitions and set(last_markers.values()) == {2}


async def test_a_request_a_dead_worker_held_is_given_up_at_the_attempt_limit(settings, base_topology,
                                                                           start_worker):
    topology = custom_topology(base_topology, settings)
    group = "g-poison"
    leave_marker(settings, topology, group, held_to=0)
    ids = publish(settings, topology, [request() for _ in range(3)], routing=False)  # one partition, offsets 0-2
    start_worker(topology, group_id=group, max_attempts=1)
    replies = {r.request_id: r for r in await collect(settings, topology, "acme", expect=3)}
    assert replies[ids[0]].error.code is ErrorCode.engine_error
    assert "after 1 engine attempts" in replies[ids[0]].error.message
    assert [replies[rid].status for rid in ids[1:]] == [Status.ok, Status.ok]
