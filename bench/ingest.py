"""Ingest: requests/s one producer process publishes (validate, encode, produce, acked).

    .venv/bin/python -m bench.ingest --requests 100000   # writes bench/results/ingest-cpu.json
"""

from __future__ import annotations

import argparse
import time

from bench.common import topology, write
from broker.embedded import EmbeddedBroker
from producer.client import Producer
from schemas.settings import Settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--bootstrap")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    docs = [{"tenant_id": "acme", "priority": ("high", "medium", "low")[i % 3], "prompt": f"hello {i}",
             "params": {"max_tokens": 16}} for i in range(args.requests)]

    def run(bootstrap: str) -> dict:
        topo = topology(bootstrap)
        settings = Settings(_env_file=None, bootstrap_servers=bootstrap)
        with Producer(settings, topo, on_quota="off") as producer:
            for doc in docs[:1000]:
                producer.submit(doc)  # warm-up: connections, metadata
            producer.flush(30)
            start = time.perf_counter()
            for doc in docs:
                producer.submit(doc)
            submitted = time.perf_counter() - start
            remaining = producer.flush(120)
            acked = time.perf_counter() - start
        assert remaining == 0, f"{remaining} requests not acknowledged"
        return {"requests": args.requests, "submit_s": round(submitted, 3), "acked_s": round(acked, 3),
                "req_per_s_acked": round(args.requests / acked), "req_per_s_submit": round(args.requests / submitted)}

    if args.bootstrap:
        result = run(args.bootstrap)
    else:
        with EmbeddedBroker() as broker:
            result = run(broker.bootstrap)
    write("ingest", args.tag, result)


if __name__ == "__main__":
    main()
