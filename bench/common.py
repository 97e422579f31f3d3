"""Shared harness for the benchmarks: one engine, the embedded broker, a fresh topology per
phase, a worker on the same engine, and JSON + PNG output.

Every benchmark compares against a baseline measured in the same run on the same engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.topics import create_topics
from broker.embedded import EmbeddedBroker
from producer.client import Producer
from producer.collector import ResultCollector
from schemas.logs import configure
from schemas.messages import Reply
from schemas.tenants import load_topology
from schemas.topology import Topology
from worker.engine import Engine, EngineConfig
from worker.service import build_worker
from worker.settings import WorkerSettings
from worker.tinymodel import make_tiny_model

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", help="model path or name (default: the tiny local test model)")
    p.add_argument("--slots", type=int, default=8, help="engine slots (max_num_seqs)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: an embedded broker)")
    p.add_argument("--tag", default="cpu", help="suffix of the result files, e.g. cpu or h100")
    return p


def machine() -> str:
    return f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"


@contextmanager
def stack(args: argparse.Namespace) -> Iterator[tuple[Engine, str]]:
    """The engine and a broker address for the whole benchmark run."""
    configure(level="WARNING")
    if args.model:
        config = EngineConfig(model=args.model, max_num_seqs=args.slots)
    else:
        model = str(make_tiny_model(Path(".tierq/tiny-model")))
        config = EngineConfig(model=model, dtype="float32", max_model_len=512, max_num_seqs=args.slots,
                              extra={"enforce_eager": True})
    engine = Engine.start(config)
    try:
        if args.bootstrap:
            yield engine, args.bootstrap
        else:
            with EmbeddedBroker() as broker:
                yield engine, broker.bootstrap
    finally:
        engine.shutdown()


def for_each_thread(pid: int, apply: Callable[[int], object]) -> None:
    """``apply(thread id)`` for every thread of process ``pid`` (placement and niceness are per
    thread on Linux); a thread that ended meanwhile is skipped."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            apply(int(thread))
        except OSError:  # ProcessLookupError included
            pass


def keep_off_model_cores(engine_core_with_model: bool = False) -> dict[str, list[int]]:
    """Move this process (every thread) and its children, except vLLM's model process, off the
    cores vLLM's CPU backend binds the model to; processes started later inherit it.
    ``engine_core_with_model``: put vLLM's engine core (the scheduler loop) on the model's cores
    instead, so that nothing else (worker, broker, load) delays its turn between two model steps.

    vLLM pins its model process (``VLLM::Worker``) to its cores, but everything else (the engine
    core's scheduler loop, our event loop, the broker) floats, and on a small machine lands on the
    model's core now and then, which slows the model for everybody. Applied before both phases of a
    comparison, so both run with the same placement. Returns the placement (empty if nothing to do).
    """
    import psutil  # a vLLM dependency

    me = psutil.Process()
    children = me.children(recursive=True)
    model = [c for c in children if c.name().startswith("VLLM::Worker")]
    if not model:
        return {}
    model_cpus = set(os.sched_getaffinity(model[0].pid))
    rest = set(os.sched_getaffinity(0)) - model_cpus
    if not rest:
        return {}
    core = [c for c in children if c.name().startswith("VLLM::EngineCore")] if engine_core_with_model else []
    for process in [me] + [c for c in children if c.pid != model[0].pid]:
        cpus = model_cpus if any(process.pid == c.pid for c in core) else rest
        for_each_thread(process.pid, lambda tid: os.sched_setaffinity(tid, cpus))
    placement = {"model_cpus": sorted(model_cpus), "other_cpus": sorted(rest)}
    if core:
        placement["engine_core_cpus"] = sorted(model_cpus)
    return placement


def topology(bootstrap: str, **band_changes: dict[str, Any]) -> Topology:
    """topics.yaml with fresh topic names (one phase's data never meets another's)."""
    document = load_topology("topics.yaml").with_topic_prefix(f"bench{uuid.uuid4().hex[:8]}").model_dump(mode="json")
    for band, values in band_changes.items():
        document["bands"][band].update(values)
    for tenant in document["tenants"].values():
        tenant["quotas"] = {}
    result = Topology.model_validate(document)
    create_topics(WorkerSettings(_env_file=None, bootstrap_servers=bootstrap), result)
    return result


class Phase:
    """A worker on the shared engine serving one topology, plus publishing helpers."""

    def __init__(self, engine: Engine, bootstrap: str, topo: Topology, slots: int, **worker_settings: Any):
        self.settings = WorkerSettings(_env_file=None, bootstrap_servers=bootstrap, max_num_seqs=slots,
                                       group_id=f"bench-{uuid.uuid4().hex[:8]}", worker_id="bench/worker",
                                       session_timeout_ms=6000, **worker_settings)
        self.topology = topo
        self.worker = build_worker(self.settings, topo, engine)
        self.producer = Producer(self.settings, topo, on_quota="off")
        self._task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> Phase:
        self._task = asyncio.get_running_loop().create_task(self.worker.run())
        await asyncio.to_thread(self.producer.connect)
        while not self.worker.intake.assigned:
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.producer.close()
        self.worker.request_stop()
        self.worker.request_stop()
        assert self._task is not None
        await self._task

    def publish(self, docs: list[dict[str, Any]]) -> list[str]:
        futures = [self.producer.submit(doc) for doc in docs]
        self.producer.flush(60)
        return [f.result(timeout=60).request_id for f in futures]

    async def collect(self, tenant: str, expect: int, timeout: float = 1800) -> list[Reply]:
        def read() -> list[Reply]:
            with ResultCollector(self.settings, self.topology, tenant) as collector:
                return list(collector.replies(expect=expect, timeout=timeout))

        replies = await asyncio.to_thread(read)
        if len(replies) < expect:
            raise RuntimeError(f"only {len(replies)} of {expect} replies for {tenant}")
        return replies


def doc(tenant: str, priority: str, max_tokens: int, text: str = "The quick brown fox") -> dict[str, Any]:
    return {"tenant_id": tenant, "priority": priority, "prompt": text,
            "params": {"max_tokens": max_tokens, "temperature": 0.0}}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)


def summary(replies: list[Reply]) -> dict[str, Any]:
    queue = [r.timing.queue_ms for r in replies if r.timing.queue_ms is not None]
    e2e = [r.timing.e2e_ms for r in replies if r.timing.e2e_ms is not None]
    kafka = [(r.timing.received_at - r.timing.submitted_at).total_seconds() * 1000
             for r in replies if r.timing.received_at and r.timing.submitted_at]
    buffered = [(r.timing.dequeued_at - r.timing.received_at).total_seconds() * 1000
                for r in replies if r.timing.received_at and r.timing.dequeued_at]
    return {"count": len(replies), "queue_ms_p50": pct(queue, 50), "queue_ms_p99": pct(queue, 99),
            # queue = time in Kafka until the worker fetched it + time in the worker's buffer
            "in_kafka_ms_p99": pct(kafka, 99), "in_worker_buffer_ms_p99": pct(buffered, 99),
            "queue_ms_max": round(max(queue), 1) if queue else None,
            "e2e_ms_p50": pct(e2e, 50), "e2e_ms_p99": pct(e2e, 99),
            "queue_ms_mean": round(statistics.fmean(queue), 1) if queue else None}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def write(name: str, tag: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{tag}.json"
    result = {"bench": name, "machine": machine(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def figure_path(name: str, tag: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}-{tag}.png"


async def wait_until_ready(url: str, timeout_s: float = 60.0) -> None:
    """Poll a gateway's /readyz until it answers 200; TimeoutError after ``timeout_s``."""
    import httpx  # the test and bench extras have it; the gateway itself does not need it

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=url) as probe:
        while time.monotonic() < deadline:
            try:
                if (await probe.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"gateway at {url} did not become ready within {timeout_s:g} s")
