"""The pool as one scheduler: N worker processes on simulated engines against the embedded broker,
published through the plain ``Producer`` (so whatever routing it does is what is measured).

Scenarios (issue 11), each with its goal, pass/fail, CPU use of workers, broker and this process
next to its figures, a JSON and a PNG under bench/results/pool-<scenario>-<tag>.*:

  scale      one tenant's low backlog, N = 1, 2, 4 (8 with --full) workers: pool output tokens/s
             over N x one worker's (measured at N = 1 in the same run); goal >= 0.9 at N = 4
  mix        three tenants at 80 / 15 / 5 % of a backlog, N = 4: share of the pool's capacity used; >= 0.9
  hetero     N = 4, one at half speed: time to drain a fixed load over the capacity-weighted ideal; <= 1.15
  priority   N = 4: a trickle as high on the idle pool, then over a low backlog of >= 10x the pool's
             in-flight capacity: high queue p99 over the idle pool's, <= 1.5; FIFO baseline (the same
             trickle published as low, behind the backlog) alongside
  fairness   N = 4: a tenant sending at a quarter of the pool's capacity alone, then while another
             floods at 10x its rate (2.5x the capacity): its median queue time over its time alone, <= 2
  burst      N = 4: the first wave instead: a tenant's burst of 2x the pool's in-flight slots alone, then
             with another tenant's 10x burst at the same moment; reported (equal shares cannot keep a
             burst this small within 2x: bench.pool_fairness_model)
  events     3 workers + 1 joining under a saturating stream: the new worker serves its share (1/4 of
             the pool's output over the last 3 s) within its group join time (until the low band's group
             gave it a quarter of the low partitions) + 5 s; then one worker SIGTERMed and one SIGKILLed
             under half load: every request of the run answered
  cost       the Kafka path's own CPU per request (workers and broker), against the simulated engine
             alone on the same load

The engines are slow (``--speed`` x an H100, ``--slots`` sequences) so that the pool, not the
2-core machine, is what is measured; token counts vary per request (0.5x to 1.5x ``--tokens``) so
engines do not run in lockstep. Throughput is counted in output tokens per second from each
reply's first and last token times, which is exact at window edges where request counts jump.

    .venv/bin/python -m bench.pool --quick        # ~6 minutes on the 2-core machine (9 pools to start)
    .venv/bin/python -m bench.pool                # ~10 minutes
    .venv/bin/python -m bench.pool --quick --key-hash --tag cpu-keyhash   # Kafka's key hash, to compare
    .venv/bin/python -m bench.pool --quick --only fairness --no-preempt --tag cpu-nopreempt   # workers without preemption
    .venv/bin/python -m bench.pool --quick --only burst --fairness-burst 8 --tag cpu-burst8    # a burst of 8x the slots
    .venv/bin/python -m bench.pool --only scale,mix --full
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.poolkit import (
    TENANTS, Bench, CpuMeter, EngineShape, Pool, WorkerProcess, by_worker, ceil, git_head, machine_info,
    in_flight_mean, other_processes, partitions_by_worker, partitions_used, queue_stats, ratio, token_times, tokens_between, ts,
    with_censored,
)
from broker.embedded import EmbeddedBroker
from producer.client import Producer
from producer.collector import ResultCollector
from schemas.logs import configure
from schemas.messages import Band, Reply

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("scale", "mix", "hetero", "priority", "fairness", "burst", "events", "cost")
NO_RESERVE = {"high": {"reserved_slots": 0}, "medium": {"reserved_slots": 0}, "low": {"reserved_slots": 0}}
NO_AGING = {"medium": {"aging_step_s": None}, "low": {"aging_step_s": None}}
HETERO_PUBLISH_X = 1.5
PRIORITY_INTERVAL_S = 0.25
COST_SPEED, COST_SLOTS = 4.0, 32  # fast engines: the Kafka path, not the engine, bounds the rate
MIX = (("acme", 0.80), ("globex", 0.15), ("initech", 0.05))
FAIRNESS_SMALL_SHARE = 0.25  # globex's rate in the fairness scenario, x the pool's capacity (half its fair share)


@dataclass
class Params:
    window_s: float
    warm_s: float
    hetero_s: float
    trickle_s: float
    fifo_wait_s: float
    fairness_s: float  # globex's sending time in the fairness scenario, alone and with the flood
    fairness_burst: float  # in pool in-flight capacities
    flood_wait_s: float  # the pool is stopped this long after the flood at the latest
    join_stream_s: float  # least seconds of the saturating stream while a worker joins
    loss_stream_s: float  # then half load while one worker is SIGTERMed and one SIGKILLed
    cost_requests: int


QUICK = Params(window_s=6, warm_s=2, hetero_s=10, trickle_s=10, fifo_wait_s=6, fairness_s=12, fairness_burst=2, flood_wait_s=30,
               join_stream_s=8, loss_stream_s=12, cost_requests=2000)
DEFAULT = Params(window_s=20, warm_s=2, hetero_s=30, trickle_s=20, fifo_wait_s=15, fairness_s=30, fairness_burst=2, flood_wait_s=120,
              join_stream_s=8, loss_stream_s=30, cost_requests=5000)


# ---- requests ------------------------------------------------------------------------------

def tokens_for(i: int, mean: int) -> int:
    """0.5x .. 1.5x ``mean`` output tokens, spread evenly but not in order."""
    lo, hi = max(1, mean // 2), mean + mean // 2
    return lo + (i * 7) % (hi - lo + 1)


def doc(tenant: str, priority: str, max_tokens: int, i: int = 0) -> dict[str, Any]:
    return {"tenant_id": tenant, "priority": priority, "prompt": f"Request {i}: the quick brown fox",
            "params": {"max_tokens": max_tokens, "temperature": 0.0}}


def mix_docs(count: int, mean_tokens: int, priority: str = "low", seed: int = 11) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    tenants = [t for t, share in MIX for _ in range(round(share * count))]
    tenants += ["acme"] * (count - len(tenants))
    rng.shuffle(tenants)
    return [doc(t, priority, tokens_for(i, mean_tokens), i) for i, t in enumerate(tenants)]


# ---- the run -------------------------------------------------------------------------------

@dataclass
class Run:
    args: argparse.Namespace
    params: Params
    bench: Bench
    shape: EngineShape
    started: float = field(default_factory=time.time)
    baseline: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    pools: list[Pool] = field(default_factory=list)
    routing_label: str = "Producer routing"

    def pool(self, name: str, **kwargs: Any) -> Pool:
        pool = Pool(self.bench, name, kwargs.pop("shape", self.shape), **kwargs)
        if self.args.key_hash:
            pool.producer_options = {"routing": False}
        if self.args.no_preempt:
            pool.worker_env["TIERQ_PREEMPT"] = "false"
        self.pools.append(pool)
        return pool

    @property
    def mean_tokens(self) -> int:
        return self.args.tokens

    def one_worker_tps(self) -> float:
        """Output tokens/s of one saturated worker, measured (the N = 1 phase of ``scale``)."""
        if self.baseline is None:
            self.baseline = measure_throughput(self, 1, "baseline", [("acme", 1.0)])
        return self.baseline["tokens_per_s"]

    def cpu_window(self, pool: Pool, seconds: float) -> tuple[float, float, dict[str, Any]]:
        a = self.bench.cpu.sample(pool.workers)
        t0 = time.time()
        time.sleep(seconds)
        b = self.bench.cpu.sample(pool.workers)
        return t0, time.time(), CpuMeter.between(a, b)


def base_result(run: Run, name: str) -> dict[str, Any]:
    return {
        "bench": f"pool-{name}", "command": "python -m bench.pool " + " ".join(sys.argv[1:]),
        "mode": "quick" if run.args.quick else ("full" if run.args.full else "default"),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_head(),
        "routing": "kafka key hash (Producer routing=False)" if run.args.key_hash else "Producer default",
        "preemption": not run.args.no_preempt,
        "machine": run.bench.machine, "loadavg_at_scenario_start": [round(x, 2) for x in os.getloadavg()],
        "engine": {"kind": "simulated", "speed": run.shape.speed, "max_num_seqs": run.shape.slots,
                   "engine_queue": run.shape.engine_queue, "mean_max_tokens": run.mean_tokens,
                   "max_tokens_range": [max(1, run.mean_tokens // 2), run.mean_tokens + run.mean_tokens // 2],
                   "model_tokens_per_s_one_worker": round(run.shape.tokens_per_s(), 1)},
    }


def write(run: Run, name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"pool-{name}-{run.args.tag}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def owners_summary(pool: Pool, replies: list[Reply]) -> dict[str, Any]:
    return {w: {"requests": len(rs), "tokens": sum(r.usage.completion_tokens for r in rs)}
            for w, rs in by_worker(replies).items()}


# ---- scenario: throughput of a backlog (scale, mix, baseline) --------------------------------

def measure_throughput(run: Run, n: int, name: str, tenants: list[tuple[str, float]],
                       pool_name: str | None = None) -> dict[str, Any]:
    """N workers, a backlog of 1.3x what N saturated workers produce during warm-up + window,
    published at once; output tokens/s during the window."""
    p = run.params
    pool = run.pool(pool_name or f"{name}-{n}", bands=NO_RESERVE)
    try:
        join_s = pool.start(n)
        tokens_needed = 1.3 * n * run.shape.tokens_per_s() * (p.warm_s + p.window_s)
        count = ceil(tokens_needed / run.mean_tokens)
        if len(tenants) == 1:
            docs = [doc(tenants[0][0], "low", tokens_for(i, run.mean_tokens), i) for i in range(count)]
        else:
            docs = mix_docs(count, run.mean_tokens)
        t_pub = time.time()
        ids = pool.publish(docs)
        time.sleep(max(0.0, t_pub + p.warm_s - time.time()))
        t0, t1, cpu = run.cpu_window(pool, p.window_s)
        codes = pool.stop()
        replies = pool.collect_all({t for t, _ in tenants})
    finally:
        pool.stop()
    window = t1 - t0
    per_worker = {w: round(tokens_between(rs, t0, t1) / window, 1) for w, rs in by_worker(replies).items()}
    for w in pool.workers:
        per_worker.setdefault(w.worker_id, 0.0)
    tps = tokens_between(replies, t0, t1) / window
    # why a worker produced less than the model says: too little work (fewer than its slots in
    # flight) or too little CPU (slots full but the simulated engine's steps ran late)
    in_flight = {w: round(in_flight_mean(rs, t0, t1), 2) for w, rs in by_worker(replies).items()}
    model = run.shape.tokens_per_s()
    full = {w: round(per_worker[w] / model, 2) for w, f in in_flight.items() if f >= run.shape.slots - 0.05}
    done_in_window = [r for r in replies if t0 <= ts(r.timing.finished_at) < t1]
    return {
        "workers": n, "join_s": join_s, "backlog_requests": len(ids), "window_s": round(window, 2),
        "tokens_per_s": round(tps, 1), "requests_per_s": round(len(done_in_window) / window, 2),
        "tokens_per_s_by_worker": dict(sorted(per_worker.items())),
        "busy_workers": sum(1 for v in per_worker.values() if v > 0.2 * run.shape.tokens_per_s()),
        "mean_in_flight_by_worker": in_flight,
        "speed_vs_model_of_workers_with_full_slots": full,
        "partitions_used": partitions_used(pool.deliveries),
        "partitions_held": partitions_by_worker(pool.owners_at_start),
        "by_tenant_in_window": {t: sum(1 for r in done_in_window if r.tenant_id == t) for t, _ in tenants},
        "cpu": cpu, "exit_codes": codes, "t0": t0, "t1": t1,
        "_replies": replies,
    }


def scenario_scale(run: Run) -> dict[str, Any]:
    ns = [int(x) for x in run.args.workers.split(",")] if run.args.workers else [1, 2, 4] + ([8] if run.args.full else [])
    ns = sorted(set(ns) | {1})
    phases = []
    for n in ns:
        if n == 1:
            run.one_worker_tps()
            phases.append(run.baseline)
        else:
            phases.append(measure_throughput(run, n, "scale", [("acme", 1.0)]))
    one = run.one_worker_tps()
    for ph in phases:
        ph["efficiency"] = ratio(ph["tokens_per_s"], ph["workers"] * one)
    at4 = next((ph["efficiency"] for ph in phases if ph["workers"] == 4), None)
    result = {
        "scenario": "one tenant's low backlog; pool output / (N x one worker's output), one worker measured at N = 1",
        "goal": "efficiency >= 0.9 at N = 4", "pass": at4 is not None and at4 >= 0.9,
        "one_worker_tokens_per_s": one,
        "efficiency_by_n": {ph["workers"]: ph["efficiency"] for ph in phases},
        "phases": [strip(ph) for ph in phases],
    }
    plot_timeline(run, "scale", [(f"N = {ph['workers']}: {ph['efficiency']:.2f} x N x one worker", ph["_replies"],
                                  ph["t0"], ph["t1"]) for ph in phases])
    return result


def scenario_mix(run: Run) -> dict[str, Any]:
    one = run.one_worker_tps()
    ph = measure_throughput(run, 4, "mix", list(MIX))
    used = ratio(ph["tokens_per_s"], 4 * one)
    result = {
        "scenario": "three tenants' low backlog at 80 / 15 / 5 %, N = 4: pool output / (4 x one worker's)",
        "goal": "capacity used >= 0.9", "pass": used is not None and used >= 0.9, "capacity_used": used,
        "one_worker_tokens_per_s": one, "phase": strip(ph),
    }
    plot_timeline(run, "mix", [(f"80/15/5 % of load, N = 4: {used:.2f} of capacity used", ph["_replies"],
                                ph["t0"], ph["t1"])], by="tenant")
    return result


def strip(phase: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in phase.items() if not k.startswith("_") and k not in ("t0", "t1")}


# ---- scenario: heterogeneous pool ----------------------------------------------------------

def scenario_hetero(run: Run) -> dict[str, Any]:
    one = run.one_worker_tps()
    speeds = [run.shape.speed] * 3 + [run.shape.speed / 2]
    capacity = one * sum(s / run.shape.speed for s in speeds)
    count = ceil(capacity * run.params.hetero_s / run.mean_tokens)
    docs = [doc("acme", "low", tokens_for(i, run.mean_tokens), i) for i in range(count)]
    total_tokens = sum(d["params"]["max_tokens"] for d in docs)
    # published over time at 1.5x the pool's capacity: the backlog grows from the start, and a
    # producer that routes by load sees it (a load published in one go is split by the producer
    # before any worker has shown its speed; Kafka cannot move a record to another partition later)
    rate = HETERO_PUBLISH_X * capacity / run.mean_tokens
    tail = run.shape.request_s(run.mean_tokens)
    ideal = total_tokens / capacity + tail
    cap = max(2 * ideal, ideal + 10)
    pool = run.pool("hetero", bands=NO_RESERVE)
    try:
        join_s = pool.start(4, speeds)
        a = run.bench.cpu.sample(pool.workers)
        t_pub = time.time()
        pool.pace([(i / rate, d) for i, d in enumerate(docs)], t_pub)
        published_s = time.time() - t_pub
        replies = pool.collect("acme", expect=count, timeout=max(1.0, t_pub + cap - time.time()))
        b = run.bench.cpu.sample(pool.workers)
        codes = pool.stop()
        if len(replies) < count:
            replies = pool.collect("acme")  # what was answered by the drain, for the plot
    finally:
        pool.stop()
    done_by_cap = [r for r in replies if ts(r.timing.finished_at) <= t_pub + cap]
    drained = len(done_by_cap) >= count
    drain_s = max(ts(r.timing.finished_at) for r in done_by_cap) - t_pub if drained else None
    if drained:
        projected = None
    else:  # at the rate seen until the cap
        done_tokens = sum(r.usage.completion_tokens for r in done_by_cap)
        projected = round(cap * total_tokens / max(done_tokens, 1), 1)
    r = ratio(drain_s if drained else projected, ideal)
    speed_of = {w.worker_id: w.speed for w in pool.workers}
    served = owners_summary(pool, replies)
    all_tokens = max(1, sum(x["tokens"] for x in served.values()))
    shares = {w: {"speed": speed_of.get(w), "tokens": v["tokens"], "share": round(v["tokens"] / all_tokens, 3),
                  "capacity_share": round((speed_of.get(w) or 0) / sum(speeds), 3)}
              for w, v in served.items()}
    result = {
        "scenario": f"N = 4, one worker at half speed; one tenant's fixed low load ({count} requests) published over "
                    f"time at {HETERO_PUBLISH_X:g} x the pool's capacity; time from the first publish to the last reply "
                    "over the ideal (load / pool capacity + one request's time)",
        "goal": "drain time <= 1.15 x ideal", "pass": drained and r is not None and r <= 1.15,
        "ratio_to_ideal": r, "drain_s": round(drain_s, 2) if drain_s else None,
        "projected_drain_s": projected, "drained_within_s": round(cap, 1), "ideal_s": round(ideal, 2),
        "ideal_parts": {"load_over_capacity_s": round(total_tokens / capacity, 2), "one_request_s": round(tail, 2)},
        "published_over_s": round(published_s, 2),
        "requests": count, "output_tokens": total_tokens, "capacity_tokens_per_s": round(capacity, 1),
        "join_s": join_s, "by_worker": shares, "partitions_used": partitions_used(pool.deliveries),
        "partition_owners": {f"{t.rsplit('.', 1)[-1]}[{p}]": w for (t, p), w in sorted(pool.owners_at_start.items())},
        "partitions_held": partitions_by_worker(pool.owners_at_start),
        "cpu": CpuMeter.between(a, b), "exit_codes": codes,
    }
    plot_cumulative(run, "hetero", replies, t_pub, {w.worker_id: f"{w.worker_id} (speed {w.speed:g})"
                                                     for w in pool.workers},
                    title=f"heterogeneous pool: drain {fmt(drain_s or projected)} s vs ideal {ideal:.1f} s "
                          f"({'measured' if drained else 'projected'}; ratio {r})",
                    marks={"ideal": t_pub + ideal, "last published": t_pub + published_s})
    return result


def fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


# ---- scenario: pool-wide priority ----------------------------------------------------------

def trickle_schedule(seconds: float, interval: float, tenant: str, priority: str, tokens: int,
                     offset: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
    n = int(seconds / interval)
    return [(offset + i * interval, doc(tenant, priority, tokens, i)) for i in range(n)]


def wait_for(pool: Pool, tenant: str, ids: set[str], timeout: float) -> dict[str, Reply]:
    """Read the tenant's replies until every id in ``ids`` is answered or ``timeout`` passes."""
    deadline = time.time() + timeout
    while True:
        got = {r.request_id: r for r in pool.collect(tenant) if r.request_id in ids}
        if len(got) == len(ids) or time.time() >= deadline:
            return got
        time.sleep(0.5)


def scenario_priority(run: Run) -> dict[str, Any]:
    """One pool: the trickle on the idle pool; then a low backlog and the trickle as high; then,
    with the backlog still >= 10x the in-flight capacity, the same trickle published as low
    (the FIFO baseline: behind the backlog in its band, as on a single queue)."""
    p, n = run.params, 4
    capacity = n * run.shape.in_flight
    low_tokens, high_tokens = 2 * run.mean_tokens, max(1, run.mean_tokens // 2)
    interval = PRIORITY_INTERVAL_S
    # lows the pool serves while the high trickle runs (3 of each worker's slots: topics.yaml
    # reserves 2 for high and 1 for medium), so that >= 10x capacity is still waiting for the FIFO phase
    low_slots = max(1, run.shape.in_flight - 3)
    low_rate = n * low_slots / run.shape.request_s(low_tokens)
    backlog = 10 * capacity + ceil(low_rate * (p.trickle_s + 6))
    lows = [doc(TENANTS[i % 3], "low", low_tokens, i) for i in range(backlog)]
    phases: dict[str, dict[str, Any]] = {}

    def trickle(priority: str) -> tuple[list[tuple[float, str, dict[str, Any]]], dict[str, Any]]:
        a = run.bench.cpu.sample(pool.workers)
        sent = pool.pace(trickle_schedule(p.trickle_s, interval, "acme", priority, high_tokens), time.time())
        return sent, {"a": a}

    pool = run.pool("priority", bands=NO_AGING)
    try:
        join_s = pool.start(n)
        sent, c = trickle("high")
        idle_ids = {rid for _, rid, _ in sent}
        idle = wait_for(pool, "acme", idle_ids, 30)
        phases["idle"] = {"high": list(idle.values()), "sent": len(idle_ids),
                          "cpu": CpuMeter.between(c["a"], run.bench.cpu.sample(pool.workers))}
        low_ids = set(pool.publish(lows))
        time.sleep(2.0)  # every worker busy with lows
        sent, c = trickle("high")
        prio_ids = {rid for _, rid, _ in sent}
        prio = wait_for(pool, "acme", prio_ids, 30)
        phases["priority"] = {"high": list(prio.values()), "sent": len(prio_ids),
                              "cpu": CpuMeter.between(c["a"], run.bench.cpu.sample(pool.workers))}
        t_fifo = time.time()
        sent, c = trickle("low")
        fifo_ids = {rid for _, rid, _ in sent}
        fifo = wait_for(pool, "acme", fifo_ids, p.fifo_wait_s)
        phases["fifo"] = {"cpu": CpuMeter.between(c["a"], run.bench.cpu.sample(pool.workers))}
        t_stop = time.time()
        codes = pool.stop()
        low_replies = [r for t in TENANTS for r in pool.collect(t) if r.request_id in low_ids]
        fifo = wait_for(pool, "acme", fifo_ids, 0)  # including those the drain finished
    finally:
        pool.stop()
    lows_started_by = lambda t: sum(1 for r in low_replies if ts(r.timing.dequeued_at) <= t)  # noqa: E731
    answered = [r for r in fifo.values() if ts(r.timing.dequeued_at) <= t_stop]
    censored = [t_stop - at for at, rid, _ in sent if rid not in {r.request_id for r in answered}]
    phases["fifo"].update({"high": answered, "sent": len(fifo_ids), "censored": len(censored),
                           "queue_ms_with_censored": [r.timing.queue_ms for r in answered] + [x * 1000 for x in censored]})
    stats = {name: queue_stats(ph["high"]) for name, ph in phases.items()}
    if censored:
        stats["fifo"].update({
            **with_censored(answered, [x * 1000 for x in censored]),
            "note": f"{len(censored)} of {len(fifo_ids)} not started when the pool was stopped {p.fifo_wait_s:g} s after "
                    "the trickle: counted with their wait so far, so the percentiles are lower bounds"})
    r99 = ratio(stats["priority"]["queue_ms_p99"], stats["idle"]["queue_ms_p99"])
    missing = phases["priority"]["sent"] - len(phases["priority"]["high"])
    result = {
        "scenario": f"N = 4, topics.yaml's reserved slots, aging off; a trickle ({1 / interval:g}/s for {p.trickle_s:g} "
                    f"s, {high_tokens} tokens) as high on the idle pool, then as high over a low backlog of {backlog} "
                    f"requests ({low_tokens} tokens, 3 tenants; >= 10 x the pool's {capacity} in-flight slots all "
                    "along), then as low behind the same backlog (FIFO baseline)",
        "goal": "high queue p99 under the backlog <= 1.5 x idle pool's",
        "pass": r99 is not None and r99 <= 1.5 and missing == 0,
        "queue_p99_ratio": r99,
        "queue_p50_ratio": ratio(stats["priority"]["queue_ms_p50"], stats["idle"]["queue_ms_p50"]),
        "fifo_queue_p99_ratio": ratio(stats["fifo"]["queue_ms_p99"], stats["idle"]["queue_ms_p99"]),
        "high": stats, "high_unanswered": missing, "join_s": join_s, "low_backlog": backlog,
        "lows_waiting": {"at_fifo_trickle_start": backlog - lows_started_by(t_fifo),
                         "at_stop": backlog - lows_started_by(t_stop)},
        "partitions_used": {"high": partitions_used(pool.deliveries, prio_ids),
                            "low": partitions_used(pool.deliveries, low_ids),
                            "fifo": partitions_used(pool.deliveries, fifo_ids)},
        "partitions_held": partitions_by_worker(pool.owners_at_start),
        "trickle_by_worker": {name: {w: len(rs) for w, rs in by_worker(ph["high"]).items()} for name, ph in phases.items()},
        "cpu": {name: ph["cpu"] for name, ph in phases.items()}, "exit_codes": codes,
    }
    plot_priority(run, phases, stats)
    return result


# ---- scenario: pool-wide fairness ----------------------------------------------------------

def rate_schedule(rate: float, seconds: float, tenant: str, mean_tokens: int,
                  offset: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
    """Open-loop arrivals, evenly spaced at ``rate`` per second, token counts as ``tokens_for``."""
    n = int(seconds * rate)
    return [(offset + i / rate, doc(tenant, "low", tokens_for(i, mean_tokens), i)) for i in range(n)]


def preemptions(pool: Pool) -> dict[str, int]:
    return {w.worker_id: sum(1 for e in w.events() if e["event"] == "preempted") for w in pool.workers}


def scenario_fairness(run: Run) -> dict[str, Any]:
    """Issue 11's "a tenant flooding at 10x another", as rates: globex sends at a quarter of the pool's
    capacity, alone, then while acme sends at 10x globex's rate (2.5x the pool's capacity; acme
    starts first, so globex arrives at a full pool all along). Globex asks for half its fair share,
    so a fair pool serves it about as fast as alone; an unfair one queues it behind acme."""
    p, n = run.params, 4
    tokens = run.mean_tokens
    capacity_rps = n * run.shape.slots / run.shape.request_s(tokens)
    globex_rps = FAIRNESS_SMALL_SHARE * capacity_rps
    acme_rps = 10 * globex_rps
    small = rate_schedule(globex_rps, p.fairness_s, "globex", tokens)
    head = p.warm_s
    both = sorted(rate_schedule(acme_rps, head + p.fairness_s, "acme", tokens)
                  + rate_schedule(globex_rps, p.fairness_s, "globex", tokens, offset=head), key=lambda e: e[0])
    pool = run.pool("fairness", bands=NO_RESERVE)
    try:
        join_s = pool.start(n)
        a = run.bench.cpu.sample(pool.workers)
        sent_alone = pool.pace(small, time.time())
        alone_ids = {rid for _, rid, _ in sent_alone}
        alone = wait_for(pool, "globex", alone_ids, 60)
        b = run.bench.cpu.sample(pool.workers)
        before = preemptions(pool)
        t_flood = time.time()
        sent = pool.pace(both, t_flood)
        with_ids = {rid for _, rid, d in sent if d["tenant_id"] == "globex"}
        flood_ids = {rid for _, rid, d in sent if d["tenant_id"] == "acme"}
        t_sent = time.time()
        together = wait_for(pool, "globex", with_ids, p.flood_wait_s)
        c = run.bench.cpu.sample(pool.workers)
        t_stop = time.time()
        after = preemptions(pool)
        codes = pool.stop()
        acme = [r for r in pool.collect("acme") if r.request_id in flood_ids]
        together = wait_for(pool, "globex", with_ids, 0)
    finally:
        pool.stop()
    alone_r = list(alone.values())
    # those not started when the pool was stopped count with their wait so far (lower bounds)
    started = [r for r in together.values() if r.timing.dequeued_at and ts(r.timing.dequeued_at) <= t_stop]
    sent_at = {rid: at for at, rid, _ in sent}
    censored = [(t_stop - sent_at[rid]) * 1000 for rid in with_ids - {r.request_id for r in started}]
    q_alone, q_with = queue_stats(alone_r), queue_stats(started)
    if censored:
        q_with.update({**with_censored(started, censored), "not_started_when_stopped": len(censored)})
    r50 = ratio(q_with["queue_ms_p50"], q_alone["queue_ms_p50"])
    window = (t_flood + head, t_sent)
    done_in = lambda rs: sum(1 for r in rs if window[0] <= ts(r.timing.finished_at) <= window[1])  # noqa: E731
    result = {
        "scenario": f"N = 4, no reserved slots; globex sends {globex_rps:.2f} low requests/s ({FAIRNESS_SMALL_SHARE:g} x the "
                    f"pool's capacity of {capacity_rps:.2f}/s at {tokens} tokens) for {p.fairness_s:g} s alone; then acme "
                    f"sends 10x that ({acme_rps:.1f}/s, {10 * FAIRNESS_SMALL_SHARE:g} x capacity) from {head:g} s before "
                    f"globex's same {p.fairness_s:g} s until its end",
        "goal": "globex's median queue time with the flood <= 2 x alone",
        "pass": r50 is not None and r50 <= 2.0 and not censored and len(alone_r) == len(alone_ids),
        "queue_p50_ratio": r50, "queue_p99_ratio": ratio(q_with["queue_ms_p99"], q_alone["queue_ms_p99"]),
        "globex_alone": q_alone, "globex_with_flood": q_with,
        "sent": {"globex_alone": len(alone_ids), "globex_with_flood": len(with_ids), "acme": len(flood_ids)},
        "unanswered_alone": len(alone_ids) - len(alone_r),
        "completions_in_window": {"globex": done_in(started), "acme": done_in(acme),
                                  "window_s": round(window[1] - window[0], 1)},
        "preemptions": {w: after.get(w, 0) - before.get(w, 0) for w in after},
        "globex_by_worker": {"alone": {w: len(rs) for w, rs in by_worker(alone_r).items()},
                             "with_flood": {w: len(rs) for w, rs in by_worker(started).items()}},
        "partitions_held": partitions_by_worker(pool.owners_at_start),
        "partitions_used": {"globex_with_flood": partitions_used(pool.deliveries, with_ids),
                            "acme": partitions_used(pool.deliveries, flood_ids)},
        "join_s": join_s, "cpu": {"alone": CpuMeter.between(a, b), "with_flood": CpuMeter.between(b, c)},
        "exit_codes": codes,
    }
    plot_fairness(run, "fairness", alone_r, started, acme, t_flood, r50, since=f"s since acme started (globex {head:g} s later)")
    return result


def scenario_burst(run: Run) -> dict[str, Any]:
    """Fairness's first wave: globex's burst of 2x the pool's in-flight slots, alone, then at the same
    moment as acme's 10x burst. Reported, no pass/fail: with equal shares a burst this small
    cannot stay within 2x (bench.pool_fairness_model), so it shows how close the pool comes."""
    n = 4
    burst = ceil(run.params.fairness_burst * n * run.shape.in_flight)
    tokens = run.mean_tokens
    small = [doc("globex", "low", tokens_for(i, tokens), i) for i in range(burst)]
    flood = [doc("acme", "low", tokens_for(i, tokens), i) for i in range(10 * burst)]
    pool = run.pool("burst", bands=NO_RESERVE)
    try:
        join_s = pool.start(n)
        a = run.bench.cpu.sample(pool.workers)
        alone_ids = pool.publish(small)
        alone = pool.collect("globex", expect=burst, timeout=120)
        b = run.bench.cpu.sample(pool.workers)
        cap = run.params.flood_wait_s
        t_flood = time.time()
        flood_ids = set(pool.submit(flood))
        with_ids = set(pool.publish(small))
        pool.collect("globex", expect=2 * burst, timeout=cap)
        c = run.bench.cpu.sample(pool.workers)
        t_stop = time.time()
        codes = pool.stop()
        got = pool.collect("globex")
        acme = pool.collect("acme")
    finally:
        pool.stop()
    alone = [r for r in alone if r.request_id in set(alone_ids)]
    # those not started when the pool was stopped count with their wait so far (lower bounds)
    together = [r for r in got if r.request_id in with_ids and r.timing.dequeued_at and ts(r.timing.dequeued_at) <= t_stop]
    submitted = {r.request_id: ts(r.timing.submitted_at) for r in got if r.request_id in with_ids}
    censored = [(t_stop - submitted.get(rid, t_flood)) * 1000 for rid in with_ids
                if rid not in {r.request_id for r in together}]
    q_alone, q_with = queue_stats(alone), queue_stats(together)
    if censored:
        q_with.update({**with_censored(together, censored), "not_started_when_stopped": len(censored),
                       "note": f"stopped {cap:g} s after the flood: {len(censored)} of {burst} not started, counted "
                               "with their wait so far (the median is exact while they are under half)"})
    r50 = ratio(q_with["queue_ms_p50"], q_alone["queue_ms_p50"])
    # completions while both had work waiting: until the small tenant's last request started
    last_start = max((ts(r.timing.dequeued_at) for r in together), default=t_flood)
    both = {"globex": sum(1 for r in together if ts(r.timing.finished_at) <= last_start),
            "acme": sum(1 for r in acme if r.request_id in flood_ids and ts(r.timing.finished_at) <= last_start)}
    result = {
        "scenario": f"N = 4; globex publishes {burst} low requests at once ({run.params.fairness_burst:g} x the pool's "
                    f"in-flight slots) alone; then acme publishes {10 * burst} and globex {burst} more at the same moment",
        "goal": "reported (first wave of a burst; fairness is the goal-bearing scenario)", "pass": None,
        "queue_p50_ratio": r50, "queue_p99_ratio": ratio(q_with["queue_ms_p99"], q_alone["queue_ms_p99"]),
        "globex_alone": q_alone, "globex_with_flood": q_with,
        "completions_while_both_waiting": both,
        "globex_by_worker": {"alone": {w: len(rs) for w, rs in by_worker(alone).items()},
                             "with_flood": {w: len(rs) for w, rs in by_worker(together).items()}},
        "partitions_held": partitions_by_worker(pool.owners_at_start),
        "acme_by_worker": {w: len(rs) for w, rs in by_worker([r for r in acme if r.request_id in flood_ids]).items()},
        "partitions_used": {"globex_with_flood": partitions_used(pool.deliveries, with_ids),
                            "acme": partitions_used(pool.deliveries, flood_ids)},
        "join_s": join_s, "cpu": {"alone": CpuMeter.between(a, b), "with_flood": CpuMeter.between(b, c)},
        "exit_codes": codes,
    }
    plot_fairness(run, "burst", alone, together, [r for r in acme if r.request_id in flood_ids], t_flood, r50)
    return result


# ---- scenarios: scale events -----------------------------------------------------------------

def stream_schedule(rate: float, seconds: float, mean_tokens: int, seed: int) -> list[tuple[float, dict[str, Any]]]:
    docs = mix_docs(ceil(rate * seconds), mean_tokens, seed=seed)
    return [(i / rate, d) for i, d in enumerate(docs)]


def await_replies(pool: Pool, expected: dict[str, set[str]], patience_s: float,
                  limit_s: float) -> tuple[dict[str, Reply], int]:
    """Read the tenants' replies (each pass to the end of their reply topics) until every expected
    one is in, no new one came for ``patience_s``, or ``limit_s`` passed. Returns the replies by id
    and the duplicate replies seen (a request served twice after a crash)."""
    answered: dict[str, Reply] = {}
    start = last_new = time.time()
    duplicates = 0
    while True:
        progressed = False
        duplicates = 0
        for tenant, ids in expected.items():
            with ResultCollector(pool.settings, pool.topology, tenant) as c:
                for r in c.replies(timeout=30.0):
                    if r.request_id in ids and r.request_id not in answered:
                        answered[r.request_id] = r
                        progressed = True
                duplicates += c.stats.duplicates
        now = time.time()
        if progressed:
            last_new = now
        if all(i in answered for ids in expected.values() for i in ids) or now - last_new > patience_s \
                or now - start > limit_s:
            return answered, duplicates
        time.sleep(1.0)


def scenario_events(run: Run) -> dict[str, Any]:
    """One pool through its scale events: 3 workers under a stream that saturates 4; a 4th joins;
    then, at half the 4 workers' capacity, the busiest worker is SIGTERMed and later the busiest
    of the rest SIGKILLed; every request of the whole run is awaited."""
    p = run.params
    one = run.one_worker_tps()
    c4 = 4 * one / run.mean_tokens  # requests/s of 4 workers
    pre, window = 3.0, 3.0
    fast_rate, slow_rate = 1.1 * c4, 0.5 * c4
    t_term, t_kill = 0.2 * p.loss_stream_s, 0.5 * p.loss_stream_s
    slow = stream_schedule(slow_rate, p.loss_stream_s, run.mean_tokens, seed=7)
    pool = run.pool("events", bands=NO_RESERVE)
    victims: dict[str, dict[str, Any]] = {}

    def strike(kind: str) -> None:
        # the live worker owning the partitions that got the most of the last ~3 s of records
        owners = pool.owners()
        recent = pool.recent_deliveries(ceil(3 * slow_rate))
        load: dict[str, int] = {}
        for d in recent:
            w = owners.get((d.topic, d.partition))
            if w:
                load[w] = load.get(w, 0) + 1
        taken = {v["worker"] for v in victims.values()}
        victim = max((w for w in pool.live if w.worker_id not in taken), key=lambda w: load.get(w.worker_id, 0))
        victims[kind] = {"worker": victim.worker_id, "at": time.time(), "records_last_3s_by_owner": load}
        victim.terminate() if kind == "SIGTERM" else victim.kill()

    def joined(w: WorkerProcess) -> float | None:
        """When the low band's group has let it in: it holds its share of the low partitions."""
        return w.holds_at(pool.topology.band_topic(pool.pool_name, Band.low), pool.topology.bands[Band.low].partitions // 4)

    try:
        join3 = pool.start(3)
        a = run.bench.cpu.sample(pool.workers)
        start = time.time()
        # the saturating stream, second by second, until the new worker has held partitions for
        # 5 s + the share window (a join takes longer on a busy machine)
        sent: list[tuple[float, str, dict[str, Any]]] = []
        new: WorkerProcess | None = None
        k = 0
        while k < p.join_stream_s or new is None or (t_joined := joined(new)) is None \
                or time.time() < t_joined + 5 + window + 1:  # the log is read once a turn
            if new is None and k >= pre:
                new = pool.start_worker()
            if k > 120:
                break
            count = ceil(fast_rate * (k + 1)) - ceil(fast_rate * k)
            sent += pool.pace([(i / fast_rate, d) for i, d in enumerate(mix_docs(count, run.mean_tokens, seed=100 + k))],
                              start + k)
            k += 1
        join_end = time.time()
        held_at_join_end = partitions_by_worker(pool.owners())
        sent += pool.pace(slow, join_end, events={t_term: lambda: strike("SIGTERM"), t_kill: lambda: strike("SIGKILL")})
        t_end = time.time()
        expected: dict[str, set[str]] = {}
        for _at, rid, x in sent:
            expected.setdefault(x["tenant_id"], set()).add(rid)
        answered, duplicates = await_replies(pool, expected, patience_s=30.0, limit_s=300.0)
        t_all = time.time()
        b = run.bench.cpu.sample(pool.workers)
        codes = pool.stop()
        # a request without a reply is lost only if the pool committed past its offset (the pool
        # considers it done); below that it is still waiting in Kafka, served by the next worker
        committed = pool.committed()
    finally:
        pool.stop()
    where = {d.request_id: d for d in pool.deliveries}
    replies = list(answered.values())
    worker_of = {w.worker_id: w for w in pool.workers}

    # the join: from the new worker's start, when it holds partitions and when its output over the
    # last 3 s first reaches 0.8 x a quarter of the pool's (during the saturating stream)
    assert new is not None
    first = new.first_assigned_at()
    assigned = joined(new)
    t_share = None
    mine = [r for r in replies if r.worker == new.worker_id]
    t = new.started_at + window
    while assigned is not None and t <= join_end:
        total = tokens_between(replies, t - window, t)
        if total and tokens_between(mine, t - window, t) >= 0.8 * total / 4:
            t_share = t
            break
        t += 0.1
    join_s = None if assigned is None else round(assigned - new.started_at, 2)
    share_s = None if t_share is None else round(t_share - new.started_at, 2)
    last3 = join_end - window
    join = {
        "goal": "the joining worker serves its share within its group join time + 5 s",
        "pass": share_s is not None and join_s is not None and share_s <= join_s + 5,
        "join_s": join_s, "share_s": share_s,
        "join_note": "join_s: from its start until the low band's group gave it its share of the low partitions "
                     "(a quarter); first_partition_s: its first partition of any band (the cooperative assignor "
                     "hands partitions over in two or more rounds)",
        "first_partition_s": None if first is None else round(first - new.started_at, 2),
        "share_after_first_partition_s": None if share_s is None or first is None
        else round(share_s - (first - new.started_at), 2),
        "share_after_join_s": None if share_s is None or join_s is None else round(share_s - join_s, 2),
        "partitions_held_before": partitions_by_worker(pool.owners_at_start),
        "partitions_held_at_end_of_join_phase": held_at_join_end,
        "tokens_per_s_by_worker_last_3s_of_join_phase": {
            w: round(tokens_between(rs, last3, last3 + window) / window, 1) for w, rs in by_worker(replies).items()},
    }
    # the losses: every request of the run, through the join, the SIGTERM and the SIGKILL
    unanswered = [rid for ids in expected.values() for rid in ids if rid not in answered]
    lost = [rid for rid in unanswered if where[rid].offset < committed.get((where[rid].topic, where[rid].partition), 0)]
    statuses: dict[str, int] = {}
    for r in replies:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    loss = {
        "goal": "every request answered after a SIGTERM and a SIGKILL (nothing lost)",
        "pass": not unanswered and statuses.get("ok", 0) == len(replies),
        "sent": len(sent), "answered": len(replies), "lost": len(lost),
        "unanswered_still_in_kafka": len(unanswered) - len(lost), "statuses": statuses,
        "duplicate_replies": duplicates, "redelivered_attempt_gt_1": sum(1 for r in replies if r.attempt > 1),
        "waited_for_all_s": round(t_all - t_end, 2),
        "last_reply_after_stream_end_s": round(max(ts(r.timing.finished_at) for r in replies) - t_end, 2)
        if replies else None,
        "victims": {kind: {**v, "at_s": round(v["at"] - start, 2), "exit_code": worker_of[v["worker"]].process.returncode,
                           "served": sum(1 for r in replies if r.worker == v["worker"])}
                    for kind, v in victims.items()},
    }
    for v in loss["victims"].values():
        v.pop("at")
    result = {
        "scenario": f"3 workers under a stream of the 80/15/5 mix at {fast_rate:.1f} requests/s (1.1 x 4 workers' "
                    f"capacity), a 4th started at {pre:g} s, the stream kept until it has held partitions for "
                    f"{5 + window + 1:g} s ({join_end - start:.1f} s in all); then {slow_rate:.1f} requests/s for "
                    f"{p.loss_stream_s:g} s with the busiest worker SIGTERMed {t_term:g} s and the busiest of the "
                    f"rest SIGKILLed {t_kill:g} s into it; then every reply awaited",
        "goal": f"{join['goal']}; {loss['goal']}", "pass": join["pass"] and loss["pass"],
        "join": join, "loss": loss, "initial_join_s": join3,
        "by_worker": {w: len(rs) for w, rs in by_worker(replies).items()},
        "partitions_used": partitions_used(pool.deliveries),
        "cpu": CpuMeter.between(a, b), "exit_codes": codes,
    }
    marks = {"w4 starts": new.started_at}
    if first and first != assigned:
        marks["w4's first partition"] = first
    if assigned:
        marks["w4 holds its share"] = assigned
    if t_share:
        marks["w4 serves its share"] = t_share
    for kind, v in victims.items():
        marks[f"{kind} {v['worker']}"] = start + loss["victims"][kind]["at_s"]
    marks["half load"] = join_end
    marks["stream ends"] = t_end
    plot_rate(run, "events", replies, start, marks,
              f"scale events: w4's share after {fmt(share_s)} s (join {fmt(join_s)} s); "
              f"{len(replies)} of {len(sent)} answered, {len(lost)} lost")
    return result


# ---- scenario: CPU cost of the Kafka path ----------------------------------------------------

DIRECT = r"""
import asyncio, json, sys, time
from schemas.messages import Request, utc_now
from worker.simulated import SimParams, SimulatedEngine
cfg = json.loads(sys.argv[1])
async def main():
    engine = SimulatedEngine(SimParams(speed=cfg["speed"], max_num_seqs=cfg["slots"]))
    sem = asyncio.Semaphore(cfg["concurrency"])
    async def one(i):
        r = Request.model_validate({"tenant_id": "acme", "priority": "low", "prompt": f"Request {i}: the quick brown fox",
                                    "params": {"max_tokens": cfg["tokens"]}, "request_id": f"d{i}", "submitted_at": utc_now()})
        async with sem:
            await engine.generate(r, engine.render(r), priority=2)
    cpu, t = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(cfg["requests"])))
    print(json.dumps({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - t}))
asyncio.run(main())
"""


def scenario_cost(run: Run) -> dict[str, Any]:
    """CPU per request of the Kafka path when it is busy: fast engines (so requests flow at a rate
    where the idle polling of workers and broker is a small part), raw CPU of every process over
    the load divided by the requests; the simulated engine alone, on the same load and shape in a
    process of its own, gives the engine model's share of the workers' CPU. The idle pool's CPU
    per second is reported beside it (it is not subtracted: how much of it a busy pool still
    spends is not known, and on Tansu an idle fetch costs more than a busy one)."""
    shape = EngineShape(speed=COST_SPEED, slots=COST_SLOTS)
    n, k, tokens = 2, run.params.cost_requests, run.mean_tokens
    direct_n = min(k, 1000)
    out = subprocess.run([sys.executable, "-c", DIRECT, json.dumps(
        {"speed": shape.speed, "slots": shape.slots, "concurrency": shape.in_flight, "tokens": tokens,
         "requests": direct_n})], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
        timeout=300)
    if out.returncode:
        raise RuntimeError(f"direct engine run failed: {out.stderr[-2000:]}")
    direct = json.loads(out.stdout.strip().splitlines()[-1])
    engine_ms = direct["cpu_s"] * 1000 / direct_n
    pool = run.pool("cost", shape=shape, bands=NO_RESERVE)
    try:
        join_s = pool.start(n)
        _t0, _t1, idle = run.cpu_window(pool, 3.0)
        docs = [{**x, "params": {**x["params"], "max_tokens": tokens}} for x in mix_docs(k, tokens, seed=3)]
        counts = {t: sum(1 for x in docs if x["tenant_id"] == t) for t in TENANTS}
        a = run.bench.cpu.sample(pool.workers)
        pool.publish(docs)
        replies = [r for t in TENANTS for r in pool.collect(t, expect=counts[t], timeout=300)]
        b = run.bench.cpu.sample(pool.workers)
        codes = pool.stop()
    finally:
        pool.stop()
    load = CpuMeter.between(a, b)
    workers_ms = load["workers_cpu_s"] * 1000 / k
    broker_ms = load["broker_cpu_s"] * 1000 / k
    per = {"workers_ms": round(workers_ms, 3), "of_which_engine_model_ms": round(engine_ms, 3),
           "workers_kafka_path_ms": round(workers_ms - engine_ms, 3), "broker_ms": round(broker_ms, 3),
           "producer_and_collector_ms": round(load["bench_cpu_s"] * 1000 / k, 3)}
    result = {
        "scenario": f"N = 2 workers at speed {shape.speed:g} with {shape.slots} slots; {k} requests of the 80/15/5 mix, "
                    f"{tokens} tokens, published at once, all replies read; CPU of workers and broker over that time "
                    f"per request; the simulated engine alone (same shape and prompts, {direct_n} requests, one process) "
                    "gives the engine model's share",
        "goal": "reported (no threshold): the Kafka path's CPU per request in worker and broker",
        "pass": None, "answered": len(replies), "requests": k, "load_s": load["wall_s"],
        "requests_per_s": round(k / load["wall_s"], 1),
        "cpu_ms_per_request": per, "kafka_path_ms_per_request": round(workers_ms - engine_ms + broker_ms, 3),
        "idle_pool_cpu": idle, "load_cpu": load, "join_s": join_s, "exit_codes": codes, "direct_engine": direct,
    }
    plot_cost(run, per, idle, result["requests_per_s"])
    return result


# ---- plots ---------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rate_series(replies: list[Reply], t0: float, t1: float, bucket: float = 0.5) -> tuple[list[float], list[float]]:
    n = max(1, int((t1 - t0) / bucket) + 1)
    counts = [0] * n
    for r in replies:
        for t in token_times(r):
            i = int((t - t0) / bucket)
            if 0 <= i < n:
                counts[i] += 1
    return [i * bucket for i in range(n)], [c / bucket for c in counts]


def plot_timeline(run: Run, name: str, panels: list[tuple[str, list[Reply], float, float]], by: str = "worker") -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels) + 0.6), squeeze=False)
    for ax, (title, replies, w0, w1) in zip(axes[:, 0], panels):
        if not replies:
            continue
        t0 = min(ts(r.timing.dequeued_at) or w0 for r in replies)
        t1 = max(ts(r.timing.finished_at) for r in replies)
        groups: dict[str, list[Reply]] = {}
        for r in replies:
            groups.setdefault(r.worker if by == "worker" else r.tenant_id, []).append(r)
        for key in sorted(groups):
            x, y = _rate_series(groups[key], t0, t1)
            ax.plot(x, y, label=key, lw=1)
        ax.axvspan(w0 - t0, w1 - t0, color="0.9", label="measured window")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7, ncol=5, loc="upper right")
    axes[-1, 0].set_xlabel("s since the first request started")
    fig.suptitle(f"tierq pool ({run.routing_label}): output per {by}", fontsize=11)
    fig.tight_layout()
    fig.savefig(RESULTS / f"pool-{name}-{run.args.tag}.png", dpi=100)
    plt.close(fig)


def plot_cumulative(run: Run, name: str, replies: list[Reply], t0: float, labels: dict[str, str], title: str,
                    marks: dict[str, float]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for w, rs in by_worker(replies).items():
        times = sorted(ts(r.timing.finished_at) - t0 for r in rs)
        ax.step(times, range(1, len(times) + 1), where="post", label=labels.get(w, w))
    times = sorted(ts(r.timing.finished_at) - t0 for r in replies)
    ax.step(times, range(1, len(times) + 1), where="post", label="pool", color="k")
    for label, at in marks.items():
        ax.axvline(at - t0, ls="--", color="0.4")
        ax.text(at - t0, 0, f" {label}", rotation=90, va="bottom", fontsize=8)
    ax.set_xlabel("s since the load was published")
    ax.set_ylabel("requests completed")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"pool-{name}-{run.args.tag}.png", dpi=100)
    plt.close(fig)


def plot_rate(run: Run, name: str, replies: list[Reply], t0: float, marks: dict[str, float], title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    t1 = max((ts(r.timing.finished_at) for r in replies), default=t0 + 1)
    for w, rs in by_worker(replies).items():
        x, y = _rate_series(rs, t0, t1, bucket=1.0)
        ax.plot(x, y, label=w, lw=1.2)
    for label, at in marks.items():
        ax.axvline(at - t0, ls="--", color="0.4")
        ax.text(at - t0, ax.get_ylim()[1] * 0.95, f" {label}", rotation=90, va="top", fontsize=8)
    ax.set_xlabel("s since the stream started")
    ax.set_ylabel("output tokens/s (1 s buckets)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"pool-{name}-{run.args.tag}.png", dpi=100)
    plt.close(fig)


def plot_priority(run: Run, phases: dict[str, dict[str, Any]], stats: dict[str, Any]) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (name, ph) in zip(axes, phases.items()):
        highs = ph["high"]
        if not highs:
            continue
        t0 = min(ts(r.timing.submitted_at) for r in highs)
        ax.scatter([ts(r.timing.submitted_at) - t0 for r in highs], [max(r.timing.queue_ms, 0.1) for r in highs], s=10,
                   color="tab:red", label=f"trickle ({len(highs)} answered)")
        ax.set_title(f"{name}: queue p50/p99 {stats[name]['queue_ms_p50']}/{stats[name]['queue_ms_p99']} ms", fontsize=10)
        ax.set_xlabel("submitted at (s)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("queue time (ms)")
    fig.suptitle(f"tierq pool priority ({run.routing_label}): high trickle, idle pool / over a low backlog / FIFO")
    fig.tight_layout()
    fig.savefig(RESULTS / f"pool-priority-{run.args.tag}.png", dpi=100)
    plt.close(fig)


def plot_fairness(run: Run, name: str, alone: list[Reply], together: list[Reply], flood: list[Reply], t_flood: float,
                  r50: float | None, since: str = "s since both published") -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, rs in (("globex alone", alone), ("globex with acme's 10x flood", together)):
        q = sorted(r.timing.queue_ms / 1000 for r in rs)
        a1.step(q, [(i + 1) / len(q) for i in range(len(q))], where="post", label=label)
    a1.set_xlabel("queue time (s)")
    a1.set_ylabel("fraction of requests")
    a1.set_title(f"globex queue time: median ratio {r50}", fontsize=10)
    a1.legend(fontsize=8)
    for label, rs in (("acme (flood)", flood), ("globex", together)):
        times = sorted(ts(r.timing.finished_at) - t_flood for r in rs)
        a2.step(times, range(1, len(times) + 1), where="post", label=label)
    a2.set_xlabel(since)
    a2.set_ylabel("requests completed")
    a2.set_title("completions with the flood", fontsize=10)
    a2.legend(fontsize=8)
    fig.suptitle(f"tierq pool {name} ({run.routing_label})")
    fig.tight_layout()
    fig.savefig(RESULTS / f"pool-{name}-{run.args.tag}.png", dpi=100)
    plt.close(fig)


def plot_cost(run: Run, per: dict[str, Any], idle: dict[str, Any], rate: float) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = ["worker: Kafka path", "worker: engine model", "broker", "producer + collector"]
    values = [per["workers_kafka_path_ms"], per["of_which_engine_model_ms"], per["broker_ms"],
              per["producer_and_collector_ms"]]
    ax.barh(labels, values, color=["tab:blue", "tab:gray", "tab:orange", "tab:green"])
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f} ms", va="center")
    ax.set_xlabel(f"CPU ms per request at {rate:g} requests/s (idle polling included)")
    ax.set_title(f"Kafka path CPU per request; the idle pool: workers {idle['workers_pct']}%, broker "
                 f"{idle['broker_pct']}% of a core", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"pool-cost-{run.args.tag}.png", dpi=100)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "scale": scenario_scale, "mix": scenario_mix, "hetero": scenario_hetero, "priority": scenario_priority,
    "fairness": scenario_fairness, "burst": scenario_burst, "events": scenario_events, "cost": scenario_cost,
}

def globex_headline(r: dict[str, Any]) -> str:
    """The fairness and burst scenarios' line: globex's median queue time with the flood and alone."""
    return (f"globex median queue {r['globex_with_flood']['queue_ms_p50']} ms vs "
            f"{r['globex_alone']['queue_ms_p50']} ms alone: {r['queue_p50_ratio']}x")


HEADLINE = {
    "scale": lambda r: f"efficiency at N=1/2/4{'/8' if '8' in map(str, r['efficiency_by_n']) else ''}: "
                       + " / ".join(str(v) for v in r["efficiency_by_n"].values()),
    "mix": lambda r: f"capacity used {r['capacity_used']}",
    "hetero": lambda r: f"drain {fmt(r['drain_s'] or r['projected_drain_s'])} s vs ideal {r['ideal_s']} s: "
                        f"{r['ratio_to_ideal']}x" + ("" if r["drain_s"] else " (projected)"),
    "priority": lambda r: f"high queue p99 {r['high']['priority']['queue_ms_p99']} ms vs idle "
                          f"{r['high']['idle']['queue_ms_p99']} ms: {r['queue_p99_ratio']}x; FIFO "
                          f"{r['high']['fifo']['queue_ms_p99']} ms",
    "fairness": globex_headline,
    "burst": globex_headline,
    "events": lambda r: f"join {r['join']['join_s']} s, share at {r['join']['share_s']} s from its start "
                        f"({'pass' if r['join']['pass'] else 'FAIL'}); {r['loss']['answered']}/{r['loss']['sent']} "
                        f"answered, {r['loss']['lost']} lost, {r['loss']['redelivered_attempt_gt_1']} redelivered "
                        f"({'pass' if r['loss']['pass'] else 'FAIL'})",
    "cost": lambda r: f"Kafka path {r['kafka_path_ms_per_request']} ms CPU/request at {r['requests_per_s']}/s (worker "
                      f"{r['cpu_ms_per_request']['workers_kafka_path_ms']} + engine model "
                      f"{r['cpu_ms_per_request']['of_which_engine_model_ms']}, broker "
                      f"{r['cpu_ms_per_request']['broker_ms']})",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter windows and loads (~6 minutes)")
    parser.add_argument("--full", action="store_true", help="also N = 8 in the scale scenario")
    parser.add_argument("--only", help=f"comma-separated scenarios (of {', '.join(SCENARIOS)})")
    parser.add_argument("--speed", type=float, default=0.05, help="simulated engine speed (x the reference H100)")
    parser.add_argument("--slots", type=int, default=4, help="simulated engine slots (max_num_seqs)")
    parser.add_argument("--tokens", type=int, default=16, help="mean max_tokens per request (0.5x-1.5x)")
    parser.add_argument("--key-hash", action="store_true",
                        help="publish with Kafka's key hash (Producer(routing=False)) instead of the Producer's routing")
    parser.add_argument("--no-preempt", action="store_true",
                        help="workers without preemption for fair share (TIERQ_PREEMPT=false), to compare")
    parser.add_argument("--workers", help="pool sizes of the scale scenario (default 1,2,4; 1,2,4,8 with --full)")
    parser.add_argument("--fairness-burst", type=float,
                        help="globex's burst in the burst scenario, in pool in-flight capacities (default 2; it also lengthens "
                             "how long the fairness and burst scenarios wait for globex after the flood; "
                             "a larger burst measures the steady fair share rather than the first wave)")
    parser.add_argument("--tag", default="cpu", help="suffix of the result files")
    args = parser.parse_args()
    if args.key_hash and "routing" not in inspect.signature(Producer).parameters:
        parser.error("this Producer has no routing switch (it already publishes by key hash)")
    only = [s for s in (args.only.split(",") if args.only else SCENARIOS)]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    configure(level="WARNING")
    params = QUICK if args.quick else DEFAULT
    if args.fairness_burst:
        # the flood is 10x the burst: give the pool time to serve globex's share of the bigger one
        params = replace(params, fairness_burst=args.fairness_burst,
                         flood_wait_s=params.flood_wait_s * max(1.0, args.fairness_burst / params.fairness_burst))
    machine = machine_info()
    machine["busy_processes_at_start"] = other_processes()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker() as broker:
        bench = Bench(broker.bootstrap, broker.pid)
        bench.machine = machine
        run = Run(args, params, bench, EngineShape(speed=args.speed, slots=args.slots),
                  routing_label="key hash" if args.key_hash else "Producer routing")
        summary: dict[str, Any] = {}
        for name in only:
            t = time.time()
            print(f"[{time.time() - run.started:6.1f}s] {name} ...", flush=True)
            try:
                result = {**base_result(run, name), **RUNNERS[name](run)}
                write(run, name, result)
                summary[name] = {"goal": result["goal"], "pass": result["pass"], "figure": HEADLINE[name](result),
                                 "seconds": round(time.time() - t, 1)}
            except Exception as exc:  # one scenario's failure must not hide the others' figures
                traceback.print_exc()
                summary[name] = {"error": f"{type(exc).__name__}: {exc}", "pass": False,
                                 "seconds": round(time.time() - t, 1)}
                for pool in run.pools:
                    pool.stop()
            print(f"[{time.time() - run.started:6.1f}s] {name}: {json.dumps(summary[name])}", flush=True)
        total = round(time.time() - run.started, 1)
        run.pools.clear()  # the producers' clients go before the broker does (else librdkafka logs its going)
        gc.collect()
    out = {**base_result(run, "summary"), "bench": "pool", "total_s": total, "scenarios": summary,
           "machine_after": {"loadavg": [round(x, 2) for x in os.getloadavg()]}}
    out.pop("loadavg_at_scenario_start", None)
    (RESULTS / f"pool-{args.tag}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print()
    for name, s in summary.items():
        verdict = "error" if "error" in s else ("-" if s["pass"] is None else ("PASS" if s["pass"] else "FAIL"))
        print(f"{name:9} {verdict:5} {s.get('figure') or s.get('error')}   [{s['seconds']} s]")
    print(f"total {total} s; results in {RESULTS}/pool-*-{args.tag}.{{json,png}}")


if __name__ == "__main__":
    main()
