"""``tierq worker`` and ``tierq demo``: parse and delegate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _worker_settings(args: argparse.Namespace) -> Any:
    from worker.settings import WorkerSettings

    overrides: dict[str, Any] = {}
    for arg, field in (("bootstrap", "bootstrap_servers"), ("topics", "topics_file"), ("tenants_file", "tenants_file"),
                       ("pool", "pool"),
                       ("model", "model"), ("max_num_seqs", "max_num_seqs"), ("metrics_port", "metrics_port")):
        value = getattr(args, arg, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "no_aging", False):
        overrides["aging"] = False
    return WorkerSettings(**overrides)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.engine import EngineStartError
    from schemas.logs import configure
    from worker.runner import run_worker

    configure()
    settings = _worker_settings(args)
    try:
        return run_worker(settings, settings.load_topology())
    except EngineStartError as exc:
        print(f"tierq: error: {exc}", file=sys.stderr)
        return 3


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(_worker_settings(args), low=args.low, medium=args.medium, high=args.high,
                    out=args.out)


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--pool", help="pool to serve (env TIERQ_POOL; default 'default')")
    engine.add_argument("--model", help="model path or name (env TIERQ_MODEL; default: a tiny local test model)")
    engine.add_argument("--max-num-seqs", type=int, help="engine slots (env TIERQ_MAX_NUM_SEQS)")
    engine.add_argument("--metrics-port", type=int, help="Prometheus port (env TIERQ_METRICS_PORT)")
    engine.add_argument("--no-aging", action="store_true", help="strict priority only, no aging promotion")

    worker = commands.add_parser("worker", parents=[common, engine],
                                 help="serve one pool with an embedded vLLM engine until SIGTERM")
    worker.set_defaults(func=cmd_worker)

    demo = commands.add_parser("demo", parents=[common, engine],
                               help="local stack + mixed workload; prints latency per band")
    demo.add_argument("--low", type=int, default=200)
    demo.add_argument("--medium", type=int, default=50)
    demo.add_argument("--high", type=int, default=20)
    demo.add_argument("--out", type=Path, help="also write the replies as JSONL")
    demo.set_defaults(func=cmd_demo)
