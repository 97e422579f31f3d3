"""Triage: what becomes of a fetched record, decided without Kafka, engine or clock.

A record is buffered for admission, answered with an error reply at once, or dead-lettered
(with its original bytes) when nobody can be answered: no valid request_id, or a tenant
without a reply topic. The worker acts on the verdict; every reason is a stable error code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from broker.topics import PartitionKey
from schemas.codec import InvalidMessage, MalformedMessage, decode_request
from schemas.messages import REQUEST_ID_PATTERN, Band, ErrorCode, Request
from schemas.topology import TenantConfig
from worker.engine import RequestRejected

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)


class Buffer(NamedTuple):
    """A servable request and its prompt, rendered once here (a NamedTuple: immutable, and
    cheaper to make than a frozen dataclass, one per request)."""

    request: Request
    prompt_ids: list[int]


@dataclass(frozen=True)
class Answer:
    """Refused before admission: answer with this error on the tenant's reply topic."""

    request_id: str
    tenant_id: str
    code: ErrorCode
    message: str
    metadata: dict[str, Any] = field(default_factory=dict)
    submitted_at: datetime | None = None


@dataclass(frozen=True)
class DeadLetter:
    """Nobody to answer: the original bytes go to the DLQ with this reason ("code: detail")."""

    reason: str


Verdict = Buffer | Answer | DeadLetter


class Renderer(Protocol):
    """What triage needs of the engine adapter: render a prompt and check it fits the model."""

    def render(self, request: Request) -> list[int]: ...

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None: ...


class Triage:
    """Decodes, validates and routes one record; ``prior_attempts(request_id, source, offset)``
    comes from the poison guard (``PoisonGuard.prior_attempts``), so a request that keeps killing
    engines is refused here."""

    def __init__(self, pool: str, tenants: Mapping[str, TenantConfig], engine: Renderer, max_attempts: int):
        self.pool = pool
        self.tenants = tenants
        self.engine = engine
        self.max_attempts = max_attempts

    def classify(self, value: bytes | None, band: Band, prior_attempts: Callable[[str, PartitionKey, int], int],
                 source: PartitionKey, offset: int) -> Verdict:
        """``source`` and ``offset``: where the record was read, for ``prior_attempts`` (passed
        apart, not bound in a closure: one record after another, thousands a second)."""
        try:
            request = decode_request(value or b"")
        except MalformedMessage as exc:
            return DeadLetter(f"malformed: {exc.message}")
        except InvalidMessage as exc:
            return self._invalid(exc)
        if request.tenant_id not in self.tenants:  # no reply topic to answer on
            return DeadLetter(f"unknown_tenant: unknown tenant {request.tenant_id!r}")
        problem = self._route_problem(request, band, prior_attempts(request.request_id, source, offset))
        if problem is None:
            try:
                prompt_ids = self.engine.render(request)
                self.engine.check_length(len(prompt_ids), request.params.max_tokens)
                return Buffer(request, prompt_ids)
            except RequestRejected as exc:
                problem = exc.code, exc.message
        code, message = problem
        return Answer(request.request_id, request.tenant_id, code, message, request.metadata, request.submitted_at)

    def _invalid(self, exc: InvalidMessage) -> Verdict:
        """Answer an invalid request when we know whom to answer, else dead-letter it."""
        doc = exc.document if isinstance(exc.document, dict) else {}
        request_id, tenant_id = doc.get("request_id"), doc.get("tenant_id")
        if (isinstance(request_id, str) and _REQUEST_ID.match(request_id)
                and isinstance(tenant_id, str) and tenant_id in self.tenants):
            metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            return Answer(request_id, tenant_id, exc.code, exc.message, metadata)
        return DeadLetter(f"{exc.code.value}: {exc.message}")

    def _route_problem(self, request: Request, band: Band, attempts: int) -> tuple[ErrorCode, str] | None:
        tenant = self.tenants[request.tenant_id]
        if request.pool != self.pool:
            return ErrorCode.unknown_pool, f"request for pool {request.pool!r} arrived on pool {self.pool!r}'s topic"
        if band.rank < tenant.max_priority.rank:
            return (ErrorCode.forbidden_priority,
                    f"tenant {request.tenant_id!r} may use priority {tenant.max_priority.value} at most")
        if attempts >= self.max_attempts:
            return (ErrorCode.engine_error,
                    f"request abandoned after {attempts} engine attempts (it may crash the engine)")
        return None
