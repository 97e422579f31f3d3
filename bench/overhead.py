"""Overhead of the Kafka path: N requests through producer -> Kafka -> worker -> reply topic,
against the same prompts submitted straight into the same engine, in the same run.

Both sides may keep the same number of requests in the engine (slots + engine queue). The
shipped topics.yaml reserves 3 slots for high and medium work, which a low-only workload
cannot use; that is the price of priority isolation, not of the Kafka path, so this bench
zeroes the reservations unless ``--keep-reserved`` is given (then it measures both costs).

Two ratios per round: end to end (first request sent to last reply read, so it includes the
pipeline's fill and drain latency) and steady state (completions per second between the 10th and
the 90th percentile completion, the sustained rate). Unless ``--no-pin``, everything but vLLM's
model process is kept off the model's cores for both phases (``bench.common.keep_off_model_cores``).

Where the time goes, per phase of every round (``bench.diag``): the engine's own steps from vLLM's
scheduler stats (steps per request, sequences per step, requests inside the engine over time),
the worker loop's turns per request, and CPU by process (this process split by thread group,
vLLM's engine core and model processes, broker, load) and by core. ``--hog N`` runs N busy loops
on every core beside both phases, the contention a shared machine brings.

    .venv/bin/python -m bench.overhead --requests 1000 --out bench/results/overhead-cpu.json
    .venv/bin/python -m bench.overhead --requests 300 --repeat 3 --hog 1 --out bench/results/overhead-cpu-diag-hog.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import for_each_thread, keep_off_model_cores, topology
from bench.diag import CpuMeter, EngineSteps, start_hogs, stop_hogs
from bench.poolkit import git_head, machine_info, other_processes
from broker.embedded import EmbeddedBroker
from producer.client import Producer
from producer.collector import ResultCollector
from schemas.logs import configure
from schemas.messages import Request, utc_now
from schemas.settings import Settings
from schemas.topology import Topology
from worker.engine import Engine, EngineConfig
from worker.service import build_worker
from worker.settings import WorkerSettings
from worker.tinymodel import make_tiny_model


def documents(n: int, max_tokens: int) -> list[dict]:
    return [{"tenant_id": "acme", "priority": "low", "prompt": f"Request {i}: the quick brown fox",
             "params": {"max_tokens": max_tokens, "temperature": 0.0}} for i in range(n)]


def steady_rate(finish_times: list[float]) -> float:
    """Completions per second between the 10th and 90th percentile completion."""
    times = sorted(finish_times)
    lo, hi = len(times) // 10, (len(times) * 9) // 10 - 1
    return (hi - lo) / (times[hi] - times[lo])


async def direct(engine: Engine, docs: list[dict], concurrency: int) -> tuple[float, int, list[float]]:
    """The same prompts straight into the engine, at most ``concurrency`` (the worker's capacity) at once."""
    requests = [Request.model_validate({**d, "request_id": f"direct-{i}", "submitted_at": utc_now()})
                for i, d in enumerate(docs)]
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    finished: list[float] = []

    async def one(request: Request) -> None:
        nonlocal tokens
        async with sem:
            completion = await engine.generate(request, engine.render(request), priority=2)
            tokens += completion.completion_tokens
            finished.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    return time.perf_counter() - start, tokens, finished


def _load(bootstrap: str, topology_doc: dict, docs: list[dict], ready: Any, go: Any, results: Any) -> None:
    """The producer and the result collector, in their own process so that the worker's CPU is
    measured alone: publish every request, then read every reply; report time and own CPU."""
    settings = Settings(_env_file=None, bootstrap_servers=bootstrap)
    topology = Topology.model_validate(topology_doc)
    with Producer(settings, topology, on_quota="off") as producer, \
            ResultCollector(settings, topology, "acme") as collector:
        producer.connect()
        ready.set()
        go.wait()
        cpu, start = time.process_time(), time.perf_counter()
        for doc in docs:
            producer.submit(doc)
        producer.flush(120)
        replies, arrived = [], []
        for reply in collector.replies(expect=len(docs), timeout=900):
            replies.append(reply)
            arrived.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    results.put((elapsed, len(replies), sum(r.usage.completion_tokens for r in replies), cpu, arrived))


async def through_kafka(settings: WorkerSettings, topology: Topology, engine: Engine, docs: list[dict],
                        broker: EmbeddedBroker, meter: CpuMeter,
                        steps: EngineSteps) -> tuple[float, int, dict[str, float], list[float], dict[str, Any]]:
    """Requests through Kafka and the worker; returns (seconds, output tokens, CPU seconds by part,
    reply arrival times, diagnostics), CPU counted from the first request on (not the worker's start
    and group join)."""
    worker = build_worker(settings, topology, engine)
    serving = asyncio.create_task(worker.run())
    spawn = multiprocessing.get_context("spawn")
    ready, go, results = spawn.Event(), spawn.Event(), spawn.Queue()
    load = spawn.Process(target=_load, args=(settings.bootstrap_servers, topology.model_dump(mode="json"), docs,
                                             ready, go, results), daemon=True)
    load.start()
    meter.load_pid = load.pid
    while not (worker.intake.assigned and ready.is_set()):
        assert load.is_alive(), "the load process died"
        await asyncio.sleep(0.05)
    before = cpu_seconds(broker)
    detail = meter.read()
    turns, timer_turns, admit_turns = worker.turns, worker.timer_turns, worker.admit_turns
    first_step, t0 = steps.mark(), time.perf_counter()
    go.set()
    elapsed, answered, tokens, load_cpu, arrived = await asyncio.to_thread(results.get, True, 900)
    last_step = steps.mark()
    cpu = cpu_used_since(before, broker)
    detail = CpuMeter.since(detail, meter.read())
    n = len(docs)
    diag = {"loop": {"turns": worker.turns - turns, "turns_per_request": round((worker.turns - turns) / n, 2),
                     "timer_woken_share": round((worker.timer_turns - timer_turns) / max(1, worker.turns - turns), 3),
                     "admitting_turns": worker.admit_turns - admit_turns,
                     "admitted_per_admitting_turn": round(n / max(1, worker.admit_turns - admit_turns), 2)},
            "engine": steps.summary(first_step, last_step, n, t0, settings.max_num_seqs),
            "cpu": detail}
    load.join(30)
    worker.request_stop()
    await serving
    assert answered == len(docs), f"only {answered} of {len(docs)} replies"
    return elapsed, tokens, {**cpu, "load": round(load_cpu, 3)}, arrived, diag


def plot(rounds: list[dict[str, Any]], median: dict[str, Any], out: Path) -> None:
    """Completions over time in the median round (direct vs tierq), and each round's ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for key, label in (("direct_done", "straight into vLLM"), ("tierq_done", "through Kafka + worker")):
        times = sorted(median[key])
        left.plot(times, range(1, len(times) + 1), label=label)
    left.set_xlabel("seconds since the first request")
    left.set_ylabel("requests completed")
    left.set_title("median round")
    left.legend()
    x = range(1, len(rounds) + 1)
    right.plot(x, [r["ratio"] for r in rounds], "o-", label="end to end")
    right.plot(x, [r["steady_ratio"] for r in rounds], "s-", label="steady state")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_xlabel("round")
    right.set_ylabel("tierq / direct requests per second")
    right.set_title("every round")
    right.legend()
    fig.suptitle("tierq overhead: same prompts, same engine, same run")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def cpu_seconds(broker: EmbeddedBroker) -> dict[str, float]:
    """CPU time so far of this process, of the engine's processes (vLLM's engine core and model
    process: not the load process or the hogs, also children of this one) and of the broker."""
    import psutil  # a vLLM dependency

    def used(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return times.user + times.system

    def is_engine(process: psutil.Process) -> bool:
        try:
            return process.name().startswith("VLLM::")
        except psutil.Error:
            return False

    me = psutil.Process()
    broker_pid = broker.pid
    children = [c for c in me.children(recursive=True) if c.pid != broker_pid and is_engine(c)]
    return {"client": used(me), "engine": sum(used(c) for c in children),
            "broker": used(psutil.Process(broker_pid)) if broker_pid else 0.0}


def cpu_used_since(before: dict[str, float], broker: EmbeddedBroker) -> dict[str, float]:
    """CPU seconds by part since ``before`` (a ``cpu_seconds`` reading)."""
    after = cpu_seconds(broker)
    return {part: round(after[part] - before[part], 3) for part in before}


def _per_request_ms(cpu: dict[str, Any], n: int) -> dict[str, float]:
    return {role: round(s * 1000 / n, 3) for role, s in cpu["by_role_s"].items()}


def brief(round_: dict[str, Any], n: int) -> dict[str, Any]:
    """One line per round: batch, steps, in-engine, loop turns and CPU ms per request, both phases."""
    out: dict[str, Any] = {}
    for side in ("direct", "tierq"):
        d = round_[f"{side}_diag"]
        e = d["engine"]
        out[side] = {"batch": e.get("batch_mean"), "steps/req": e.get("steps_per_request"),
                     "in_engine": e.get("in_engine_mean"), "step_ms": e.get("step_ms_p50"),
                     "cpu_ms/req": {k: v for k, v in _per_request_ms(d["cpu"], n).items() if v >= 0.01}}
        if "loop" in d:
            out[side]["turns/req"] = d["loop"]["turns_per_request"]
    return out


def diagnosis(rounds: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Medians over rounds of the per-phase diagnostics, side by side."""
    med = statistics.median
    result: dict[str, Any] = {}
    for side in ("direct", "tierq"):
        diags = [r[f"{side}_diag"] for r in rounds]
        engine = {key: med(d["engine"][key] for d in diags)
                  for key in ("steps_per_request", "batch_mean", "batch_mean_nonempty", "batch_full_share",
                              "in_engine_mean", "waiting_mean", "step_ms_mean", "step_ms_p50")
                  if all(d["engine"].get(key) is not None for d in diags)}
        roles = sorted({role for d in diags for role in d["cpu"]["by_role_s"]})
        cpu = {role: round(med(d["cpu"]["by_role_s"].get(role, 0.0) * 1000 / n for d in diags), 3) for role in roles}
        cores = [round(med(d["cpu"]["core_busy_share"][i] for d in diags), 3)
                 for i in range(len(diags[0]["cpu"]["core_busy_share"]))]
        result[side] = {"engine": engine, "cpu_ms_per_request": cpu, "core_busy_share": cores}
        if side == "tierq":
            result[side]["loop"] = {key: med(d["loop"][key] for d in diags)
                                    for key in ("turns_per_request", "timer_woken_share",
                                                "admitted_per_admitting_turn")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--engine-queue", type=int, default=None, help="worker engine_queue (default: the setting's)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of direct-then-tierq; the median is reported")
    parser.add_argument("--keep-reserved", action="store_true",
                        help="keep topics.yaml's reserved slots (low work then gets fewer engine slots than direct)")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave process placement to the OS (see bench.common.keep_off_model_cores)")
    parser.add_argument("--engine-core-with-model", action="store_true",
                        help="pin vLLM's engine core (scheduler) to the model's cores, the rest elsewhere")
    parser.add_argument("--no-engine-stats", action="store_true",
                        help="no vLLM stat logger (the engine then skips its per-step stats; no step figures)")
    parser.add_argument("--hog", type=int, default=0, metavar="N",
                        help="run N busy-loop processes (on every core) beside both phases: CPU contention")
    parser.add_argument("--broker-nice", type=int, default=0, metavar="N",
                        help="run the broker at this niceness (the engine's scheduler loop then takes the shared core first)")
    parser.add_argument("--broker-with-model", action="store_true",
                        help="pin the broker to the model's cores instead of the others (an experiment: can the model's "
                             "waits between steps absorb the broker? measured 0.648 on 2 cores, see README)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead-cpu.json"))
    args = parser.parse_args()
    if args.broker_with_model and args.no_pin:
        parser.error("--broker-with-model places the broker on the model's cores; it needs the pinning --no-pin turns off")
    configure(level="WARNING")
    machine_at_start = machine_info()
    others_at_start = other_processes()
    model = str(make_tiny_model(Path(".tierq/tiny-model")))
    steps = EngineSteps()
    engine = Engine.start(EngineConfig(model=model, dtype="float32", max_model_len=512, max_num_seqs=args.slots,
                                       extra={"enforce_eager": True}),
                          stat_loggers=None if args.no_engine_stats else [steps.factory()])
    placement = {} if args.no_pin else keep_off_model_cores(args.engine_core_with_model)
    hogs = start_hogs(args.hog)  # after the pinning: they may run on every core
    docs = documents(args.requests, args.max_tokens)
    rounds = []
    with EmbeddedBroker() as broker:
        meter = CpuMeter(broker.pid)
        if args.broker_nice and broker.pid:
            for_each_thread(broker.pid, lambda tid: os.setpriority(os.PRIO_PROCESS, tid, args.broker_nice))
        if args.broker_with_model and broker.pid and placement:
            for_each_thread(broker.pid, lambda tid: os.sched_setaffinity(tid, placement["model_cpus"]))
            placement = {**placement, "broker_cpus": placement["model_cpus"]}
        meter.hog_pids = {h.pid for h in hogs}
        extra = {} if args.engine_queue is None else {"engine_queue": args.engine_queue}
        settings = WorkerSettings(_env_file=None, bootstrap_servers=broker.bootstrap, max_num_seqs=args.slots, **extra)
        capacity = args.slots + settings.engine_queue  # what the worker may keep in the engine
        # reservations kept free for high/medium work are not the Kafka path's cost (see above)
        band_changes = {} if args.keep_reserved else {b: {"reserved_slots": 0} for b in ("high", "medium", "low")}
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(direct(engine, docs[:50], capacity))  # warm-up
            for round_ in range(args.repeat):  # alternate, so drift hits both sides alike
                load_before = [round(x, 2) for x in os.getloadavg()]
                topo = topology(broker.bootstrap, **band_changes)  # fresh topics each round
                before = cpu_seconds(broker)
                detail = meter.read()
                first_step, t0 = steps.mark(), time.perf_counter()
                direct_s, direct_tokens, direct_done = loop.run_until_complete(direct(engine, docs, capacity))
                direct_cpu = cpu_used_since(before, broker)
                direct_diag = {"engine": steps.summary(first_step, steps.mark(), len(docs), t0, args.slots),
                               "cpu": CpuMeter.since(detail, meter.read())}
                kafka_s, kafka_tokens, kafka_cpu, kafka_done, kafka_diag = loop.run_until_complete(
                    through_kafka(settings, topo, engine, docs, broker, meter, steps))
                direct_steady, kafka_steady = steady_rate(direct_done), steady_rate(kafka_done)
                rounds.append({"direct_s": round(direct_s, 3), "tierq_s": round(kafka_s, 3),
                               "direct_tokens": direct_tokens, "tierq_tokens": kafka_tokens,
                               "direct_cpu_s": direct_cpu, "tierq_cpu_s": kafka_cpu,
                               "ratio": round(direct_s / kafka_s, 3),
                               "direct_steady_rps": round(direct_steady, 1),
                               "tierq_steady_rps": round(kafka_steady, 1),
                               "steady_ratio": round(kafka_steady / direct_steady, 3),
                               "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                               "direct_diag": direct_diag, "tierq_diag": kafka_diag,
                               "direct_done": direct_done, "tierq_done": kafka_done})
                print({k: v for k, v in rounds[-1].items() if not k.endswith(("_done", "_diag"))}, flush=True)
                print(" ", brief(rounds[-1], len(docs)), flush=True)
        finally:
            loop.close()
            stop_hogs(hogs)
    engine.shutdown()
    best = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]  # the median round
    n = args.requests
    result = {
        "bench": "overhead", "machine": f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs",
        "requests": n, "max_tokens": args.max_tokens, "slots": args.slots, "engine_queue": settings.engine_queue,
        "reserved_slots": "topics.yaml" if args.keep_reserved else 0, "placement": placement or "os",
        "broker_nice": args.broker_nice,
        # TIERQ_FETCH_WAIT_MS / TIERQ_CONTROL_FETCH_WAIT_MS / TIERQ_ATTEMPTS_FETCH_WAIT_MS: the idle consumers' polling is most of the broker's CPU
        "fetch_wait_ms": {band.value: ms for band, ms in settings.fetch_wait_ms.items()},
        "control_fetch_wait_ms": settings.control_fetch_wait_ms,
        "attempts_fetch_wait_ms": settings.attempts_fetch_wait_ms,
        "median_round": {
            "direct": {"req_per_s": round(n / best["direct_s"], 1),
                       "tokens_per_s": round(best["direct_tokens"] / best["direct_s"], 1)},
            "tierq": {"req_per_s": round(n / best["tierq_s"], 1),
                      "tokens_per_s": round(best["tierq_tokens"] / best["tierq_s"], 1)},
            "ratio_req_per_s": best["ratio"],
        },
        "ratio_req_per_s_median": statistics.median(r["ratio"] for r in rounds),
        "steady_ratio_median": statistics.median(r["steady_ratio"] for r in rounds),
        # CPU seconds per phase: "client" = this process (the engine client; for tierq also the
        # worker), "engine" = vLLM's engine core and model processes, "broker"; the producer and
        # collector run in a process of their own ("load", reported for tierq only)
        "extra_cpu_ms_per_request": {
            part: round(statistics.median((r["tierq_cpu_s"][part] - r["direct_cpu_s"][part]) * 1000 / n
                                          for r in rounds), 3)
            for part in ("client", "engine", "broker")},
        "load_cpu_ms_per_request": round(statistics.median(r["tierq_cpu_s"]["load"] * 1000 / n for r in rounds), 3),
        "engine_stats": not args.no_engine_stats, "hogs": args.hog, "hog_placement": "every core" if args.hog else None,
        "machine_info": machine_at_start, "git": git_head(),
        "other_processes_at_start": others_at_start, "other_processes_at_end": other_processes(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        # medians over rounds, direct vs tierq: see bench.diag and README "Where the Kafka path's time goes"
        "diagnosis": diagnosis(rounds, n),
        "rounds": [{k: v for k, v in r.items() if not k.endswith("_done")} for r in rounds],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(rounds, best, args.out.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing (scripts/setup bench): no plot")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
