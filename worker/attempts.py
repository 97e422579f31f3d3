"""Poison-request guard: durable engine-attempt counts, cheap on the common path.

A request that kills the engine kills its worker, and is delivered again to the next one;
without a durable count it would crash the pool forever. Counting every request before the
engine sees it would cost two records per request and a broker round trip in front of the
engine, so the compacted attempts topic holds two kinds of records:

- a *held-to marker* per (consumer group, source partition): before the engine sees a
  request, a marker at or past its offset is durable, meaning "the owner of this partition
  may have started requests up to here". One marker covers a whole fetched batch. A clean
  release (rebalance, shutdown) puts back the marker it inherited, so only a worker that
  dies, or loses its partitions, leaves a marker past its committed offset.
- a *count* per request_id, for *suspects* only: requests at or below the marker a worker
  found when it was assigned the partition (its predecessor may have started them: one
  attempt), and requests that already have a count. A suspect's count is written and
  acknowledged before the engine sees it, and tombstoned once its reply is durable.

Every worker of the pool reads the topic continuously; on assignment it reads it to the end
first, so it sees the marker its predecessor left.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Protocol

import confluent_kafka
import orjson
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from broker.topics import PartitionKey
from schemas.settings import Settings
from worker.settings import DEFAULT_ATTEMPTS_FETCH_WAIT_MS

#: Request ids cannot contain "/" (schemas.messages.REQUEST_ID_PATTERN), so marker keys never collide.
MARKER_PREFIX = "held/"
NOTHING_HELD = -1


def marker_key(group_id: str, tp: PartitionKey) -> str:
    return f"{MARKER_PREFIX}{group_id}/{tp[0]}/{tp[1]}"


def attempts_consumer_config(settings: Settings, fetch_wait_ms: int) -> dict[str, object]:
    """The attempts reader's librdkafka config (``WorkerSettings.attempts_fetch_wait_ms``)."""
    return settings.librdkafka("worker-attempts", **{
        "group.id": f"tierq-attempts-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        # a fetch that finds nothing waits this long; Tansu does not answer early when records
        # arrive meanwhile, so librdkafka's 500 ms default would hold up every catch-up by that much
        "fetch.wait.max.ms": fetch_wait_ms,
    })


class AttemptsLedger:
    """What the attempts topic says: counts per request_id, and this group's held-to markers."""

    def __init__(self, settings: Settings, topic: str, group_id: str,
                 fetch_wait_ms: int = DEFAULT_ATTEMPTS_FETCH_WAIT_MS):
        self.topic = topic
        self.counts: dict[str, int] = {}
        self.markers: dict[PartitionKey, int] = {}
        #: per assigned partition: offsets up to here may have been started by a worker that died
        self.suspect_to: dict[PartitionKey, int] = {}
        self._marker_prefix = f"{MARKER_PREFIX}{group_id}/"
        self._consumer = confluent_kafka.Consumer(attempts_consumer_config(settings, fetch_wait_ms))
        # end offsets come from a client of its own: on the consumer's connection the query would
        # queue behind the consumer's waiting fetch
        self._admin_config = settings.librdkafka("worker-attempts-admin")
        self._admin: AdminClient | None = None
        self._partitions: list[int] = []
        self._not_loaded: set[int] = set()
        self.connected = False

    def connect(self, timeout: float = 5.0) -> str | None:
        """Find the topic and start reading it; None when done, else why not (broker down, topic missing)."""
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=timeout).topics.get(self.topic)
        except confluent_kafka.KafkaException as exc:
            return f"broker unreachable: {exc.args[0].str() if exc.args else exc}"
        if metadata is None or metadata.error is not None:
            return f"attempts topic {self.topic!r} does not exist yet; run `tierq topics create`"
        self._partitions = sorted(metadata.partitions)
        self._not_loaded = set(self._partitions)
        self._consumer.assign([TopicPartition(self.topic, p, confluent_kafka.OFFSET_BEGINNING)
                               for p in self._partitions])
        self.connected = True
        return None

    def load(self, timeout: float = 30.0) -> None:
        """Read the topic to its end once, so counts from before this worker started are known."""
        deadline = time.monotonic() + timeout
        while self._not_loaded and time.monotonic() < deadline:
            self.poll(0.2)

    def catch_up(self, timeout: float = 30.0) -> bool:
        """Read everything written before now (a predecessor's last marker); False if that timed out."""
        deadline = time.monotonic() + timeout
        if self._admin is None:
            self._admin = AdminClient(self._admin_config)
        futures = self._admin.list_offsets({TopicPartition(self.topic, p): OffsetSpec.latest()
                                            for p in self._partitions}, request_timeout=timeout)
        try:
            ends = {tp.partition: future.result().offset for tp, future in futures.items()}
        except confluent_kafka.KafkaException:
            return False
        while time.monotonic() < deadline:
            positions = self._consumer.position([TopicPartition(self.topic, p) for p in self._partitions])
            if all(tp.offset >= ends[tp.partition] or ends[tp.partition] <= 0 for tp in positions):
                return True
            self.poll(0.05)
        return False

    def poll(self, timeout: float = 0) -> None:
        for msg in self._consumer.consume(num_messages=500, timeout=timeout):
            error = msg.error()
            if error is not None:
                if error.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    self._not_loaded.discard(msg.partition())
                continue
            key = (msg.key() or b"").decode(errors="replace")
            value = msg.value()
            if key.startswith(MARKER_PREFIX):
                self._read_marker(key, value)
            elif value is None:
                self.counts.pop(key, None)
            else:
                try:
                    self.counts[key] = max(self.counts.get(key, 0), int(orjson.loads(value)["attempts"]))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue

    def _read_marker(self, key: str, value: bytes | None) -> None:
        if not key.startswith(self._marker_prefix):
            return  # another consumer group's partitions
        topic, _, partition = key[len(self._marker_prefix):].rpartition("/")
        try:
            tp = (topic, int(partition))
            self.markers[tp] = NOTHING_HELD if value is None else int(orjson.loads(value)["held_to"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return

    # ---- what a request's attempt is -------------------------------------------------

    def assigned(self, partitions: Iterable[PartitionKey]) -> bool:
        """Take over partitions: offsets up to their markers are suspects. False: the topic could
        not be read to its end, so a predecessor's marker may be unknown (not safe to serve)."""
        if not self.catch_up():
            return False
        for tp in partitions:
            self.suspect_to[tp] = self.markers.get(tp, NOTHING_HELD)
        return True

    def released(self, partitions: Iterable[PartitionKey]) -> None:
        for tp in partitions:
            self.suspect_to.pop(tp, None)

    def is_suspect(self, request_id: str, tp: PartitionKey, offset: int) -> bool:
        """Whether this request is counted by request_id (a suspect) rather than covered by a marker:
        it has a count, or a worker that died may have started it (its offset is at or below the
        marker found on assignment). Written out here and in ``prior_attempts``, not shared through
        a helper: both are asked for every request."""
        return request_id in self.counts or offset <= self.suspect_to.get(tp, NOTHING_HELD)

    def record_count(self, request_id: str, attempts: int) -> None:
        """Our own count write was acknowledged (reading it back would come later)."""
        self.counts[request_id] = attempts

    def forget_count(self, request_id: str) -> None:
        """Our tombstone for this request is on its way."""
        self.counts.pop(request_id, None)

    def prior_attempts(self, request_id: str, tp: PartitionKey, offset: int) -> int:
        """Engine attempts this request has had so far, as far as anyone can know."""
        if request_id in self.counts:
            return self.counts[request_id]
        return 1 if offset <= self.suspect_to.get(tp, NOTHING_HELD) else 0

    def close(self) -> None:
        self._consumer.close()
        self._admin = None  # librdkafka releases an admin client when it is collected


class MarkerWriter(Protocol):
    """What ``HeldMarkers`` needs of ``worker.replies.ReplyWriter``."""

    def mark_held(self, key: str, offset: int, on_durable: Callable[[], None] | None = None) -> None: ...


class HeldMarkers:
    """This worker's held-to markers: written when requests are fetched, so that by the time
    one reaches the engine its marker is usually durable already; awaited only when not."""

    def __init__(self, writer: MarkerWriter, group_id: str):
        self._writer = writer
        self._group_id = group_id
        self._issued: dict[PartitionKey, int] = {}
        self._durable: dict[PartitionKey, int] = {}
        self._waiters: dict[PartitionKey, list[tuple[int, asyncio.Future[None]]]] = {}
        self._generation: dict[PartitionKey, int] = {}

    def cover(self, tp: PartitionKey, offset: int) -> None:
        """Make sure a marker at or past ``offset`` is (being) written."""
        if offset <= self._issued.get(tp, NOTHING_HELD):
            return
        self._issued[tp] = offset
        generation = self._generation.get(tp, 0)
        self._writer.mark_held(marker_key(self._group_id, tp), offset,
                               on_durable=lambda: self._on_durable(tp, offset, generation))

    def _on_durable(self, tp: PartitionKey, offset: int, generation: int) -> None:
        if generation != self._generation.get(tp, 0) or offset <= self._durable.get(tp, NOTHING_HELD):
            return  # written before the partition was released, or overtaken
        self._durable[tp] = offset
        waiting = self._waiters.get(tp, [])
        for item in [w for w in waiting if w[0] <= offset]:
            waiting.remove(item)
            if not item[1].done():
                item[1].set_result(None)

    def covered(self, tp: PartitionKey, offset: int) -> bool:
        """Whether a marker at or past ``offset`` is durable (then ``wait_covered`` need not be awaited)."""
        return offset <= self._durable.get(tp, NOTHING_HELD)

    async def wait_covered(self, tp: PartitionKey, offset: int) -> None:
        """Return once a marker at or past ``offset`` is durable (``cover`` must have been called)."""
        if self.covered(tp, offset):
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(tp, []).append((offset, future))
        await future

    def release(self, partitions: Iterable[PartitionKey], clean: bool, inherited: dict[PartitionKey, int]) -> int:
        """Forget partitions. On a clean release, put back the marker this worker inherited (what it
        held is done or back in Kafka, not started by a dead worker); return how many were written."""
        written = 0
        for tp in partitions:
            self._generation[tp] = self._generation.get(tp, 0) + 1
            self._durable.pop(tp, None)
            for _offset, future in self._waiters.pop(tp, []):
                future.cancel()
            if self._issued.pop(tp, None) is not None and clean:
                self._writer.mark_held(marker_key(self._group_id, tp), inherited.get(tp, NOTHING_HELD))
                written += 1
        return written
