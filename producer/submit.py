"""Submitting a JSONL file of requests: every good line is published, every bad one reported."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from producer.batchfile import to_request_document
from producer.client import DeliveryFuture, Producer
from schemas.codec import MessageError, loads_object


@dataclass(frozen=True)
class Rejection:
    line: int
    code: str
    message: str


@dataclass
class SubmitReport:
    published: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    undelivered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected and not self.undelivered


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 20), b""))


def submit_file(
    producer: Producer,
    path: Path,
    *,
    tenant: str | None = None,
    priority: str | None = None,
    on_reject: Callable[[Rejection], None] | None = None,
    progress: bool | None = None,
    flush_timeout: float = 60.0,
) -> SubmitReport:
    """Publish each valid line of ``path``; the report lists rejected lines by number.

    Returns once every published request is acknowledged by the broker (or timed out,
    in which case it is listed under ``undelivered``).
    """
    report = SubmitReport()

    def delivered(future: DeliveryFuture) -> None:
        if future.failed:
            report.undelivered.append(str(future.exception()))
        else:
            report.published += 1

    total = count_lines(path) if progress is not False else None
    bar = tqdm(total=total, unit="req", desc="submit", disable=None if progress is None else not progress,
               file=sys.stderr, mininterval=0.5)
    with open(path, "rb") as lines, bar:
        for number, raw in enumerate(lines, start=1):
            bar.update()
            if not raw.strip():
                continue
            try:
                doc = to_request_document(loads_object(raw), tenant=tenant, priority=priority)
                producer.submit(doc).add_done_callback(delivered)
            except MessageError as exc:
                rejection = Rejection(number, exc.code.value, exc.message)
                report.rejected.append(rejection)
                if on_reject is not None:
                    on_reject(rejection)
    remaining = producer.flush(flush_timeout)
    if remaining:
        report.undelivered.append(f"{remaining} request(s) not acknowledged within {flush_timeout:.0f}s")
    return report

