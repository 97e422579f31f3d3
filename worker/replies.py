"""Writing results: replies, dead letters, attempt counts and held-to markers, through one
idempotent producer.

Each send takes an ``on_durable`` callback that runs only once the broker has
acknowledged the record (acks=all); the worker marks the source offset done there and
nowhere else. A record the broker refuses for good is fatal: the worker stops without
committing, and the request is served again after restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import confluent_kafka
import structlog

from schemas.codec import dumps, encode, encode_reply
from schemas.messages import CHUNK_SCHEMA, REPLY_SCHEMA, Chunk, Reply, Status, utc_now
from schemas.settings import Settings

log = structlog.get_logger("tierq.replies")

#: a reply's constant headers, made once (``Status.value`` is a slow property on Python 3.11)
_STATUS_HEADER = {status: ("status", status.value.encode()) for status in Status}
_REPLY_SCHEMA_HEADER = ("schema", REPLY_SCHEMA.encode())

REPLY_PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 2,
    "compression.type": "lz4",
}


class ReplyWriter:
    def __init__(self, settings: Settings, dlq_topic: str, attempts_topic: str):
        self._producer = confluent_kafka.Producer(settings.librdkafka("worker-replies", **REPLY_PRODUCER_DEFAULTS))
        self.dlq_topic = dlq_topic
        self.attempts_topic = attempts_topic
        self.fatal: str | None = None
        self._closing = False

    def _send(self, topic: str, key: bytes, value: bytes | None, on_durable: Callable[[], None] | None,
              headers: list[tuple[str, bytes]] | None = None) -> None:
        def delivered(err: confluent_kafka.KafkaError | None, _msg: Any) -> None:
            if err is not None and self._closing:
                log.warning("dropped_at_close", topic=topic, key=key.decode(errors="replace"), error=err.str())
            elif err is not None:
                self.fatal = f"broker refused a record for {topic}: {err.str()}"
                log.error("delivery_failed", topic=topic, key=key.decode(errors="replace"), error=err.str())
            elif on_durable is not None:
                on_durable()

        while True:
            try:
                self._producer.produce(topic, key=key, value=value, headers=headers, on_delivery=delivered)
                return
            except BufferError:
                self._producer.poll(0.05)

    def reply(self, topic: str, reply: Reply, on_durable: Callable[[], None] | None = None) -> None:
        key = reply.request_id.encode()
        self._send(topic, key, encode_reply(reply), on_durable,
                   headers=[("request_id", key), _STATUS_HEADER[reply.status], _REPLY_SCHEMA_HEADER])

    def chunk(self, topic: str, chunk: Chunk) -> None:
        """A streamed request's chunk: same topic and key as its reply, so it is read before it.
        Nothing waits on its acknowledgement (the reply carries the whole text)."""
        self._send(topic, chunk.request_id.encode(), encode(chunk), None,
                   headers=[("request_id", chunk.request_id.encode()), ("schema", CHUNK_SCHEMA.encode())])

    def dead_letter(self, raw: bytes | None, source: tuple[str, int, int], reason: str, *,
                    key: bytes | None = None, on_durable: Callable[[], None] | None = None) -> None:
        """DLQ record: the original bytes untouched as value, where and why in headers and key."""
        topic, partition, offset = source
        headers = [
            ("tierq.source_topic", topic.encode()),
            ("tierq.source_partition", str(partition).encode()),
            ("tierq.source_offset", str(offset).encode()),
            ("tierq.reason", reason.encode()[:4096]),
            ("tierq.dead_lettered_at", utc_now().isoformat().encode()),
        ]
        self._send(self.dlq_topic, key or f"{topic}:{partition}:{offset}".encode(), raw, on_durable, headers)

    def count_attempt(self, request_id: str, attempts: int, on_durable: Callable[[], None]) -> None:
        self._send(self.attempts_topic, request_id.encode(), dumps({"attempts": attempts}), on_durable)

    def mark_held(self, key: str, offset: int, on_durable: Callable[[], None] | None = None) -> None:
        """A held-to marker (see worker.attempts): this partition's owner may have started up to ``offset``."""
        self._send(self.attempts_topic, key.encode(), dumps({"held_to": offset}), on_durable)

    def clear_attempts(self, request_id: str) -> None:
        """Tombstone: the compacted attempts topic forgets a request once it is answered."""
        self._send(self.attempts_topic, request_id.encode(), None, None)

    def poll(self) -> None:
        self._producer.poll(0)

    def flush(self, timeout: float) -> int:
        return self._producer.flush(timeout)

    def close(self) -> None:
        """Release the client (its threads keep reconnecting otherwise). Call after ``flush``:
        whatever is still unacknowledged is dropped, and its source offset was never committed."""
        if self._closing:
            return
        self._closing = True
        if len(self._producer):
            self._producer.purge()
            self._producer.poll(0)
        self._producer.close()
