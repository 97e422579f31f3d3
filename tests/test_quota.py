"""Token buckets and per-tenant quotas, on a fake clock."""

from __future__ import annotations

import pytest

from producer.quota import QuotaExceeded, QuotaLimiter, TokenBucket, estimated_tokens
from schemas.codec import MessageError
from schemas.messages import ErrorCode, Request, utc_now
from schemas.topology import Topology


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def topology(**quotas) -> Topology:
    return Topology.model_validate({
        "bands": {"high": {}, "medium": {"aging_step_s": 30}, "low": {"aging_step_s": 60}},
        "pools": {"default": {}},
        "tenants": {"t": {"quotas": quotas}, "free": {}},
    })


def request(tenant: str = "t", max_tokens: int = 10, prompt: str = "x" * 40) -> Request:
    return Request(request_id="r1", tenant_id=tenant, priority="low", prompt=prompt,
                   params={"max_tokens": max_tokens}, submitted_at=utc_now())


def test_bucket_refills_at_its_rate_up_to_capacity():
    clock = Clock()
    bucket = TokenBucket(rate=2, capacity=4, clock=clock)
    for _ in range(4):
        assert bucket.wait_time(1) == 0
        bucket.take(1)
    assert bucket.wait_time(1) == pytest.approx(0.5)
    clock.now += 10
    assert bucket.wait_time(4) == 0 and bucket.wait_time(5) == pytest.approx(0.5)


def test_requests_per_s_refuses_with_retry_after_and_charges_nothing():
    clock = Clock()
    limiter = QuotaLimiter(topology(requests_per_s=2), clock=clock)
    limiter.charge(request())
    limiter.charge(request())
    with pytest.raises(QuotaExceeded) as over:
        limiter.charge(request())
    assert over.value.code is ErrorCode.quota_exceeded
    assert over.value.retry_after == pytest.approx(0.5)
    assert "2 requests/s" in over.value.message
    clock.now += 0.5
    limiter.charge(request())  # exactly refilled


def test_tokens_per_min_counts_max_tokens_and_prompt():
    clock = Clock()
    limiter = QuotaLimiter(topology(tokens_per_min=60), clock=clock)
    assert estimated_tokens(request(max_tokens=10, prompt="x" * 40)) == 20
    limiter.charge(request())
    limiter.charge(request())
    limiter.charge(request())
    with pytest.raises(QuotaExceeded) as over:
        limiter.charge(request())
    assert over.value.retry_after == pytest.approx(20.0)  # 20 tokens at 1 token/s
    assert "tokens/min" in over.value.message


def test_a_request_larger_than_the_whole_quota_is_invalid_not_retryable():
    limiter = QuotaLimiter(topology(tokens_per_min=50))
    with pytest.raises(MessageError) as err:
        limiter.charge(request(max_tokens=100))
    assert not isinstance(err.value, QuotaExceeded)
    assert err.value.code is ErrorCode.invalid_request


def test_unlimited_tenants_and_updates_keep_unchanged_buckets():
    clock = Clock()
    limiter = QuotaLimiter(topology(requests_per_s=1), clock=clock)
    for _ in range(100):
        limiter.charge(request("free"))
    limiter.charge(request())
    limiter.update(topology(requests_per_s=1))  # same quota: the spent bucket stays spent
    with pytest.raises(QuotaExceeded):
        limiter.charge(request())
    limiter.update(topology(requests_per_s=5))  # new quota: a fresh bucket
    limiter.charge(request())
