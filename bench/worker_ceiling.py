"""The worker's ceiling: requests/s one worker process sustains when the engine never limits it.

A backlog of tiny requests is published first; then one worker with a simulated engine so
fast it never waits (``speed`` 10^6: every step ~0) drains it. Reported per round: requests/s
from the first to the last reply, and the worker process's CPU per request (this process runs
nothing else while the worker drains; librdkafka's threads are counted: they are the worker's).
With ``--profile`` one more round runs under cProfile and its CPU is split by part: Kafka
intake, decode/validate (triage), admission, engine (simulated), reply build/encode/produce,
commit and the loop itself. cProfile slows everything; only the shares are used.

    python -m bench.worker_ceiling --requests 20000 --repeat 3 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import time
import uuid
from typing import Any

from bench.common import doc, figure_path, topology, write
from broker.embedded import EmbeddedBroker
from producer.client import Producer
from schemas.logs import configure
from worker.runner import settle_gc
from worker.service import build_worker
from worker.settings import SimulatedSettings, WorkerSettings
from worker.simulated import SimulatedEngine

#: which part of the worker a profiled function belongs to, by its file (first match wins)
PARTS = [
    ("intake (Kafka consume, pause/resume)", ("worker/intake.py", "cimpl.Consumer", "consume")),
    # before decode: pydantic's serializer (to_python) and model_construct belong to the reply
    ("reply build + encode", ("worker/reply_builder.py", "orjson.dumps", "model_dump", "to_python",
                              "model_construct")),
    ("decode + validate (triage)", ("worker/triage.py", "schemas/codec.py", "pydantic", "orjson.loads")),
    ("admission", ("worker/admission.py",)),
    ("engine (simulated)", ("worker/simulated.py",)),
    ("reply produce + delivery", ("worker/replies.py", "cimpl.Producer", "produce", "poll")),
    ("commit", ("worker/offsets.py", "commit")),
    ("poison guard (held-to markers)", ("worker/poison.py", "worker/attempts.py")),
]


async def drain(bootstrap: str, requests: int, slots: int, profile: cProfile.Profile | None) -> dict[str, Any]:
    topo = topology(bootstrap, low={"reserved_slots": 0}, medium={"reserved_slots": 0}, high={"reserved_slots": 0})
    settings = WorkerSettings(_env_file=None, bootstrap_servers=bootstrap, max_num_seqs=slots, engine_queue=0,
                              group_id=f"ceiling-{uuid.uuid4().hex[:8]}", worker_id="bench/ceiling",
                              session_timeout_ms=6000, engine="simulated",
                              simulated=SimulatedSettings(speed=1e6))
    with Producer(settings, topo, on_quota="off") as producer:
        batch = [doc("acme", "low", 1, text="hi") for _ in range(requests)]
        for document in batch:
            producer.submit(document)
        producer.flush(120)
    del batch
    settle_gc()  # as run_worker does once the engine is up, before it builds the worker
    worker = build_worker(settings, topo, SimulatedEngine.from_settings(settings))
    task = asyncio.get_running_loop().create_task(worker.run())
    while worker.served == 0:
        await asyncio.sleep(0.001)
    started, cpu_started = time.monotonic(), time.process_time()
    if profile is not None:
        profile.enable()
    first = worker.served
    while worker.served < requests:
        await asyncio.sleep(0.01)
    if profile is not None:
        profile.disable()
    elapsed, cpu = time.monotonic() - started, time.process_time() - cpu_started
    worker.request_stop()
    await task
    del worker, task
    gc.unfreeze()  # what settle_gc froze is this round's startup, not the next one's
    gc.collect()  # release this round's librdkafka handles: their threads would count in the next round's CPU
    served = requests - first
    return {"requests": served, "seconds": round(elapsed, 3), "requests_per_s": round(served / elapsed, 1),
            "worker_cpu_ms_per_request": round(cpu * 1000 / served, 4)}


def split(profile: cProfile.Profile) -> dict[str, float]:
    """Share of profiled own time per part (the rest is the asyncio loop and other code)."""
    stats = pstats.Stats(profile)
    totals: dict[str, float] = {name: 0.0 for name, _ in PARTS}
    totals["loop and other"] = 0.0
    for (filename, _line, function), (_cc, _nc, own, _cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{filename}:{function}"
        part = next((name for name, keys in PARTS if any(k in where for k in keys)), "loop and other")
        totals[part] += own
    whole = sum(totals.values()) or 1.0
    return {name: round(seconds / whole, 3) for name, seconds in totals.items()}


def plot(rounds: list[dict[str, Any]], shares: dict[str, float] | None, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if shares else 1, figsize=(11 if shares else 6, 4))
    axes = axes if shares else [axes]
    axes[0].bar(range(1, len(rounds) + 1), [r["requests_per_s"] for r in rounds], color="tab:blue")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("requests/s (one worker, simulated engine)")
    axes[0].set_title("worker ceiling")
    if shares:
        names = [n for n in shares if shares[n] > 0]
        axes[1].barh(names, [shares[n] * 100 for n in names], color="tab:orange")
        axes[1].set_xlabel("% of the worker's profiled CPU")
        axes[1].set_title("CPU by part")
    fig.tight_layout()
    fig.savefig(figure_path("worker_ceiling", tag))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--slots", type=int, default=256, help="simulated engine slots")
    p.add_argument("--profile", action="store_true", help="one more round under cProfile: CPU split by part")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    configure(level="WARNING")
    with EmbeddedBroker() as broker:
        rounds = [asyncio.run(drain(broker.bootstrap, args.requests, args.slots, None)) for _ in range(args.repeat)]
        shares = None
        if args.profile:
            profile = cProfile.Profile()
            asyncio.run(drain(broker.bootstrap, args.requests, args.slots, profile))
            shares = split(profile)
    rates = [r["requests_per_s"] for r in rounds]
    cpu = [r["worker_cpu_ms_per_request"] for r in rounds]
    per_part = ({name: round(share * statistics.median(cpu), 4) for name, share in shares.items()}
                if shares else None)
    write("worker_ceiling", args.tag, {
        "command": f"python -m bench.worker_ceiling --requests {args.requests} --repeat {args.repeat}"
                   + (" --profile" if args.profile else ""),
        "goal": ">= 5000 requests/s, worker CPU <= 0.2 ms per request",
        "requests_per_s_median": statistics.median(rates), "requests_per_s_rounds": rates,
        "worker_cpu_ms_per_request_median": statistics.median(cpu), "worker_cpu_ms_per_request_rounds": cpu,
        "cpu_ms_per_request_by_part": per_part, "rounds": rounds,
    })
    plot(rounds, shares, args.tag)


if __name__ == "__main__":
    main()
