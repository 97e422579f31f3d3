"""What an idle worker costs per second: one ``tierq worker --engine simulated`` with no requests,
its CPU by thread (the event loop's thread, librdkafka's threads) and the broker's CPU, for each
set of fetch waits. Rounds interleave the settings; medians are reported.

Why (issue 13): the worker's extra CPU in the overhead benchmark is mostly a cost per second, not
per request; this measures it alone. The event loop turns every ``POLL_S`` (5 ms) while a request
could start, because librdkafka gives asyncio no descriptor to wait on; each consumer's empty
fetches cost the broker (Tansu: its whole wait per fetch, see bench.fetch_cost).

    .venv/bin/python -m bench.idle_worker                   # ~2 minutes
    .venv/bin/python -m bench.idle_worker --rounds 1 --seconds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import psutil

from bench.diag import thread_group
from bench.poolkit import Bench, EngineShape, Pool, git_head, machine_info, other_processes
from broker.embedded import EmbeddedBroker

RESULTS = Path(__file__).resolve().parent / "results"
KAFKA_LIKE = {"TIERQ_FETCH_WAIT_MS": json.dumps({"high": 500, "medium": 500, "low": 500}),
              "TIERQ_CONTROL_FETCH_WAIT_MS": "500", "TIERQ_ATTEMPTS_FETCH_WAIT_MS": "500"}
SETTINGS = {"defaults": {}, "500 ms waits (docker-compose, Kafka)": KAFKA_LIKE}


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds by thread kind (``bench.diag.thread_group``): the main thread (the event loop),
    librdkafka's, the rest."""
    out = {"event_loop": 0.0, "librdkafka": 0.0, "other": 0.0}
    for thread in psutil.Process(pid).threads():
        group = thread_group(pid, thread.id)
        kind = {"main": "event_loop", "librdkafka": "librdkafka"}.get(group, "other")
        out[kind] += thread.user_time + thread.system_time
    return out


def measure(bench: Bench, broker: psutil.Process, env: dict[str, str], seconds: float) -> dict[str, float]:
    pool = Pool(bench, "idle", EngineShape(speed=1.0, slots=16))
    pool.worker_env.update(env)
    try:
        pool.start(1)
        time.sleep(2.0)  # past the join: assigned, fetching, nothing to read
        pid = pool.workers[0].pid
        a, broker_a, t0 = thread_cpu_s(pid), sum(broker.cpu_times()[:2]), time.monotonic()
        time.sleep(seconds)
        b, broker_b, t1 = thread_cpu_s(pid), sum(broker.cpu_times()[:2]), time.monotonic()
    finally:
        pool.stop()
    pct = {kind: 100 * (b[kind] - a[kind]) / (t1 - t0) for kind in a}
    return {**{f"worker_{k}_pct": round(v, 2) for k, v in pct.items()},
            "worker_pct": round(sum(pct.values()), 2), "broker_pct": round(100 * (broker_b - broker_a) / (t1 - t0), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring window per setting and round")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    machine = machine_info()
    machine["busy_processes_at_start"] = other_processes()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    with EmbeddedBroker() as broker:
        assert broker.pid is not None
        bench = Bench(broker.bootstrap, broker.pid)
        process = psutil.Process(broker.pid)
        for round_ in range(args.rounds):
            order = list(SETTINGS.items())
            for name, env in order if round_ % 2 == 0 else order[::-1]:  # alternate which goes first
                row = measure(bench, process, env, args.seconds)
                samples[name].append(row)
                print(f"round {round_ + 1}, {name}: {row}", flush=True)
    table = {name: {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
             for name, rows in samples.items()}
    out = {"bench": "idle_worker", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "git": git_head(), "machine": machine, "loadavg_at_end": [round(x, 2) for x in psutil.getloadavg()],
           "rounds": args.rounds, "seconds": args.seconds, "settings": {n: SETTINGS[n] for n in SETTINGS},
           "median_pct_of_a_core": table, "rounds_pct": samples}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"idle_worker-{args.tag}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for name, row in table.items():
        print(f"{name}: worker {row['worker_pct']}% of a core (event loop {row['worker_event_loop_pct']}%, "
              f"librdkafka {row['worker_librdkafka_pct']}%), broker {row['broker_pct']}%")
    print(f"results in {path}")


if __name__ == "__main__":
    main()
