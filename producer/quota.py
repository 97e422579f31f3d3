"""Per-tenant rate quotas at the entry point: token buckets for requests/s and tokens/min.

A request over quota is refused with ``quota_exceeded`` and a retry-after (the time until
the buckets can cover it), never dropped. Token cost is charged up front, before the
model has run, as ``max_tokens`` plus an estimate of the prompt (4 characters a token),
because the point is to bound what a tenant can ask the engine for.

Buckets live in the process that enforces them (a gateway instance, a producer): with N
gateway instances a tenant can use N times its rate. Size quotas per instance, or route
a tenant to one instance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from schemas.codec import MessageError
from schemas.messages import ErrorCode, Request
from schemas.topology import Quotas, Topology

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # chat-template overhead per message, roughly


class QuotaExceeded(MessageError):
    """Over quota now; ``retry_after`` seconds from now the same request would fit."""

    code = ErrorCode.quota_exceeded

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, code=ErrorCode.quota_exceeded)
        self.retry_after = retry_after


class TokenBucket:
    """``rate`` units per second, holding at most ``capacity``; starts full."""

    __slots__ = ("rate", "capacity", "_level", "_updated", "_clock")

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._level = capacity
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` is available (0 if it is now)."""
        self._refill()
        missing = amount - self._level
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self._level -= amount

    def give_back(self, amount: float) -> None:
        self._refill()
        self._level = min(self.capacity, self._level + amount)


def estimated_tokens(request: Request) -> int:
    """What a request is charged against tokens_per_min: max_tokens + prompt estimate."""
    if request.prompt is not None:
        chars, overhead = len(request.prompt), 0
    else:
        messages = request.messages or []
        chars, overhead = sum(len(m.content) for m in messages), TOKENS_PER_MESSAGE * len(messages)
    return request.params.max_tokens * request.params.n + overhead + math.ceil(chars / CHARS_PER_TOKEN)


@dataclass
class _TenantBuckets:
    requests: TokenBucket | None
    tokens: TokenBucket | None


class QuotaLimiter:
    """Checks and charges each tenant's ``requests_per_s`` and ``tokens_per_min``."""

    def __init__(self, topology: Topology, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, _TenantBuckets] = {}
        self._quotas: dict[str, Quotas] = {}
        self.update(topology)

    def update(self, topology: Topology) -> None:
        """Adopt new quotas (tenants file reloaded); unchanged tenants keep their buckets."""
        quotas = {tid: cfg.quotas for tid, cfg in topology.tenants.items()}
        for tenant_id, q in quotas.items():
            if self._quotas.get(tenant_id) != q:
                self._buckets[tenant_id] = _TenantBuckets(
                    TokenBucket(q.requests_per_s, max(1.0, q.requests_per_s), self._clock)
                    if q.requests_per_s else None,
                    TokenBucket(q.tokens_per_min / 60, q.tokens_per_min, self._clock) if q.tokens_per_min else None,
                )
        for gone in set(self._buckets) - set(quotas):
            del self._buckets[gone]
        self._quotas = quotas

    def charge(self, request: Request) -> int:
        """Charge one request, or raise ``QuotaExceeded`` (nothing charged). Returns its token cost."""
        buckets = self._buckets.get(request.tenant_id)
        cost = estimated_tokens(request)
        if buckets is None:
            return cost
        if buckets.tokens is not None and cost > buckets.tokens.capacity:
            raise MessageError(
                f"request needs about {cost} tokens (max_tokens + prompt), more than tenant "
                f"{request.tenant_id!r}'s whole quota of {buckets.tokens.capacity:.0f} tokens/min",
                code=ErrorCode.invalid_request,
            )
        waits = {}
        if buckets.requests is not None:
            waits["requests_per_s"] = buckets.requests.wait_time(1)
        if buckets.tokens is not None:
            waits["tokens_per_min"] = buckets.tokens.wait_time(cost)
        over = {name: wait for name, wait in waits.items() if wait > 0}
        if over:
            which, retry_after = max(over.items(), key=lambda kv: kv[1])
            quota = self._quotas[request.tenant_id]
            limit = f"{quota.requests_per_s:g} requests/s" if which == "requests_per_s" else (
                f"{quota.tokens_per_min} tokens/min (this request: ~{cost})")
            raise QuotaExceeded(
                f"tenant {request.tenant_id!r} is over its quota of {limit}; retry after {retry_after:.2f}s",
                retry_after=retry_after,
            )
        if buckets.requests is not None:
            buckets.requests.take(1)
        if buckets.tokens is not None:
            buckets.tokens.take(cost)
        return cost

    def refund(self, tenant_id: str, tokens: int) -> None:
        """Give back tokens charged but not used (e.g. a request that was never published)."""
        buckets = self._buckets.get(tenant_id)
        if buckets is not None and buckets.tokens is not None and tokens > 0:
            buckets.tokens.give_back(tokens)
