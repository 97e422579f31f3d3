"""Prometheus metrics of a worker (served on TIERQ_METRICS_PORT when set)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

waiting = Gauge("tierq_waiting_requests", "Requests buffered in the worker, by band", ["band"])
paused = Gauge("tierq_paused_partitions", "source partitions paused because their buffer is full", ["band"])
slots_in_use = Gauge("tierq_engine_slots_in_use", "Requests admitted to the engine and not finished")
admitted = Counter("tierq_admitted_total", "Requests admitted to the engine", ["band", "served_as", "tenant"])
promotions = Counter("tierq_aging_promotions_total", "Requests admitted above their band by aging", ["band"])
replies = Counter("tierq_replies_total", "Replies written, by band, status and tenant", ["band", "status", "tenant"])
cancels = Counter("tierq_cancels_total", "Cancel records by outcome: queued, running, on_arrival (answered), "
                  "remembered (request not here yet), refused (another tenant's request)", ["outcome"])
dead_letters = Counter("tierq_dead_letters_total", "Records written to the DLQ", ["reason"])
tokens = Counter("tierq_completion_tokens_total", "Generated tokens", ["band"])
queue_seconds = Histogram("tierq_queue_seconds", "submitted_at to admission", ["band"], buckets=LATENCY_BUCKETS)
ttft_seconds = Histogram("tierq_ttft_seconds", "admission to first token", ["band"], buckets=LATENCY_BUCKETS)
e2e_seconds = Histogram("tierq_e2e_seconds", "submitted_at to finished", ["band"], buckets=LATENCY_BUCKETS)


@functools.lru_cache(maxsize=8192)
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: prometheus_client's lookup costs several microseconds,
    and the worker asks for the same few children for every request."""
    return metric.labels(*labels)


def serve(port: int) -> None:
    start_http_server(port)
