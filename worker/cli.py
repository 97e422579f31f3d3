"""``tierq worker`` and ``tierq demo``: parse and delegate."""

from __future__ import annotations

import argparse
import json
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


def cmd_devices(args: argparse.Namespace) -> int:
    from worker.devices import discover, format_table

    discovery = discover()
    if args.json:
        print(json.dumps({"devices": [d.as_json() for d in discovery.devices], "note": discovery.note}, indent=2))
    else:
        print(format_table(discovery))
    return 0


def cmd_workers_up(args: argparse.Namespace) -> int:
    from producer.admin import create_topics
    from producer.broker import EmbeddedBroker
    from schemas.logs import configure
    from worker.devices import discover
    from worker.launcher import Supervisor, cpu_devices, plan

    configure()
    settings = _worker_settings(args)
    topology = settings.load_topology()
    if args.cpu:
        devices, note = cpu_devices(args.cpu), None
    else:
        discovery = discover()
        devices, note = discovery.devices, discovery.note
    if note:
        print(f"tierq: {note}", file=sys.stderr)
    specs = plan(devices, topology, metrics_port_base=args.metrics_port_base)
    if not specs:
        print("tierq: error: no device is assigned a worker (check the devices: rules)", file=sys.stderr)
        return 2
    base_env = {"TIERQ_TOPICS_FILE": str(Path(settings.topics_file).resolve()),
                "TIERQ_TENANTS_FILE": str(Path(settings.tenants_file).resolve()),
                "TIERQ_STATE_DIR": str(Path(settings.state_dir).resolve())}
    broker = None
    if settings.bootstrap_servers:
        base_env["TIERQ_BOOTSTRAP_SERVERS"] = settings.bootstrap_servers
    else:
        broker = EmbeddedBroker(log_path=settings.state_dir / "broker.log").start()
        base_env["TIERQ_BOOTSTRAP_SERVERS"] = broker.bootstrap
        create_topics(settings.model_copy(update={"bootstrap_servers": broker.bootstrap}), topology)
        print(f"tierq: no TIERQ_BOOTSTRAP_SERVERS: embedded broker at {broker.bootstrap} (in memory)",
              file=sys.stderr)
    if settings.model is None and any(topology.pools[spec.pool].model is None for spec in specs):
        from worker.tinymodel import make_tiny_model

        make_tiny_model(settings.model_dir_default())  # once, before the workers race to make it
    for spec in specs:
        print(f"tierq: {spec.name}: pool {spec.pool}", file=sys.stderr)
    supervisor = Supervisor(specs, base_env, settings.state_dir / "workers.json",
                            log_dir=args.log_dir)
    try:
        return supervisor.run(settings.drain_timeout_s)
    finally:
        if broker is not None:
            broker.stop()


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

    devices = commands.add_parser("devices", help="list GPUs and MIG instances (NVML); the CPU when there are none")
    devices.add_argument("--json", action="store_true", help="JSON instead of a table")
    devices.set_defaults(func=cmd_devices)

    workers = commands.add_parser("workers", help="run one worker per device").add_subparsers(
        dest="action", required=True)
    up = workers.add_parser("up", parents=[common],
                            help="start and supervise one worker process per GPU/MIG instance until SIGTERM")
    up.add_argument("--cpu", type=int, metavar="N", help="ignore GPUs; run N CPU workers")
    up.add_argument("--metrics-port-base", type=int, help="worker i serves Prometheus on this port + i")
    up.add_argument("--log-dir", type=Path, help="write each worker's output to LOG_DIR/worker-<device>.log")
    up.set_defaults(func=cmd_workers_up)
