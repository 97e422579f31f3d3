"""The gateway's Kafka side: publish requests, read every reply topic, hand replies to waiters.

One reply consumer per gateway instance reads all tenants' reply topics with manual
assignment (no consumer group, nothing committed), so any number of instances can run
side by side; each one correlates the replies of its own requests by request_id. Read
from the beginning (the default), the reply topics also rebuild the results index and
batch progress after a restart.

All Kafka callbacks are handed to the asyncio loop, so the gateway's state is touched by
one thread only.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import confluent_kafka
import structlog
from confluent_kafka import TopicPartition

from producer.client import DeliveryError, DeliveryFuture, Producer
from schemas.codec import MessageError, decode_reply_topic_record
from schemas.messages import CHUNK_SCHEMA, Chunk, Reply, Request
from schemas.topology import Topology

log = structlog.get_logger("tierq.gateway")

#: How long the gateway waits for the broker to acknowledge a request before answering 503.
PUBLISH_TIMEOUT_MS = 30_000


class ReplyListener(threading.Thread):
    """Reads reply topics in its own thread and passes each decoded reply to ``on_reply``."""

    def __init__(self, settings: Any, topics: list[str], on_reply: Callable[[Reply], None], from_beginning: bool,
                 on_chunk: Callable[[Chunk], None] | None = None,
                 wants_chunks: Callable[[bytes | None], bool] = lambda _request_id: False):
        super().__init__(name="tierq-reply-listener", daemon=True)
        self._consumer = confluent_kafka.Consumer(settings.librdkafka("gateway-replies", **{
            "group.id": f"tierq-gateway-{uuid.uuid4().hex}",  # required by librdkafka; never joined or committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            # a fetch that finds nothing waits this long at the broker; Kafka answers as soon as a record
            # arrives, Tansu waits it out, which delays each streamed chunk by half of it on average
            "fetch.wait.max.ms": 10,
        }))
        self._start_offset = confluent_kafka.OFFSET_BEGINNING if from_beginning else confluent_kafka.OFFSET_END
        self._on_reply = on_reply
        self._on_chunk = on_chunk
        self._wants_chunks = wants_chunks  # by the request_id header: chunks nobody streams are not decoded
        self._requests: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        self._requests.put(topics)
        self._assigned: set[str] = set()
        self._retry: list[str] = []
        self._retry_at = 0.0
        self._not_at_end: set[tuple[str, int]] = set()
        self._stopping = threading.Event()
        self.assigned = threading.Event()
        self.caught_up = threading.Event()
        self.error: str | None = None

    def add_topics(self, topics: list[str]) -> None:
        self._requests.put(topics)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._retry and time.monotonic() >= self._retry_at:
                    self._requests.put(self._retry)
                    self._retry = []
                self._assign_pending()
                msg = self._consumer.poll(0.1)
                if msg is None:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                        self._not_at_end.discard((msg.topic(), msg.partition()))
                        if not self._not_at_end:
                            self.caught_up.set()
                    elif error.fatal():
                        raise confluent_kafka.KafkaException(error)
                    else:
                        log.warning("reply_consumer_error", error=error.str())
                    continue
                headers = msg.headers() or []
                if ("schema", CHUNK_SCHEMA.encode()) in headers:
                    request_id = next((v for k, v in headers if k == "request_id"), None)
                    if self._on_chunk is None or not self._wants_chunks(request_id):
                        continue
                try:
                    record = decode_reply_topic_record(msg.value() or b"", headers)
                except MessageError as exc:
                    log.warning("undecodable_reply", topic=msg.topic(), partition=msg.partition(),
                                offset=msg.offset(), error=exc.message)
                    continue
                if isinstance(record, Reply):
                    self._on_reply(record)
                elif self._on_chunk is not None:
                    self._on_chunk(record)
        except Exception as exc:  # the gateway reports not-ready instead of hanging requests
            self.error = f"reply consumer failed: {exc}"
            log.error("reply_consumer_failed", error=str(exc))
        finally:
            self._consumer.close()

    def _assign_pending(self) -> None:
        """Assign newly requested reply topics; one that is not available yet is retried later,
        without holding up the topics already being read."""
        topics: set[str] = set()
        while True:
            try:
                topics.update(t for t in self._requests.get_nowait() if t not in self._assigned)
            except queue.Empty:
                break
        partitions, retry = [], []
        for topic in sorted(topics):
            try:
                meta = self._consumer.list_topics(topic, timeout=10).topics.get(topic)
            except confluent_kafka.KafkaException as exc:  # broker slow or away
                log.warning("reply_topic_metadata_failed", topic=topic, error=str(exc))
                meta = None
            if meta is None or meta.error is not None:
                log.error("reply_topic_unavailable", topic=topic, hint="does it exist? `tierq topics create`")
                retry.append(topic)
                continue
            partitions += [TopicPartition(topic, p, self._start_offset) for p in meta.partitions]
            self._not_at_end.update((topic, p) for p in meta.partitions)
            self._assigned.add(topic)
        if partitions:
            self._consumer.incremental_assign(partitions)
            log.info("reply_topics_assigned", topics=sorted({tp.topic for tp in partitions}))
        if retry:
            self._retry_at = time.monotonic() + 1.0
            self._retry = retry
        if not retry or partitions:
            self.assigned.set()


class KafkaBridge:
    """Publishes requests and resolves waiters when their replies arrive."""

    def __init__(self, settings: Any, topology: Topology):
        self.settings = settings
        self.topology = topology
        # a person waits on each request: send at once (the batch default, linger.ms=20, would add up to
        # 20 ms to every time to first token); requests queued meanwhile still share a batch
        self.producer = Producer(settings, topology, on_quota="raise",
                                 **{"message.timeout.ms": PUBLISH_TIMEOUT_MS, "linger.ms": 1})
        self.results: OrderedDict[str, Reply] = OrderedDict()
        self.submitted: OrderedDict[str, str] = OrderedDict()  # request_id -> tenant, awaiting a reply
        self._waiters: dict[str, list[asyncio.Future[Reply]]] = {}
        #: streamed requests of this gateway: their chunks and then their reply, in order
        self._streams: dict[str, asyncio.Queue[Chunk | Reply]] = {}
        self._streamed_ids: set[bytes] = set()  # the same ids, read by the listener thread
        self.reply_hooks: list[Callable[[Reply], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: ReplyListener | None = None
        self._poller: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        topics = [self.topology.reply_topic(t) for t in self.topology.tenants]
        self._listener = ReplyListener(self.settings, topics, self._from_listener,
                                       from_beginning=self.settings.gateway_replay == "beginning",
                                       on_chunk=self._chunk_from_listener,
                                       wants_chunks=lambda request_id: request_id in self._streamed_ids)
        self._listener.start()
        self._poller = self._loop.create_task(self._poll_producer())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        try:
            await asyncio.to_thread(self.producer.close, 10)
        except DeliveryError as exc:  # their callers already saw a failed publish
            log.error("requests_not_acknowledged_at_shutdown", error=str(exc))
        if self._listener is not None:
            self._listener.stop()
            await asyncio.to_thread(self._listener.join, 5)

    async def _poll_producer(self) -> None:
        """Serve delivery callbacks on the loop thread."""
        while True:
            self.producer.poll(0)
            await asyncio.sleep(0.002)

    def readiness(self) -> tuple[bool, str]:
        listener = self._listener
        if listener is None:
            return False, "not started"
        if listener.error:
            return False, listener.error
        if not listener.assigned.is_set():
            return False, "reply topics not assigned yet"
        if not listener.caught_up.is_set():
            return False, "reading reply topics"
        return True, "ready"

    def update_topology(self, topology: Topology) -> None:
        """Adopt reloaded tenants: their keys, quotas and reply topics."""
        self.topology = topology
        self.producer.update_tenants(topology)
        if self._listener is not None:
            self._listener.add_topics([topology.reply_topic(t) for t in topology.tenants])

    # ---- requests and replies --------------------------------------------------------

    def prepare(self, document: dict[str, Any]) -> Request:
        """Validate, authorize and charge quota (raises ``MessageError`` / ``QuotaExceeded``)."""
        return self.producer.prepare(document)

    async def publish(self, request: Request) -> None:
        """Publish and wait until the broker acknowledges it (raises ``DeliveryError``)."""
        future = self.producer.publish(request)  # raises MessageError for an oversized request
        self.submitted[request.request_id] = request.tenant_id
        while len(self.submitted) > self.settings.gateway_results_cache:
            self.submitted.popitem(last=False)
        try:
            await self._acknowledged(future)
        except DeliveryError:
            self.submitted.pop(request.request_id, None)
            raise

    async def cancel(self, request_id: str, tenant_id: str, reason: str) -> None:
        """Publish a cancel record for the tenant's request and wait for the broker's acknowledgement."""
        await self._acknowledged(self.producer.cancel(request_id, tenant_id, reason=reason))

    def open_stream(self, request_id: str) -> asyncio.Queue[Chunk | Reply]:
        """Start collecting a request's chunks and reply; call before publishing it."""
        stream: asyncio.Queue[Chunk | Reply] = asyncio.Queue()
        self._streams[request_id] = stream
        self._streamed_ids.add(request_id.encode())
        return stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._streamed_ids.discard(request_id.encode())

    async def _acknowledged(self, future: DeliveryFuture) -> None:
        assert self._loop is not None
        acked: asyncio.Future[None] = self._loop.create_future()

        def delivered(future: DeliveryFuture) -> None:
            if acked.done():
                return
            error = future.exception(timeout=0) if future.failed else None
            if error is not None:
                acked.set_exception(error)
            else:
                acked.set_result(None)

        future.add_done_callback(delivered)
        await acked

    async def wait_reply(self, request_id: str, timeout: float) -> Reply | None:
        """The reply, or None if it did not arrive within ``timeout`` seconds."""
        if request_id in self.results:
            return self.results[request_id]
        assert self._loop is not None
        future: asyncio.Future[Reply] = self._loop.create_future()
        self._waiters.setdefault(request_id, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(request_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(request_id, None)

    def owner(self, request_id: str) -> str | None:
        """The tenant of a request this gateway published or saw answered; None if unknown here."""
        reply = self.results.get(request_id)
        return reply.tenant_id if reply is not None else self.submitted.get(request_id)

    def lookup(self, tenant_id: str, request_id: str) -> tuple[str, Reply | None] | None:
        """('done', reply) or ('pending', None) for the tenant's own request, else None."""
        reply = self.results.get(request_id)
        if reply is not None:
            return ("done", reply) if reply.tenant_id == tenant_id else None
        if self.submitted.get(request_id) == tenant_id:
            return "pending", None
        return None

    def _from_listener(self, reply: Reply) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_reply, reply)

    def _chunk_from_listener(self, chunk: Chunk) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_chunk, chunk)

    def _on_chunk(self, chunk: Chunk) -> None:
        stream = self._streams.get(chunk.request_id)
        if stream is not None:
            stream.put_nowait(chunk)

    def _on_reply(self, reply: Reply) -> None:
        if reply.request_id in self.results:
            return  # a repeated reply after a worker restart: first one wins
        if (stream := self._streams.get(reply.request_id)) is not None:
            stream.put_nowait(reply)
        self.results[reply.request_id] = reply
        while len(self.results) > self.settings.gateway_results_cache:
            self.results.popitem(last=False)
        self.submitted.pop(reply.request_id, None)
        for future in self._waiters.pop(reply.request_id, []):
            if not future.done():
                future.set_result(reply)
        for hook in self.reply_hooks:
            hook(reply)
