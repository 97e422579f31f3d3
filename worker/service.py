"""The worker: one asyncio loop that wires intake -> triage -> admission -> engine -> reply -> commit.

Each concept lives in its own module; this one only orders them:
- ``Intake`` (worker.intake): the Kafka consumer, pause/resume backpressure, rebalances;
- ``Triage`` (worker.triage): a fetched record -> buffer | error reply | dead letter;
- ``AdmissionPolicy`` (worker.admission): which buffered request starts next;
- the engine adapter (worker.engine, or worker.simulated for load tests);
- ``ReplyBuilder`` (worker.reply_builder) and ``ReplyWriter`` (worker.replies);
- ``OffsetTracker`` (worker.offsets): what may be committed;
- ``PoisonGuard`` (worker.poison): durable engine-attempt counts.

Everything that touches Kafka state runs on the loop's thread (rebalance and delivery
callbacks fire inside ``poll``), so no locks are needed. A source offset is marked done only
in the delivery callback of its reply or DLQ record. The Kafka clients are passed in
(``build_worker`` makes the real ones), so the loop also runs on in-memory fakes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple

import confluent_kafka
import structlog

from broker.groups import GroupAdoptionError
from broker.topics import PartitionKey
from schemas.messages import BAND_ORDER, Band, Cancel, ErrorCode, Reply, Request, Timing, timestamp, utc_now
from schemas.tenants import TenantsReloader
from schemas.topology import Topology
from worker import metrics
from worker.admission import NEVER, AdmissionPolicy, Pending, Preemption, band_rules
from worker.attempts import AttemptsLedger
from worker.control import CancelBook, ControlReader
from worker.engine import EngineAdapter, EngineDead, EngineRequestError, Progress, RequestRejected
from worker.intake import Intake, ReadAhead
from worker.offsets import OffsetTracker
from worker.poison import Attempt, PoisonGuard
from worker.pool_caps import pool_caps
from worker.replies import ReplyWriter
from worker.reply_builder import ReplyBuilder
from worker.settings import WorkerSettings
from worker.streaming import ChunkStream
from worker.triage import Answer, Buffer, DeadLetter, Triage

log = structlog.get_logger("tierq.worker")

COMMIT_INTERVAL_S = 0.2
GAUGE_INTERVAL_S = 0.25  # waiting/paused/slots gauges: scanning the buffer every loop turn costs CPU
#: the loop's wait between turns while a request could start (a slot is free): Kafka has no fd to
#: await, so a request that arrives is seen at the next poll at the latest
POLL_S = 0.005
#: the wait while nothing could start even if a high request arrived (every slot taken, reserved
#: ones too) and no admitted request waits for a delivery to start: a freed slot wakes the loop at
#: once (``_slot_freed``), so only what arrives by polling waits longer: cancel records, expiry
#: replies, delivery callbacks (commits stay at COMMIT_INTERVAL_S), rebalances, tenant reloads
FULL_POLL_S = 0.02


class Buffered(NamedTuple):
    """What the worker keeps with a buffered request (``Pending.payload``)."""

    request: Request
    prompt_ids: list[int]
    tp: PartitionKey
    offset: int
    done: Callable[[], None]
    received_at: datetime


class Worker:
    """One worker process: drains one pool into one engine."""

    def __init__(self, settings: WorkerSettings, topology: Topology, engine: EngineAdapter, *,
                 intake: Intake, writer: ReplyWriter, guard: PoisonGuard, reloader: TenantsReloader | None = None,
                 control: ControlReader | None = None):
        if settings.pool not in topology.pools:
            raise ValueError(f"unknown pool {settings.pool!r} (pools: {', '.join(topology.pools)})")
        self.settings = settings
        self.topology = topology
        self.engine = engine
        self.pool = settings.pool
        self.policy = AdmissionPolicy(
            band_rules(topology.bands.items()),
            capacity=settings.max_num_seqs + settings.engine_queue,
            tenant_caps={},  # pool-wide caps are derived from the partitions held (_derive_caps)
            aging=settings.aging,
        )
        self.read_ahead = ReadAhead(settings.prefetch, settings.read_ahead, settings.read_ahead_bytes)
        self.triage = Triage(self.pool, topology.tenants, engine, settings.max_attempts)
        self.replies = ReplyBuilder(settings.worker_id)
        self.reloader = reloader
        self.tracker = OffsetTracker()
        self.intake = intake
        self.writer = writer
        self.guard = guard
        self.tasks_by_partition: dict[PartitionKey, set[asyncio.Task[None]]] = {}
        self._partition_counts: dict[str, int] = {}
        self._counts_stale = False  # partitions were assigned: read the topics' partition counts again
        self._wake = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._abort = False
        self.fatal: str | None = None
        self.served = 0
        self.control = control
        self._reply_topics: dict[str, str] = {}  # by tenant, of self.topology
        self.tally = metrics.Tally()  # per-request metrics, handed to prometheus with the gauges
        self.cancels = CancelBook(settings.cancel_memory_s, settings.cancel_memory_limit)
        self.running: dict[str, tuple[asyncio.Task[None], Pending]] = {}  # by request_id
        self._cancelled_by_tenant: set[str] = set()  # running requests whose task a cancel record ended
        #: admitted requests taken back for a tenant below its fair share (``_preempt``) whose task
        #: has not ended yet: once it has, the request waits again (``_requeue_preempted``)
        self._preempted: set[str] = set()
        self.preemptions = 0  # requests taken back so far (a plain counter for tests and benches)
        # loop turns, those the timer woke (not an event), and those that admitted something:
        # plain counters read by bench.overhead (nothing allocated per turn)
        self.turns = self.timer_turns = self.admit_turns = 0
        #: admitted requests whose task has not yet got past the poison guard (it may await a
        #: delivery callback, which only a loop turn's ``writer.poll`` runs)
        self._starting: set[str] = set()
        #: admitted requests' tasks that have not run a step (``_cancel``): their item and task set
        self._unstarted: dict[asyncio.Task[None], tuple[Pending, set[asyncio.Task[None]]]] = {}
        self.wait_s = POLL_S  # the last wait between turns (POLL_S or FULL_POLL_S), for tests and benches

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
            loop = asyncio.get_running_loop()
            timer = loop.call_later(timeout, self._wake.set)
            await self._wake.wait()
            if loop.time() >= timer.when():  # the timer's time came: nothing woke us before it
                self.timer_turns += 1
            timer.cancel()
        self._wake.clear()

    async def _wait_for_broker(self) -> bool:
        """Wait (logging why) until the broker answers and the topics exist; False if stopped first."""
        delay = 0.5
        while self._stop_requested_at is None:
            problem = await asyncio.to_thread(self.guard.connect, 5.0)
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
            self.guard.close()
            return 0
        await asyncio.to_thread(self.guard.load)
        await self._start_control()
        self._partition_counts = self.intake.partition_counts() or self._partition_counts
        try:
            self.intake.subscribe(on_assigned=self._on_assigned, on_revoked=self._on_revoked)
        except GroupAdoptionError as exc:
            log.error("worker_fatal", reason=str(exc))
            self.fatal = str(exc)
            await self._shutdown()
            return 1
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
                    self._intake_turn()
                else:
                    self.intake.poll(0)  # keep the group membership alive while draining
                if self._counts_stale:
                    self._refresh_partition_counts()
                self._reload_tenants()
                self.guard.poll()
                self._control_turn()
                self.writer.poll()
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    self.intake.commit(self.tracker.committable())
                    last_commit = time.monotonic()
                if time.monotonic() - last_gauges >= GAUGE_INTERVAL_S:
                    self._update_gauges()
                    last_gauges = time.monotonic()
                self.turns += 1
                self.wait_s = self._next_wait()
                await self._sleep_until_woken(self.wait_s)
        finally:
            await self._shutdown()
        return 0

    def _next_wait(self) -> float:
        """POLL_S while a request could start if one arrived; FULL_POLL_S while nothing could
        (``AdmissionPolicy.full``: even a high request would find no slot), nothing admitted awaits
        a delivery to start, and no stop is under way. A freed slot wakes the loop either way."""
        if self._starting or self._stop_requested_at is not None or not self.policy.full():
            return POLL_S
        return FULL_POLL_S

    def _intake_turn(self) -> None:
        """Fetch what arrived, triage it, expire and admit; pause partitions read far enough ahead."""
        messages = self.intake.poll()
        if self.fatal:  # an assignment we cannot serve safely
            return
        if messages:
            highest: dict[PartitionKey, int] = {}
            received_at = utc_now()  # one fetch: one time for the batch
            for msg in messages:
                self._accept(msg, received_at)
                highest[(msg.topic(), msg.partition())] = msg.offset()  # offsets only grow within a batch
            self.guard.fetched(highest)
        now = time.time()
        self._expire(now)
        self._admit(now)
        if self.settings.preempt and not self._preempted:  # one at a time: counts are exact again once it ended
            self._preempt(now)
        if messages or self.intake.paused:  # buffers only grow on intake, only shrink to resume
            self.intake.apply_backpressure(self.policy.waiting_by_source(), self.policy.waiting_bytes,
                                           self.read_ahead)

    def _drained_or_out_of_time(self) -> bool:
        assert self._stop_requested_at is not None
        in_flight = [t for tasks in self.tasks_by_partition.values() for t in tasks]
        if not in_flight:
            return True
        if self._abort or time.monotonic() - self._stop_requested_at > self.settings.drain_timeout_s:
            for task in in_flight:
                self._cancel(task)
            return True
        return False

    async def _shutdown(self) -> None:
        tasks = [t for ts in self.tasks_by_partition.values() for t in ts]
        for task in tasks:
            self._cancel(task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if not self.fatal:
            self.writer.flush(10)  # delivery callbacks mark the last offsets done
            self.intake.commit(self.tracker.committable(), asynchronous=False)
            self.guard.released(list(self.intake.assigned), clean=True)
        self.intake.close()  # may revoke partitions, which flushes the writer and commits
        self.guard.close()
        if self.control is not None:
            self.control.close()
        self.writer.close()
        self.tally.flush()
        log.info("worker_stopped", served=self.served, fatal=self.fatal)

    def _reload_tenants(self) -> None:
        if self.reloader is None or (topology := self.reloader.reload(self.topology)) is None:
            return
        self.topology = topology
        self._reply_topics = {}
        self.triage.tenants = topology.tenants
        self._derive_caps(self.intake.assigned)
        log.info("tenants_reloaded", tenants=sorted(topology.tenants))

    # ---- intake ----------------------------------------------------------------------

    def _accept(self, msg: confluent_kafka.Message, received_at: datetime) -> None:
        topic, offset, value = msg.topic(), msg.offset(), msg.value()
        tp = (topic, msg.partition())
        self.tracker.received(tp, offset)
        band = self.intake.topic_band[topic]
        done = self._offset_done_callback(tp, offset)
        verdict = self.triage.classify(value, band, self.guard.prior_attempts, tp, offset)
        if isinstance(verdict, Buffer):
            request = verdict.request
            if self._cancelled_on_arrival(request, band, done, received_at):
                return
            params, deadline = request.params, request.deadline
            self.policy.add(Pending(
                request.request_id, request.tenant_id, band, submitted_ts=timestamp(request.submitted_at),
                cost=len(verdict.prompt_ids) + params.max_tokens * params.n,
                deadline_ts=timestamp(deadline) if deadline else NEVER,
                payload=Buffered(request, verdict.prompt_ids, tp, offset, done, received_at),
                slots=params.n, source=tp, size=len(value or b""),
            ))
        elif isinstance(verdict, Answer):
            log.info("request_rejected", request_id=verdict.request_id, tenant=verdict.tenant_id,
                     code=verdict.code.value, reason=verdict.message)
            self._send(self.replies.refused(verdict.request_id, verdict.tenant_id, verdict.metadata, band,
                                            verdict.code, verdict.message, verdict.submitted_at), band, done)
        else:
            self._dead_letter(msg, verdict, done)

    def _offset_done_callback(self, tp: PartitionKey, offset: int) -> Callable[[], None]:
        """Called once the record's reply or dead letter is durable: the offset may be committed.
        A partial, not a lambda: calling it runs no Python frame of its own (one per request)."""
        return functools.partial(self.tracker.done, tp, offset)

    def _dead_letter(self, msg: confluent_kafka.Message, verdict: DeadLetter, done: Callable[[], None]) -> None:
        source = (msg.topic(), msg.partition(), msg.offset())
        log.warning("dead_lettered", topic=source[0], partition=source[1], offset=source[2], reason=verdict.reason)
        metrics.child(metrics.dead_letters, verdict.reason.split(":", 1)[0]).inc()
        self.writer.dead_letter(msg.value(), source, verdict.reason, key=msg.key(), on_durable=done)

    def _expire(self, now: float) -> None:
        for item in self.policy.take_expired(now):
            self._send(self.replies.expired(item.payload.request, item.band), item.band, item.payload.done)

    # ---- admission and serving -------------------------------------------------------

    def _admit(self, now: float) -> None:
        dequeued_at: datetime | None = None  # one time for every request this turn admits
        while (item := self.policy.next(now)) is not None:
            dequeued_at = dequeued_at or utc_now()
            self._start(item, dequeued_at)
        if dequeued_at is not None:
            self.admit_turns += 1

    def _start(self, item: Pending, dequeued_at: datetime) -> None:
        """Run an admitted request in a task of its own (``_serve``)."""
        self._starting.add(item.request_id)  # until its task is past the poison guard (``_serve``)
        tasks = self.tasks_by_partition.get(item.payload.tp)
        if tasks is None:  # not setdefault: that would make a new empty set for every request
            tasks = self.tasks_by_partition[item.payload.tp] = set()
        task = asyncio.get_running_loop().create_task(self._serve(item, tasks, dequeued_at))
        tasks.add(task)
        self._unstarted[task] = (item, tasks)
        self.running[item.request_id] = (task, item)
        served_as = item.served_as or item.band
        self.tally.inc(metrics.admitted, metrics.LABEL[item.band], metrics.LABEL[served_as], item.tenant_id)
        if served_as is not item.band:
            self.tally.inc(metrics.promotions, metrics.LABEL[item.band])

    def _preempt(self, now: float) -> None:
        """Give a tenant below its fair share a slot of the tenant holding the most (the policy's
        ``preemption``): the victim's newest admitted request that may be taken back ends (the
        engine aborts it) and waits again; the waiting head starts now."""
        choice = self.policy.preemption(now)
        if choice is None:
            return
        victim = self._victim(choice)
        if victim is None:
            return
        task, item = victim
        self._preempted.add(item.request_id)
        self.preemptions += 1
        self._cancel(task)
        self.tally.inc(metrics.preemptions, metrics.LABEL[item.band], item.tenant_id)
        taken = self.policy.admit_preempting(choice)
        log.info("preempted", request_id=item.request_id, tenant=item.tenant_id, band=item.band.value,
                 for_request=taken.request_id, for_tenant=taken.tenant_id,
                 in_flight={t: n for t, n in self.policy.in_flight_by_tenant.items() if n})
        self._start(taken, utc_now())

    def _victim(self, choice: Preemption) -> tuple[asyncio.Task[None], Pending] | None:
        """The newest admitted request of ``choice.tenant`` that may be taken back: of
        ``choice.band`` or a lower one, at least as wide as the waiting head, not streaming (its
        client has chunks already), not cancelled, and no suspect of the poison guard (running it
        again would count one more attempt)."""
        for task, item in reversed(self.running.values()):
            if item.tenant_id != choice.tenant or task.done() or item.slots < choice.slots:
                continue
            if (item.served_as or item.band).rank < choice.band.rank:
                continue
            buffered: Buffered = item.payload
            if buffered.request.stream or item.request_id in self._cancelled_by_tenant:
                continue
            if self.guard.prior_attempts(item.request_id, buffered.tp, buffered.offset):
                continue
            return task, item
        return None

    def _requeue_preempted(self, item: Pending) -> None:
        """A preempted request's task has ended unanswered: it waits again, as before it started."""
        if item.request_id in self._preempted:
            self._preempted.discard(item.request_id)
            self.policy.requeue(item)

    def _cancel(self, task: asyncio.Task[None]) -> None:
        """Cancel a request's task. One cancelled before its first step never runs ``_serve`` (nor
        its ``finally``, which frees the slot): its slot is freed once it ends, by a done callback
        added only here (a callback on every task cost ~5 us a request: bench.worker_ceiling)."""
        task.cancel()
        unstarted = self._unstarted.pop(task, None)
        if unstarted is not None:
            item, tasks = unstarted
            task.add_done_callback(lambda t: self._slot_freed(item, t, tasks))

    def _slot_freed(self, item: Pending, task: asyncio.Task[None], tasks: set[asyncio.Task[None]]) -> None:
        """The request's task ends: from ``_serve``'s ``finally``, or (cancelled before its first
        step) from the done callback ``_cancel`` added."""
        tasks.discard(task)
        self._starting.discard(item.request_id)  # a task cancelled before its first step never ran _serve
        if self.running.get(item.request_id, (None,))[0] is task:
            del self.running[item.request_id]
            if task.cancelled() and item.request_id in self._cancelled_by_tenant:  # only the done callback's
                # the tenant's cancel reached the task before its first step: ``_serve`` never ran
                self._cancelled_by_tenant.discard(item.request_id)
                buffered: Buffered = item.payload
                self._send(self.replies.cancelled(buffered.request, item.band, None, received_at=buffered.received_at),
                           item.band, buffered.done)
            elif task.cancelled():  # preempted before its first step (``_serve`` requeues the others)
                self._requeue_preempted(item)
            self._preempted.discard(item.request_id)  # answered after all (it finished first): nothing to requeue
        self.policy.finished(item)
        self._wake.set()

    async def _serve(self, item: Pending, tasks: set[asyncio.Task[None]], dequeued_at: datetime) -> None:
        """Run one admitted request and answer it. ``dequeued_at``: when admission took it (not when
        this task first ran: requests admitted in one turn left the queue together)."""
        task = asyncio.current_task()
        assert task is not None
        del self._unstarted[task]  # it runs: ``_cancel`` adds no done callback for it
        buffered: Buffered = item.payload
        request = buffered.request
        served_as = item.served_as or item.band
        attempt: Attempt | None = None
        reply: Reply
        progress, stream = Progress(), None
        try:  # the slot is freed however the task ends (``finally``)
            try:
                try:
                    attempt = await self.guard.start(request.request_id, buffered.tp, buffered.offset)
                finally:
                    self._starting.discard(request.request_id)
                if request.stream:
                    stream = ChunkStream(request.request_id, request.tenant_id, attempt.number, self._chunk_sender())
                    progress = Progress(stream.on_delta)
                completion = await self.engine.generate(request, buffered.prompt_ids, priority=served_as.rank,
                                                        progress=progress)
            except asyncio.CancelledError:
                if request.request_id not in self._cancelled_by_tenant:
                    # preempted: it waits again here; a rebalance or shutdown: unanswered, it goes back to Kafka
                    self._requeue_preempted(item)
                    raise
                self._cancelled_by_tenant.discard(request.request_id)
                if stream is not None:
                    stream.finish()
                reply = self.replies.cancelled(request, item.band, served_as, prompt_tokens=len(buffered.prompt_ids),
                                               progress=progress, attempt=attempt.number if attempt else 1,
                                               received_at=buffered.received_at, dequeued_at=dequeued_at)
            except RequestRejected as exc:
                reply = self.replies.failed(request, item.band, served_as, exc.code, exc.message,
                                            received_at=buffered.received_at, dequeued_at=dequeued_at)
            except EngineRequestError as exc:
                log.error("engine_request_failed", request_id=request.request_id, tenant=request.tenant_id,
                          error=str(exc))
                reply = self.replies.failed(request, item.band, served_as, ErrorCode.engine_error, str(exc),
                                            received_at=buffered.received_at, dequeued_at=dequeued_at)
            except EngineDead as exc:
                self.fatal = f"engine died: {exc}"
                return
            else:
                if stream is not None:
                    stream.finish()
                reply = self.replies.served(request, item.band, served_as, completion, attempt=attempt.number,
                                            received_at=buffered.received_at, dequeued_at=dequeued_at)
                self._observe(item.band, reply.timing, completion.completion_tokens)
            self._send(reply, item.band, buffered.done, attempt)
        finally:
            self._slot_freed(item, task, tasks)

    def _observe(self, band: Band, timing: Timing, completion_tokens: int) -> None:
        queue_ms, ttft_ms, e2e_ms = timing.queue_ms, timing.ttft_ms, timing.e2e_ms
        self.tally.served(metrics.LABEL[band], None if queue_ms is None else queue_ms / 1000,
                          None if ttft_ms is None else ttft_ms / 1000, None if e2e_ms is None else e2e_ms / 1000,
                          completion_tokens)

    def _send(self, reply: Reply, band: Band, done: Callable[[], None], attempt: Attempt | None = None) -> None:
        self.served += 1
        self.tally.inc(metrics.replies, metrics.LABEL[band], metrics.LABEL[reply.status], reply.tenant_id)
        # the guard has nothing to do once the reply of an attempt it did not count is durable
        # (``PoisonGuard.answered``): then ``done`` alone, without a closure and two calls a request
        on_durable = done
        if attempt is not None and attempt.counted:
            def durable() -> None:
                done()
                self.guard.answered(reply.request_id, attempt)

            on_durable = durable
        self.writer.reply(self._reply_topic(reply.tenant_id), reply, on_durable=on_durable)

    def _reply_topic(self, tenant_id: str) -> str:
        """The tenant's reply topic, formatted once per tenant (per topology: a reload replaces it)."""
        topic = self._reply_topics.get(tenant_id)
        if topic is None:
            topic = self._reply_topics[tenant_id] = self.topology.reply_topic(tenant_id)
        return topic

    # ---- streaming and cancellation ----------------------------------------------------

    def _chunk_sender(self) -> Callable[..., None]:
        return lambda chunk: self.writer.chunk(self._reply_topic(chunk.tenant_id), chunk)

    async def _start_control(self) -> None:
        if self.control is None:
            return
        problem = await asyncio.to_thread(self.control.start)
        if problem is not None:
            log.error("cancels_not_read", problem=problem,
                      why="cancel records are ignored until this worker restarts with its control topic")

    def _control_turn(self) -> None:
        if self.control is not None:
            for cancel in self.control.poll():
                self._on_cancel(cancel)

    def _on_cancel(self, cancel: Cancel) -> None:
        """Running: end its task (the engine aborts it; ``_serve`` answers). Waiting: answer now.
        Neither: remember it for when the request arrives. Only the request's tenant may cancel it."""
        rid = cancel.request_id
        if rid in self.running:
            task, item = self.running[rid]
            if not task.done() and self._cancel_allowed(cancel, item.tenant_id):
                self._cancelled_by_tenant.add(rid)
                self._cancel(task)
                metrics.cancels.labels("running").inc()
            return
        waiting = next((item for item in self.policy.waiting if item.request_id == rid), None)
        if waiting is None:
            self.cancels.remember(cancel)
            metrics.cancels.labels("remembered").inc()
        elif self._cancel_allowed(cancel, waiting.tenant_id):
            for item in self.policy.remove_where(lambda i: i.request_id == rid):
                self._send(self.replies.cancelled(item.payload.request, item.band, None,
                                                  received_at=item.payload.received_at), item.band, item.payload.done)
            metrics.cancels.labels("queued").inc()
            self._wake.set()

    def _cancelled_on_arrival(self, request: Request, band: Band, done: Callable[[], None],
                              received_at: datetime) -> bool:
        """A request whose cancel came first is answered without being buffered."""
        cancel = self.cancels.take(request.request_id)
        if cancel is None or not self._cancel_allowed(cancel, request.tenant_id):
            return False
        metrics.cancels.labels("on_arrival").inc()
        self._send(self.replies.cancelled(request, band, None, received_at=received_at), band, done)
        return True

    @staticmethod
    def _cancel_allowed(cancel: Cancel, owner: str) -> bool:
        if cancel.tenant_id == owner:
            return True
        log.warning("cancel_refused", request_id=cancel.request_id, tenant=cancel.tenant_id,
                    why="a tenant may cancel only its own requests")
        metrics.cancels.labels("refused").inc()
        return False

    # ---- rebalancing and gauges ------------------------------------------------------

    def _on_assigned(self, partitions: list[PartitionKey]) -> None:
        """Read the attempts topic to its end first: a dead predecessor's marker makes suspects.
        An empty assignment (a cooperative rebalance round that gave this worker nothing; three
        band groups make many) only completes the picture of which bands we hold: reading the
        attempts topic or the partition counts for it would stall the loop for nothing."""
        if not partitions:
            self._warn_if_a_band_is_missing()
            return
        if not self.guard.assigned(partitions):
            self.fatal = "cannot read the attempts topic to its end (a dead worker's marker may be unknown)"
            return
        # the topics' partition counts (they may have grown) are read after the callback: a
        # call on the consumer from inside its own rebalance callback ends confluent-kafka's call
        # state for the poll or close that runs the callback, and that call's next callback then
        # aborts the process (`CallState_get: Assertion cs != NULL`: seen at shutdown)
        self._counts_stale = True
        self._derive_caps(self.intake.assigned)
        self._warn_if_a_band_is_missing()

    def _refresh_partition_counts(self) -> None:
        """Caps were derived in the callback from the counts known then: again only if they changed."""
        self._counts_stale = False
        counts = self.intake.partition_counts() or self._partition_counts
        if counts != self._partition_counts:
            self._partition_counts = counts
            self._derive_caps(self.intake.assigned)

    def _on_revoked(self, partitions: list[PartitionKey], lost: bool) -> None:
        """Stop work from partitions we no longer own; commit what is done unless they are lost.
        Nothing revoked, nothing to do (the flush below would stall the loop for every in-flight reply)."""
        if not partitions:
            return
        revoked = set(partitions)
        # a preempted request of a revoked partition is not put back when its task ends: it goes back to Kafka
        self._preempted -= {rid for rid in self._preempted if self.running[rid][1].payload.tp in revoked}
        for tp in partitions:
            for task in self.tasks_by_partition.pop(tp, set()):
                self._cancel(task)
        self.policy.remove_where(lambda item: item.payload.tp in revoked)
        if not lost:
            self.writer.flush(5)
            self.intake.commit({tp: o for tp, o in self.tracker.committable().items() if tp in revoked},
                               asynchronous=False)
        self.guard.released(partitions, clean=not (lost or self.fatal))
        for tp in partitions:
            self.tracker.forget(tp)
        self._derive_caps(self.intake.assigned - revoked)

    def _derive_caps(self, owned: set[PartitionKey]) -> None:
        """Each tenant's in-flight cap here: its pool-wide cap times our share of its lanes."""
        self.policy.tenant_caps = pool_caps(self.topology, self.intake.topic_band, self._partition_counts, owned)
        capped = {t: c for t, c in self.policy.tenant_caps.items() if c is not None}
        if capped and owned:
            log.info("tenant_caps", caps=capped, partitions_held=len(owned))

    def _warn_if_a_band_is_missing(self) -> None:
        """A worker without partitions of a band cannot serve that band: the pool's priority
        holds only if partitions per band >= workers (see topics.yaml)."""
        if len(self.intake.bands_assigned) < len(self.intake.topic_band):
            return  # each band's group assigns on its own: judge once every one has
        held = {self.intake.topic_band[topic] for topic, _partition in self.intake.assigned}
        missing = [band.value for band in BAND_ORDER if band not in held]
        if missing and self.intake.assigned:
            log.warning("band_without_partitions", bands=missing,
                        why="more workers in the pool than partitions of these bands; raise their partitions "
                            "in topics.yaml and run `tierq topics create`")

    def _update_gauges(self) -> None:
        self.tally.flush()
        for band, count in self.policy.waiting_by_band().items():
            metrics.child(metrics.waiting, band.value).set(count)
        for band, count in self.intake.paused_by_band().items():
            metrics.child(metrics.paused, band.value).set(count)
        metrics.slots_in_use.set(self.policy.in_flight)


def build_worker(settings: WorkerSettings, topology: Topology, engine: EngineAdapter,
                 reloader: TenantsReloader | None = None) -> Worker:
    """A Worker wired to real Kafka clients: the pool's band groups, one idempotent writer."""
    group_id = settings.group_id or topology.pool_group(settings.pool)
    writer = ReplyWriter(settings, topology.dlq.topic, topology.attempts.topic)
    # held-to markers are keyed by the pool's group name and the partition (its topic names the band)
    guard = PoisonGuard(AttemptsLedger(settings, topology.attempts.topic, group_id,
                                       fetch_wait_ms=settings.attempts_fetch_wait_ms), writer, group_id)
    intake = Intake(settings, topology.pool_topics(settings.pool), topology.band_groups(settings.pool, group_id),
                    session_timeout_ms=settings.session_timeout_ms, client_id=settings.worker_id,
                    pool_group=group_id, fetch_wait_ms=settings.fetch_wait_ms,
                    rebalance_stuck_s=settings.rebalance_stuck_s)
    control = ControlReader(settings, topology.control_topic(settings.pool), settings.cancel_memory_s,
                            fetch_wait_ms=settings.control_fetch_wait_ms)
    return Worker(settings, topology, engine, intake=intake, writer=writer, guard=guard, reloader=reloader,
                  control=control)
