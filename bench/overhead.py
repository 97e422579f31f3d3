"""Overhead of the Kafka path: N requests through producer -> Kafka -> worker -> reply topic,
against the same prompts submitted straight into the same engine, in the same run.

    .venv/bin/python -m bench.overhead --requests 1000 --out bench/results/overhead-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

from producer.admin import create_topics
from producer.broker import EmbeddedBroker
from producer.client import Producer
from producer.collector import ResultCollector
from schemas.messages import Request, utc_now
from schemas.topology import load_topology
from worker.engine import Engine, EngineConfig
from schemas.logs import configure
from worker.service import Worker
from worker.settings import WorkerSettings
from worker.tinymodel import make_tiny_model


def documents(n: int, max_tokens: int) -> list[dict]:
    return [{"tenant_id": "acme", "priority": "low", "prompt": f"Request {i}: the quick brown fox",
             "params": {"max_tokens": max_tokens, "temperature": 0.0}} for i in range(n)]


async def direct(engine: Engine, docs: list[dict]) -> tuple[float, int]:
    requests = [Request.model_validate({**d, "request_id": f"direct-{i}", "submitted_at": utc_now()})
                for i, d in enumerate(docs)]
    sem = asyncio.Semaphore(engine_slots_plus_queue)
    tokens = 0

    async def one(request: Request) -> None:
        nonlocal tokens
        async with sem:
            completion = await engine.generate(request, engine.render(request), priority=2)
            tokens += completion.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    return time.perf_counter() - start, tokens


async def through_kafka(settings: WorkerSettings, topology, engine: Engine, docs: list[dict]) -> tuple[float, int]:
    worker = Worker(settings, topology, engine)
    serving = asyncio.create_task(worker.run())
    while not worker.intake.assigned:
        await asyncio.sleep(0.05)
    start = time.perf_counter()
    with Producer(settings, topology, on_quota="off") as producer:
        for doc in docs:
            producer.submit(doc)

    def collect() -> list:
        with ResultCollector(settings, topology, "acme") as collector:
            return list(collector.replies(expect=len(docs), timeout=900))

    replies = await asyncio.to_thread(collect)
    elapsed = time.perf_counter() - start
    worker.request_stop()
    await serving
    assert len(replies) == len(docs), f"only {len(replies)} of {len(docs)} replies"
    return elapsed, sum(r.usage.completion_tokens for r in replies)


engine_slots_plus_queue = 18


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead-cpu.json"))
    args = parser.parse_args()
    configure(level="WARNING")
    global engine_slots_plus_queue
    engine_slots_plus_queue = args.slots + 2
    model = str(make_tiny_model(Path(".tierq/tiny-model")))
    engine = Engine.start(EngineConfig(model=model, dtype="float32", max_model_len=512, max_num_seqs=args.slots,
                                       extra={"enforce_eager": True}))
    docs = documents(args.requests, args.max_tokens)
    with EmbeddedBroker() as broker:
        settings = WorkerSettings(_env_file=None, bootstrap_servers=broker.bootstrap, max_num_seqs=args.slots)
        topology = load_topology("topics.yaml")
        create_topics(settings, topology)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(direct(engine, docs[:50]))  # warm-up
            direct_s, direct_tokens = loop.run_until_complete(direct(engine, docs))
            kafka_s, kafka_tokens = loop.run_until_complete(through_kafka(settings, topology, engine, docs))
        finally:
            loop.close()
    engine.shutdown()
    result = {
        "bench": "overhead", "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "requests": args.requests, "max_tokens": args.max_tokens, "slots": args.slots,
        "direct": {"seconds": round(direct_s, 3), "req_per_s": round(args.requests / direct_s, 1),
                   "tokens_per_s": round(direct_tokens / direct_s, 1)},
        "tierq": {"seconds": round(kafka_s, 3), "req_per_s": round(args.requests / kafka_s, 1),
                  "tokens_per_s": round(kafka_tokens / kafka_s, 1)},
        "ratio_req_per_s": round(direct_s / kafka_s, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
