"""Streaming and cancellation: what they cost and what they buy, on one engine in one run.

1. **Time to first token through the gateway**: streamed high chat requests, one at a time, from
   the official openai client (HTTP -> Kafka -> worker -> Kafka -> SSE); per request, the client's
   time to its first content delta next to the engine's own time to first token as the worker saw
   it (the reply's ``timing.ttft_ms``: admission to first token); the difference is the streaming
   path's overhead. Also the same prompts straight into the engine (no worker), for the bare figure.
2. **Records and broker CPU per request**, streamed against unstreamed, at 32 and 256 tokens:
   records on the reply topic (chunks + reply) and the broker process's CPU seconds per request.
3. **Cancelled-request slot reuse**: every engine slot holds a long low request, a high request
   waits behind them (no reserved slots in this phase); one low is cancelled; the time from
   publishing the cancel to the high's admission (its ``timing.dequeued_at``).

    .venv/bin/python -m bench.streaming --ttft-requests 40 --requests 24 --rounds 5
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from bench.common import Phase, doc, figure_path, parser, pct, stack, topology, wait_until_ready, write
from broker.embedded import free_port
from producer.collector import ResultCollector
from producer.gateway.app import create_app
from producer.gateway.settings import GatewaySettings
from schemas.messages import Reply, utc_now
from schemas.tenants import hash_api_key, new_api_key
from schemas.topology import Topology

IDLE_S = 3.0
LONG = 440  # tokens: a low that holds its slot for a while (the tiny model allows 512 in all)


def broker_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def serve_gateway(bootstrap: str, topo: Topology, state: Path) -> tuple[Any, asyncio.Task[None], str, str]:
    """The gateway in this process; returns (server, its task, base URL, acme's API key)."""
    import uvicorn

    key = new_api_key()
    document = topo.model_dump(mode="json")
    document["tenants"]["acme"]["api_key_hashes"] = [hash_api_key(key)]
    topo = Topology.model_validate(document)
    port = free_port()
    settings = GatewaySettings(_env_file=None, bootstrap_servers=bootstrap, gateway_port=port, state_dir=state,
                               topics_file=state / "absent.yaml", tenants_file=state / "tenants.yaml")
    server = uvicorn.Server(uvicorn.Config(create_app(settings, topo), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    task = asyncio.get_running_loop().create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    await wait_until_ready(url)
    return server, task, url, key


async def ttft_phase(engine: Any, bootstrap: str, slots: int, n: int) -> dict[str, Any]:
    import openai

    topo = topology(bootstrap)
    state = Path(".tierq") / f"bench-gw-{uuid.uuid4().hex[:6]}"
    state.mkdir(parents=True, exist_ok=True)
    async with Phase(engine, bootstrap, topo, slots) as phase:
        server, task, url, key = await serve_gateway(bootstrap, topo, state)
        gateway_bridge = server.config.app.state.gateway.bridge
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        rows = []
        for i in range(n + 3):  # the first three warm up connections and caches
            started = time.perf_counter()
            first = None
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Question {i}: why is the sky blue?"}],
                max_tokens=32, temperature=0, stream=True, extra_headers={"X-Priority": "high"})
            async for chunk in stream:
                if first is None:
                    rid = chunk.id.split("-", 1)[1]
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = (time.perf_counter() - started) * 1000
            reply: Reply | None = await gateway_bridge.wait_reply(rid, 30)
            if i >= 3 and first is not None and reply is not None and reply.timing.ttft_ms is not None:
                rows.append({"client_ttft_ms": round(first, 2), "engine_ttft_ms": reply.timing.ttft_ms,
                             "queue_ms": reply.timing.queue_ms})
        await client.close()
        server.should_exit = True
        await task
        del phase
    direct = await direct_ttft(engine, n)
    client_ttft = [r["client_ttft_ms"] for r in rows]
    engine_ttft = [r["engine_ttft_ms"] for r in rows]
    overhead = [r["client_ttft_ms"] - r["engine_ttft_ms"] for r in rows]
    return {"requests": len(rows), "client_ttft_ms_p50": pct(client_ttft, 50), "client_ttft_ms_p99": pct(client_ttft, 99),
            "engine_ttft_ms_p50": pct(engine_ttft, 50), "engine_ttft_ms_p99": pct(engine_ttft, 99),
            "overhead_ms_p50": pct(overhead, 50), "overhead_ms_p99": pct(overhead, 99),
            # the engine alone (no Kafka, no worker, no gateway), same prompts, same run
            "direct_engine_ttft_ms_p50": pct(direct, 50), "direct_engine_ttft_ms_p99": pct(direct, 99),
            "overhead_vs_direct_ms_p50": round(pct(client_ttft, 50) - pct(direct, 50), 1),
            "overhead_vs_direct_ms_p99": round(pct(client_ttft, 99) - pct(direct, 99), 1), "rows": rows}


async def direct_ttft(engine: Any, n: int) -> list[float]:
    """The same chat requests straight into the engine, one at a time: its bare time to first token."""
    from schemas.messages import Request
    from worker.engine import Progress

    times = []
    for i in range(n + 3):  # the first three warm up, as through the gateway
        request = Request.model_validate({
            "request_id": f"direct-{uuid.uuid4().hex}", "tenant_id": "acme", "priority": "high",
            "messages": [{"role": "user", "content": f"Question {i}: why is the sky blue?"}],
            "params": {"max_tokens": 32, "temperature": 0}, "submitted_at": utc_now()})
        first: list[float] = []
        started = time.perf_counter()
        progress = Progress(lambda _text, _tokens: first or first.append((time.perf_counter() - started) * 1000))
        await engine.generate(request, engine.render(request), priority=0, progress=progress)
        if i >= 3 and first:
            times.append(round(first[0], 2))
    return times


async def records_phase(engine: Any, bootstrap: str, broker_pid: int, slots: int, n: int, max_tokens: int,
                        streamed: bool) -> dict[str, Any]:
    topo = topology(bootstrap)
    async with Phase(engine, bootstrap, topo, slots) as phase:
        docs = [{**doc("acme", "high", max_tokens, f"Story {i}: once upon a time"), "stream": streamed}
                for i in range(n)]
        idle_before = broker_cpu(broker_pid)
        await asyncio.sleep(IDLE_S)  # the broker's CPU with everything connected and nothing to do
        idle_rate = (broker_cpu(broker_pid) - idle_before) / IDLE_S
        cpu_before, started = broker_cpu(broker_pid), time.perf_counter()
        await asyncio.to_thread(phase.publish, docs)
        replies = await phase.collect("acme", n)
        cpu = broker_cpu(broker_pid) - cpu_before
        elapsed = time.perf_counter() - started

        def count_chunks() -> int:
            with ResultCollector(phase.settings, topo, "acme") as collector:
                list(collector.replies())
                return collector.stats.chunks

        chunks = await asyncio.to_thread(count_chunks)
    tokens = sum(r.usage.completion_tokens for r in replies) / n
    return {"streamed": streamed, "max_tokens": max_tokens, "requests": n, "mean_completion_tokens": round(tokens, 1),
            "records_per_request": round((chunks + n) / n, 2), "chunks_per_request": round(chunks / n, 2),
            "broker_cpu_ms_per_request": round(cpu / n * 1000, 2),
            # what the requests cost the broker beyond its idle polling (fetches of every consumer) in that time
            "broker_cpu_ms_per_request_above_idle": round((cpu - idle_rate * elapsed) / n * 1000, 2),
            "broker_idle_cpu_percent": round(idle_rate * 100, 1), "elapsed_s": round(elapsed, 2)}


async def cancel_phase(engine: Any, bootstrap: str, slots: int, rounds: int) -> dict[str, Any]:
    topo = topology(bootstrap, high={"reserved_slots": 0}, medium={"reserved_slots": 0})
    waits: list[float] = []
    answered = 0
    async with Phase(engine, bootstrap, topo, slots, engine_queue=0) as phase:
        worker = phase.worker
        for _ in range(rounds):
            lows = await asyncio.to_thread(phase.publish, [doc("acme", "low", LONG, f"Essay {i}") for i in range(slots)])
            while len(worker.running) < slots:
                await asyncio.sleep(0.005)
            (high,) = await asyncio.to_thread(phase.publish, [doc("acme", "high", 8, "Quick question")])
            while not any(item.request_id == high for item in worker.policy.waiting):
                await asyncio.sleep(0.005)
            cancelled_at = utc_now()
            await asyncio.to_thread(lambda: phase.producer.cancel(lows[0], "acme").result(timeout=30))
            replies = {r.request_id: r for r in await phase.collect("acme", answered + 2)}  # the low and the high
            admitted = replies[high].timing.dequeued_at
            assert admitted is not None and high in replies and lows[0] in replies
            waits.append(round((admitted - cancelled_at).total_seconds() * 1000, 2))
            for rid in lows[1:]:  # clear the engine for the next round
                await asyncio.to_thread(lambda rid=rid: phase.producer.cancel(rid, "acme").result(timeout=30))
            answered += slots + 1
            await phase.collect("acme", answered)
            while worker.running:
                await asyncio.sleep(0.01)
    return {"rounds": rounds, "slots": slots, "cancel_to_admission_ms": waits,
            "cancel_to_admission_ms_p50": pct(waits, 50), "cancel_to_admission_ms_max": max(waits)}


def plot(result: dict[str, Any], tag: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ttft = result["ttft"]
    labels = ["engine alone", "engine TTFT\n(in the worker)", "client TTFT\n(via gateway)",
              "overhead\n(client - worker's)"]
    p50 = [ttft["direct_engine_ttft_ms_p50"], ttft["engine_ttft_ms_p50"], ttft["client_ttft_ms_p50"],
           ttft["overhead_ms_p50"]]
    p99 = [ttft["direct_engine_ttft_ms_p99"], ttft["engine_ttft_ms_p99"], ttft["client_ttft_ms_p99"],
           ttft["overhead_ms_p99"]]
    x = range(len(labels))
    axes[0].bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    axes[0].bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    axes[0].set_xticks(list(x), labels)
    axes[0].set_ylabel("ms")
    axes[0].set_title(f"time to first token, {ttft['requests']} streamed high requests")
    axes[0].legend()
    rows = result["records"]
    names = [f"{r['max_tokens']} tok\n{'streamed' if r['streamed'] else 'whole'}" for r in rows]
    axes[1].bar(names, [r["records_per_request"] for r in rows], color="tab:green")
    axes[1].set_title("records on the reply topic per request")
    axes[2].bar([i - 0.2 for i in range(len(rows))], [r["broker_cpu_ms_per_request"] for r in rows], 0.4,
                color="tab:red", label="all")
    axes[2].bar([i + 0.2 for i in range(len(rows))], [r["broker_cpu_ms_per_request_above_idle"] for r in rows], 0.4,
                color="tab:orange", label="above idle polling")
    axes[2].set_xticks(list(range(len(rows))), names)
    axes[2].legend()
    axes[2].set_title("broker CPU ms per request")
    cancel = result["cancel"]
    fig.suptitle(f"streaming overhead; cancel -> waiting high admitted: p50 {cancel['cancel_to_admission_ms_p50']} ms,"
                 f" max {cancel['cancel_to_admission_ms_max']} ms ({cancel['rounds']} rounds, {cancel['slots']} slots)")
    fig.tight_layout()
    path = figure_path("streaming", tag)
    fig.savefig(path, dpi=110)
    return path


async def run(args: Any) -> None:
    with stack(args) as (engine, bootstrap):
        broker_pid = _broker_pid(bootstrap)
        ttft = await ttft_phase(engine, bootstrap, args.slots, args.ttft_requests)
        records = []
        for max_tokens in (32, 256):
            for streamed in (False, True):
                records.append(await records_phase(engine, bootstrap, broker_pid, args.slots, args.requests,
                                                   max_tokens, streamed))
        cancel = await cancel_phase(engine, bootstrap, min(args.slots, 4), args.rounds)
    result = {"ttft": ttft, "records": records, "cancel": cancel,
              "command": f".venv/bin/python -m bench.streaming --ttft-requests {args.ttft_requests} "
                         f"--requests {args.requests} --rounds {args.rounds}"}
    result["figure"] = str(plot(result, args.tag))
    write("streaming", args.tag, result)


def _broker_pid(bootstrap: str) -> int:
    """The embedded broker process listening on the bootstrap port."""
    port = int(bootstrap.rsplit(":", 1)[1])
    for process in psutil.Process().children(recursive=True):
        try:
            if any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in process.net_connections()):
                return process.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise RuntimeError(f"no child process listens on {bootstrap}: give no --bootstrap (the broker's CPU is measured)")


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--ttft-requests", type=int, default=40)
    p.add_argument("--requests", type=int, default=24, help="requests per records phase")
    p.add_argument("--rounds", type=int, default=5, help="cancel rounds")
    p.set_defaults(slots=4)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
