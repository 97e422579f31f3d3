"""Durable attempt counts per request_id, read from the compacted attempts topic.

Before the engine sees a request, the worker writes ``attempts + 1`` for it and waits for
the broker's acknowledgement; after the reply is durable it writes a tombstone. A request
that kills the engine is therefore counted even though its worker died, and every worker
of the pool reads the counts back (this ledger follows the whole topic continuously).
"""

from __future__ import annotations

import time
import uuid

import confluent_kafka
import orjson
from confluent_kafka import TopicPartition

from schemas.settings import Settings


class AttemptsLedger:
    def __init__(self, settings: Settings, topic: str):
        self.topic = topic
        self.counts: dict[str, int] = {}
        self._consumer = confluent_kafka.Consumer(settings.librdkafka("worker-attempts", **{
            "group.id": f"tierq-attempts-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }))
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
        self._not_loaded = set(metadata.partitions)
        self._consumer.assign([TopicPartition(self.topic, p, confluent_kafka.OFFSET_BEGINNING)
                               for p in metadata.partitions])
        self.connected = True
        return None

    def load(self, timeout: float = 30.0) -> None:
        """Read the topic to its end once, so counts from before this worker started are known."""
        deadline = time.monotonic() + timeout
        while self._not_loaded and time.monotonic() < deadline:
            self.poll(0.2)

    def poll(self, timeout: float = 0) -> None:
        for msg in self._consumer.consume(num_messages=500, timeout=timeout):
            error = msg.error()
            if error is not None:
                if error.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    self._not_loaded.discard(msg.partition())
                continue
            request_id = msg.key().decode(errors="replace")
            if msg.value() is None:
                self.counts.pop(request_id, None)
            else:
                try:
                    self.counts[request_id] = max(self.counts.get(request_id, 0), int(orjson.loads(msg.value())["attempts"]))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue

    def get(self, request_id: str) -> int:
        return self.counts.get(request_id, 0)

    def close(self) -> None:
        self._consumer.close()
