"""The gateway end to end: the official openai client -> gateway -> Kafka -> worker (real vLLM) -> reply.

One gateway and one worker serve the whole module (the engine is shared with the session).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import confluent_kafka
import openai
import orjson
import pytest
import pytest_asyncio

from schemas.codec import decode_request
from schemas.messages import Band
from schemas.settings import Settings
from schemas.topology import Topology
from tests.gateway_stack import GatewayStack, gateway_stack
from tests.worker_fixtures import collect, spawn_worker

pytestmark = [pytest.mark.integration, pytest.mark.engine]

TENANTS = {
    # tenant: (config without keys)
    "acme": {"pool": "default", "max_priority": "high", "quotas": {"requests_per_s": 500}},
    "globex": {"pool": "default", "max_priority": "medium", "quotas": {"requests_per_s": 50}},
    "initech": {"pool": "default", "max_priority": "low"},
    "lowered": {"pool": "default", "max_priority": "medium", "on_priority_above_max": "lower"},
    "metered": {"pool": "default", "max_priority": "medium", "quotas": {"requests_per_s": 4, "max_tokens": 64}},
    "vip": {"pool": "vip", "max_priority": "high"},
}


Stack = GatewayStack


@pytest_asyncio.fixture(scope="module")
async def stack(bootstrap: str, base_topology: Topology, engine: Any,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with gateway_stack(bootstrap, base_topology, engine, tmp_path_factory.mktemp("gateway"), TENANTS,
                             pools={"vip": "dedicated to tenant vip"}) as s:
        yield s


async def test_openai_client_gets_completions_and_chat(stack: Stack):
    async with stack.client("acme") as client:
        completion = await client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                                     temperature=0)
        assert completion.object == "text_completion"
        assert isinstance(completion.choices[0].text, str)
        assert 1 <= completion.usage.completion_tokens <= 5
        assert completion.choices[0].finish_reason in ("length", "stop")

        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say hello"}], max_tokens=4, temperature=0)
        assert chat.object == "chat.completion"
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.prompt_tokens > 0

        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Stream please"}], max_tokens=4, stream=True)
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert isinstance(streamed, str)


async def test_priority_header_and_lowering(stack: Stack):
    async with stack.client("acme") as client:
        raw = await client.completions.with_raw_response.create(
            model="tiny", prompt="hi", max_tokens=2, extra_headers={"X-Priority": "high"})
        assert raw.headers["x-tierq-priority"] == "high"
    async with stack.client("lowered") as client:
        raw = await client.completions.with_raw_response.create(
            model="tiny", prompt="hi", max_tokens=2, extra_body={"priority": "high"})
        assert raw.headers["x-tierq-priority"] == "medium"
        assert raw.headers["x-tierq-priority-lowered"] == "high->medium"
        assert raw.parse().choices[0].text is not None


async def test_wrong_key_forbidden_priority_and_bad_body(stack: Stack):
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="tq-not-a-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.completions.create(model="tiny", prompt="hi", max_tokens=2)
    async with stack.http() as http:
        assert (await http.post("/v1/completions", json={"prompt": "hi"})).status_code == 401

    async with stack.client("initech") as client:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.completions.create(model="tiny", prompt="hi", max_tokens=2,
                                            extra_headers={"X-Priority": "high"})
        assert denied.value.code == "forbidden_priority"
        with pytest.raises(openai.BadRequestError) as bad_body:
            await client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=-1)
        assert "temperature" in str(bad_body.value)
        with pytest.raises(openai.BadRequestError) as unknown:
            await client.completions.create(model="tiny", prompt="hi", extra_body={"best_of": 3})
        assert "best_of" in str(unknown.value)
    async with stack.http("initech") as http:
        response = await http.post("/v1/completions", content=b"{not json")
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_exhausted_quota_is_429_with_retry_after(stack: Stack):
    async with stack.client("metered") as client:
        # max_tokens above the tenant's per-request limit is a 400, not a quota matter
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(model="tiny", prompt="hi", max_tokens=500)
        with pytest.raises(openai.RateLimitError) as limited:
            for _ in range(20):
                await client.completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert limited.value.code == "quota_exceeded"
        assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_quota_at_five_times_the_rate_loses_nothing_and_spares_others(stack: Stack):
    """metered (4 requests/s) sends 20/s for 2 s while globex sends at its own pace."""
    rate, burst, seconds = 4, 4, 2.0
    await asyncio.sleep(burst / rate + 0.5)  # let earlier tests' use of the bucket refill

    async def one(client: openai.AsyncOpenAI) -> tuple[str, Any]:
        try:
            raw = await client.completions.with_raw_response.create(model="tiny", prompt="quota", max_tokens=3)
            return "ok", raw
        except openai.RateLimitError as exc:
            return "limited", exc

    async with stack.client("metered") as metered, stack.client("globex") as globex:
        tasks, other = [], []
        started = time.monotonic()
        for i in range(int(seconds * rate * 5)):
            tasks.append(asyncio.create_task(one(metered)))
            if i % 8 == 0:
                other.append(asyncio.create_task(one(globex)))
            await asyncio.sleep(1 / (rate * 5))
        elapsed = time.monotonic() - started
        outcomes = await asyncio.gather(*tasks)
        others = await asyncio.gather(*other)

    accepted = [raw for kind, raw in outcomes if kind == "ok"]
    limited = [exc for kind, exc in outcomes if kind == "limited"]
    print(f"metered: {len(outcomes)} sent in {elapsed:.2f}s at {rate}/s quota: {len(accepted)} accepted, "
          f"{len(limited)} refused (429); globex: {sum(k == 'ok' for k, _ in others)}/{len(others)} accepted")
    assert limited, "a tenant at 5x its rate must get 429s"
    assert all(int(exc.response.headers["retry-after"]) >= 1 for exc in limited)
    assert burst <= len(accepted) <= burst + rate * elapsed + 1
    # every accepted request was answered: nothing accepted is lost
    ids = [raw.headers["x-tierq-request-id"] for raw in accepted]
    assert all(raw.parse().usage.completion_tokens >= 1 for raw in accepted)
    assert len(set(ids)) == len(accepted)
    assert all(kind == "ok" for kind, _ in others), "another tenant must not be limited"


async def test_tenants_see_only_their_own_results(stack: Stack):
    async with stack.client("acme") as client:
        raw = await client.completions.with_raw_response.create(model="tiny", prompt="mine", max_tokens=2)
    request_id = raw.headers["x-tierq-request-id"]
    async with stack.http("acme") as acme, stack.http("globex") as globex:
        own = await acme.get(f"/v1/requests/{request_id}")
        assert own.status_code == 200 and own.json()["status"] == "done"
        assert own.json()["reply"]["tenant_id"] == "acme"
        other = await globex.get(f"/v1/requests/{request_id}")
        assert other.status_code == 404
        assert (await acme.get("/v1/requests/no-such-id")).status_code == 404
    globex_replies = await collect(stack.settings, stack.topology, "globex", expect=None)
    assert request_id not in {r.request_id for r in globex_replies}
    acme_replies = await collect(stack.settings, stack.topology, "acme", expect=None)
    assert request_id in {r.request_id for r in acme_replies}


async def test_dedicated_pool_is_invisible_to_shared_workers_and_504_without_a_reply(stack: Stack):
    async with stack.http("vip") as http:
        response = await http.post("/v1/completions", json={"prompt": "vip only", "max_tokens": 2},
                                   headers={"X-Request-Timeout": "1.5", "X-Priority": "high"})
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        request_id = response.headers["x-tierq-request-id"]
        pending = await http.get(f"/v1/requests/{request_id}")
        assert pending.json()["status"] == "pending"  # nobody serves pool vip yet
    vip_topic = stack.topology.band_topic("vip", Band.high)
    assert request_id in await asyncio.to_thread(_request_ids_on, stack.settings, vip_topic)
    for topic in stack.topology.pool_topics("default").values():
        assert request_id not in await asyncio.to_thread(_request_ids_on, stack.settings, topic)
    # a worker of the dedicated pool answers it (expired: its deadline passed while nobody served vip)
    worker, task = spawn_worker(stack.engine, stack.settings.bootstrap_servers, stack.topology, pool="vip",
                                worker_id="test/vip")
    try:
        async with stack.http("vip") as http:
            for _ in range(300):
                body = (await http.get(f"/v1/requests/{request_id}")).json()
                if body["status"] == "done":
                    break
                await asyncio.sleep(0.1)
        assert body["status"] == "done" and body["reply"]["status"] == "expired"
        assert body["reply"]["worker"] == "test/vip"
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


async def test_batch_of_200_openai_lines(stack: Stack):
    lines = [{"custom_id": f"row-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "messages": [{"role": "user", "content": f"item {i}"}], "max_tokens": 3}}
             for i in range(200)]
    lines.insert(100, {"custom_id": "bad-row", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [], "max_tokens": 3}})
    content = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    async with stack.client("acme") as client:
        uploaded = await client.files.create(file=("batch.jsonl", content), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        for _ in range(1200):
            batch = await client.batches.retrieve(batch.id)
            if batch.status in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.25)
        assert batch.status == "completed", batch
        assert batch.request_counts.total == 201
        assert batch.request_counts.completed == 200 and batch.request_counts.failed == 1
        output = (await client.files.content(batch.output_file_id)).content
        errors = (await client.files.content(batch.error_file_id)).content
    results = [orjson.loads(line) for line in output.splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(f"row-{i}" for i in range(200))
    assert all(r["response"]["status_code"] == 200 for r in results)
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in results)
    failed = [orjson.loads(line) for line in errors.splitlines()]
    assert [f["custom_id"] for f in failed] == ["bad-row"]
    async with stack.client("globex") as other:  # batches and files are private to their tenant
        with pytest.raises(openai.NotFoundError):
            await other.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await other.files.content(batch.output_file_id)


async def test_health_readiness_and_metrics(stack: Stack):
    async with stack.http() as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).status_code == 200
        metrics = (await http.get("/metrics")).text
    assert 'tierq_gateway_requests_total{endpoint="/v1/completions"' in metrics
    assert "tierq_gateway_quota_rejections_total" in metrics


def _request_ids_on(settings: Settings, topic: str) -> set[str]:
    """Every request id on a topic, read to its end with a plain consumer."""
    consumer = confluent_kafka.Consumer(settings.librdkafka("check", **{
        "group.id": f"check-{uuid.uuid4().hex}", "enable.partition.eof": True, "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        consumer.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                         for p in meta.partitions])
        open_partitions, ids = set(meta.partitions), set()
        deadline = time.monotonic() + 20
        while open_partitions and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                open_partitions.discard(msg.partition())
                continue
            ids.add(decode_request(msg.value()).request_id)
        return ids
    finally:
        consumer.close()
