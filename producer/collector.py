"""Reading replies back: one tenant's reply topic, deduplicated by request_id.

A reply may be delivered twice after a worker crash (at-least-once); it always repeats
the same request_id, so keeping the first reply per id gives exactly-once results.
The collector uses manual partition assignment, not a consumer group, so it never
commits offsets and any number of collectors can read the same topic.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import confluent_kafka
from confluent_kafka import TopicPartition

from schemas.codec import MessageError, decode_reply_topic_record
from schemas.messages import Chunk, Reply
from schemas.settings import Settings
from schemas.topology import Topology, TopologyError


@dataclass
class CollectStats:
    replies: int = 0
    duplicates: int = 0
    chunks: int = 0  # chunks of streamed requests, skipped (the reply has the whole text)
    undecodable: list[str] = field(default_factory=list)


class ResultCollector:
    """Iterates over a tenant's replies from the start of its reply topic."""

    def __init__(self, settings: Settings, topology: Topology, tenant_id: str):
        if tenant_id not in topology.tenants:
            raise TopologyError(f"unknown tenant {tenant_id!r} (tenants: {', '.join(topology.tenants)})")
        self.topic = topology.reply_topic(tenant_id)
        self.stats = CollectStats()
        self._seen: set[str] = set()
        self._consumer = confluent_kafka.Consumer(
            settings.librdkafka(
                "collector",
                **{
                    "group.id": f"tierq-collector-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    "enable.partition.eof": True,
                    # a fetch that finds nothing new waits this long at the broker; Kafka answers as
                    # soon as a reply arrives, but Tansu waits it out, which delays the last reply
                    # by up to the 500 ms default
                    "fetch.wait.max.ms": 100,
                },
            )
        )

    def _assign_all(self) -> set[int]:
        """Assign every partition from the beginning; return the partition numbers."""
        metadata = self._consumer.list_topics(self.topic, timeout=30)
        topic_meta = metadata.topics.get(self.topic)
        if topic_meta is None or topic_meta.error is not None:
            raise RuntimeError(f"reply topic {self.topic!r} does not exist; run `tierq topics create`")
        partitions = set(topic_meta.partitions)
        self._consumer.assign([TopicPartition(self.topic, p, confluent_kafka.OFFSET_BEGINNING) for p in partitions])
        return partitions

    def replies(
        self, *, follow: bool = False, expect: int | None = None, timeout: float | None = None
    ) -> Iterator[Reply]:
        """Yield each request's first reply.

        Stops after ``expect`` distinct replies; else, unless ``follow``, once every
        partition has been read to its end. ``timeout`` bounds the whole read.
        The end is taken from fetch responses (partition EOF), not from a ListOffsets
        query, which some Kafka-protocol brokers (Tansu 0.6) answer wrongly.
        """
        not_at_end = self._assign_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if expect is not None and self.stats.replies >= expect:
                return
            if expect is None and not follow and not not_at_end:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            msg = self._consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error() is not None:
                if msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    not_at_end.discard(msg.partition())
                    continue
                raise confluent_kafka.KafkaException(msg.error())
            reply = self._decode(msg)
            if reply is not None:
                yield reply

    def _decode(self, msg: confluent_kafka.Message) -> Reply | None:
        try:
            reply = decode_reply_topic_record(msg.value() or b"", msg.headers())
        except MessageError as exc:
            self.stats.undecodable.append(f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: {exc.message}")
            return None
        if isinstance(reply, Chunk):
            self.stats.chunks += 1
            return None
        if reply.request_id in self._seen:
            self.stats.duplicates += 1
            return None
        self._seen.add(reply.request_id)
        self.stats.replies += 1
        return reply

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> ResultCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
