"""Overhead of the Kafka path: N requests through producer -> Kafka -> worker -> reply topic,
against the same prompts submitted straight into the same engine, in the same run.

    .venv/bin/python -m bench.overhead --requests 1000 --out bench/results/overhead-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import uuid
import time
from pathlib import Path

from producer.admin import create_topics
from producer.broker import EmbeddedBroker
from producer.client import Producer
from producer.collector import ResultCollector
from schemas.messages import Request, utc_now
from schemas.logs import configure
from schemas.topology import load_topology
from worker.engine import Engine, EngineConfig
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
    parser.add_argument("--engine-queue", type=int, default=None, help="worker engine_queue (default: the setting's)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of direct-then-tierq; the median is reported")
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead-cpu.json"))
    args = parser.parse_args()
    configure(level="WARNING")
    global engine_slots_plus_queue
    engine_slots_plus_queue = args.slots + 2
    model = str(make_tiny_model(Path(".tierq/tiny-model")))
    engine = Engine.start(EngineConfig(model=model, dtype="float32", max_model_len=512, max_num_seqs=args.slots,
                                       extra={"enforce_eager": True}))
    docs = documents(args.requests, args.max_tokens)
    rounds = []
    with EmbeddedBroker() as broker:
        extra = {} if args.engine_queue is None else {"engine_queue": args.engine_queue}
        settings = WorkerSettings(_env_file=None, bootstrap_servers=broker.bootstrap, max_num_seqs=args.slots, **extra)
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(direct(engine, docs[:50]))  # warm-up
            for round_ in range(args.repeat):  # alternate, so drift hits both sides alike
                topology = load_topology("topics.yaml").with_topic_prefix(f"overhead{round_}-{uuid.uuid4().hex[:6]}")
                create_topics(settings, topology)
                cpu = time.process_time()
                direct_s, direct_tokens = loop.run_until_complete(direct(engine, docs))
                direct_cpu, cpu = time.process_time() - cpu, time.process_time()
                kafka_s, kafka_tokens = loop.run_until_complete(through_kafka(settings, topology, engine, docs))
                kafka_cpu = time.process_time() - cpu
                rounds.append({"direct_s": round(direct_s, 3), "tierq_s": round(kafka_s, 3),
                               "direct_tokens": direct_tokens, "tierq_tokens": kafka_tokens,
                               "direct_cpu_s": round(direct_cpu, 3), "tierq_cpu_s": round(kafka_cpu, 3),
                               "ratio": round(direct_s / kafka_s, 3)})
                print(rounds[-1], flush=True)
        finally:
            loop.close()
    engine.shutdown()
    best = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]  # the median round
    n = args.requests
    result = {
        "bench": "overhead", "machine": f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs",
        "requests": n, "max_tokens": args.max_tokens, "slots": args.slots, "engine_queue": settings.engine_queue,
        "median_round": {
            "direct": {"req_per_s": round(n / best["direct_s"], 1),
                       "tokens_per_s": round(best["direct_tokens"] / best["direct_s"], 1)},
            "tierq": {"req_per_s": round(n / best["tierq_s"], 1),
                      "tokens_per_s": round(best["tierq_tokens"] / best["tierq_s"], 1)},
            "ratio_req_per_s": best["ratio"],
        },
        # CPU time of this process per request: the engine client, plus for tierq the worker,
        # producer and result collector (the engine core runs in its own process)
        "extra_cpu_ms_per_request": round(statistics.median(
            (r["tierq_cpu_s"] - r["direct_cpu_s"]) * 1000 / n for r in rounds), 3),
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
