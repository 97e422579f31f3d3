"""Per-tenant rate quotas at the entry point: token buckets for requests/s and tokens/min.

A request over quota is refused with ``quota_exceeded`` and a retry-after (the time until
the buckets can cover it), never dropped. Token cost is charged up front, before the
model has run, as ``max_tokens`` plus an estimate of the prompt (4 characters a token),
because the point is to bound what a tenant can ask the engine for.

Where the buckets live is a ``QuotaBackend``, chosen at the edge by ``quota_backend``:

* ``LocalQuotaBackend`` (default): in the process that enforces them (a gateway instance, a
  producer). With N gateway instances a tenant can use N times its rate.
* ``RedisQuotaBackend`` (``TIERQ_QUOTA_REDIS_URL``, producer.quota_redis): one set of buckets in
  Redis/Valkey charged atomically by every instance, so the rate holds for the whole pool.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from schemas.codec import MessageError
from schemas.messages import ErrorCode, Request
from schemas.topology import Quotas, Topology

if TYPE_CHECKING:
    from schemas.settings import Settings

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # chat-template overhead per message, roughly


class QuotaExceeded(MessageError):
    """Over quota now; ``retry_after`` seconds from now the same request would fit."""

    code = ErrorCode.quota_exceeded

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, code=ErrorCode.quota_exceeded)
        self.retry_after = retry_after


class QuotaStoreUnavailable(QuotaExceeded):
    """The shared quota store cannot be reached and the backend refuses rather than guess
    (``TIERQ_QUOTA_REDIS_ON_ERROR=refuse``): refused like a request over quota (same code, HTTP 429,
    ``retry_after`` = when the store is tried again), with a message that names the store."""


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


class Limit(NamedTuple):
    """One of a tenant's buckets: ``rate`` units per second, at most ``capacity``."""

    name: str  # "requests_per_s" | "tokens_per_min"
    rate: float
    capacity: float


def tenant_limits(quotas: Quotas) -> tuple[Limit, ...]:
    """The buckets a tenant's quotas mean: requests/s (burst: one second's worth, at least 1) and
    tokens/min (burst: one minute's worth)."""
    limits = []
    if quotas.requests_per_s:
        limits.append(Limit("requests_per_s", quotas.requests_per_s, max(1.0, quotas.requests_per_s)))
    if quotas.tokens_per_min:
        limits.append(Limit("tokens_per_min", quotas.tokens_per_min / 60, float(quotas.tokens_per_min)))
    return tuple(limits)


class QuotaBackend(ABC):
    """Where token buckets live. A bucket is named by tenant and ``Limit`` (its rate and capacity
    included): a tenant whose quota changes gets a fresh, full bucket."""

    @abstractmethod
    def try_take(self, tenant_id: str, limits: Sequence[Limit], amounts: Sequence[float]) -> list[float] | None:
        """Take ``amounts[i]`` from bucket ``limits[i]`` for every i, or nothing at all. Returns
        None when taken, else each bucket's wait in seconds until its amount fits (0 where it does)."""

    @abstractmethod
    def give_back(self, tenant_id: str, limit: Limit, amount: float) -> None:
        """Return ``amount`` to a bucket (capped at its capacity)."""

    def forget(self, tenant_id: str) -> None:
        """The tenant is gone: drop what is kept for it (if anything)."""

    def close(self) -> None:
        """Release connections."""


class LocalQuotaBackend(QuotaBackend):
    """Buckets in this process (``time.monotonic`` unless another clock is given)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[tuple[str, Limit], TokenBucket] = {}
        self._by_tenant: dict[str, dict[str, Limit]] = {}

    def _bucket(self, tenant_id: str, limit: Limit) -> TokenBucket:
        bucket = self._buckets.get((tenant_id, limit))
        if bucket is None:
            known = self._by_tenant.setdefault(tenant_id, {})
            old = known.get(limit.name)
            if old is not None:  # the quota changed: the old bucket goes
                self._buckets.pop((tenant_id, old), None)
            known[limit.name] = limit
            bucket = self._buckets[(tenant_id, limit)] = TokenBucket(limit.rate, limit.capacity, self._clock)
        return bucket

    def try_take(self, tenant_id: str, limits: Sequence[Limit], amounts: Sequence[float]) -> list[float] | None:
        buckets = [self._bucket(tenant_id, limit) for limit in limits]
        waits = [bucket.wait_time(amount) for bucket, amount in zip(buckets, amounts)]
        if any(wait > 0 for wait in waits):
            return waits
        for bucket, amount in zip(buckets, amounts):
            bucket.take(amount)
        return None

    def give_back(self, tenant_id: str, limit: Limit, amount: float) -> None:
        self._bucket(tenant_id, limit).give_back(amount)

    def forget(self, tenant_id: str) -> None:
        for limit in self._by_tenant.pop(tenant_id, {}).values():
            self._buckets.pop((tenant_id, limit), None)


def quota_backend(settings: Settings) -> QuotaBackend:
    """The backend the settings ask for: Redis with ``quota_redis_url``, else this process."""
    url = getattr(settings, "quota_redis_url", None)
    if url is None:
        return LocalQuotaBackend()
    from producer.quota_redis import RedisQuotaBackend

    return RedisQuotaBackend(url.get_secret_value(), on_error=getattr(settings, "quota_redis_on_error", "local"))


def estimated_tokens(request: Request) -> int:
    """What a request is charged against tokens_per_min: max_tokens + prompt estimate."""
    if request.prompt is not None:
        chars, overhead = len(request.prompt), 0
    else:
        messages = request.messages or []
        chars, overhead = sum(len(m.content) for m in messages), TOKENS_PER_MESSAGE * len(messages)
    return request.params.max_tokens * request.params.n + overhead + math.ceil(chars / CHARS_PER_TOKEN)


class QuotaLimiter:
    """Checks and charges each tenant's ``requests_per_s`` and ``tokens_per_min``, in ``backend``
    (default: buckets in this process, on ``clock``)."""

    def __init__(self, topology: Topology, clock: Callable[[], float] = time.monotonic, *,
                 backend: QuotaBackend | None = None):
        self.backend = backend if backend is not None else LocalQuotaBackend(clock)
        self._limits: dict[str, tuple[Limit, ...]] = {}
        self._quotas: dict[str, Quotas] = {}
        self.update(topology)

    def update(self, topology: Topology) -> None:
        """Adopt new quotas (tenants file reloaded); unchanged limits keep their buckets."""
        quotas = {tid: cfg.quotas for tid, cfg in topology.tenants.items()}
        for gone in set(self._quotas) - set(quotas):
            self.backend.forget(gone)
        self._limits = {tid: limits for tid, q in quotas.items() if (limits := tenant_limits(q))}
        self._quotas = quotas

    def charge(self, request: Request) -> int:
        """Charge one request, or raise ``QuotaExceeded`` (nothing charged). Returns its token cost."""
        limits = self._limits.get(request.tenant_id)
        cost = estimated_tokens(request)
        if limits is None:
            return cost
        amounts = [1 if limit.name == "requests_per_s" else cost for limit in limits]
        for limit in limits:
            if limit.name == "tokens_per_min" and cost > limit.capacity:
                raise MessageError(
                    f"request needs about {cost} tokens (max_tokens + prompt), more than tenant "
                    f"{request.tenant_id!r}'s whole quota of {limit.capacity:.0f} tokens/min",
                    code=ErrorCode.invalid_request,
                )
        waits = self.backend.try_take(request.tenant_id, limits, amounts)
        if waits is None:
            return cost
        which, retry_after = max(zip((limit.name for limit in limits), waits), key=lambda kv: kv[1])
        quota = self._quotas[request.tenant_id]
        limit_text = f"{quota.requests_per_s:g} requests/s" if which == "requests_per_s" else (
            f"{quota.tokens_per_min} tokens/min (this request: ~{cost})")
        raise QuotaExceeded(
            f"tenant {request.tenant_id!r} is over its quota of {limit_text}; retry after {retry_after:.2f}s",
            retry_after=retry_after,
        )

    def refund(self, tenant_id: str, tokens: int) -> None:
        """Give back tokens charged but not used (e.g. a request that was never published)."""
        for limit in self._limits.get(tenant_id, ()):
            if limit.name == "tokens_per_min" and tokens > 0:
                self.backend.give_back(tenant_id, limit, tokens)

    def close(self) -> None:
        self.backend.close()
