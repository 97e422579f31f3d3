"""Publishing requests: validate, fill ids, route to the least-loaded of the tenant's lanes of
its band topic (producer.routing), key by tenant.

The Kafka producer is idempotent with ``acks=all``: a request acknowledged by
``Delivery`` is on every in-sync replica and was written exactly once per send.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Literal, Mapping, NamedTuple

import confluent_kafka

from producer.quota import QuotaExceeded, QuotaLimiter, quota_backend
from producer.routing import LaneRouter, backlog_reader_source

from pydantic import ValidationError

from schemas.codec import InvalidMessage, MessageError, describe_validation_error, encode, validate_request
from schemas.messages import CANCEL_SCHEMA, Cancel, ErrorCode, Request, utc_now
from schemas.settings import Settings
from schemas.topology import TenantConfig, Topology

#: Throughput-oriented defaults; anything here can be overridden with TIERQ_KAFKA_EXTRA.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "batch.num.messages": 10_000,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "compression.type": "lz4",
}


#: Largest encoded request accepted: below librdkafka's and Kafka's default 1 MB message limit.
MAX_REQUEST_BYTES = 900_000

#: Serve delivery callbacks after this many sends; each poll(0) costs about a microsecond.
POLL_EVERY = 64


class DeliveryError(RuntimeError):
    """The broker did not acknowledge a message."""


class Delivery(NamedTuple):
    """Where an acknowledged request landed."""

    request_id: str
    topic: str
    partition: int
    offset: int


def new_request_id() -> str:
    """128 random bits as 32 hex digits (uuid4's entropy at a quarter of its cost)."""
    return os.urandom(16).hex()


class DeliveryFuture:
    """The broker's acknowledgement of one request, resolved by the producer's poll loop.

    Unlike ``concurrent.futures.Future`` it needs no lock (callbacks run in the thread
    that polls), and ``result()`` polls the producer itself, so ``submit(...).result()``
    cannot wait forever for a poll that nobody makes. Use from the producer's thread.
    """

    __slots__ = ("request_id", "_producer", "_message", "_error", "_callbacks", "_lane")

    def __init__(self, request_id: str, producer: Producer):
        self.request_id = request_id
        self._producer = producer
        self._message: confluent_kafka.Message | None = None
        self._error: DeliveryError | None = None
        self._callbacks: list[Callable[[DeliveryFuture], None]] = []
        #: (router, tenant, topic, partition) when the router chose the partition: told the outcome
        self._lane: tuple[LaneRouter, str, str, int] | None = None

    def done(self) -> bool:
        return self._message is not None or self._error is not None

    @property
    def failed(self) -> bool:
        """True once delivery failed; a cheap check for callbacks (no waiting)."""
        return self._error is not None

    def _tell_router(self, offset: int | None) -> None:
        """The record's fate, to the router that chose its partition (offset None: not written)."""
        if self._lane is not None:
            router, tenant, topic, partition = self._lane
            router.delivered(tenant, topic, partition, offset)

    def _resolve(self, err: confluent_kafka.KafkaError | None, msg: confluent_kafka.Message) -> None:
        if err is not None:
            self._error = DeliveryError(f"request {self.request_id}: {err.str()}")
        else:
            self._message = msg
        self._tell_router(msg.offset() if err is None else None)
        for callback in self._callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[DeliveryFuture], None]) -> None:
        if self.done():
            callback(self)
        else:
            self._callbacks.append(callback)

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self.request_id} not acknowledged within {timeout}s")
            self._producer.poll(0.05)

    def exception(self, timeout: float | None = None) -> DeliveryError | None:
        self._wait(timeout)
        return self._error

    def result(self, timeout: float | None = None) -> Delivery:
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        msg = self._message
        assert msg is not None
        return Delivery(self.request_id, msg.topic(), msg.partition(), msg.offset())


QuotaMode = Literal["raise", "wait", "off"]


class Producer:
    """Validates requests and publishes them to ``tierq.<pool>.<band>`` keyed by tenant.

    Tenant quotas (requests/s, tokens/min) are enforced here, per process, or pool-wide in Redis
    with ``settings.quota_redis_url`` (producer.quota_redis): ``on_quota``
    ``"raise"`` refuses a request over quota with ``QuotaExceeded`` (it has a
    ``retry_after``), ``"wait"`` sleeps until it fits (batch submission), ``"off"`` skips
    the check (trusted internal pipelines).
    """

    def __init__(self, settings: Settings, topology: Topology, *, on_quota: QuotaMode = "raise",
                 routing: bool = True, **config_overrides: Any):
        self.topology = topology
        self._settings = settings
        self.on_quota = on_quota
        self.quotas = QuotaLimiter(topology, backend=quota_backend(settings)) if on_quota != "off" else None
        conf = settings.librdkafka("producer", **PRODUCER_DEFAULTS)
        conf.update(config_overrides)
        self._producer = confluent_kafka.Producer(conf)
        self._unpolled = 0
        self._closed = False
        self._topics = {
            (pool, band): topic for pool in topology.pools for band, topic in topology.pool_topics(pool).items()
        }
        self._routing = routing
        self._router: LaneRouter | None = None

    def _lane_router(self) -> LaneRouter:
        """Started on first use, so a producer that never publishes reads no backlog."""
        if self._router is None:
            backlog, close_backlog = backlog_reader_source(self._settings, self.topology)
            self._router = LaneRouter(self.topology, self._partition_count, backlog,
                                      read_ahead=self._settings.read_ahead_per_partition,
                                      close_source=close_backlog).start()
        return self._router

    def _partition_count(self, topic: str) -> int | None:
        try:
            metadata = self._producer.list_topics(topic, timeout=10).topics.get(topic)
        except confluent_kafka.KafkaException:
            return None
        if metadata is None or metadata.error is not None or not metadata.partitions:
            return None
        return len(metadata.partitions)

    def update_tenants(self, topology: Topology) -> None:
        """Adopt a topology whose tenants changed (pools and topics must be the same)."""
        self.topology = topology
        if self.quotas is not None:
            self.quotas.update(topology)
        if self._router is not None:
            self._router.update_tenants(topology)

    def prepare(self, document: Mapping[str, Any]) -> Request:
        """Fill request_id, submitted_at and pool, validate, and check the tenant's rights.

        Raises ``MessageError`` with a stable code (``invalid_request``, ``unknown_tenant``,
        ``forbidden_priority``, ``quota_exceeded``, ...) and a message that says what to change.
        """
        doc = dict(document)
        doc.setdefault("request_id", new_request_id())
        doc.setdefault("submitted_at", utc_now())
        tenant_id = doc.get("tenant_id")
        tenant = self.topology.tenants.get(tenant_id) if isinstance(tenant_id, str) else None
        if tenant is not None:
            doc.setdefault("pool", tenant.pool)
        request = validate_request(doc)
        if tenant is None:
            raise MessageError(f"unknown tenant {request.tenant_id!r}", code=ErrorCode.unknown_tenant)
        request = self._authorize(request, tenant)
        self._charge(request)
        return request

    def _charge(self, request: Request) -> None:
        if self.quotas is None:
            return
        while True:
            try:
                self.quotas.charge(request)
                return
            except QuotaExceeded as exc:
                if self.on_quota != "wait":
                    raise
                self._producer.poll(min(exc.retry_after, 1.0))  # serve delivery callbacks meanwhile

    def _authorize(self, request: Request, tenant: TenantConfig) -> Request:
        if request.pool not in self.topology.pools:
            raise MessageError(f"unknown pool {request.pool!r}", code=ErrorCode.unknown_pool)
        if request.pool != tenant.pool:
            raise MessageError(
                f"tenant {request.tenant_id!r} may only use pool {tenant.pool!r}, not {request.pool!r}",
                code=ErrorCode.forbidden_pool,
            )
        if request.priority.rank < tenant.max_priority.rank:
            if tenant.on_priority_above_max == "reject":
                raise MessageError(
                    f"tenant {request.tenant_id!r} may use priority {tenant.max_priority.value} at most, "
                    f"not {request.priority.value}",
                    code=ErrorCode.forbidden_priority,
                )
            request = request.model_copy(update={"priority": tenant.max_priority})
        limit = tenant.quotas.max_tokens
        if limit is not None and request.params.max_tokens > limit:
            raise InvalidMessage(
                f"params.max_tokens: {request.params.max_tokens} exceeds tenant {request.tenant_id!r}'s limit of {limit}"
            )
        return request

    def publish(self, request: Request) -> DeliveryFuture:
        """Send an already prepared request; the future resolves once the broker acknowledges it."""
        value = encode(request)
        if len(value) > MAX_REQUEST_BYTES:
            raise InvalidMessage(f"request is {len(value):,} bytes encoded; the limit is {MAX_REQUEST_BYTES:,} "
                                 "(Kafka's default message size); shorten the prompt")
        future = DeliveryFuture(request.request_id, self)
        tenant = request.tenant_id.encode()
        topic = self._topics[(request.pool, request.priority)]
        router = self._lane_router() if self._routing else None
        partition = router.partition_for(request.tenant_id, request.pool, request.priority) if router else None
        if router is not None and partition is not None:
            future._lane = (router, request.tenant_id, topic, partition)
        try:
            self._produce(
                topic,
                **({"partition": partition} if partition is not None else {}),
                key=tenant,
                value=value,
                headers=[
                    ("request_id", request.request_id.encode()),
                    ("tenant_id", tenant),
                    ("priority", request.priority.value.encode()),
                ],
                on_delivery=future._resolve,
            )
        except BaseException:
            future._tell_router(None)  # never written: no delivery report will come
            raise
        return future

    def submit(self, document: Mapping[str, Any] | Request) -> DeliveryFuture:
        """Prepare and publish; raises ``MessageError`` at once for a request that is not valid."""
        if isinstance(document, Request):
            document = document.model_dump(by_alias=True)
        return self.publish(self.prepare(document))

    def cancel(self, request_id: str, tenant_id: str, *, reason: str | None = None) -> DeliveryFuture:
        """Ask the workers of the tenant's pool to cancel one of its requests: a ``tierq.cancel/v1``
        record on the pool's control topic. Workers honour it only for the tenant's own request: a
        queued one is never started, a running one is aborted; both are answered ``cancelled``. A
        cancel for an id no worker holds is kept by each worker for a while (it may arrive later)."""
        tenant = self.topology.tenants.get(tenant_id)
        if tenant is None:
            raise MessageError(f"unknown tenant {tenant_id!r}", code=ErrorCode.unknown_tenant)
        try:
            cancel = Cancel(request_id=request_id, tenant_id=tenant_id, reason=reason)
        except ValidationError as exc:
            raise InvalidMessage(describe_validation_error(exc)) from None
        future = DeliveryFuture(request_id, self)
        self._produce(self.topology.control_topic(tenant.pool), key=request_id.encode(), value=encode(cancel),
                      headers=[("request_id", request_id.encode()), ("tenant_id", tenant_id.encode()),
                               ("schema", CANCEL_SCHEMA.encode())],
                      on_delivery=future._resolve)
        return future

    def _produce(self, topic: str, **kwargs: Any) -> None:
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve delivery callbacks, then retry
        self._unpolled += 1
        if self._unpolled >= POLL_EVERY:
            self._unpolled = 0
            self._producer.poll(0)

    def connect(self, timeout: float = 10.0) -> None:
        """Reach the broker now (metadata), so the first request does not pay for connecting."""
        self._producer.list_topics(timeout=timeout)

    def poll(self, timeout: float = 0) -> int:
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for outstanding deliveries; return how many are still unacknowledged."""
        return self._producer.flush(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush, then release the client. Requests still unacknowledged after ``timeout`` fail
        their delivery futures and raise ``DeliveryError``: none is dropped silently."""
        if self._closed:
            return
        self._closed = True
        if self._router is not None:
            self._router.close()  # it releases its backlog reader
        if self.quotas is not None:
            self.quotas.close()
        remaining = self.flush(timeout)
        if remaining:
            self._producer.purge()
            self._producer.poll(0)  # their futures learn they were not delivered
        self._producer.close()
        if remaining:
            raise DeliveryError(f"{remaining} request(s) were not acknowledged within {timeout:.0f}s")

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

