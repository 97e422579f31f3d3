"""Streaming and cancellation end to end: the official openai client -> gateway -> Kafka -> worker
(real vLLM, the session's engine) -> chunks and replies -> SSE; cancels through the library, the
CLI, the gateway and a client hanging up.

One gateway and one in-process worker serve the module. The SIGKILL test runs a worker process of
its own on a pool of its own (pool ``solo``), so only it and its successor serve that request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import pytest_asyncio
import yaml

from producer.client import Producer
from producer.collector import ResultCollector
from schemas.messages import Reply, Status
from schemas.settings import Settings
from schemas.topology import Topology
from tests.gateway_stack import GatewayStack, gateway_stack
from tests.worker_fixtures import spawn_worker
from tierq.cli import main
from worker.service import Worker

pytestmark = [pytest.mark.integration, pytest.mark.engine]

LONG = 440  # tokens: with the prompt, within the test engine's 512; a few seconds on the CPU
TENANTS = {
    "acme": {"pool": "default", "max_priority": "high"},
    "globex": {"pool": "default", "max_priority": "high"},
    # one request at a time: its second request waits in the worker's buffer (queued)
    "single": {"pool": "default", "max_priority": "high", "quotas": {"max_in_flight": 1}},
    "solo": {"pool": "solo", "max_priority": "high"},
}


Stack = GatewayStack


@pytest_asyncio.fixture(scope="module")
async def stack(bootstrap: str, base_topology: Topology, engine: Any,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with gateway_stack(bootstrap, base_topology, engine, tmp_path_factory.mktemp("stream-gateway"), TENANTS,
                             pools={"solo": "the SIGKILL test's own worker process"}, worker_id="test/stream") as s:
        yield s


async def until(condition: Any, what: Any, timeout: float = 120) -> None:
    """Wait for observable state, checking every 20 ms; ``what`` may be a callable describing the state."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, f"timed out waiting for {what() if callable(what) else what}"
        await asyncio.sleep(0.02)


def _batch_state(stack: Stack, batch_id: str) -> str:
    batch = stack.gateway.batches.batches[batch_id]
    results = stack.gateway.batches.results[batch_id]
    return (f"lines {sorted(batch['_custom_ids'])}, results {{{', '.join(f'{k}: {r.status.value}' for k, r in results.items())}}}, "
            f"running {sorted(stack.worker.running)}, waiting {[i.request_id for i in stack.worker.policy.waiting]}, "
            f"remembered cancels {len(stack.worker.cancels)}, status {batch['status']}")


def request_id_of(chunk_id: str) -> str:
    return chunk_id.split("-", 1)[1]


async def test_stream_sends_several_deltas_that_add_up_to_the_reply(stack: Stack):
    async with stack.client("acme") as client:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Tell a long story"}], max_tokens=96,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_headers={"X-Priority": "high"})
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    reply = await stack.reply(request_id_of(chunks[0].id))
    assert len(deltas) >= 3, f"one delta per chunk record, the first at once: got {len(deltas)}"
    assert "".join(deltas) == reply.text
    assert finish[-1].choices[0].finish_reason == reply.finish_reason and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens and not chunks[-1].choices

    async with stack.client("acme") as client:
        stream = await client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=48,
                                                 temperature=0, stream=True)
        chunks = [c async for c in stream]
    texts = [c.choices[0].text for c in chunks if c.choices]
    reply = await stack.reply(request_id_of(chunks[0].id))
    assert len([t for t in texts if t]) >= 2 and "".join(texts) == reply.text


async def test_readers_of_replies_ignore_chunks(stack: Stack):
    settings = Settings(_env_file=None, bootstrap_servers=stack.settings.bootstrap_servers)

    def publish_and_collect() -> tuple[list[Reply], int]:
        with Producer(settings, stack.topology, on_quota="off") as producer:
            futures = [producer.submit({"tenant_id": "globex", "priority": "high", "prompt": f"story {i}",
                                        "stream": True, "params": {"max_tokens": 32, "temperature": 0}})
                       for i in range(3)]
            ids = {f.result(timeout=30).request_id for f in futures}
        with ResultCollector(settings, stack.topology, "globex") as collector:
            replies = [r for r in collector.replies(expect=3, timeout=120) if r.request_id in ids]
            return replies, collector.stats.chunks

    replies, chunks = await asyncio.to_thread(publish_and_collect)
    assert len(replies) == 3 and all(r.status is Status.ok for r in replies)
    assert chunks >= 3  # read past, not returned, not counted as undecodable
    out = await asyncio.to_thread(_cli_results, stack, "globex", 3)
    assert all(orjson.loads(line)["schema"] == "tierq.reply/v1" for line in out)


def _cli_results(stack: Stack, tenant: str, expect: int) -> list[bytes]:
    path = Path(stack.settings.state_dir) / f"results-{uuid.uuid4().hex[:6]}.jsonl"
    assert main(["results", "--tenant", tenant, "--bootstrap", stack.settings.bootstrap_servers,
                 "--topics", str(_topics_file(stack)), "--expect", str(expect), "--timeout", "60",
                 "--out", str(path)]) == 0
    return path.read_bytes().splitlines()


def _topics_file(stack: Stack) -> Path:
    path = Path(stack.settings.state_dir) / "topics.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(stack.topology.model_dump(mode="json")))
    return path


async def _start_long(stack: Stack, tenant: str, max_tokens: int = LONG) -> tuple[asyncio.Task[Any], list[str]]:
    """A long streamed chat request running in the background; returns (task, its deltas so far)."""
    deltas: list[str] = []
    client = stack.client(tenant)

    async def run() -> Any:
        async with client:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Write at length"}], max_tokens=max_tokens,
                temperature=0, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    deltas.append(chunk.choices[0].delta.content)

    return asyncio.get_running_loop().create_task(run()), deltas


def _running_ids(worker: Worker) -> set[str]:
    return set(worker.running)


def _waiting_ids(worker: Worker) -> set[str]:
    return {item.request_id for item in worker.policy.waiting}


async def test_cancel_a_queued_and_a_running_request_and_the_slot_is_reused(stack: Stack):
    worker = stack.worker
    before = _running_ids(worker)
    first_task, first_deltas = await _start_long(stack, "single")
    await until(lambda: first_deltas, "the first request streams")
    (first_id,) = _running_ids(worker) - before
    caps = dict(worker.policy.tenant_caps)
    worker.policy.tenant_caps = {**caps, "single": 0}  # hold the tenant's next requests in the buffer
    second_task, _ = await _start_long(stack, "single")
    await until(lambda: _waiting_ids(worker) or second_task.done() or first_task.done(),
                lambda: f"the second request waits (tenant at its in-flight cap): running {sorted(worker.running)}, "
                        f"caps {worker.policy.tenant_caps}, in flight {dict(worker.policy.in_flight_by_tenant)}")
    assert not first_task.done(), f"the first request ended early: {first_task.exception()!r}, {len(first_deltas)} deltas"
    assert not second_task.done(), f"the second request was answered at once: {second_task.exception()!r}"
    (second_id,) = _waiting_ids(worker)

    # queued: cancelled through the CLI, never started
    assert await asyncio.to_thread(main, ["cancel", second_id, "--tenant", "single", "--bootstrap",
                                          stack.settings.bootstrap_servers, "--topics", str(_topics_file(stack))]) == 0
    queued = await stack.reply(second_id)
    assert queued.status is Status.cancelled and queued.error.code.value == "cancelled"
    assert queued.usage.completion_tokens == 0 and queued.timing.dequeued_at is None
    with pytest.raises(openai.APIError):
        await second_task

    # running: cancelled through the gateway, aborted in vLLM with the usage so far
    third_task, third_deltas = await _start_long(stack, "single")
    await until(lambda: len(_waiting_ids(worker)) == 1, "the third request waits")
    async with stack.http("single") as http:
        answer = await http.post(f"/v1/requests/{first_id}/cancel")
    assert answer.status_code == 202 and answer.json()["status"] == "cancel_requested"
    worker.policy.tenant_caps = caps  # the cap of 1 again: the third starts once the first's slot is free
    running = await stack.reply(first_id)
    assert running.status is Status.cancelled
    assert 0 < running.usage.completion_tokens < LONG and running.text.startswith("".join(first_deltas))
    with pytest.raises(openai.APIError):
        await first_task
    await until(lambda: third_deltas, "the next request took the freed slot")
    third_id = (_running_ids(worker) - before).pop()
    async with stack.http("single") as http:
        assert (await http.post(f"/v1/requests/{third_id}/cancel")).status_code == 202
    with pytest.raises(openai.APIError):
        await third_task


async def test_another_tenants_cancel_is_refused_and_an_unknown_id_is_kept_then_harmless(stack: Stack):
    worker = stack.worker
    before = _running_ids(worker)
    task, deltas = await _start_long(stack, "acme", max_tokens=160)
    await until(lambda: deltas, "the request streams")
    (request_id,) = _running_ids(worker) - before
    async with stack.http("globex") as http:
        assert (await http.post(f"/v1/requests/{request_id}/cancel")).status_code == 404
    settings = Settings(_env_file=None, bootstrap_servers=stack.settings.bootstrap_servers)

    def cancel_as(tenant: str, rid: str) -> None:
        with Producer(settings, stack.topology, on_quota="off") as producer:
            producer.cancel(rid, tenant).result(timeout=30)

    remembered = len(worker.cancels)
    await asyncio.to_thread(cancel_as, "globex", request_id)  # past the gateway: the worker refuses it
    unknown = uuid.uuid4().hex
    async with stack.http("acme") as http:
        answer = await http.post(f"/v1/requests/{unknown}/cancel")
    assert answer.status_code == 202
    await until(lambda: len(worker.cancels) == remembered + 1, "the unknown id's cancel is remembered")
    await task  # the refused cancel changed nothing
    reply = await stack.reply(request_id)
    assert reply.status is Status.ok and reply.text == "".join(deltas)


async def test_a_client_hanging_up_cancels_its_request(stack: Stack):
    worker = stack.worker
    before = _running_ids(worker)
    async with stack.http("acme") as http:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": LONG,
                "temperature": 0, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["x-tierq-request-id"]
            # closed here, not left to the garbage collector half-read (httpx's generators then
            # finalize whenever a later test happens to trigger a collection)
            async with contextlib.aclosing(response.aiter_lines()) as lines:
                async for line in lines:
                    if line.startswith("data: "):
                        break  # the first delta: hang up now
    reply = await stack.reply(request_id)
    assert reply.status is Status.cancelled and reply.usage.completion_tokens < LONG

    # a waiting (not streamed) request: hanging up cancels it too
    async with stack.http("acme") as http:
        call = asyncio.get_running_loop().create_task(http.post("/v1/chat/completions", json={**body, "stream": False}))
        await until(lambda: _running_ids(worker) - before, "the request runs")
        (request_id,) = _running_ids(worker) - before
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    reply = await stack.reply(request_id)
    assert reply.status is Status.cancelled and reply.usage.completion_tokens < LONG


async def test_batch_cancel_cancels_the_unfinished_lines(stack: Stack):
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "messages": [{"role": "user", "content": f"Essay {i}"}],
                       "max_tokens": LONG, "temperature": 0}} for i in range(6)]
    async with stack.client("single") as client:
        upload = await client.files.create(file=("b.jsonl", b"".join(orjson.dumps(l) + b"\n" for l in lines)),
                                           purpose="batch")
        batch = await client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        service = stack.gateway.batches
        await until(lambda: service.batches[batch.id]["_publishing_done"], "every line published")
        await until(lambda: any(rid.startswith("batch.") for rid in stack.worker.running), "a line runs")
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        await until(lambda: service.batches[batch.id]["status"] == "cancelled",
                    lambda: f"the batch is cancelled: {_batch_state(stack, batch.id)}")
        done = await client.batches.retrieve(batch.id)
    replies = service.results[batch.id].values()
    assert done.request_counts.total == 6 and len(replies) == 6
    assert sum(r.status is Status.cancelled for r in replies) >= 5  # one line ran at a time (max_in_flight 1)


# ---- a worker killed mid-stream ------------------------------------------------------------


def _worker_process(stack: Stack, model: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TIERQ_GROUP_ID": "solo-workers", "TIERQ_WORKER_ID": "solo/B", "TIERQ_DTYPE": "float32",
           "TIERQ_MAX_MODEL_LEN": "512", "TIERQ_ENGINE_EXTRA": '{"enforce_eager": true}',
           "TIERQ_SESSION_TIMEOUT_MS": "6000", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tierq", "worker", "--pool", "solo", "--bootstrap", stack.settings.bootstrap_servers,
             "--topics", str(_topics_file(stack)), "--model", model, "--max-num-seqs", "4"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


async def test_a_worker_killed_mid_stream_duplicates_no_text(stack: Stack, engine: Any, tiny_model: str,
                                                             tmp_path: Path):
    log_path = tmp_path / "b.log"
    process = _worker_process(stack, tiny_model, log_path)
    successor: tuple[Worker, asyncio.Task[int]] | None = None
    try:  # its engine start can take minutes on a busy machine: send the request once it serves
        await until(lambda: b'"partitions_assigned"' in log_path.read_bytes() or process.poll() is not None,
                    "the doomed worker holds its partitions", 600)
        task, deltas = await _start_long(stack, "solo")
        await until(lambda: len(deltas) >= 2 or process.poll() is not None, "the doomed worker streams")
        assert process.poll() is None, log_path.read_text()[-3000:]
        os.killpg(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait, 30)
        sent_before_kill = "".join(deltas)
        successor = spawn_worker(engine, stack.settings.bootstrap_servers, stack.topology, pool="solo",
                                 group_id="solo-workers", worker_id="solo/C")
        try:
            await task
        except openai.APIError as exc:  # allowed: the retry's text differed, the stream says so and stops
            assert "stream_diverged" in str(exc.body or exc), exc
            print(f"the retry diverged after {len(sent_before_kill)} characters: the stream ended with an error")
            return
        streamed = "".join(deltas)
        request_id = next(rid for rid, r in stack.gateway.bridge.results.items() if r.tenant_id == "solo")
        reply = await stack.reply(request_id)
        assert reply.status is Status.ok and reply.worker in ("solo/B", "solo/C")
        assert streamed == reply.text and streamed.startswith(sent_before_kill)
        if reply.worker == "solo/B":  # the tiny model finished it between the second delta and the kill
            print("the request was answered before the kill: the stream ended with the doomed worker's reply")
            return
        print(f"continued after the kill: {len(sent_before_kill)} characters before, {len(streamed)} in all")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if successor is not None:
            successor[0].request_stop()
            successor[0].request_stop()
            await asyncio.wait_for(successor[1], 60)
