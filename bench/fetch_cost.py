"""What an idle consumer costs the broker: one consumer at the end of a topic, its fetches finding
nothing, for each fetch wait (``fetch.wait.max.ms``) and partition count; the broker's CPU while
it polls, against the broker alone. Rounds interleave the settings; the median is reported.

Why (issue 13): on a small machine the broker shares cores with the worker and the engine, and
an idle worker's consumers (three band groups, the control reader, the attempts reader) keep it
busy. Tansu 0.6.0 holds every fetch for its whole wait and reads its storage at the start and at
the end of it, so what it costs follows fetches per second; Kafka answers as soon as a record
arrives and then costs little per empty fetch.

    .venv/bin/python -m bench.fetch_cost                     # ~3 minutes
    .venv/bin/python -m bench.fetch_cost --waits 20,50 --partitions 1 --rounds 2 --seconds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import confluent_kafka
import psutil
from confluent_kafka.admin import AdminClient, NewTopic

from bench.poolkit import git_head, machine_info, other_processes
from broker.embedded import EmbeddedBroker

RESULTS = Path(__file__).resolve().parent / "results"


def broker_cpu_pct(process: psutil.Process, seconds: float, poll: Callable[[], object]) -> float:
    """The broker's CPU (percent of one core) over ``seconds`` while ``poll`` runs."""
    times = process.cpu_times()
    before, t0 = times.user + times.system, time.monotonic()
    while time.monotonic() - t0 < seconds:
        poll()
    times = process.cpu_times()
    return 100 * (times.user + times.system - before) / (time.monotonic() - t0)


def idle_consumer_pct(bootstrap: str, process: psutil.Process, topic: str, partitions: int, wait_ms: int,
                      seconds: float) -> float:
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": f"fetch-cost-{uuid.uuid4().hex}",
                                         "enable.auto.commit": False, "fetch.wait.max.ms": wait_ms})
    try:
        consumer.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_END) for p in range(partitions)])
        warm_until = time.monotonic() + 1.5  # connected, offsets resolved, fetching
        while time.monotonic() < warm_until:
            consumer.poll(0.05)
        return broker_cpu_pct(process, seconds, lambda: consumer.poll(0.05))
    finally:
        consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waits", default="20,50,100,500", help="fetch.wait.max.ms values, comma-separated")
    parser.add_argument("--partitions", default="1,4,16", help="partition counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring window per setting and round")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    waits = [int(w) for w in args.waits.split(",")]
    counts = [int(p) for p in args.partitions.split(",")]
    machine = machine_info()
    machine["busy_processes_at_start"] = other_processes()
    samples: dict[str, list[float]] = {}
    with EmbeddedBroker() as broker:
        assert broker.pid is not None
        process = psutil.Process(broker.pid)
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for future in admin.create_topics([NewTopic(f"fetch-cost-{p}", p, 1) for p in counts]).values():
            future.result()
        alone = [broker_cpu_pct(process, args.seconds, lambda: time.sleep(0.05)) for _ in range(args.rounds)]
        for round_ in range(args.rounds):
            for p in counts:
                for wait in waits:
                    pct = idle_consumer_pct(broker.bootstrap, process, f"fetch-cost-{p}", p, wait, args.seconds)
                    samples.setdefault(f"{p}/{wait}", []).append(round(pct, 2))
                    print(f"round {round_ + 1}: {p} partitions, fetch wait {wait} ms: broker {pct:.1f}% of a core",
                          flush=True)
        del admin
    table = {key: {"partitions": int(key.split("/")[0]), "fetch_wait_ms": int(key.split("/")[1]),
                   "broker_pct_median": round(statistics.median(v), 2), "broker_pct_rounds": v,
                   # an empty fetch lasts its wait on Tansu: about 1000 / wait fetches a second
                   "fetches_per_s_about": round(1000 / int(key.split("/")[1]), 1),
                   "broker_cpu_ms_per_fetch": round(10 * statistics.median(v) / (1000 / int(key.split("/")[1])), 3)}
             for key, v in samples.items()}
    out = {"bench": "fetch_cost", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_head(),
           "machine": machine, "loadavg_at_end": [round(x, 2) for x in psutil.getloadavg()],
           "broker_alone_pct": [round(x, 2) for x in alone], "rounds": args.rounds, "seconds": args.seconds,
           "idle_consumer": list(table.values())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"fetch_cost-{args.tag}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for row in table.values():
        print(f"{row['partitions']:>3} partitions, wait {row['fetch_wait_ms']:>4} ms: broker {row['broker_pct_median']:5.1f}% "
              f"of a core ({row['broker_cpu_ms_per_fetch']} ms per fetch)")
    print(f"broker alone: {out['broker_alone_pct']}%; results in {path}")


if __name__ == "__main__":
    main()
