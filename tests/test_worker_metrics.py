"""The worker's per-request metrics go through ``metrics.Tally`` (added up, handed to
prometheus_client in one call per series on each flush): what a scrape sees after a flush must be
what per-request calls would have made."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from worker.metrics import LATENCY_BUCKETS, Tally


def metrics(registry: CollectorRegistry) -> tuple[Histogram, Counter]:
    return (Histogram("t_queue_seconds", "q", ["band"], buckets=LATENCY_BUCKETS, registry=registry),
            Counter("t_replies_total", "r", ["band", "status"], registry=registry))


def test_a_flushed_tally_exposes_what_per_request_calls_would_have():
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    (hist, count), (hist2, count2) = metrics(direct), metrics(tallied)
    tally = Tally()
    # on a bucket's bound, between bounds, past the last bound, zero, and a second series
    values = [0.005, 0.0049, 0.0051, 0.25, 7.3, 600, 601, 0.0, 1e-9, 30]
    for value in values:
        hist.labels("low").observe(value)
        tally.observe(hist2, value, "low")
        count.labels("low", "ok").inc()
        tally.inc(count2, "low", "ok")
    hist.labels("high").observe(0.01)
    tally.observe(hist2, 0.01, "high")
    count.labels("high", "error").inc(3)
    tally.inc(count2, "high", "error", amount=3)
    assert generate_latest(tallied) != generate_latest(direct)  # nothing handed over before a flush
    tally.flush()
    exposed = [line for line in generate_latest(tallied).decode().splitlines() if "_created" not in line]
    expected = [line for line in generate_latest(direct).decode().splitlines() if "_created" not in line]
    assert exposed == expected
    tally.flush()  # nothing new: nothing added twice
    assert [line for line in generate_latest(tallied).decode().splitlines() if "_created" not in line] == expected


def test_served_requests_reach_their_latency_histograms_and_token_counter():
    """``Tally.served``: one call per served request for the band's queue, TTFT and end-to-end
    histograms (None: not observed) and its token counter, as the per-value calls would have."""
    from worker import metrics as worker_metrics

    series = (worker_metrics.queue_seconds, worker_metrics.ttft_seconds, worker_metrics.e2e_seconds,
              worker_metrics.tokens)

    def samples(metrics_: tuple, band: str) -> dict[tuple[str, str], float]:
        return {(sample.name, sample.labels.get("le", "")): sample.value for metric in metrics_
                for family in metric.collect() for sample in family.samples
                if sample.labels.get("band") == band and not sample.name.endswith("_created")}

    registry = CollectorRegistry()
    direct = (Histogram("tierq_queue_seconds", "q", ["band"], buckets=LATENCY_BUCKETS, registry=registry),
              Histogram("tierq_ttft_seconds", "t", ["band"], buckets=LATENCY_BUCKETS, registry=registry),
              Histogram("tierq_e2e_seconds", "e", ["band"], buckets=LATENCY_BUCKETS, registry=registry),
              Counter("tierq_completion_tokens_total", "n", ["band"], registry=registry))
    served = [(0.005, None, 0.3, 7), (0.0049, 0.01, 601.0, 0), (0.25, 0.025, 2.5, 3)]
    before = samples(series, "medium")
    tally = Tally()
    for queue_s, ttft_s, e2e_s, tokens in served:
        tally.served("medium", queue_s, ttft_s, e2e_s, tokens)
        for histogram, value in zip(direct, (queue_s, ttft_s, e2e_s)):
            if value is not None:
                histogram.labels("medium").observe(value)
        direct[3].labels("medium").inc(tokens)
    assert samples(series, "medium") == before  # nothing handed over before a flush
    tally.flush()
    after = samples(series, "medium")
    # approx: the process-wide series may hold earlier tests' sums, and (a + b) - a need not be b in floats
    assert {key: after[key] - before.get(key, 0.0) for key in after} == pytest.approx(samples(direct, "medium"))


def test_settle_gc_freezes_the_startup_heap_and_raises_the_young_threshold():
    import gc

    from worker.runner import GC_YOUNG_THRESHOLD, settle_gc

    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] >= GC_YOUNG_THRESHOLD
        assert gc.get_threshold()[1:] == before[1:]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
