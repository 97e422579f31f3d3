"""``tierq demo``: the whole local stack on one machine, and what priority scheduling does.

Starts a broker (embedded unless one is configured), creates the topics, runs one worker
with an in-process engine, publishes a low backlog first and medium/high work after it,
collects every reply and prints latency per band.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from producer.client import Producer
from producer.collector import ResultCollector
from schemas.codec import encode
from schemas.messages import BAND_ORDER, Reply
from schemas.topology import Topology
from worker.engine import Engine
from schemas.logs import configure
from broker.embedded import local_broker
from worker.runner import engine_config
from worker.service import build_worker
from worker.settings import WorkerSettings

PROMPTS = ["Summarise the plot of Hamlet.", "Write a haiku about queues.", "Explain starvation aging.",
           "List three uses of Kafka.", "Translate 'good night' into French."]


def workload(topology: Topology, low: int, medium: int, high: int) -> list[dict[str, Any]]:
    """Low first (the backlog), then medium, then high, spread over the tenants allowed each band."""
    docs = []
    for band, count in (("low", low), ("medium", medium), ("high", high)):
        rank = [b.value for b in BAND_ORDER].index(band)
        allowed = [t for t, c in topology.tenants.items() if c.max_priority.rank <= rank]
        for i in range(count):
            docs.append({"tenant_id": allowed[i % len(allowed)], "priority": band, "prompt": PROMPTS[i % len(PROMPTS)],
                         "params": {"max_tokens": 32, "temperature": 0.8, "seed": i},
                         "metadata": {"custom_id": f"{band}-{i}"}})
    return docs


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def table(replies: list[Reply]) -> str:
    rows = [f"{'band':8}{'count':>7}{'ok':>6}{'queue p50':>11}{'queue p95':>11}{'e2e p50':>10}{'e2e p95':>10}{'promoted':>10}"]
    for band in BAND_ORDER:
        mine = [r for r in replies if r.priority is band]
        if not mine:
            continue
        queue = [r.timing.queue_ms for r in mine if r.timing.queue_ms is not None]
        e2e = [r.timing.e2e_ms for r in mine if r.timing.e2e_ms is not None]
        ok = sum(1 for r in mine if r.status.value == "ok")
        promoted = sum(1 for r in mine if r.served_as is not None and r.served_as.rank < band.rank)
        rows.append(f"{band.value:8}{len(mine):>7}{ok:>6}{percentile(queue, 50):>9.0f}ms{percentile(queue, 95):>9.0f}ms"
                    f"{percentile(e2e, 50):>8.0f}ms{percentile(e2e, 95):>8.0f}ms{promoted:>10}")
    return "\n".join(rows)


async def _run(settings: WorkerSettings, topology: Topology, engine: Engine, docs: list[dict[str, Any]]) -> list[Reply]:
    worker = build_worker(settings, topology, engine)
    serving = asyncio.create_task(worker.run())
    while not worker.intake.assigned:  # group join; publishing earlier would count it as queueing
        if serving.done():
            return []
        await asyncio.sleep(0.05)
    started = time.monotonic()
    with Producer(settings, topology, on_quota="wait") as producer:
        for doc in docs:
            producer.submit(doc)
    expected: dict[str, int] = {}
    for doc in docs:
        expected[doc["tenant_id"]] = expected.get(doc["tenant_id"], 0) + 1

    def collect(tenant: str, count: int) -> list[Reply]:
        with ResultCollector(settings, topology, tenant) as collector:
            return list(collector.replies(expect=count, timeout=600))

    batches = await asyncio.gather(*(asyncio.to_thread(collect, t, n) for t, n in expected.items()))
    elapsed = time.monotonic() - started
    worker.request_stop()
    await serving
    replies = [r for batch in batches for r in batch]
    print(f"\n{len(replies)} of {len(docs)} requests answered in {elapsed:.1f}s "
          f"({len(replies) / elapsed:.1f} req/s) by worker {settings.worker_id}\n")
    return replies


def run_demo(settings: WorkerSettings, *, low: int, medium: int, high: int, out: Path | None = None) -> int:
    configure(level="WARNING")
    topology = settings.load_topology()
    docs = workload(topology, low, medium, high)
    with local_broker(settings, topology) as local:
        print(f"tierq demo: broker {local.bootstrap_servers}; starting the engine (about 20-40 s on a CPU)...")
        engine = Engine.start(engine_config(local, topology))
        try:
            replies = asyncio.run(_run(local, topology, engine, docs))
        finally:
            engine.shutdown()
    print(table(replies))
    print("\nqueue = submitted_at to admission; e2e = submitted_at to last token; "
          "promoted = admitted in a higher band by aging")
    if out is not None:
        out.write_bytes(b"".join(encode(r) + b"\n" for r in replies))
    return 0 if len(replies) == len(docs) else 1
