"""Producer-side commands (``submit``, ``results``, ``tenant``, ``gateway``): parse and delegate.

Registered on the ``tierq`` command by ``tierq.cli``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from schemas.settings import Settings

EXIT_OK, EXIT_FAILED = 0, 1


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the common command-line options on top."""
    overrides: dict[str, Any] = {}
    if getattr(args, "bootstrap", None):
        overrides["bootstrap_servers"] = args.bootstrap
    if getattr(args, "topics", None):
        overrides["topics_file"] = args.topics
    if getattr(args, "tenants_file", None):
        overrides["tenants_file"] = args.tenants_file
    return Settings(**overrides)


def cmd_submit(args: argparse.Namespace) -> int:
    from producer.client import Producer
    from producer.submit import Rejection, submit_file
    from schemas.codec import dumps

    settings = settings_from_args(args)
    errors_out = open(args.errors, "wb") if args.errors else None

    def on_reject(rejection: Rejection) -> None:
        print(f"{args.file}:{rejection.line}: {rejection.code}: {rejection.message}", file=sys.stderr)
        if errors_out is not None:
            errors_out.write(dumps(rejection.__dict__) + b"\n")

    try:
        with Producer(settings, settings.load_topology(), on_quota=args.quota) as producer:
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

    settings = settings_from_args(args)
    out = open(args.out, "wb") if args.out else sys.stdout.buffer
    try:
        with ResultCollector(settings, settings.load_topology(), args.tenant) as collector:
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


def cmd_cancel(args: argparse.Namespace) -> int:
    from producer.client import DeliveryError, Producer
    from schemas.codec import MessageError

    settings = settings_from_args(args)
    try:
        with Producer(settings, settings.load_topology(), on_quota="off", routing=False) as producer:
            producer.cancel(args.request_id, args.tenant, reason=args.reason).result(timeout=30)
    except (MessageError, DeliveryError, TimeoutError) as exc:
        print(f"tierq: cancel not published: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"tierq: cancel of {args.request_id} published; its reply (status cancelled) follows unless it "
          "had finished or is not this tenant's", file=sys.stderr)
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

    settings = settings_from_args(args)
    key = add_tenant(settings.topics_file, settings.tenants_file, args.tenant_id, _tenant_config(args))
    _print_key(args.tenant_id, key, settings)
    print("tierq: run `tierq topics create` to create its reply topic; running gateways and workers "
          "pick the tenant up within seconds", file=sys.stderr)
    return EXIT_OK


def cmd_tenant_rotate_key(args: argparse.Namespace) -> int:
    from schemas.tenants import rotate_key

    settings = settings_from_args(args)
    key = rotate_key(settings.topics_file, settings.tenants_file, args.tenant_id, keep_old=args.keep_old)
    _print_key(args.tenant_id, key, settings)
    if not args.keep_old:
        print("tierq: earlier keys of this tenant are revoked", file=sys.stderr)
    return EXIT_OK


def cmd_tenant_list(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    for tenant_id, cfg in settings.load_topology().tenants.items():
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


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
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

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a request (queued: never started; "
                                 "running: aborted); answered with status cancelled")
    cancel.add_argument("request_id")
    cancel.add_argument("--tenant", required=True, help="the request's tenant (another tenant's cancel is refused)")
    cancel.add_argument("--reason", help="recorded in the cancel record")
    cancel.set_defaults(func=cmd_cancel)

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
