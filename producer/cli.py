"""The ``tierq`` command: parses arguments and delegates; no logic lives here."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from schemas.settings import BrokerNotConfigured, Settings
from schemas.topology import Topology, TopologyError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "bootstrap", None):
        overrides["bootstrap_servers"] = args.bootstrap
    if getattr(args, "topics", None):
        overrides["topics_file"] = args.topics
    if getattr(args, "tenants_file", None):
        overrides["tenants_file"] = args.tenants_file
    return Settings(**overrides)


def _topology(settings: Settings) -> Topology:
    return settings.load_topology()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_broker(args: argparse.Namespace) -> int:
    from producer.broker import EmbeddedBroker, LocalS3, s3_env

    s3 = None
    storage, env = "memory://tansu/", {}
    if args.s3_endpoint:
        storage, env = f"s3://{args.bucket}/", s3_env(args.s3_endpoint)
    elif args.durable:
        s3 = LocalS3(bucket=args.bucket).start()
        storage, env = f"s3://{args.bucket}/", s3.broker_env()
    broker = EmbeddedBroker(port=args.port, host=args.host, storage=storage, env=env).start()
    signal.signal(signal.SIGTERM, _interrupt)
    print(broker.bootstrap, flush=True)
    if storage.startswith("memory://"):
        where = "in memory (lost when it stops)"
    else:
        where = f"in {storage} ({args.s3_endpoint or (s3.endpoint if s3 else '')})"
    print(f"tierq: broker listening, data {where}; export TIERQ_BOOTSTRAP_SERVERS={broker.bootstrap}; "
          "Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        while True:
            code = broker.wait()
            if storage.startswith("memory://"):
                print(f"tierq: broker exited with status {code}; log: {broker.log_path}", file=sys.stderr)
                return EXIT_FAILED
            # durable storage: a crashed broker comes back on the same port with its data, except
            # the last records it acknowledged before a hard crash (Tansu 0.6.0; bench.broker_restart)
            print(f"tierq: broker exited with status {code}; restarting; records acknowledged just before "
                  f"a crash may be lost (log: {broker.log_path})", file=sys.stderr)
            time.sleep(1)
            broker.start()
    except KeyboardInterrupt:
        broker.stop()
        return EXIT_OK
    finally:
        if s3 is not None:
            s3.stop()


def cmd_topics_create(args: argparse.Namespace) -> int:
    from producer.admin import create_topics

    settings = _settings(args)
    outcome = create_topics(settings, _topology(settings))
    for topic, state in outcome.items():
        print(f"{state:8} {topic}")
    created = sum(1 for s in outcome.values() if s == "created")
    print(f"tierq: {created} created, {len(outcome) - created} already existed", file=sys.stderr)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from producer.client import Producer
    from producer.submit import Rejection, submit_file
    from schemas.codec import dumps

    settings = _settings(args)
    errors_out = open(args.errors, "wb") if args.errors else None

    def on_reject(rejection: Rejection) -> None:
        print(f"{args.file}:{rejection.line}: {rejection.code}: {rejection.message}", file=sys.stderr)
        if errors_out is not None:
            errors_out.write(dumps(rejection.__dict__) + b"\n")

    try:
        producer = Producer(settings, _topology(settings), on_quota=args.quota)
        report = submit_file(producer, args.file, tenant=args.tenant, priority=args.priority,
                             on_reject=on_reject, progress=None if not args.no_progress else False)
    finally:
        if errors_out is not None:
            errors_out.close()
    for problem in report.undelivered:
        print(f"tierq: not delivered: {problem}", file=sys.stderr)
    print(f"tierq: published {report.published}, rejected {len(report.rejected)}, "
          f"undelivered {len(report.undelivered)}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_results(args: argparse.Namespace) -> int:
    from producer.collector import ResultCollector
    from schemas.codec import encode

    settings = _settings(args)
    out = open(args.out, "wb") if args.out else sys.stdout.buffer
    try:
        with ResultCollector(settings, _topology(settings), args.tenant) as collector:
            for reply in collector.replies(follow=args.follow, expect=args.expect, timeout=args.timeout):
                out.write(encode(reply) + b"\n")
                out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    stats = collector.stats
    for problem in stats.undecodable:
        print(f"tierq: undecodable reply {problem}", file=sys.stderr)
    print(f"tierq: {stats.replies} replies ({stats.duplicates} duplicates skipped)", file=sys.stderr)
    if args.expect is not None and stats.replies < args.expect:
        print(f"tierq: expected {args.expect} replies, got {stats.replies} before the timeout", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _tenant_config(args: argparse.Namespace) -> Any:
    from schemas.topology import Quotas, TenantConfig

    quotas = Quotas(requests_per_s=args.requests_per_s, tokens_per_min=args.tokens_per_min,
                    max_in_flight=args.max_in_flight, max_tokens=args.max_tokens)
    return TenantConfig(pool=args.pool, max_priority=args.max_priority,
                        on_priority_above_max=args.on_priority_above_max, quotas=quotas)


def _print_key(tenant_id: str, key: str, settings: Settings) -> None:
    print(key)
    print(f"tierq: API key for tenant {tenant_id!r} printed above; it is shown only this once "
          f"(stored as a SHA-256 hash in {settings.tenants_file})", file=sys.stderr)


def cmd_tenant_add(args: argparse.Namespace) -> int:
    from schemas.tenants import add_tenant

    settings = _settings(args)
    key = add_tenant(settings.topics_file, settings.tenants_file, args.tenant_id, _tenant_config(args))
    _print_key(args.tenant_id, key, settings)
    print("tierq: run `tierq topics create` to create its reply topic; running gateways and workers "
          "pick the tenant up within seconds", file=sys.stderr)
    return EXIT_OK


def cmd_tenant_rotate_key(args: argparse.Namespace) -> int:
    from schemas.tenants import rotate_key

    settings = _settings(args)
    key = rotate_key(settings.topics_file, settings.tenants_file, args.tenant_id, keep_old=args.keep_old)
    _print_key(args.tenant_id, key, settings)
    if not args.keep_old:
        print("tierq: earlier keys of this tenant are revoked", file=sys.stderr)
    return EXIT_OK


def cmd_tenant_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    for tenant_id, cfg in _topology(settings).tenants.items():
        q = cfg.quotas
        print(f"{tenant_id:20} pool={cfg.pool} max_priority={cfg.max_priority.value} keys={len(cfg.api_key_hashes)} "
              f"rps={q.requests_per_s} tpm={q.tokens_per_min} in_flight={q.max_in_flight} max_tokens={q.max_tokens}")
    return EXIT_OK


def cmd_gateway(args: argparse.Namespace) -> int:
    from producer.gateway.app import run_gateway
    from producer.gateway.settings import GatewaySettings
    from schemas.logs import configure

    configure()
    overrides: dict[str, Any] = {}
    for arg, field in (("bootstrap", "bootstrap_servers"), ("topics", "topics_file"),
                       ("tenants_file", "tenants_file"), ("host", "gateway_host"), ("port", "gateway_port")):
        if getattr(args, arg, None) is not None:
            overrides[field] = getattr(args, arg)
    return run_gateway(GatewaySettings(**overrides))


def cmd_schema_export(args: argparse.Namespace) -> int:
    from schemas.export import export_json_schemas

    for path in export_json_schemas(args.directory):
        print(path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bootstrap", help="Kafka bootstrap servers (env TIERQ_BOOTSTRAP_SERVERS)")
    common.add_argument("--topics", type=Path, help="topology file (env TIERQ_TOPICS_FILE; default ./topics.yaml)")
    common.add_argument("--tenants-file", type=Path,
                        help="tenants file (env TIERQ_TENANTS_FILE; default ./tenants.yaml, read if present)")

    parser = argparse.ArgumentParser(prog="tierq", description="Priority-scheduled LLM inference over Kafka.")
    commands = parser.add_subparsers(dest="command", required=True)

    broker = commands.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) until Ctrl-C")
    broker.add_argument("--port", type=int, help="listen port (default: a free one)")
    broker.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    broker.add_argument("--durable", action="store_true",
                        help="keep data in a local S3 server (moto), so the broker survives clean restarts; "
                             "it is restarted if it dies (a hard crash can lose the last acknowledged records)")
    broker.add_argument("--s3-endpoint", help="keep data in this S3/MinIO endpoint instead (credentials from AWS_*)")
    broker.add_argument("--bucket", default="tansu", help="S3 bucket for --durable / --s3-endpoint")
    broker.set_defaults(func=cmd_broker)

    topics = commands.add_parser("topics", help="topic administration").add_subparsers(dest="action", required=True)
    topics.add_parser("create", parents=[common], help="create the topics of topics.yaml (idempotent)").set_defaults(
        func=cmd_topics_create)

    submit = commands.add_parser("submit", parents=[common], help="publish a JSONL file of requests")
    submit.add_argument("file", type=Path, help="JSONL: tierq requests or OpenAI batch lines")
    submit.add_argument("--priority", choices=["high", "medium", "low"], help="override each line's priority")
    submit.add_argument("--tenant", help="override each line's tenant_id (required for OpenAI batch lines)")
    submit.add_argument("--errors", type=Path, help="also write rejected lines as JSONL here")
    submit.add_argument("--no-progress", action="store_true", help="no progress bar")
    submit.add_argument("--quota", choices=["wait", "raise", "off"], default="wait",
                        help="tenant quotas: wait until a line fits (default), reject it, or do not check")
    submit.set_defaults(func=cmd_submit)

    results = commands.add_parser("results", parents=[common], help="write a tenant's replies as JSONL")
    results.add_argument("--tenant", required=True)
    results.add_argument("--out", type=Path, help="output file (default stdout)")
    results.add_argument("--follow", action="store_true", help="keep waiting for new replies")
    results.add_argument("--expect", type=int, help="stop after N distinct replies")
    results.add_argument("--timeout", type=float, help="give up after S seconds")
    results.set_defaults(func=cmd_results)

    tenant = commands.add_parser("tenant", help="tenants and API keys").add_subparsers(dest="action", required=True)
    add = tenant.add_parser("add", parents=[common], help="add a tenant to the tenants file and print its API key once")
    add.add_argument("tenant_id")
    add.add_argument("--pool", default="default")
    add.add_argument("--max-priority", choices=["high", "medium", "low"], default="medium")
    add.add_argument("--on-priority-above-max", choices=["reject", "lower"], default="reject")
    add.add_argument("--requests-per-s", type=float)
    add.add_argument("--tokens-per-min", type=int)
    add.add_argument("--max-in-flight", type=int)
    add.add_argument("--max-tokens", type=int)
    add.set_defaults(func=cmd_tenant_add)
    rotate = tenant.add_parser("rotate-key", parents=[common], help="print a new API key once; revoke the old ones")
    rotate.add_argument("tenant_id")
    rotate.add_argument("--keep-old", action="store_true", help="keep the earlier keys valid (overlap while rolling)")
    rotate.set_defaults(func=cmd_tenant_rotate_key)
    tenant.add_parser("list", parents=[common], help="list tenants, pools and quotas (never keys)").set_defaults(
        func=cmd_tenant_list)

    gateway = commands.add_parser("gateway", parents=[common],
                                  help="OpenAI-compatible HTTP gateway: API keys, quotas, priorities, batches")
    gateway.add_argument("--host", help="listen address (env TIERQ_GATEWAY_HOST; default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="listen port (env TIERQ_GATEWAY_PORT; default 8080)")
    gateway.set_defaults(func=cmd_gateway)

    schema = commands.add_parser("schema", help="message schemas").add_subparsers(dest="action", required=True)
    export = schema.add_parser("export", help="write JSON Schema files for the request and reply messages")
    export.add_argument("directory", type=Path)
    export.set_defaults(func=cmd_schema_export)

    _add_worker_commands(commands, common)
    return parser


def _add_worker_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Worker-side commands live in worker.cli; they are optional until the worker is installed."""
    try:
        from worker.cli import add_commands
    except ImportError:
        return
    add_commands(commands, common)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TopologyError, BrokerNotConfigured) as exc:
        print(f"tierq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        print(f"tierq: error: {exc.filename}: file not found", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
