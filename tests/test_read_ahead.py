"""The worker's read-ahead (worker.intake.ReadAhead) and the buffer counts it is fed
(worker.admission), as pure logic."""

from __future__ import annotations

from collections import Counter

from worker.admission import AdmissionPolicy, BandRules, Pending
from worker.intake import ReadAhead
from schemas.messages import BAND_ORDER, Band

A, B, C = ("low", 0), ("low", 1), ("low", 2)
RULE = ReadAhead(floor=12, ceiling=256, max_bytes=1000)


def test_a_partition_is_read_past_the_small_prefetch_while_the_buffer_has_room():
    """A flood's partition keeps being read (the requests of others behind it reach the fair
    share) until it holds ``ceiling`` requests."""
    pause, resume = RULE.decide({A: 40, B: 255, C: 256}, waiting_bytes=100, assigned=[A, B, C], paused=set())
    assert pause == [C] and resume == []


def test_over_the_byte_bound_partitions_are_held_to_the_prefetch():
    pause, _ = RULE.decide({A: 40, B: 11, C: 12}, waiting_bytes=1000, assigned=[A, B, C], paused=set())
    assert sorted(pause) == [A, C]  # B, under the prefetch, is still read: its tenant is not hidden


def test_resuming_has_hysteresis():
    paused = {A, B, C}
    # bytes between 3/4 of the bound and the bound: only partitions down to half the prefetch resume
    _, resume = RULE.decide({A: 40, B: 6, C: 129}, waiting_bytes=800, assigned=[A, B, C], paused=paused)
    assert resume == [B]
    # room again: partitions down to half the ceiling resume; one above it stays paused
    _, resume = RULE.decide({A: 40, B: 6, C: 129}, waiting_bytes=700, assigned=[A, B, C], paused=paused)
    assert sorted(resume) == [A, B]


def test_a_zero_byte_bound_is_the_old_fixed_prefetch():
    rule = ReadAhead(floor=12, ceiling=256, max_bytes=0)
    pause, _ = rule.decide({A: 12, B: 11}, waiting_bytes=0, assigned=[A, B], paused=set())
    assert pause == [A]
    _, resume = rule.decide({A: 7, B: 6}, waiting_bytes=0, assigned=[A, B], paused={A, B})
    assert resume == [B]


def test_the_policy_counts_buffered_requests_per_source_and_their_bytes():
    bands = {band: BandRules(aging_step_s=None, reserved_slots=0) for band in BAND_ORDER}
    policy = AdmissionPolicy(bands, capacity=2)
    for i, (tenant, source) in enumerate([("acme", A), ("acme", A), ("globex", B), ("acme", B), ("acme", C)]):
        policy.add(Pending(f"r{i}", tenant, Band.low, submitted_ts=float(i), source=source, size=100 + i,
                           deadline_ts=2.5 if source == C else float("inf")))
    assert policy.waiting_by_source() == {A: 2, B: 2, C: 1} and policy.waiting_bytes == 510
    first, second = policy.next(now=0.0), policy.next(now=0.0)
    assert first is not None and second is not None
    assert policy.waiting_by_source() == dict(Counter(item.source for item in policy.waiting))
    assert policy.waiting_bytes == 510 - first.size - second.size
    policy.take_expired(now=3.0)  # the request from C
    policy.remove_where(lambda item: item.source == B)
    assert policy.waiting_by_source() == dict(Counter(item.source for item in policy.waiting))
    assert policy.waiting_bytes == sum(item.size for item in policy.waiting)
