"""The worker: intake -> admission -> engine -> reply -> commit, on one asyncio loop.

Everything that touches Kafka state runs on the loop's thread (rebalance callbacks and
delivery callbacks fire inside ``poll``), so no locks are needed. The source offset of a
request is marked done only in the delivery callback of its reply or DLQ record.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from collections.abc import Callable
from typing import Any, NamedTuple

import confluent_kafka
import structlog

from schemas.codec import InvalidMessage, MalformedMessage, decode_request
from schemas.messages import REQUEST_ID_PATTERN, Band, ErrorCode, ErrorInfo, Reply, Request, Status, Timing, Usage, utc_now
from schemas.tenants import TenantsReloader
from schemas.topology import Topology
from worker import metrics
from worker.admission import AdmissionPolicy, Pending, band_rules
from worker.attempts import NOTHING_HELD, AttemptsLedger, HeldMarkers
from worker.engine import Engine, EngineDead, EngineRequestError, RequestRejected
from worker.intake import Intake, PartitionKey
from worker.offsets import OffsetTracker
from worker.replies import ReplyWriter
from worker.settings import WorkerSettings

log = structlog.get_logger("tierq.worker")

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
COMMIT_INTERVAL_S = 0.2
GAUGE_INTERVAL_S = 0.25  # waiting/paused/slots gauges: scanning the buffer every loop turn costs CPU


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds() * 1000, 3)


class Buffered(NamedTuple):
    """What the worker keeps with a buffered request (``Pending.payload``)."""

    request: Request
    prompt_ids: list[int]
    tp: PartitionKey
    offset: int
    done: Callable[[], None]
    received_at: datetime


def _tenant_caps(topology: Topology) -> dict[str, int | None]:
    return {tenant_id: config.quotas.max_in_flight for tenant_id, config in topology.tenants.items()}


def _source_partition(item: Pending) -> PartitionKey:
    return item.payload.tp


class Worker:
    """One worker process: drains one pool into one engine."""

    def __init__(self, settings: WorkerSettings, topology: Topology, engine: Engine,
                 reloader: TenantsReloader | None = None):
        if settings.pool not in topology.pools:
            raise ValueError(f"unknown pool {settings.pool!r} (pools: {', '.join(topology.pools)})")
        self.settings = settings
        self.topology = topology
        self.engine = engine
        self.pool = settings.pool
        self.policy = AdmissionPolicy(
            band_rules(topology.bands.items()),
            capacity=settings.max_num_seqs + settings.engine_queue,
            tenant_caps=_tenant_caps(topology),
            aging=settings.aging,
        )
        self.reloader = reloader
        self.tracker = OffsetTracker()
        group_id = settings.group_id or f"tierq-{self.pool}"
        self.writer = ReplyWriter(settings, topology.dlq.topic, topology.attempts.topic)
        self.attempts = AttemptsLedger(settings, topology.attempts.topic, group_id)
        self.held = HeldMarkers(self.writer, group_id)
        self.intake = Intake(settings, topology.pool_topics(self.pool), group_id=group_id,
                             session_timeout_ms=settings.session_timeout_ms,
                             on_assigned=self._on_assigned, on_revoked=self._on_revoked)
        self.tasks_by_partition: dict[PartitionKey, set[asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._abort = False
        self.fatal: str | None = None
        self.served = 0

    # ---- lifecycle -------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: stop intake and drain. Second call: abort in-flight work now."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
            log.info("draining", in_flight=self.policy.in_flight, grace_s=self.settings.drain_timeout_s)
        else:
            self._abort = True
            log.warning("aborting", in_flight=self.policy.in_flight)
        self._wake.set()

    async def _sleep_until_woken(self, timeout: float) -> None:
        """Wait for a wake-up (engine output, delivery) or ``timeout``: Kafka has no fd to await.
        A timer handle is much cheaper than ``asyncio.wait_for``'s task per loop turn."""
        if not self._wake.is_set():
            timer = asyncio.get_running_loop().call_later(timeout, self._wake.set)
            await self._wake.wait()
            timer.cancel()
        self._wake.clear()

    async def _wait_for_broker(self) -> bool:
        """Wait (logging why) until the broker answers and the topics exist; False if stopped first."""
        delay = 0.5
        while self._stop_requested_at is None:
            problem = await asyncio.to_thread(self.attempts.connect, 5.0)
            if problem is None:
                return True
            log.warning("waiting_for_broker", problem=problem, retry_in_s=delay,
                        bootstrap=self.settings.bootstrap_servers)
            await self._sleep_until_woken(delay)  # a stop request wakes it early
            delay = min(delay * 2, 10.0)
        return False

    async def run(self) -> int:
        """Serve until stopped; return the process exit status (non-zero: restart me)."""
        if not await self._wait_for_broker():
            self.intake.close()
            self.attempts.close()
            return 0
        await asyncio.to_thread(self.attempts.load)
        self.intake.subscribe()
        log.info("worker_started", pool=self.pool, worker=self.settings.worker_id,
                 slots=self.settings.max_num_seqs, capacity=self.policy.capacity)
        last_commit = last_gauges = 0.0
        try:
            while True:
                self.fatal = self.fatal or self.writer.fatal or ("engine died" if self.engine.dead else None)
                if self.fatal:
                    log.error("worker_fatal", reason=self.fatal)
                    return 1
                if self._stop_requested_at is not None and self._drained_or_out_of_time():
                    break
                if self._stop_requested_at is None:
                    messages = self.intake.poll()
                    if self.fatal:  # an assignment we cannot serve safely
                        continue
                    for msg in messages:
                        self._accept(msg)
                    self._cover(messages)
                    now = time.time()
                    self._expire(now)
                    self._admit(now)
                    if messages or self.intake.paused:  # buffers only grow on intake, only shrink to resume
                        self.intake.apply_backpressure(self.policy.waiting_by(_source_partition),
                                                       self.settings.prefetch)
                else:
                    self.intake.poll(0)  # keep the group membership alive while draining
                self._reload_tenants()
                self.attempts.poll()
                self.writer.poll()
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    self.intake.commit(self.tracker.committable())
                    last_commit = time.monotonic()
                if time.monotonic() - last_gauges >= GAUGE_INTERVAL_S:
                    self._update_gauges()
                    last_gauges = time.monotonic()
                await self._sleep_until_woken(0.005)
        finally:
            await self._shutdown()
        return 0

    def _drained_or_out_of_time(self) -> bool:
        assert self._stop_requested_at is not None
        in_flight = [t for tasks in self.tasks_by_partition.values() for t in tasks]
        if not in_flight:
            return True
        if self._abort or time.monotonic() - self._stop_requested_at > self.settings.drain_timeout_s:
            for task in in_flight:
                task.cancel()
            return True
        return False

    async def _shutdown(self) -> None:
        tasks = [t for ts in self.tasks_by_partition.values() for t in ts]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if not self.fatal:
            self.writer.flush(10)  # delivery callbacks mark the last offsets done
            self.intake.commit(self.tracker.committable(), asynchronous=False)
            self._release_markers(list(self.intake.assigned))
        self.intake.close()  # may revoke partitions, which flushes the writer and commits
        self.attempts.close()
        self.writer.close()
        log.info("worker_stopped", served=self.served, fatal=self.fatal)

    def _reload_tenants(self) -> None:
        if self.reloader is None or (topology := self.reloader.reload(self.topology)) is None:
            return
        self.topology = topology
        self.policy.tenant_caps = _tenant_caps(topology)
        log.info("tenants_reloaded", tenants=sorted(topology.tenants))

    # ---- intake ----------------------------------------------------------------------

    def _accept(self, msg: confluent_kafka.Message) -> None:
        received_at = utc_now()
        source = (msg.topic(), msg.partition(), msg.offset())
        tp = (msg.topic(), msg.partition())
        self.tracker.received(tp, msg.offset())
        band = self.intake.topic_band[msg.topic()]
        done = self._marker(tp, msg.offset())
        try:
            request = decode_request(msg.value() or b"")
        except MalformedMessage as exc:
            self._dead_letter(msg, source, f"malformed: {exc.message}", done)
            return
        except InvalidMessage as exc:
            self._reject_invalid(msg, source, exc, band, done)
            return
        if request.tenant_id not in self.topology.tenants:  # no reply topic to answer on
            self._dead_letter(msg, source, f"unknown_tenant: unknown tenant {request.tenant_id!r}", done)
            return
        problem = self._check_route(request, band, tp, msg.offset())
        if problem is not None:
            self._reply_error(request.request_id, request.tenant_id, request.metadata, band, problem, done,
                              submitted_at=request.submitted_at)
            return
        self._buffer(request, band, tp, msg.offset(), done, received_at)

    def _marker(self, tp: PartitionKey, offset: int) -> Any:
        return lambda: self.tracker.done(tp, offset)

    def _dead_letter(self, msg: confluent_kafka.Message, source: tuple[str, int, int], reason: str, done: Any) -> None:
        log.warning("dead_lettered", topic=source[0], partition=source[1], offset=source[2], reason=reason)
        metrics.dead_letters.labels(reason.split(":", 1)[0]).inc()
        self.writer.dead_letter(msg.value(), source, reason, key=msg.key(), on_durable=done)

    def _reject_invalid(self, msg: confluent_kafka.Message, source: tuple[str, int, int], exc: InvalidMessage,
                        band: Band, done: Any) -> None:
        """Answer an invalid request when we know whom to answer, else dead-letter it."""
        doc = exc.document if isinstance(exc.document, dict) else {}
        request_id, tenant_id = doc.get("request_id"), doc.get("tenant_id")
        if (isinstance(request_id, str) and _REQUEST_ID.match(request_id)
                and isinstance(tenant_id, str) and tenant_id in self.topology.tenants):
            metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            self._reply_error(request_id, tenant_id, metadata, band, (exc.code, exc.message), done)
        else:
            self._dead_letter(msg, source, f"{exc.code.value}: {exc.message}", done)

    def _check_route(self, request: Request, band: Band, tp: PartitionKey, offset: int) -> tuple[ErrorCode, str] | None:
        tenant = self.topology.tenants[request.tenant_id]
        if request.pool != self.pool:
            return ErrorCode.unknown_pool, f"request for pool {request.pool!r} arrived on pool {self.pool!r}'s topic"
        if band.rank < tenant.max_priority.rank:
            return (ErrorCode.forbidden_priority,
                    f"tenant {request.tenant_id!r} may use priority {tenant.max_priority.value} at most")
        attempts = self.attempts.prior_attempts(request.request_id, tp, offset)
        if attempts >= self.settings.max_attempts:
            return (ErrorCode.engine_error,
                    f"request abandoned after {attempts} engine attempts (it may crash the engine)")
        return None

    def _cover(self, messages: list[confluent_kafka.Message]) -> None:
        """Write the held-to markers for a fetched batch: one per partition, not one per request."""
        highest: dict[PartitionKey, int] = {}
        for msg in messages:
            tp = (msg.topic(), msg.partition())
            highest[tp] = max(highest.get(tp, NOTHING_HELD), msg.offset())
        for tp, offset in highest.items():
            self.held.cover(tp, offset)

    def _buffer(self, request: Request, band: Band, tp: PartitionKey, offset: int, done: Any,
                received_at: datetime) -> None:
        try:
            prompt_ids = self.engine.render(request)
            self.engine.check_length(len(prompt_ids), request.params.max_tokens)
        except RequestRejected as exc:
            self._reply_error(request.request_id, request.tenant_id, request.metadata, band,
                              (exc.code, exc.message), done, submitted_at=request.submitted_at)
            return
        deadline = request.deadline.timestamp() if request.deadline else float("inf")
        self.policy.add(Pending(
            request.request_id, request.tenant_id, band, submitted_ts=request.submitted_at.timestamp(),
            cost=len(prompt_ids) + request.params.max_tokens, deadline_ts=deadline,
            payload=Buffered(request, prompt_ids, tp, offset, done, received_at),
        ))

    def _expire(self, now: float) -> None:
        for item in self.policy.take_expired(now):
            request, done = item.payload.request, item.payload.done
            reply = self._reply(request.request_id, request.tenant_id, request.metadata, item.band,
                                Status.expired, error=ErrorInfo(code=ErrorCode.deadline_exceeded,
                                message=f"deadline {request.deadline.isoformat()} passed before admission"),
                                timing=Timing(submitted_at=request.submitted_at, finished_at=utc_now()))
            self._send(reply, item.band, done)

    # ---- admission and serving -------------------------------------------------------

    def _admit(self, now: float) -> None:
        while (item := self.policy.next(now)) is not None:
            tp = item.payload.tp
            task = asyncio.get_running_loop().create_task(self._serve(item))
            tasks = self.tasks_by_partition.setdefault(tp, set())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            served_as = item.served_as or item.band
            metrics.admitted.labels(item.band.value, served_as.value, item.tenant_id).inc()
            if served_as is not item.band:
                metrics.promotions.labels(item.band.value).inc()

    async def _serve(self, item: Pending) -> None:
        request, prompt_ids, tp, offset, done, received_at = item.payload
        served_as = item.served_as or item.band
        dequeued_at = utc_now()
        counted = False
        try:
            attempt, counted = await self._start_attempt(request.request_id, tp, offset)
            completion = await self.engine.generate(request, prompt_ids, priority=served_as.rank)
        except RequestRejected as exc:
            reply = self._reply(request.request_id, request.tenant_id, request.metadata, item.band, Status.error,
                                error=ErrorInfo(code=exc.code, message=exc.message), served_as=served_as,
                                timing=Timing(submitted_at=request.submitted_at, received_at=received_at,
                                              dequeued_at=dequeued_at, finished_at=utc_now()))
        except EngineRequestError as exc:
            log.error("engine_request_failed", request_id=request.request_id, tenant=request.tenant_id, error=str(exc))
            reply = self._reply(request.request_id, request.tenant_id, request.metadata, item.band, Status.error,
                                error=ErrorInfo(code=ErrorCode.engine_error, message=str(exc)), served_as=served_as,
                                timing=Timing(submitted_at=request.submitted_at, received_at=received_at,
                                              dequeued_at=dequeued_at, finished_at=utc_now()))
        except EngineDead as exc:
            self.fatal = f"engine died: {exc}"
            return
        else:
            timing = Timing(
                submitted_at=request.submitted_at, received_at=received_at, dequeued_at=dequeued_at,
                first_token_at=completion.first_token_at, finished_at=completion.finished_at,
                queue_ms=_ms(request.submitted_at, dequeued_at), ttft_ms=_ms(dequeued_at, completion.first_token_at),
                e2e_ms=_ms(request.submitted_at, completion.finished_at),
            )
            reply = self._reply(request.request_id, request.tenant_id, request.metadata, item.band, Status.ok,
                                text=completion.text, finish_reason=completion.finish_reason, served_as=served_as,
                                usage=Usage(prompt_tokens=completion.prompt_tokens,
                                            completion_tokens=completion.completion_tokens),
                                attempt=attempt, timing=timing)
            self._observe(item.band, timing, completion.completion_tokens)
        finally:
            self.policy.finished(item)
            self._wake.set()
        self._send(reply, item.band, done, clear_attempts=counted)

    async def _start_attempt(self, request_id: str, tp: PartitionKey, offset: int) -> tuple[int, bool]:
        """Make this attempt durable before the engine sees the request: its partition's held-to
        marker, or for a suspect (see worker.attempts) its own count. Returns (attempt, counted)."""
        attempt = self.attempts.prior_attempts(request_id, tp, offset) + 1
        if not self.attempts.counted(request_id, tp, offset):
            await self.held.wait_covered(tp, offset)
            return attempt, False
        durable = asyncio.get_running_loop().create_future()
        self.writer.count_attempt(request_id, attempt,
                                  on_durable=lambda: durable.done() or durable.set_result(None))
        self._wake.set()
        await durable
        self.attempts.counts[request_id] = attempt
        return attempt, True

    @staticmethod
    def _observe(band: Band, timing: Timing, completion_tokens: int) -> None:
        label = band.value
        if timing.queue_ms is not None:
            metrics.queue_seconds.labels(label).observe(timing.queue_ms / 1000)
        if timing.ttft_ms is not None:
            metrics.ttft_seconds.labels(label).observe(timing.ttft_ms / 1000)
        if timing.e2e_ms is not None:
            metrics.e2e_seconds.labels(label).observe(timing.e2e_ms / 1000)
        metrics.tokens.labels(label).inc(completion_tokens)

    # ---- replies ---------------------------------------------------------------------

    def _reply(self, request_id: str, tenant_id: str, metadata: dict[str, Any], band: Band, status: Status,
               **fields: Any) -> Reply:
        return Reply(request_id=request_id, tenant_id=tenant_id, status=status, priority=band,
                     worker=self.settings.worker_id, metadata=metadata, **fields)

    def _reply_error(self, request_id: str, tenant_id: str, metadata: dict[str, Any], band: Band,
                     problem: tuple[ErrorCode, str], done: Any, submitted_at: datetime | None = None) -> None:
        code, message = problem
        log.info("request_rejected", request_id=request_id, tenant=tenant_id, code=code.value, reason=message)
        reply = self._reply(request_id, tenant_id, metadata, band, Status.error,
                            error=ErrorInfo(code=code, message=message),
                            timing=Timing(submitted_at=submitted_at, finished_at=utc_now()))
        self._send(reply, band, done)

    def _send(self, reply: Reply, band: Band, done: Any, clear_attempts: bool = False) -> None:
        def durable() -> None:
            done()
            if clear_attempts:
                self.writer.clear_attempts(reply.request_id)
                self.attempts.counts.pop(reply.request_id, None)

        self.served += 1
        metrics.replies.labels(band.value, reply.status.value, reply.tenant_id).inc()
        self.writer.reply(self.topology.reply_topic(reply.tenant_id), reply, on_durable=durable)

    # ---- rebalancing and gauges ------------------------------------------------------

    def _on_assigned(self, partitions: list[PartitionKey]) -> None:
        """Read the attempts topic to its end first: a dead predecessor's marker makes suspects."""
        if not self.attempts.assigned(partitions):
            self.fatal = "cannot read the attempts topic to its end (a dead worker's marker may be unknown)"
            return
        for tp in partitions:
            if (held_to := self.attempts.suspect_to[tp]) != NOTHING_HELD:
                log.warning("inherited_suspects", topic=tp[0], partition=tp[1], held_to=held_to,
                            why="the previous owner died or lost the partition; requests up to this "
                                "offset are counted as attempted once")

    def _release_markers(self, partitions: list[PartitionKey]) -> None:
        """Clean release: put back the marker we inherited (nothing we held was started by a dead worker)."""
        if self.held.release(partitions, clean=True, inherited=self.attempts.suspect_to):
            self.writer.flush(5)

    def _on_revoked(self, partitions: list[PartitionKey], lost: bool) -> None:
        """Stop work from partitions we no longer own; commit what is done unless they are lost."""
        revoked = set(partitions)
        for tp in partitions:
            for task in self.tasks_by_partition.pop(tp, set()):
                task.cancel()
        self.policy.remove_where(lambda item: item.payload.tp in revoked)
        if not lost:
            self.writer.flush(5)
            self.intake.commit({tp: o for tp, o in self.tracker.committable().items() if tp in revoked},
                               asynchronous=False)
        if lost or self.fatal:  # the marker stays: whoever gets these partitions counts what we held
            self.held.release(partitions, clean=False, inherited={})
        else:
            self._release_markers(partitions)
        self.attempts.released(partitions)
        for tp in partitions:
            self.tracker.forget(tp)

    def _update_gauges(self) -> None:
        for band, count in self.policy.waiting_by_band().items():
            metrics.waiting.labels(band.value).set(count)
        for band, count in self.intake.paused_by_band().items():
            metrics.paused.labels(band.value).set(count)
        metrics.slots_in_use.set(self.policy.in_flight)
