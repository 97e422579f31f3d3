"""Plain confluent-kafka helpers for tests: what any Kafka client would see."""

from __future__ import annotations

import time
import uuid

import confluent_kafka
from confluent_kafka import TopicPartition


def _reader(bootstrap: str, topics: list[str]) -> tuple[confluent_kafka.Consumer, list[TopicPartition]]:
    """A plain consumer assigned to every partition of ``topics`` from the start (no group work)."""
    consumer = confluent_kafka.Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"test-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    })
    assignment = []
    for topic in topics:
        # generous: on 2 cores a starting vLLM engine can hold up the broker's answer
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        assignment += [TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in meta.partitions]
    consumer.assign(assignment)
    return consumer, assignment


def read_topics(bootstrap: str, topics: list[str], expect: int, timeout: float = 30.0) -> list[confluent_kafka.Message]:
    """Read ``expect`` messages from the start of ``topics`` with a plain consumer (no tierq code)."""
    consumer, _assignment = _reader(bootstrap, topics)
    try:
        messages: list[confluent_kafka.Message] = []
        deadline = time.monotonic() + timeout
        while len(messages) < expect and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                messages.append(msg)
        return messages
    finally:
        consumer.close()


def read_to_end(bootstrap: str, topics: list[str], timeout: float = 60.0) -> list[confluent_kafka.Message]:
    """Every message now in ``topics``: read from the start until each partition reports its end,
    however slow the broker is to answer (a fixed read window misses messages on a busy machine)."""
    consumer, assignment = _reader(bootstrap, topics)
    try:
        not_at_end = {(tp.topic, tp.partition) for tp in assignment}
        messages: list[confluent_kafka.Message] = []
        deadline = time.monotonic() + timeout
        while not_at_end and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error() is None:
                messages.append(msg)
            elif msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                not_at_end.discard((msg.topic(), msg.partition()))
        assert not not_at_end, f"partitions not read to their end within {timeout}s: {sorted(not_at_end)}"
        return messages
    finally:
        consumer.close()
