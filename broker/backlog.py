"""The pool's load as Kafka sees it: per band-topic partition, end offset, the committed offset
of the band's consumer group and the backlog between them.

Used by ``tierq status`` and by load-aware routing in the producers (refreshed about once a
second for a few dozen partitions), so a reader keeps its clients and its last answers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import confluent_kafka
from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from broker.topics import PartitionKey
from schemas.settings import Settings

#: how long a topic's partition list is trusted before its metadata is read again
METADATA_MAX_AGE_S = 30.0
#: group states in which members' commits reach the broker as they are made (``settling_groups``)
SETTLED_STATES = frozenset({ConsumerGroupState.STABLE, ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD})


class BacklogError(RuntimeError):
    """The broker did not answer, or a topic does not exist."""


class PartitionLoad(NamedTuple):
    topic: str
    partition: int
    #: the true end offset (offset of the next record to be written)
    end: int
    #: the group's committed offset; the log start when the group has committed none
    committed: int
    #: records written but not yet committed by the group: ``max(0, end - committed)``
    backlog: int


class BacklogReader:
    """End offsets, committed offsets and backlog of a consumer group's partitions.

    **Why end offsets come from a read, not from ListOffsets alone.** Tansu 0.6.0 (the embedded
    broker and the test broker) answers ListOffsets(latest), the high watermark, with the base
    offset of the partition's *last batch* + 1: after batches of 57 and 13 records it says 58,
    not 70 (see ENVIRONMENT.md). Backlog computed from it alone would be wrong by up to a batch
    per partition, exactly when producers batch most (under load). So the reported watermark is
    only a lower bound: a plain consumer (``enable.partition.eof``, assigned, never joins or
    commits to any group) reads from it to the partition's end, and the end is the offset that
    end-of-partition event reports (the offset after the last record). On real Kafka the
    watermark is exact and this costs one empty fetch; on Tansu it re-reads at most the last
    batch. A partition whose reported watermark did not change since the previous ``read`` has
    no new batch (a new batch always moves even Tansu's answer), so its last true end is reused
    without any fetch.

    **Committed offsets** come from OffsetFetch for the topic's group, through a consumer with
    the group's id that never subscribes (not the admin client's ``list_consumer_group_offsets``,
    which can abort the process across a broker restart; see ``_committed``): it neither joins
    the group nor disturbs its members. With
    no committed offset the log start counts as committed (a new group starts there), and a
    committed offset below the log start (retention deleted those records) counts as the log
    start.

    Not thread-safe: one thread calls ``read`` (and ``oldest_timestamps``). Call ``close``.
    """

    def __init__(self, settings: Settings, groups: str | Mapping[str, str]):
        """``groups``: the consumer group whose committed offsets count, one for every topic or
        one per topic (a pool's band groups, ``Topology.band_groups``)."""
        self.groups = groups
        self._settings = settings
        #: per group: a consumer that reads its committed offsets and never joins it
        self._group_consumers: dict[str, confluent_kafka.Consumer] = {}
        #: describes groups (settling_groups); None: make a fresh one
        self._describer: AdminClient | None = None
        # a metadata request for one topic would create it where the broker auto-creates topics
        # (Tansu always does; Kafka with auto.create.topics.enable) unless the client says not to
        self._admin = AdminClient(settings.librdkafka("backlog-admin", **{"allow.auto.create.topics": False}))
        self._consumer = confluent_kafka.Consumer(settings.librdkafka("backlog", **{
            # never used to join, commit or fetch offsets: librdkafka merely requires one
            "group.id": f"tierq-backlog-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            # a stale end past the log's end (topic recreated) resets to the end, which then
            # reports EOF like any other
            "auto.offset.reset": "latest",
            # a fetch at the end returns after this long (Kafka holds empty fetches up to it,
            # and Tansu always waits it out), so it bounds the cost of each read
            "fetch.wait.max.ms": 10,
            "fetch.error.backoff.ms": 50,
            # only the tail of a partition is ever read: keep librdkafka from prefetching more
            # (not queued.min.messages=1: past it librdkafka backs off the next fetch by 1 s)
            "queued.max.messages.kbytes": 1024,
            "max.partition.fetch.bytes": 65536,
        }))
        #: per partition: (reported watermark, true end) of the previous read
        self._ends: dict[PartitionKey, tuple[int, int]] = {}
        #: per topic: (when read, partition ids)
        self._partitions: dict[str, tuple[float, list[int]]] = {}
        self._closed = False

    # ---- public API ---------------------------------------------------------------------

    def read(self, topics: list[str], timeout: float = 5.0) -> dict[PartitionKey, PartitionLoad]:
        """Load of every partition of ``topics``, keyed by ``(topic, partition)``.

        Raises ``BacklogError`` when the broker does not answer within ``timeout`` or a topic
        does not exist.
        """
        deadline = time.monotonic() + timeout
        try:
            partitions = [TopicPartition(topic, p) for topic in topics for p in self.partitions(topic, timeout)]
            if not partitions:
                return {}
            latest = self._list_offsets(partitions, OffsetSpec.latest(), deadline)
            earliest = self._list_offsets(partitions, OffsetSpec.earliest(), deadline)
            committed = self._committed(partitions, deadline)
            ends = self._true_ends(latest, deadline)
        except BacklogError:
            self._describer = None  # its connections may be dead: a fresh client next time (settling_groups)
            raise
        loads: dict[PartitionKey, PartitionLoad] = {}
        for tp in partitions:
            key = (tp.topic, tp.partition)
            start = max(earliest[key], 0)
            done = max(committed.get(key, start), start)
            end = max(ends[key], done)
            loads[key] = PartitionLoad(tp.topic, tp.partition, end, done, max(0, end - done))
        return loads

    def oldest_timestamps(self, loads: Iterable[PartitionLoad], timeout: float = 5.0) -> dict[PartitionKey, float]:
        """Kafka timestamp (seconds since the epoch) of the oldest waiting record of each partition
        with a backlog: the record at the committed offset. Partitions whose record could not be
        read in time (or that have no backlog) are absent."""
        waiting = {(load.topic, load.partition): load.committed for load in loads if load.backlog > 0}
        found: dict[PartitionKey, float] = {}
        if not waiting:
            return found
        deadline = time.monotonic() + timeout
        self._consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in waiting.items()])
        try:
            while len(found) < len(waiting) and time.monotonic() < deadline:
                for msg in self._consumer.consume(num_messages=100, timeout=0.05):
                    key = (msg.topic(), msg.partition())
                    if msg.error() is not None or key in found or key not in waiting:
                        continue
                    if msg.offset() < waiting[key]:
                        continue
                    kind, millis = msg.timestamp()
                    if kind != confluent_kafka.TIMESTAMP_NOT_AVAILABLE:
                        found[key] = millis / 1000.0
                    else:
                        found[key] = float("nan")
        finally:
            self._consumer.unassign()
        return {key: ts for key, ts in found.items() if ts == ts}  # drop NaN: no timestamp

    def settling_groups(self, groups: Iterable[str], timeout: float = 5.0) -> set[str]:
        """The groups among ``groups`` that are re-forming: while a member rejoins, librdkafka holds
        its commits back until the group has settled (seen on Tansu and by librdkafka's design), so
        the committed offsets of the group's partitions stand still however fast its workers serve.
        Tansu reports a re-forming group's state as one librdkafka does not know (UNKNOWN): that
        counts as settling too. A group the broker does not know has no members: settled; one it
        did not describe in time counts as settled too (its offsets then decide, as they did
        before this was asked).

        DescribeConsumerGroups has the admin client's coordinator bug (see ``_committed``): a
        request that meets a dead connection aborts the process. So it runs on a client of its own,
        replaced whenever a ``read`` or a describe failed (the broker went away: its connections may
        be dead), and only right after a ``read`` succeeded (the broker is there)."""
        wanted = sorted(set(groups))
        if not wanted:
            return set()
        settling: set[str] = set()
        if self._describer is None:
            self._describer = AdminClient(self._settings.librdkafka("backlog-describe"))
        try:
            futures = self._describer.describe_consumer_groups(wanted, request_timeout=timeout)
        except KafkaException:
            return settling  # not known: as before this was asked (the offsets alone decide)
        for group, future in futures.items():
            try:
                state = future.result().state
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if not (isinstance(error, KafkaError) and error.code() == KafkaError.GROUP_ID_NOT_FOUND):
                    self._describer = None  # no answer: a fresh client next time
                continue  # no such group (no members), or no answer now: settled, as above
            if state not in SETTLED_STATES:
                settling.add(group)
        return settling

    def partitions(self, topic: str, timeout: float = 5.0) -> list[int]:
        """Partition ids of ``topic``, re-read from the broker's metadata every
        ``METADATA_MAX_AGE_S`` (partitions can be added while readers run)."""
        cached = self._partitions.get(topic)
        if cached is None or time.monotonic() - cached[0] > METADATA_MAX_AGE_S:
            metadata = self._metadata(topic, timeout)
            cached = (time.monotonic(), sorted(metadata.partitions))
            self._partitions[topic] = cached
        return cached[1]

    def group_for(self, topic: str) -> str:
        """The group whose committed offsets count for ``topic``."""
        if isinstance(self.groups, str):
            return self.groups
        try:
            return self.groups[topic]
        except KeyError:
            raise BacklogError(f"no consumer group given for topic {topic!r}") from None

    def forget(self) -> None:
        """Drop cached partition lists and ends (after partitions were added or topics recreated)."""
        self._partitions.clear()
        self._ends.clear()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()
            for consumer in self._group_consumers.values():
                consumer.close()
            self._describer = None
            # AdminClient has no close(): dropping our reference destroys its librdkafka handle, which
            # would otherwise keep reconnecting to a stopped broker and logging about it
            del self._admin

    def __enter__(self) -> BacklogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------

    def _metadata(self, topic: str, timeout: float):  # noqa: ANN202 (librdkafka's TopicMetadata)
        try:
            metadata = self._admin.list_topics(topic, timeout=timeout).topics.get(topic)
        except KafkaException as exc:
            raise BacklogError(f"broker unreachable: {_describe(exc)}") from None
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise BacklogError(f"topic {topic!r} does not exist; run `tierq topics create`")
        return metadata

    def _list_offsets(self, partitions: list[TopicPartition], spec: OffsetSpec,
                      deadline: float) -> dict[PartitionKey, int]:
        remaining = max(deadline - time.monotonic(), 0.1)
        futures = self._admin.list_offsets({TopicPartition(tp.topic, tp.partition): spec for tp in partitions},
                                           request_timeout=remaining)
        try:
            return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}
        except KafkaException as exc:
            raise BacklogError(f"cannot list offsets: {_describe(exc)}") from None

    def _committed(self, partitions: list[TopicPartition], deadline: float) -> dict[PartitionKey, int]:
        """Through a consumer of each group that never joins it (OffsetFetch on the consumer's own
        path): the admin client's ListConsumerGroupOffsets aborts the process when the coordinator's
        connection drops under it (librdkafka issues 3663 and 4605, `rd_kafka_enq_once_del_source_return`;
        reproduced here across a broker restart), and a producer must outlive its broker's restarts."""
        by_group: dict[str, list[TopicPartition]] = {}
        for tp in partitions:
            by_group.setdefault(self.group_for(tp.topic), []).append(tp)
        committed: dict[PartitionKey, int] = {}
        for group, tps in by_group.items():
            consumer = self._group_consumers.get(group)
            if consumer is None:
                consumer = self._group_consumers[group] = confluent_kafka.Consumer(self._settings.librdkafka(
                    "backlog-committed", **{"group.id": group, "enable.auto.commit": False,
                                            "enable.auto.offset.store": False}))
            try:
                answer = consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in tps],
                                            timeout=max(deadline - time.monotonic(), 0.1))
            except KafkaException as exc:
                raise BacklogError(f"cannot read committed offsets of group {group!r}: {_describe(exc)}") from None
            committed.update({(tp.topic, tp.partition): tp.offset for tp in answer if tp.error is None and tp.offset >= 0})
        return committed

    def _true_ends(self, reported: dict[PartitionKey, int], deadline: float) -> dict[PartitionKey, int]:
        """Read from each changed partition's reported watermark to its end (see the class doc)."""
        ends: dict[PartitionKey, int] = {}
        to_read: dict[PartitionKey, int] = {}
        for key, watermark in reported.items():
            previous = self._ends.get(key)
            if previous is not None and previous[0] == watermark:
                ends[key] = previous[1]
            else:
                # both the reported watermark and the previous true end are at most the true end
                to_read[key] = max(watermark, previous[1] if previous else 0, 0)
        if to_read:
            found = self._read_to_eof(to_read, deadline)
            for key, start in to_read.items():
                end = found.get(key)
                if end is None:
                    ends[key] = start  # no EOF in time: the best lower bound; read again next time
                else:
                    ends[key] = end
                    self._ends[key] = (reported[key], end)
        return ends

    def _read_to_eof(self, starts: dict[PartitionKey, int], deadline: float) -> dict[PartitionKey, int]:
        self._consumer.assign([TopicPartition(t, p, offset) for (t, p), offset in starts.items()])
        at_end: dict[PartitionKey, int] = {}
        last: dict[PartitionKey, int] = {}
        try:
            while len(at_end) < len(starts) and time.monotonic() < deadline:
                for msg in self._consumer.consume(num_messages=1000, timeout=0.02):
                    key = (msg.topic(), msg.partition())
                    error = msg.error()
                    if error is None:
                        last[key] = max(last.get(key, -1), msg.offset())
                    elif error.code() == KafkaError._PARTITION_EOF:
                        at_end[key] = max(msg.offset(), last.get(key, -1) + 1)
        finally:
            self._consumer.unassign()
        return at_end


def _describe(exc: KafkaException) -> str:
    error = exc.args[0] if exc.args else None
    return error.str() if isinstance(error, KafkaError) else str(exc)
