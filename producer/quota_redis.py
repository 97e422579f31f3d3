"""Pool-wide token buckets in Redis (or Valkey): every producer and gateway instance charges the
same buckets, so a tenant's ``requests_per_s`` and ``tokens_per_min`` hold for the whole pool.

One Lua script does refill + take + retry-after for all of a request's buckets at once, on
Redis's own clock (``TIME``), so instances agree whatever their clocks say and two instances
never both take the last token. A bucket is a hash ``{level, ts}`` (``ts``: Redis time in
microseconds) under ``tierq:quota:{<tenant>}:<limit>:<rate>:<capacity>``: the braces keep a
tenant's buckets in one Redis Cluster slot, and the rate and capacity in the key give a tenant
whose quota changed a fresh bucket in every instance at once. A missing key is a full bucket;
keys expire once they would be full again. Needs Redis >= 5 (script effects replication).

When Redis cannot be reached (or answers with an error), ``on_error`` decides: ``"local"``
(default) enforces the same quotas in this process's buckets, logged once per outage, so the
pool admits at most N times the rate with N instances, as without Redis; ``"refuse"`` refuses
every limited request with ``QuotaStoreUnavailable`` (``quota_exceeded``, HTTP 429). Redis is
tried again after ``retry_interval`` seconds; meanwhile no request waits on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal
from urllib.parse import urlsplit

import structlog

from producer.quota import Limit, LocalQuotaBackend, QuotaBackend, QuotaStoreUnavailable

log = structlog.get_logger("tierq.quota")

OnError = Literal["local", "refuse"]

#: Seconds a Redis command may take (connect and reply) before the store counts as unreachable;
#: a charge is one round trip of well under a millisecond on a LAN.
SOCKET_TIMEOUT_S = 0.5
#: While Redis is unreachable, seconds between tries; requests in between do not wait on it.
RETRY_INTERVAL_S = 2.0

#: KEYS[i]: bucket i. ARGV[3i-2 .. 3i]: its rate (units/s), capacity, amount to take (negative:
#: give back). Takes every amount or none. Returns {1 if taken else 0, wait_1, ..., wait_n}, the
#: waits (seconds until amount i fits, "0" where it does; rounded up to the microsecond) as strings:
#: Lua numbers would be truncated to integers on the way out.
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local levels, waits, over = {}, {}, false
for i = 1, n do
  local rate, cap, amount = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local level = cap
  local kept = redis.call('HMGET', KEYS[i], 'level', 'ts')
  if kept[1] and kept[2] then
    local elapsed = math.max(0, now - tonumber(kept[2])) / 1000000
    level = math.min(cap, tonumber(kept[1]) + elapsed * rate)
  end
  levels[i] = level
  local missing = amount - level
  if missing > 0 then
    waits[i] = missing / rate
    over = true
  else
    waits[i] = 0
  end
end
if not over then
  for i = 1, n do
    local rate, cap, amount = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
    local level = math.min(cap, levels[i] - amount)
    redis.call('HSET', KEYS[i], 'level', string.format('%.17g', level), 'ts', string.format('%.0f', now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - level) / rate * 1000) + 1000)
  end
end
local out = {over and 0 or 1}
for i = 1, n do
  out[i + 1] = string.format('%.6f', math.ceil(waits[i] * 1000000) / 1000000)  -- never early
end
return out
"""


def redacted(url: str) -> str:
    """The URL without credentials, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


class RedisQuotaBackend(QuotaBackend):
    """Token buckets shared through Redis; see the module docstring."""

    def __init__(self, url: str, *, on_error: OnError = "local", key_prefix: str = "tierq:quota",
                 retry_interval: float = RETRY_INTERVAL_S, timeout: float = SOCKET_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise RuntimeError(
                "TIERQ_QUOTA_REDIS_URL is set but the redis package is not installed: "
                "pip install 'tierq[pool-quotas]' (or unset it for per-process quotas)"
            ) from None
        if on_error not in ("local", "refuse"):
            raise ValueError(f"on_error must be 'local' or 'refuse', not {on_error!r}")
        self.store = redacted(url)
        self.on_error: OnError = on_error
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError,)
        # one immediate retry on a fresh connection (a pooled one may predate a Redis restart),
        # then give up: never a backoff that would hold the caller (the gateway's event loop)
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                            retry=Retry(NoBackoff(), 1))
        self._script = self._client.register_script(TAKE_SCRIPT)
        self._prefix = key_prefix
        self._retry_interval = retry_interval
        self._clock = clock
        self._local = LocalQuotaBackend(clock)
        self._retry_at: float | None = None  # set while the store is unreachable
        self._last_error = ""
        try:
            self._client.ping()
        except self._errors as exc:
            self._went_down(exc)
        else:
            log.info("quota buckets shared in Redis", store=self.store, on_error=on_error)

    @property
    def available(self) -> bool:
        """False while the store counts as unreachable (between a failure and the next success)."""
        return self._retry_at is None

    def key(self, tenant_id: str, limit: Limit) -> str:
        return f"{self._prefix}:{{{tenant_id}}}:{limit.name}:{limit.rate:.12g}:{limit.capacity:.12g}"

    def _run(self, tenant_id: str, limits: Sequence[Limit], amounts: Sequence[float]) -> list[bytes] | None:
        """The script's reply, or None if the store is (still) unreachable."""
        if self._retry_at is not None and self._clock() < self._retry_at:
            return None
        args: list[str] = []
        for limit, amount in zip(limits, amounts):
            args += (repr(float(limit.rate)), repr(float(limit.capacity)), repr(float(amount)))
        try:
            reply = self._script(keys=[self.key(tenant_id, limit) for limit in limits], args=args)
        except self._errors as exc:
            self._went_down(exc)
            return None
        if self._retry_at is not None:
            self._retry_at = None
            log.warning("quota store reachable again: quotas are pool-wide again", store=self.store)
        return reply

    def _went_down(self, exc: BaseException) -> None:
        first = self._retry_at is None
        self._retry_at = self._clock() + self._retry_interval
        self._last_error = f"{type(exc).__name__}: {exc}"
        if not first:
            return
        if self.on_error == "refuse":
            log.error("quota store unreachable: refusing rate-limited requests until it is back",
                      store=self.store, error=self._last_error, retry_s=self._retry_interval)
        else:
            log.warning("quota store unreachable: enforcing quotas in this process only until it is back "
                        "(the pool may admit up to N times a tenant's rate with N instances)",
                        store=self.store, error=self._last_error, retry_s=self._retry_interval)

    def try_take(self, tenant_id: str, limits: Sequence[Limit], amounts: Sequence[float]) -> list[float] | None:
        reply = self._run(tenant_id, limits, amounts)
        if reply is not None:
            return None if int(reply[0]) else [float(wait) for wait in reply[1:]]
        if self.on_error == "local":
            return self._local.try_take(tenant_id, limits, amounts)
        retry_after = max(0.1, (self._retry_at or 0.0) - self._clock())
        raise QuotaStoreUnavailable(
            "the shared quota store is unreachable, so requests with a rate quota are refused until it "
            f"is back; retry after {retry_after:.2f}s",
            retry_after=retry_after,
        )

    def give_back(self, tenant_id: str, limit: Limit, amount: float) -> None:
        if self._run(tenant_id, [limit], [-amount]) is None and self.on_error == "local":
            self._local.give_back(tenant_id, limit, amount)

    def forget(self, tenant_id: str) -> None:
        self._local.forget(tenant_id)  # Redis keys expire by themselves

    def close(self) -> None:
        self._client.close()
