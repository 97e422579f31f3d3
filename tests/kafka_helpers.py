"""Plain confluent-kafka helpers for tests: what any Kafka client would see."""

from __future__ import annotations

import time
import uuid

import confluent_kafka
from confluent_kafka import TopicPartition


def read_topics(bootstrap: str, topics: list[str], expect: int, timeout: float = 30.0) -> list[confluent_kafka.Message]:
    """Read ``expect`` messages from the start of ``topics`` with a plain consumer (no tierq code)."""
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
    })
    try:
        assignment = []
        for topic in topics:
            # generous: on 2 cores a starting vLLM engine can hold up the broker's answer
            meta = consumer.list_topics(topic, timeout=30).topics[topic]
            assignment += [TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in meta.partitions]
        consumer.assign(assignment)
        messages: list[confluent_kafka.Message] = []
        deadline = time.monotonic() + timeout
        while len(messages) < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                messages.append(msg)
        return messages
    finally:
        consumer.close()
