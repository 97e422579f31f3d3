"""The ``tierq`` command: one parser that registers the broker-side, producer and worker
commands. It parses and delegates; the logic lives in broker/, producer/ and worker/."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from producer.cli import settings_from_args
from schemas.settings import BrokerNotConfigured
from schemas.topology import TopologyError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_broker(args: argparse.Namespace) -> int:
    from broker.embedded import EmbeddedBroker, LocalS3, keep_running, s3_env

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

    def restarting(code: int) -> None:
        print(f"tierq: broker exited with status {code}; restarting; records acknowledged just before "
              f"a crash may be lost (log: {broker.log_path})", file=sys.stderr)

    try:
        code = keep_running(broker, on_restart=restarting)
        print(f"tierq: broker exited with status {code}; log: {broker.log_path}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        broker.stop()
        return EXIT_OK
    finally:
        if s3 is not None:
            s3.stop()


def cmd_topics_create(args: argparse.Namespace) -> int:
    from broker.topics import GROWTH_WARNING, create_topics, grow_topics

    settings = settings_from_args(args)
    topology = settings.load_topology()
    outcome = create_topics(settings, topology)
    changes = grow_topics(settings, topology, [t for t, state in outcome.items() if state == "exists"])
    for topic, state in outcome.items():
        change = changes.get(topic)
        note = f"  ({change.problem})" if change is not None and change.problem else ""
        print(f"{change.state if change is not None else state:8} {topic}{note}")
    created = sum(1 for s in outcome.values() if s == "created")
    grown = sum(1 for c in changes.values() if c.grown)
    print(f"tierq: {created} created, {grown} grown, {len(outcome) - created - grown} already existed",
          file=sys.stderr)
    if grown:
        print(f"tierq: warning: {GROWTH_WARNING}", file=sys.stderr)
    return EXIT_FAILED if any(c.failed for c in changes.values()) else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from broker.status import StatusError, as_json, as_table, collect

    settings = settings_from_args(args)
    try:
        pools = collect(settings, settings.load_topology(), pool=args.pool, group_id=args.group, timeout=args.timeout)
    except StatusError as exc:
        print(f"tierq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(as_json(pools) if args.json else as_table(pools))
    return EXIT_OK


def cmd_groups_copy(args: argparse.Namespace) -> int:
    """Carry a pool's committed offsets from its band groups under one group id to another's."""
    from broker.groups import GroupAdoptionError, copy_committed_offsets

    settings = settings_from_args(args)
    topology = settings.load_topology()
    if args.pool not in topology.pools:
        print(f"tierq: error: no pool {args.pool!r} in the topology (pools: {', '.join(topology.pools)})", file=sys.stderr)
        return EXIT_USAGE
    source = args.source or topology.pool_group(args.pool)
    sources, targets = topology.band_groups(args.pool, source), topology.band_groups(args.pool, args.target)
    try:
        copied = copy_committed_offsets(settings, sources, targets, timeout=args.timeout)
    except GroupAdoptionError as exc:
        print(f"tierq: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for topic, group in targets.items():
        print(f"{sources[topic]} -> {group}: {copied.get(group, 0)} partition offsets copied")
    return EXIT_OK


def cmd_schema_export(args: argparse.Namespace) -> int:
    from schemas.export import export_json_schemas

    for path in export_json_schemas(args.directory):
        print(path)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from tierq.demo import run_demo
    from worker.cli import worker_settings

    return run_demo(worker_settings(args), low=args.low, medium=args.medium, high=args.high, out=args.out,
                    verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    from producer.cli import add_commands as add_producer_commands
    from worker.cli import add_commands as add_worker_commands, engine_options

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
    topics.add_parser("create", parents=[common],
                      help="create the topics of topics.yaml, add partitions where it asks for more (idempotent)"
                      ).set_defaults(func=cmd_topics_create)

    status = commands.add_parser("status", parents=[common],
                                 help="backlog, owning worker and oldest waiting request per pool, band and partition")
    status.add_argument("--pool", help="only this pool (default: every pool of topics.yaml)")
    status.add_argument("--group", help="the pool's consumer group, if the workers run with TIERQ_GROUP_ID "
                                        "(default tierq-<pool>; needs --pool)")
    status.add_argument("--json", action="store_true", help="a JSON list, one object per partition")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    status.set_defaults(func=cmd_status)

    groups = commands.add_parser("groups", help="the pools' consumer groups").add_subparsers(dest="action", required=True)
    copy = groups.add_parser(
        "copy", parents=[common],
        help="copy a pool's committed offsets from the band groups of one group id to those of another, where the "
             "other has none (stop the pool's workers first; then start them with TIERQ_GROUP_ID=<to>): moves a "
             "pool off a group that no longer works (band_group_stuck) without serving answered requests again")
    copy.add_argument("--from", dest="source",
                      help="the group id the workers ran with (their TIERQ_GROUP_ID; default tierq-<pool>)")
    copy.add_argument("--to", dest="target", required=True, help="the new group id")
    copy.add_argument("--pool", default="default", help="pool (default: default)")
    copy.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    copy.set_defaults(func=cmd_groups_copy)

    schema = commands.add_parser("schema", help="message schemas").add_subparsers(dest="action", required=True)
    export = schema.add_parser("export", help="write JSON Schema files for the request and reply messages")
    export.add_argument("directory", type=Path)
    export.set_defaults(func=cmd_schema_export)

    add_producer_commands(commands, common)
    add_worker_commands(commands, common)

    demo = commands.add_parser("demo", parents=[common, engine_options()],
                               help="local stack + mixed workload; prints latency per band")
    demo.add_argument("--low", type=int, default=200)
    demo.add_argument("--medium", type=int, default=50)
    demo.add_argument("--high", type=int, default=20)
    demo.add_argument("--out", type=Path, help="also write the replies as JSONL")
    demo.add_argument("--verbose", action="store_true",
                      help="show vLLM's, the broker's and the worker's logs here (default: <state dir>/demo.log)")
    demo.set_defaults(func=cmd_demo)
    return parser


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
