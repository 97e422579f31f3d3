"""Prometheus metrics of a worker (served on TIERQ_METRICS_PORT when set)."""

from __future__ import annotations

import bisect
import functools
from collections import defaultdict
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from schemas.messages import Band, Status

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

waiting = Gauge("tierq_waiting_requests", "Requests buffered in the worker, by band", ["band"])
paused = Gauge("tierq_paused_partitions", "source partitions paused because their buffer is full", ["band"])
slots_in_use = Gauge("tierq_engine_slots_in_use", "Requests admitted to the engine and not finished")
admitted = Counter("tierq_admitted_total", "Requests admitted to the engine", ["band", "served_as", "tenant"])
preemptions = Counter("tierq_preemptions_total", "Admitted requests taken back for a tenant below its fair share "
                      "(they run again later)", ["band", "tenant"])
promotions = Counter("tierq_aging_promotions_total", "Requests admitted above their band by aging", ["band"])
replies = Counter("tierq_replies_total", "Replies written, by band, status and tenant", ["band", "status", "tenant"])
cancels = Counter("tierq_cancels_total", "Cancel records by outcome: queued, running, on_arrival (answered), "
                  "remembered (request not here yet), refused (another tenant's request)", ["outcome"])
dead_letters = Counter("tierq_dead_letters_total", "Records written to the DLQ", ["reason"])
tokens = Counter("tierq_completion_tokens_total", "Generated tokens", ["band"])
queue_seconds = Histogram("tierq_queue_seconds", "submitted_at to admission", ["band"], buckets=LATENCY_BUCKETS)
ttft_seconds = Histogram("tierq_ttft_seconds", "admission to first token", ["band"], buckets=LATENCY_BUCKETS)
e2e_seconds = Histogram("tierq_e2e_seconds", "submitted_at to finished", ["band"], buckets=LATENCY_BUCKETS)

#: the label of a band or status: ``member.value`` is a Python-level property on Python 3.11's
#: enums (~0.8 us), and the worker labels every request several times
LABEL: dict[Band | Status, str] = {member: member.value for member in (*Band, *Status)}


@functools.lru_cache(maxsize=8192)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: prometheus_client's lookup costs several microseconds,
    and the worker asks for the same few children for every request."""
    return metric.labels(*labels)


def serve(port: int) -> None:
    start_http_server(port)


class Tally:
    """Per-request counter increments and histogram observations, added up here and handed to
    prometheus_client by ``flush`` (the worker: every GAUGE_INTERVAL_S and at shutdown).

    prometheus_client takes a lock per value and walks a histogram's buckets in Python on every
    call: six calls per request were a tenth of the worker's CPU. Here a request costs a dict
    update per counter, a list append per observation and one append for a served request's four
    series (``served``); ``flush`` puts the values in their buckets, in one loop per series, and a
    scrape sees them up to one flush later. Only the loop's thread calls it (no lock)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[Any, tuple[str, ...]], float] = {}
        #: (histogram, labels) -> the values observed since the last flush
        self._observed: dict[tuple[Any, tuple[str, ...]], list[float]] = {}
        #: band label -> (queue s, TTFT s, end-to-end s, tokens) of each request served since the last flush
        self._served: defaultdict[str, list[tuple[float | None, float | None, float | None, int]]] = defaultdict(list)

    def inc(self, metric: Any, *labels: str, amount: float = 1.0) -> None:
        key = (metric, labels)
        self._counts[key] = self._counts.get(key, 0.0) + amount

    def observe(self, histogram: Any, value: float, *labels: str) -> None:
        key = (histogram, labels)
        values = self._observed.get(key)
        if values is None:
            values = self._observed[key] = []
        values.append(value)

    def served(self, band: str, queue_s: float | None, ttft_s: float | None, e2e_s: float | None,
               completion_tokens: int) -> None:
        """A served request, by its band's label: its queue, TTFT and end-to-end seconds (None: not
        known) for queue_seconds, ttft_seconds and e2e_seconds, its tokens for tokens. One append
        instead of four ``observe``/``inc`` calls (a worker serves thousands a second)."""
        self._served[band].append((queue_s, ttft_s, e2e_s, completion_tokens))

    def flush(self) -> None:
        served, self._served = self._served, defaultdict(list)
        for band, rows in served.items():
            queue, ttft, e2e, completion_tokens = zip(*rows)
            for histogram, values in ((queue_seconds, queue), (ttft_seconds, ttft), (e2e_seconds, e2e)):
                known = [value for value in values if value is not None]
                if known:
                    _add_to_histogram(child(histogram, band), known)
            child(tokens, band).inc(sum(completion_tokens))
        counts, self._counts = self._counts, {}
        for (metric, labels), amount in counts.items():
            child(metric, *labels).inc(amount)
        observed, self._observed = self._observed, {}
        for (histogram, labels), values in observed.items():
            _add_to_histogram(child(histogram, *labels), values)


def _add_to_histogram(target: Any, values: list[float]) -> None:
    """``target.observe(value)`` for each value, in one pass. prometheus_client has no call for many
    observations at once: its Histogram child keeps a sum and one (non-cumulative) count per bucket,
    which this adds to (tests/test_worker_metrics.py compares the exposition with per-value calls)."""
    bounds = target._upper_bounds  # the buckets' upper bounds, +Inf last
    buckets = [0] * len(bounds)
    for value in values:
        # prometheus counts a value in the first bucket whose upper bound is >= it
        buckets[bisect.bisect_left(bounds, value)] += 1
    target._sum.inc(sum(values))
    for index, count in enumerate(buckets):
        if count:
            target._buckets[index].inc(count)
