"""The worker against a real broker and the real vLLM engine on the CPU (tiny local model)."""

from __future__ import annotations

from datetime import timedelta

import confluent_kafka
import orjson
import pytest

from schemas.messages import Band, ErrorCode, Status, utc_now
from tests.kafka_helpers import read_topics
from tests.worker_fixtures import collect, custom_topology, publish, request

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
    ok_low = REGISTRY.get_sample_value("tierq_replies_total", {"band": "low", "status": "ok", "tenant": "acme"})
    assert ok_low is not None and ok_low >= 1
    assert REGISTRY.get_sample_value("tierq_queue_seconds_count", {"band": "low"}) >= 1
