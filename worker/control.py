"""The control topic: cancel records (``tierq.cancel/v1``) that every worker of a pool reads.

Each worker reads every partition of its pool's control topic itself (manual assignment, no
consumer group, nothing committed), because the request a cancel names may be buffered or
running on any worker of the pool, or not fetched by anyone yet. On start it reads back
``memory_s`` of the topic (offsets by timestamp), so a worker that replaces a dead one also
knows the cancels of the requests it inherits.

A cancel for a request the worker does not hold goes into the ``CancelBook``: if the request
arrives within ``memory_s`` (a cancel that overtook its request, or a request that another
worker held and gave back in a rebalance), it is answered ``cancelled`` without starting.
After ``memory_s``, or past ``limit`` remembered cancels (oldest first), a cancel is dropped:
a cancel for an unknown id costs a little memory for a while, nothing more.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

import confluent_kafka
import structlog
from confluent_kafka import TopicPartition

from schemas.codec import MessageError, decode_cancel
from schemas.messages import Cancel
from schemas.settings import Settings
from worker.settings import DEFAULT_CONTROL_FETCH_WAIT_MS

log = structlog.get_logger("tierq.control")


class CancelBook:
    """Cancels for requests this worker does not hold (yet), kept ``ttl_s`` seconds, at most ``limit``."""

    def __init__(self, ttl_s: float, limit: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.limit = limit
        self._clock = clock
        self._cancels: OrderedDict[str, tuple[Cancel, float]] = OrderedDict()

    def remember(self, cancel: Cancel) -> None:
        self._cancels[cancel.request_id] = (cancel, self._clock() + self.ttl_s)
        self._cancels.move_to_end(cancel.request_id)
        self._evict()

    def take(self, request_id: str) -> Cancel | None:
        """The cancel for ``request_id`` if one is remembered (it is forgotten now)."""
        if not self._cancels:  # asked for every request that arrives; mostly none is remembered
            return None
        self._evict()
        entry = self._cancels.pop(request_id, None)
        return None if entry is None else entry[0]

    def _evict(self) -> None:
        now = self._clock()
        while self._cancels:
            _rid, (_cancel, expires_at) = next(iter(self._cancels.items()))
            if expires_at > now and len(self._cancels) <= self.limit:
                return
            self._cancels.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cancels)


def control_consumer_config(settings: Settings, fetch_wait_ms: int) -> dict[str, object]:
    """The control reader's librdkafka config (``WorkerSettings.control_fetch_wait_ms``)."""
    return settings.librdkafka("worker-control", **{
        "group.id": f"tierq-control-{uuid.uuid4().hex}",  # required by librdkafka; never joined
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "fetch.wait.max.ms": fetch_wait_ms,
    })


class ControlReader:
    """Reads the pool's control topic without blocking; ``poll`` returns the cancels that arrived."""

    def __init__(self, settings: Settings, topic: str, memory_s: float,
                 fetch_wait_ms: int = DEFAULT_CONTROL_FETCH_WAIT_MS):
        self.topic = topic
        self.memory_s = memory_s
        self._consumer = confluent_kafka.Consumer(control_consumer_config(settings, fetch_wait_ms))
        self._assigned = False

    def start(self, timeout: float = 10.0) -> str | None:
        """Assign every partition from ``memory_s`` ago; None when done, else why not (retry later)."""
        try:
            meta = self._consumer.list_topics(self.topic, timeout=timeout).topics.get(self.topic)
        except confluent_kafka.KafkaException as exc:
            return f"control topic {self.topic}: {exc}"
        if meta is None or meta.error is not None or not meta.partitions:
            return f"control topic {self.topic} does not exist; run `tierq topics create`"
        since_ms = int((time.time() - self.memory_s) * 1000)
        wanted = [TopicPartition(self.topic, p, since_ms) for p in sorted(meta.partitions)]
        try:
            found = self._consumer.offsets_for_times(wanted, timeout=timeout)
        except confluent_kafka.KafkaException as exc:
            return f"control topic {self.topic}: cannot look up offsets by time: {exc}"
        # -1: nothing that recent, start at the end
        self._consumer.assign([TopicPartition(self.topic, tp.partition,
                                              tp.offset if tp.offset >= 0 else confluent_kafka.OFFSET_END)
                               for tp in found])
        self._assigned = True
        return None

    def poll(self, max_records: int = 100) -> list[Cancel]:
        if not self._assigned:
            return []
        cancels = []
        oldest_ms = (time.time() - self.memory_s) * 1000
        for msg in self._consumer.consume(max_records, 0):
            if msg.error() is not None:
                if msg.error().code() != confluent_kafka.KafkaError._PARTITION_EOF:
                    log.warning("control_read_error", topic=self.topic, error=msg.error().str())
                continue
            _kind, stamp = msg.timestamp()
            if 0 < stamp < oldest_ms:  # older than a worker remembers cancels anyway
                continue
            try:
                cancels.append(decode_cancel(msg.value() or b""))
            except MessageError as exc:
                log.warning("bad_cancel_record", topic=self.topic, partition=msg.partition(), offset=msg.offset(),
                            error=exc.message)
        return cancels

    def close(self) -> None:
        self._consumer.close()
