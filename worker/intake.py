"""Kafka intake: one consumer per band topic of the pool, with pause/resume backpressure.

**A consumer group per band** (``Topology.band_groups``: ``<group>-high``, ``-medium``, ``-low``).
Kafka's cooperative-sticky assignor balances the number of partitions per member over all the
topics of its group, not per topic: in one group for the three bands, a worker that joins can be
given every high partition and no low one (seen in ``bench.pool``'s join scenario), and then the
pool's priority and fair share hold only by accident. One group per band spreads every band over
every worker. The three consumers are polled from the same loop; what they hold is one set.

**Read-ahead.** The worker's fair share (worker.admission) can only choose among requests it
has read, and a partition is read in order: a tenant's request queued behind another tenant's
flood in the same partition is invisible until the flood's records before it are read. So the
worker reads each partition well ahead of what it can start (``ReadAhead.ceiling``,
``TIERQ_READ_AHEAD_PER_PARTITION``, default 256 requests), bounded by the bytes buffered in the
whole worker (``ReadAhead.max_bytes``, ``TIERQ_READ_AHEAD_BYTES``): past that bound each
partition holds at most ``ReadAhead.floor`` (``TIERQ_PREFETCH_PER_PARTITION``, twice slots +
engine queue, so a partition resumed at half still holds a full engine's worth). A partition
at its limit alone is paused (``poll`` keeps running so the group does not rebalance us out)
and resumed at half. Reading ahead loses nothing: offsets are committed only up to the first
request not yet answered (worker.offsets), so whatever a worker buffered but did not start is
read again by the partition's next owner.

**A group that does not re-form.** Each band consumer's librdkafka statistics say whether its
member is ``steady`` in its group; one that has not been for ``rebalance_stuck_s`` is logged
(``band_group_stuck``) once, and again when it settles. On the embedded broker (Tansu 0.6.0) a
group whose leader leaves while the group re-forms (a member joined or left a moment before)
never re-forms: the broker keeps the departed leader and answers every SyncGroup with
REBALANCE_IN_PROGRESS, so the group's members loop without an assignment, and its partitions
without an owner, until the broker restarts (README, known problems). Kafka elects a new leader.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import confluent_kafka
import orjson
import structlog
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from broker.groups import adopt_pool_group_offsets
from broker.topics import PartitionKey
from schemas.messages import Band
from schemas.settings import Settings
from worker.settings import DEFAULT_FETCH_WAIT_MS, DEFAULT_REBALANCE_STUCK_S

log = structlog.get_logger("tierq.intake")


class RebalanceWatch:
    """Whether a band consumer's group member has been out of ``steady`` for too long, from its
    librdkafka statistics (``cgrp.join_state``); see the module doc."""

    def __init__(self, band: Band, group: str, stuck_after_s: float):
        self.band, self.group, self.stuck_after_s = band, group, stuck_after_s
        self.steady_at = time.monotonic()  # Intake.subscribe sets it again: the join starts there
        self.stuck = False

    def observe(self, join_state: str, now: float) -> None:
        """One statistics report: log when the member passes ``stuck_after_s`` unsteady, and when it settles."""
        if join_state == "steady":
            if self.stuck:
                log.info("band_group_formed", band=self.band.value, group=self.group,
                         after_s=round(now - self.steady_at, 1))
            self.steady_at, self.stuck = now, False
        elif not self.stuck and now - self.steady_at > self.stuck_after_s:
            self.stuck = True
            log.error("band_group_stuck", band=self.band.value, group=self.group, join_state=join_state,
                      unsteady_s=round(now - self.steady_at, 1),
                      why="this worker's member of the band's group has had no assignment for this long, so "
                          "part of the band may have no owner. On the embedded broker (Tansu 0.6.0) a group "
                          "whose leader left while it re-formed never re-forms: stop the pool's workers, run "
                          "`tierq groups copy --from <this group id> --to <a new one>` and start them with "
                          "TIERQ_GROUP_ID=<the new one> (nothing answered is served again)")

    def on_stats(self, stats_json: str) -> None:
        """librdkafka's ``stats_cb``."""
        cgrp = orjson.loads(stats_json).get("cgrp")
        if cgrp:
            self.observe(cgrp.get("join_state", ""), time.monotonic())


@dataclass(frozen=True)
class ReadAhead:
    """How much of each partition the worker buffers (see the module doc)."""

    #: requests a partition may always hold (TIERQ_PREFETCH_PER_PARTITION)
    floor: int
    #: requests a partition may hold at most (TIERQ_READ_AHEAD_PER_PARTITION)
    ceiling: int
    #: buffered bytes of the whole worker beyond which partitions are held to ``floor``
    #: (TIERQ_READ_AHEAD_BYTES; 0: always, the small fixed prefetch of earlier versions)
    max_bytes: int

    def decide(self, waiting: Mapping[PartitionKey, int], waiting_bytes: int, assigned: Iterable[PartitionKey],
               paused: set[PartitionKey]) -> tuple[list[PartitionKey], list[PartitionKey]]:
        """Partitions to pause and to resume, from each one's buffered requests and the bytes of all.

        Paused at ``ceiling``, or at ``floor`` once the bytes reach ``max_bytes``; resumed at half of
        ``ceiling``, and (while the bytes are above 3/4 of ``max_bytes``) at half of ``floor``."""
        over = waiting_bytes >= self.max_bytes
        roomy = waiting_bytes <= self.max_bytes * 3 // 4 and not over
        pause, resume = [], []
        for tp in assigned:
            count = waiting.get(tp, 0)
            if tp not in paused:
                if count >= self.ceiling or (over and count >= self.floor):
                    pause.append(tp)
            elif count <= self.ceiling // 2 and (roomy or count <= self.floor // 2):
                resume.append(tp)
        return pause, resume


def consumer_config(settings: Settings, group_id: str, session_timeout_ms: int, client_id: str | None,
                    fetch_wait_ms: int, stats_interval_ms: int = 0) -> dict[str, object]:
    """librdkafka configuration of one band's consumer (``stats_interval_ms``: 0, no statistics)."""
    return settings.librdkafka(
        "worker",
        **{
            "statistics.interval.ms": stats_interval_ms,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": session_timeout_ms,
            "heartbeat.interval.ms": max(session_timeout_ms // 5, 500),
            # keep librdkafka's own prefetch small: the backlog belongs in Kafka
            "queued.min.messages": 64,
            "queued.max.messages.kbytes": 2048,
            # an empty fetch's hold (WorkerSettings.fetch_wait_ms): on Tansu also the band's latency
            "fetch.wait.max.ms": fetch_wait_ms,
            # librdkafka postpones a partition's next fetch by up to 1 s once its local queue
            # passes the thresholds above; keep that short so a high request is not left behind
            "fetch.queue.backoff.ms": 20,
            "fetch.error.backoff.ms": 100,
            # the groups' member lists (`tierq status`) name the worker
            **({"client.id": client_id} if client_id else {}),
        },
    )


class Intake:
    def __init__(
        self,
        settings: Settings,
        band_topics: dict[Band, str],
        groups: Mapping[str, str],
        *,
        session_timeout_ms: int = 10_000,
        client_id: str | None = None,
        pool_group: str | None = None,
        fetch_wait_ms: Mapping[Band, int] | None = None,
        rebalance_stuck_s: float = DEFAULT_REBALANCE_STUCK_S,
    ):
        """``groups``: the consumer group of each band topic; ``pool_group``: the single group of
        earlier versions, whose committed offsets are adopted before joining (broker.groups)."""
        self.topic_band = {topic: band for band, topic in band_topics.items()}
        self.groups = dict(groups)
        self.assigned: set[PartitionKey] = set()
        self.paused: set[PartitionKey] = set()
        #: bands whose group has given this worker its assignment (maybe empty) at least once
        self.bands_assigned: set[Band] = set()
        self._settings = settings
        self._pool_group = pool_group
        self._on_assigned: Callable[[list[PartitionKey]], None] | None = None
        self._on_revoked: Callable[[list[PartitionKey], bool], None] | None = None
        waits = fetch_wait_ms or {}
        #: per band topic: is its group re-forming for too long (statistics every quarter of the limit, 1-5 s)
        self.watches = {topic: RebalanceWatch(band, self.groups[topic], rebalance_stuck_s)
                        for topic, band in self.topic_band.items()}
        stats_ms = int(min(max(rebalance_stuck_s / 4, 1.0), 5.0) * 1000)
        self._consumers = {
            topic: confluent_kafka.Consumer({
                **consumer_config(settings, self.groups[topic], session_timeout_ms, client_id,
                                  waits.get(band, DEFAULT_FETCH_WAIT_MS), stats_ms),
                "stats_cb": self.watches[topic].on_stats})
            for topic, band in self.topic_band.items()}
        #: partition counts come from a client that never fetches: a metadata request on a band
        #: consumer waits behind its fetch parked at the broker, up to fetch.wait.max.ms per band,
        #: with the worker's loop held (measured on Tansu: 1.6 s at a 2 s wait, 2 ms here)
        self._metadata: AdminClient | None = AdminClient(
            settings.librdkafka("worker-metadata", **{"allow.auto.create.topics": False}))

    def subscribe(self, on_assigned: Callable[[list[PartitionKey]], None],
                  on_revoked: Callable[[list[PartitionKey], bool], None]) -> None:
        """Join the band groups (after adopting an earlier version's offsets); the callbacks run
        inside ``poll`` (on the caller's thread)."""
        if self._pool_group is not None:
            adopt_pool_group_offsets(self._settings, self._pool_group, self.groups)
        self._on_assigned, self._on_revoked = on_assigned, on_revoked
        for watch in self.watches.values():
            watch.steady_at = time.monotonic()
        for topic, consumer in self._consumers.items():
            consumer.subscribe([topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    def _assigned(self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self.bands_assigned.add(self.topic_band[self._topic_of(consumer)])
        self.assigned.update(keys)
        self.paused.difference_update(keys)
        # librdkafka keeps a partition's pause flag across revoke and re-assignment; a partition
        # this consumer paused before must not come back silently paused
        consumer.resume(partitions)
        log.info("partitions_assigned", partitions=sorted(keys))
        if self._on_assigned is not None:
            started = time.monotonic()
            self._on_assigned(keys)
            _log_if_slow("assigned", keys, started)

    def _topic_of(self, consumer: confluent_kafka.Consumer) -> str:
        return next(topic for topic, c in self._consumers.items() if c is consumer)

    def _revoked(self, _consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, lost=False)

    def _lost(self, _consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, lost=True)

    def _release(self, partitions: list[TopicPartition], lost: bool) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        log.info("partitions_lost" if lost else "partitions_revoked", partitions=sorted(keys))
        if self._on_revoked is not None:
            started = time.monotonic()
            self._on_revoked(keys, lost)
            _log_if_slow("lost" if lost else "revoked", keys, started)
        self.assigned.difference_update(keys)
        self.paused.difference_update(keys)

    def poll(self, max_messages: int = 64) -> list[confluent_kafka.Message]:
        """Non-blocking: whatever is already fetched (up to ``max_messages`` per band), and
        rebalance callbacks."""
        good = []
        for consumer in self._consumers.values():
            good.extend(self._poll_one(consumer, max_messages))
        return good

    @staticmethod
    def _poll_one(consumer: confluent_kafka.Consumer, max_messages: int) -> list[confluent_kafka.Message]:
        messages = consumer.consume(num_messages=max_messages, timeout=0)
        good = []
        for msg in messages:
            error = msg.error()
            if error is None:
                good.append(msg)
            elif error.code() != confluent_kafka.KafkaError._PARTITION_EOF:
                if error.fatal():
                    raise confluent_kafka.KafkaException(error)
                log.warning("consumer_error", error=error.str())
        return good

    def apply_backpressure(self, waiting: Mapping[PartitionKey, int], waiting_bytes: int,
                           read_ahead: ReadAhead) -> None:
        """Pause and resume partitions by ``read_ahead``'s rule (``ReadAhead.decide``)."""
        pause, resume = read_ahead.decide(waiting, waiting_bytes, self.assigned, self.paused)
        if pause:
            self.paused.update(pause)
            for topic, tps in _by_topic(pause).items():
                self._consumers[topic].pause(tps)
        if resume:
            self.paused.difference_update(resume)
            for topic, tps in _by_topic(resume).items():
                self._consumers[topic].resume(tps)

    def partition_counts(self, timeout: float = 10.0) -> dict[str, int]:
        """Partitions of each band topic, from the broker's metadata ({} if it does not answer)."""
        counts: dict[str, int] = {}
        if self._metadata is None:  # closed
            return counts
        for topic in self._consumers:
            try:
                metadata = self._metadata.list_topics(topic, timeout=timeout).topics.get(topic)
            except confluent_kafka.KafkaException:
                return {}
            if metadata is not None and metadata.error is None and metadata.partitions:
                counts[topic] = len(metadata.partitions)
        return counts

    def paused_by_band(self) -> dict[Band, int]:
        counts = {band: 0 for band in self.topic_band.values()}
        for topic, _partition in self.paused:
            counts[self.topic_band[topic]] += 1
        return counts

    def commit(self, offsets: dict[PartitionKey, int], *, asynchronous: bool = True) -> None:
        """Commit each band's offsets through its own group (only partitions still held)."""
        owned = {tp: offset for tp, offset in offsets.items() if tp in self.assigned}
        for topic, tps in _by_topic(owned.keys(), owned).items():
            try:
                self._consumers[topic].commit(offsets=tps, asynchronous=asynchronous)
            except confluent_kafka.KafkaException as exc:
                log.warning("commit_failed", error=str(exc),
                            offsets={f"{t.topic}[{t.partition}]": t.offset for t in tps})

    def close(self) -> None:
        """Leave every band group (each close may revoke partitions: the callbacks commit)."""
        for consumer in self._consumers.values():
            consumer.close()
        self._metadata = None  # AdminClient has no close(): dropping it ends its connections


#: a rebalance callback that holds the worker's loop longer than this is logged (nothing is
#: admitted, answered or committed meanwhile)
SLOW_CALLBACK_S = 0.1


def _log_if_slow(kind: str, keys: list[PartitionKey], started: float) -> None:
    took = time.monotonic() - started
    if took >= SLOW_CALLBACK_S:
        log.info("rebalance_callback_slow", kind=kind, count=len(keys), ms=round(took * 1000, 1))


def _by_topic(keys: Iterable[PartitionKey], offsets: Mapping[PartitionKey, int] | None = None,
              ) -> dict[str, list[TopicPartition]]:
    """``TopicPartition``s grouped by topic (with their offset from ``offsets`` if given)."""
    grouped: dict[str, list[TopicPartition]] = {}
    for topic, partition in keys:
        tp = TopicPartition(topic, partition) if offsets is None else TopicPartition(topic, partition,
                                                                                      offsets[(topic, partition)])
        grouped.setdefault(topic, []).append(tp)
    return grouped
