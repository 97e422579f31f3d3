"""The worker's scheduling paths driven in memory: fake intake, writer, guard and a gated engine.

These cover the orchestration in worker/service.py (what is admitted when, what is answered,
what is committed, what a revocation frees) without a broker or vLLM; the same paths run
against the real broker and engine in test_worker_integration.py and
test_scheduling_integration.py. Every wait is on the worker's observable state.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.groups import GroupAdoptionError
from schemas.codec import encode
from schemas.messages import Band, Cancel, Chunk, Request, Status, utc_now
from schemas.topology import Topology
from worker.engine import Completion, Progress, check_length
from worker.poison import Attempt
from worker.service import FULL_POLL_S, POLL_S, Worker
from worker.settings import WorkerSettings

TOPICS = {Band.high: "p.high", Band.medium: "p.medium", Band.low: "p.low"}
PARTITIONS = [(topic, 0) for topic in TOPICS.values()]


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None, key: bytes | None = None):
        self._fields = topic, partition, offset, value, key

    def topic(self) -> str:
        return self._fields[0]

    def partition(self) -> int:
        return self._fields[1]

    def offset(self) -> int:
        return self._fields[2]

    def value(self) -> bytes | None:
        return self._fields[3]

    def key(self) -> bytes | None:
        return self._fields[4]


class FakeIntake:
    """Hands out what the test queued; assigns every partition on the first poll."""

    def __init__(self) -> None:
        self.topic_band = {topic: band for band, topic in TOPICS.items()}
        self.assigned: set[tuple[str, int]] = set()
        self.paused: set[tuple[str, int]] = set()
        self.bands_assigned = set(TOPICS)
        self.queued: list[FakeMessage] = []
        self.backpressure: tuple[dict[Any, int], int, Any] | None = None  # the last call's arguments
        self.committed: dict[tuple[str, int], int] = {}
        self._offsets = {tp: itertools.count() for tp in PARTITIONS}
        self._callbacks: tuple[Callable[..., None], Callable[..., None]] | None = None
        self.in_callback = False
        #: consumer calls made from inside a rebalance callback (confluent-kafka aborts on some)
        self.calls_in_callback: list[str] = []
        self.partition_count_reads = 0
        self.commit_calls = 0  # the worker commits every COMMIT_INTERVAL_S of its clock: a loop-time tick

    def _callback(self, which: int, *args: Any) -> None:
        assert self._callbacks is not None
        self.in_callback = True
        try:
            self._callbacks[which](*args)
        finally:
            self.in_callback = False

    def publish(self, band: Band, value: bytes | None) -> int:
        tp = (TOPICS[band], 0)
        offset = next(self._offsets[tp])
        self.queued.append(FakeMessage(tp[0], 0, offset, value))
        return offset

    def subscribe(self, on_assigned: Callable[..., None], on_revoked: Callable[..., None]) -> None:
        self._callbacks = on_assigned, on_revoked

    def poll(self, max_messages: int = 64) -> list[FakeMessage]:
        assert self._callbacks is not None
        if not self.assigned:
            self.assigned = set(PARTITIONS)
            self._callback(0, list(PARTITIONS))
        taken, self.queued = self.queued[:max_messages], self.queued[max_messages:]
        return taken

    def revoke(self, partitions: list[tuple[str, int]]) -> None:
        self._callback(1, partitions, False)
        self.assigned.difference_update(partitions)

    def apply_backpressure(self, waiting: dict[Any, int], waiting_bytes: int, read_ahead: Any) -> None:
        self.backpressure = dict(waiting), waiting_bytes, read_ahead

    def paused_by_band(self) -> dict[Band, int]:
        return {band: 0 for band in TOPICS}

    def partition_counts(self) -> dict[str, int]:
        if self.in_callback:
            self.calls_in_callback.append("partition_counts")
        self.partition_count_reads += 1
        return {topic: 1 for topic in TOPICS.values()}

    def commit(self, offsets: dict[tuple[str, int], int], *, asynchronous: bool = True) -> None:
        self.commit_calls += 1
        self.committed.update({tp: o for tp, o in offsets.items() if tp in self.assigned})

    def close(self) -> None:
        pass


class FakeWriter:
    """Acknowledges records on ``poll`` unless ``hold`` is set (the broker is slow)."""

    def __init__(self) -> None:
        self.fatal: str | None = None
        self.hold = False
        self.replies: list[Any] = []
        self.chunks: list[Chunk] = []
        self.dead_letters: list[tuple[bytes | None, str]] = []
        self._unacked: list[Callable[[], None]] = []

    def reply(self, topic: str, reply: Any, on_durable: Callable[[], None] | None = None) -> None:
        self.replies.append(reply)
        self._unacked.append(on_durable or (lambda: None))

    def chunk(self, topic: str, chunk: Chunk) -> None:
        self.chunks.append(chunk)

    def dead_letter(self, raw: bytes | None, source: Any, reason: str, *, key: bytes | None = None,
                    on_durable: Callable[[], None] | None = None) -> None:
        self.dead_letters.append((raw, reason))
        self._unacked.append(on_durable or (lambda: None))

    def poll(self) -> None:
        if not self.hold:
            acks, self._unacked = self._unacked, []
            for ack in acks:
                ack()

    def flush(self, timeout: float) -> int:
        self.poll()
        return len(self._unacked)

    def close(self) -> None:
        pass


class FakeGuard:
    """No poison history: every request is a first attempt."""

    def connect(self, timeout: float) -> None:
        return None

    def load(self) -> None: ...

    def poll(self) -> None: ...

    def close(self) -> None: ...

    def prior_attempts(self, request_id: str, tp: Any, offset: int) -> int:
        return 0

    def fetched(self, highest: dict[Any, int]) -> None: ...

    async def start(self, request_id: str, tp: Any, offset: int) -> Attempt:
        return Attempt(1, counted=False)

    def answered(self, request_id: str, attempt: Attempt | None) -> None: ...

    def assigned(self, partitions: list[Any]) -> bool:
        return True

    def released(self, partitions: Any, clean: bool) -> None: ...


class SlowMarkerGuard(FakeGuard):
    """Each attempt waits until the test says its held-to marker is durable (a delivery callback)."""

    def __init__(self) -> None:
        self.durable = asyncio.Event()

    async def start(self, request_id: str, tp: Any, offset: int) -> Attempt:
        await self.durable.wait()
        return Attempt(1, counted=False)


class FakeControl:
    """The pool's control topic: cancels the test queued, handed out on the next poll."""

    def __init__(self) -> None:
        self.queued: list[Cancel] = []

    def start(self) -> None:
        return None

    def poll(self) -> list[Cancel]:
        taken, self.queued = self.queued, []
        return taken

    def close(self) -> None: ...


class GatedEngine:
    """Each generation runs until the test opens its gate, so 'running' is a state, not a time."""

    max_model_len = 256
    dead = False

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []  # generations ended by cancelling their task (the engine aborts them)
        self.active: list[str] = []  # generations under way
        self.gates: dict[str, asyncio.Event] = {}
        self.progress: dict[str, Progress] = {}

    def render(self, request: Request) -> list[int]:
        return [1] * len((request.prompt or "").split())

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        check_length(prompt_tokens, max_tokens, self.max_model_len)

    async def generate(self, request: Request, prompt_ids: list[int], priority: int,
                       progress: Progress | None = None) -> Completion:
        self.started.append(request.request_id)
        self.progress[request.request_id] = progress or Progress()
        gate = self.gates.setdefault(request.request_id, asyncio.Event())
        self.active.append(request.request_id)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise
        finally:
            self.active.remove(request.request_id)
        now = utc_now()
        return Completion("done", "length", len(prompt_ids), request.params.max_tokens, now, now)

    def emit(self, request_id: str, text: str) -> None:
        """One token of text made by a running generation."""
        self.progress[request_id].add(text, 1)

    def finish(self, request_id: str) -> None:
        self.gates.setdefault(request_id, asyncio.Event()).set()

    def running(self) -> list[str]:
        return list(self.active)

    def shutdown(self) -> None: ...


def topology(base: Topology, reserved: tuple[int, int, int] = (0, 0, 0), tenant_caps: dict[str, int] | None = None
             ) -> Topology:
    document = base.model_dump(mode="json")
    document["pools"]["default"]["topics"] = {band.value: topic for band, topic in TOPICS.items()}
    for band, slots in zip(("high", "medium", "low"), reserved):
        document["bands"][band].update(reserved_slots=slots, aging_step_s=None)
    for tenant in document["tenants"].values():
        tenant["max_priority"] = "high"
        tenant["quotas"]["max_in_flight"] = None
    for tenant, cap in (tenant_caps or {}).items():
        document["tenants"][tenant]["quotas"]["max_in_flight"] = cap
    return Topology.model_validate(document)


def request(priority: str = "low", tenant: str = "acme", **extra: Any) -> bytes:
    doc = {"request_id": os.urandom(16).hex(), "tenant_id": tenant, "priority": priority, "prompt": "a b c",
           "params": {"max_tokens": 4}, "submitted_at": utc_now(), **extra}
    return encode(Request.model_validate(doc))


def rid(value: bytes) -> str:
    return Request.model_validate_json(value).request_id


class Harness:
    def __init__(self, topo: Topology, slots: int, guard: FakeGuard | None = None) -> None:
        self.intake, self.writer, self.engine = FakeIntake(), FakeWriter(), GatedEngine()
        settings = WorkerSettings(_env_file=None, bootstrap_servers="fake:9092", max_num_seqs=slots, engine_queue=0,
                                  worker_id="test/loop", pool="default")
        self.control = FakeControl()
        self.worker = Worker(settings, topo, self.engine, intake=self.intake, writer=self.writer,  # type: ignore[arg-type]
                             guard=guard or FakeGuard(), control=self.control)  # type: ignore[arg-type]
        self.task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> Harness:
        self.task = asyncio.get_running_loop().create_task(self.worker.run())
        await self.until(lambda: bool(self.intake.assigned))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for gate_owner in list(self.engine.gates):
            self.engine.finish(gate_owner)
        self.worker.request_stop()
        assert self.task is not None
        assert await asyncio.wait_for(self.task, 10) == 0

    async def until(self, condition: Callable[[], bool], what: str = "condition") -> None:
        for _ in range(2000):
            if condition():
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"timed out waiting for {what}")

    def publish(self, band: Band, value: bytes | None) -> int:
        offset = self.intake.publish(band, value)
        self.worker._wake.set()
        return offset

    def cancel(self, value: bytes, tenant: str = "acme") -> None:
        self.control.queued.append(Cancel(request_id=rid(value), tenant_id=tenant))
        self.worker._wake.set()

    def reply_for(self, value: bytes) -> Any:
        return next((r for r in self.writer.replies if r.request_id == rid(value)), None)


@pytest.fixture
def base(base_topology: Topology) -> Topology:
    return base_topology


async def test_the_best_band_starts_first_and_the_engine_never_holds_more_than_its_slots(base):
    async with Harness(topology(base), slots=1) as h:
        low, medium, high = request("low"), request("medium"), request("high")
        h.publish(Band.low, low)
        h.publish(Band.medium, medium)
        h.publish(Band.high, high)
        await h.until(lambda: h.engine.started, "first start")
        assert h.engine.started == [rid(high)]
        h.engine.finish(rid(high))
        await h.until(lambda: len(h.engine.started) == 2)
        assert h.engine.started[1] == rid(medium) and len(h.engine.running()) == 1
        h.engine.finish(rid(medium))
        await h.until(lambda: len(h.engine.started) == 3)
        assert h.engine.started[2] == rid(low)


async def test_the_read_ahead_sees_buffered_requests_per_partition_and_their_bytes(base):
    async with Harness(topology(base), slots=1) as h:
        lows = [request("low") for _ in range(5)]
        for low in lows:
            h.publish(Band.low, low)
        await h.until(lambda: len(h.engine.started) == 1, "one started")
        await h.until(lambda: h.intake.backpressure is not None and sum(h.intake.backpressure[0].values()) == 4)
        waiting, waiting_bytes, read_ahead = h.intake.backpressure  # type: ignore[misc]
        assert waiting == {(TOPICS[Band.low], 0): 4}
        assert waiting_bytes == sum(len(v) for v in lows if rid(v) not in h.engine.started)
        # read far past the prefetch (2 x one slot) unless the buffer's bytes pass the bound
        assert (read_ahead.floor, read_ahead.ceiling) == (2, 256) and read_ahead.max_bytes > waiting_bytes


async def test_the_consumer_is_not_called_from_inside_its_rebalance_callbacks(base):
    """confluent-kafka ends its call state when a method of the consumer that sets one (list_topics,
    poll, consume, close) returns; from inside a rebalance callback that is the state of the poll or
    close running the callback, whose next callback then aborts the process."""
    async with Harness(topology(base), slots=1) as h:
        # once before joining the group, once after the assignment (the topics may have grown)
        await h.until(lambda: h.intake.partition_count_reads >= 2, "partition counts read after the assignment")
    assert h.intake.calls_in_callback == []


class CountingGuard(FakeGuard):
    def __init__(self) -> None:
        self.assigned_calls: list[list[Any]] = []

    def assigned(self, partitions: list[Any]) -> bool:
        self.assigned_calls.append(list(partitions))
        return True


class CountingWriter(FakeWriter):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        return super().flush(timeout)


def test_empty_rebalance_rounds_do_not_read_the_attempts_topic_or_flush(base):
    """Cooperative rebalances of three band groups call back with empty lists often; each call
    used to read the attempts topic to its end (assigned) or flush every in-flight reply (revoked)
    on the loop's thread, stalling it for nothing."""
    h = Harness(topology(base), slots=1)
    guard, writer = CountingGuard(), CountingWriter()
    h.worker.guard, h.worker.writer = guard, writer  # type: ignore[assignment]
    h.worker._on_assigned([])
    h.worker._on_revoked([], False)
    assert guard.assigned_calls == [] and writer.flushes == 0 and not h.worker._counts_stale
    h.worker._on_assigned([(TOPICS[Band.low], 0)])
    h.worker._on_revoked([(TOPICS[Band.low], 0)], False)
    assert guard.assigned_calls == [[(TOPICS[Band.low], 0)]] and writer.flushes == 1


async def test_a_worker_that_cannot_adopt_the_old_groups_offsets_does_not_start(base):
    """Joining the band groups without the old pool group's offsets would serve its history again."""
    h = Harness(topology(base), slots=1)

    def refuse(**_callbacks: Any) -> None:
        raise GroupAdoptionError("cannot copy g's committed offsets into g-low")

    h.intake.subscribe = refuse  # type: ignore[method-assign]
    assert await asyncio.wait_for(h.worker.run(), 10) == 1
    assert h.worker.fatal is not None and "g-low" in h.worker.fatal and not h.engine.started


def test_a_missing_band_is_warned_about_only_once_every_bands_group_has_assigned(base):
    """Each band's group assigns on its own; a worker that has heard from one group only holds no
    partition of the others *yet*, which is not worth a warning."""
    h = Harness(topology(base), slots=1)
    h.intake.assigned = {(TOPICS[Band.high], 0)}
    h.intake.bands_assigned = {Band.high}
    with capture_logs() as logs:
        h.worker._warn_if_a_band_is_missing()
    assert not [e for e in logs if e["event"] == "band_without_partitions"]
    h.intake.bands_assigned = set(Band)  # every group has assigned: medium and low gave us nothing
    with capture_logs() as logs:
        h.worker._warn_if_a_band_is_missing()
    assert [e["bands"] for e in logs if e["event"] == "band_without_partitions"] == [["medium", "low"]]


async def test_reserved_slots_let_a_high_start_while_lows_fill_the_rest(base):
    async with Harness(topology(base, reserved=(2, 0, 0)), slots=4) as h:
        lows = [request("low") for _ in range(5)]
        for low in lows:
            h.publish(Band.low, low)
        await h.until(lambda: len(h.engine.started) == 2, "two lows running")
        assert h.worker.policy.waiting_by_band()[Band.low] == 3  # the other slots are kept for high
        high = request("high")
        h.publish(Band.high, high)
        await h.until(lambda: rid(high) in h.engine.started, "the high starts beside the running lows")
        assert len(h.engine.running()) == 3


async def test_a_tenant_at_its_cap_waits_while_another_tenant_starts(base):
    async with Harness(topology(base, tenant_caps={"acme": 1}), slots=4) as h:
        flood = [request("low", "acme") for _ in range(4)]
        for value in flood:
            h.publish(Band.low, value)
        await h.until(lambda: len(h.engine.started) == 1)
        other = request("low", "globex")
        h.publish(Band.low, other)
        await h.until(lambda: rid(other) in h.engine.started)
        assert h.engine.started == [rid(flood[0]), rid(other)]


async def test_bad_records_are_answered_or_dead_lettered_and_good_ones_around_them_served(base):
    async with Harness(topology(base), slots=2) as h:
        good = request("low")
        h.publish(Band.low, b"{not json")
        h.publish(Band.low, encode(Request.model_validate({
            "request_id": "a" * 32, "tenant_id": "acme", "priority": "low", "prompt": "x",
            "submitted_at": utc_now()})).replace(b'"prompt":"x"', b'"prompt":""'))
        h.publish(Band.low, request("low", tenant="nobody"))
        h.publish(Band.low, good)
        await h.until(lambda: rid(good) in h.engine.started)
        h.engine.finish(rid(good))
        await h.until(lambda: any(r.request_id == rid(good) for r in h.writer.replies))
        reasons = [reason.split(":")[0] for _raw, reason in h.writer.dead_letters]
        assert reasons == ["malformed", "unknown_tenant"]
        invalid = next(r for r in h.writer.replies if r.request_id == "a" * 32)
        assert invalid.status is Status.error and invalid.error.code.value == "invalid_request"
        await h.until(lambda: h.intake.committed.get(("p.low", 0)) == 4, "all four offsets committed")


async def test_an_offset_is_committed_only_after_its_reply_is_acknowledged(base):
    async with Harness(topology(base), slots=2) as h:
        h.writer.hold = True
        first = request("low")
        h.publish(Band.low, first)
        await h.until(lambda: h.engine.started)
        h.engine.finish(rid(first))
        await h.until(lambda: h.writer.replies, "the reply is sent")
        for _ in range(60):  # several commit intervals pass; nothing is acknowledged yet
            await asyncio.sleep(0.01)
        assert ("p.low", 0) not in h.intake.committed
        h.writer.hold = False
        await h.until(lambda: h.intake.committed.get(("p.low", 0)) == 1, "committed after the acknowledgement")


async def test_an_expired_request_is_answered_without_the_engine(base):
    async with Harness(topology(base), slots=1) as h:
        blocker = request("high")
        h.publish(Band.high, blocker)
        await h.until(lambda: h.engine.started)
        now = utc_now()
        late = request("low", submitted_at=now - timedelta(seconds=10), deadline=now + timedelta(milliseconds=50))
        h.publish(Band.low, late)
        await h.until(lambda: any(r.request_id == rid(late) for r in h.writer.replies), "the expired reply")
        reply = next(r for r in h.writer.replies if r.request_id == rid(late))
        assert reply.status is Status.expired and rid(late) not in h.engine.started


async def test_a_revoked_partition_frees_its_slots_even_for_work_not_yet_started(base):
    async with Harness(topology(base), slots=2) as h:
        h.worker.policy.tenant_caps = {"acme": 0}  # hold the lows in the buffer for now
        lows = [request("low") for _ in range(2)]
        for low in lows:
            h.publish(Band.low, low)
        await h.until(lambda: h.worker.policy.waiting_by_band()[Band.low] == 2, "both buffered")
        h.worker.policy.tenant_caps = {}
        # a rebalance inside the same loop turn as the admission: the tasks never ran a step
        h.worker._admit(time.time())
        assert h.worker.policy.in_flight == 2
        h.intake.revoke([("p.low", 0)])
        await h.until(lambda: h.worker.policy.in_flight == 0, "slots freed")
        high = request("high")
        h.publish(Band.high, high)
        await h.until(lambda: rid(high) in h.engine.started)
        assert not h.engine.started[:-1] and not h.writer.replies  # the lows go back to Kafka unanswered


async def test_a_queued_request_cancelled_is_answered_without_the_engine_and_committed(base):
    async with Harness(topology(base), slots=1) as h:
        blocker, queued = request("high"), request("low")
        h.publish(Band.high, blocker)
        await h.until(lambda: h.engine.started)
        h.publish(Band.low, queued)
        await h.until(lambda: h.worker.policy.waiting_by_band()[Band.low] == 1, "the low waits")
        h.cancel(queued)
        await h.until(lambda: h.reply_for(queued) is not None, "the cancelled reply")
        reply = h.reply_for(queued)
        assert reply.status is Status.cancelled and reply.error.code.value == "cancelled"
        assert reply.usage.completion_tokens == 0 and rid(queued) not in h.engine.started
        await h.until(lambda: h.intake.committed.get(("p.low", 0)) == 1, "its offset committed")


async def test_a_running_request_cancelled_reports_its_usage_and_frees_its_slot_at_once(base):
    async with Harness(topology(base), slots=1) as h:
        running, nxt = request("low", stream=True), request("low")
        h.publish(Band.low, running)
        h.publish(Band.low, nxt)
        await h.until(lambda: h.engine.started == [rid(running)])
        h.engine.emit(rid(running), "Hello")
        h.engine.emit(rid(running), " world")
        h.cancel(running)
        await h.until(lambda: rid(nxt) in h.engine.started, "the next request takes the slot")
        reply = h.reply_for(running)
        assert reply.status is Status.cancelled and reply.usage.completion_tokens == 2 and reply.text == "Hello world"
        assert [c.delta for c in h.writer.chunks] == ["Hello", " world"] and h.writer.chunks[-1].last


async def test_another_tenants_cancel_is_refused_and_an_early_cancel_waits_for_its_request(base):
    async with Harness(topology(base), slots=1) as h:
        mine = request("low")
        h.publish(Band.low, mine)
        await h.until(lambda: h.engine.started == [rid(mine)])
        h.cancel(mine, tenant="globex")
        early = request("low")
        h.cancel(early)  # before the request exists
        await h.until(lambda: len(h.worker.cancels) == 1, "the early cancel is remembered")
        h.engine.finish(rid(mine))
        await h.until(lambda: h.reply_for(mine) is not None)
        assert h.reply_for(mine).status is Status.ok
        h.publish(Band.low, early)
        await h.until(lambda: h.reply_for(early) is not None)
        assert h.reply_for(early).status is Status.cancelled and rid(early) not in h.engine.started


async def admitted_not_started(h: Harness) -> bytes:
    """A low request admitted in a loop turn of the test's own: its task exists and has not run a step."""
    h.worker.policy.tenant_caps = {"acme": 0}  # hold it in the buffer
    queued = request("low")
    h.publish(Band.low, queued)
    await h.until(lambda: h.worker.policy.waiting_by_band()[Band.low] == 1, "buffered")
    h.worker.policy.tenant_caps = {}
    h.worker._admit(time.time())
    return queued


async def test_a_request_cancelled_in_the_turn_it_was_admitted_is_still_answered(base):
    """Admitted (its task made) and cancelled before the task ran a step: ``_serve`` never runs, so
    the answer must come from where the slot is freed, or the request is never answered."""
    async with Harness(topology(base), slots=1) as h:
        queued = await admitted_not_started(h)
        assert rid(queued) in h.worker.running
        h.worker._on_cancel(Cancel(request_id=rid(queued), tenant_id="acme"))
        await h.until(lambda: h.reply_for(queued) is not None, "the cancelled reply")
        assert h.reply_for(queued).status is Status.cancelled and rid(queued) not in h.engine.started
        await h.until(lambda: h.intake.committed.get(("p.low", 0)) == 1, "its offset committed")
        await h.until(lambda: h.worker.policy.in_flight == 0, "its slot freed")


async def test_a_request_revoked_in_the_turn_it_was_admitted_frees_its_slot_unanswered(base):
    """Its task is cancelled before its first step (``_serve``'s ``finally`` never runs): the slot is
    freed all the same, and the request is left to the partition's next owner."""
    async with Harness(topology(base), slots=1) as h:
        queued = await admitted_not_started(h)
        h.intake.revoke([("p.low", 0)])
        await h.until(lambda: h.worker.policy.in_flight == 0, "its slot freed")
        assert rid(queued) not in h.worker.running and not h.worker._starting
        assert h.reply_for(queued) is None and rid(queued) not in h.engine.started


async def test_a_revocation_does_not_answer_a_streamed_request(base):
    async with Harness(topology(base), slots=1) as h:
        streamed = request("low", stream=True)
        h.publish(Band.low, streamed)
        await h.until(lambda: h.engine.started == [rid(streamed)])
        h.engine.emit(rid(streamed), "Hi")
        h.intake.revoke([("p.low", 0)])
        await h.until(lambda: h.worker.policy.in_flight == 0, "slot freed")
        assert h.reply_for(streamed) is None and [c.delta for c in h.writer.chunks] == ["Hi"]


async def test_a_full_engine_does_not_spin_on_the_timer_and_a_freed_slot_goes_to_the_best_band(base):
    """Every slot taken: nothing could start whatever arrives, so the loop waits FULL_POLL_S between
    turns, not POLL_S (it woke 200 times a second for nothing). Counted over the worker's own
    commit ticks, whatever the machine's speed: each timer turn is a whole wait."""
    async with Harness(topology(base), slots=2) as h:
        lows = [request("low") for _ in range(3)]
        for low in lows:
            h.publish(Band.low, low)
        await h.until(lambda: len(h.engine.started) == 2 and h.worker.policy.waiting_by_band()[Band.low] == 1)
        await h.until(lambda: h.worker.wait_s == FULL_POLL_S, "the long wait while full")
        high = request("high")
        h.intake.publish(Band.high, high)  # arrives by polling only: no wake-up
        await h.until(lambda: h.worker.policy.waiting_by_band()[Band.high] == 1, "the high is read while full")
        timer_turns, commits, started = h.worker.timer_turns, h.intake.commit_calls, time.monotonic()
        await h.until(lambda: h.intake.commit_calls >= commits + 3, "three commit ticks")
        elapsed = time.monotonic() - started
        assert h.worker.timer_turns - timer_turns <= elapsed / FULL_POLL_S + 1  # POLL_S: ~4x as many
        assert h.engine.started == [rid(lows[0]), rid(lows[1])] and h.worker.policy.full()
        h.engine.finish(rid(lows[0]))  # the freed slot wakes the loop; the high takes it, not the waiting low
        await h.until(lambda: len(h.engine.started) == 3)
        assert h.engine.started[2] == rid(high)
        h.engine.finish(rid(lows[1]))
        await h.until(lambda: len(h.engine.started) == 4 and h.worker.wait_s == FULL_POLL_S)
        h.engine.finish(rid(high))
        await h.until(lambda: h.worker.policy.in_flight == 1 and h.worker.wait_s == POLL_S, "back to the short poll")


async def test_a_high_is_admitted_at_the_next_poll_while_a_reserved_slot_is_free(base):
    """Lows fill every slot they may; the reserved ones are free, so the loop keeps polling every
    POLL_S and a high that arrives (seen by polling, no wake-up) starts at the next turn."""
    async with Harness(topology(base, reserved=(2, 0, 0)), slots=4) as h:
        for _ in range(5):
            h.publish(Band.low, request("low"))
        await h.until(lambda: len(h.engine.started) == 2 and h.worker.policy.waiting_by_band()[Band.low] == 3)
        assert not h.worker.policy.full()
        await h.until(lambda: h.worker.turns >= 3 and h.worker.wait_s == POLL_S)
        high = request("high")
        turns = h.worker.turns
        h.intake.publish(Band.high, high)
        await h.until(lambda: rid(high) in h.engine.started, "the high starts beside the running lows")
        assert h.worker.turns - turns <= 2 and h.worker.wait_s == POLL_S  # one poll to see it (one more at most)
        assert len(h.engine.running()) == 3


async def test_the_short_poll_stays_while_an_admitted_request_waits_for_a_delivery(base):
    """Full, but the admitted request's held-to marker is not durable yet: only a loop turn's
    ``writer.poll`` runs that delivery callback, so the loop keeps polling every POLL_S."""
    guard = SlowMarkerGuard()
    async with Harness(topology(base), slots=1, guard=guard) as h:
        low = request("low")
        h.publish(Band.low, low)
        await h.until(lambda: h.worker.policy.full() and h.worker.turns >= 2, "admitted")
        turns = h.worker.turns
        await h.until(lambda: h.worker.turns >= turns + 2)
        assert h.worker.wait_s == POLL_S and not h.engine.started
        guard.durable.set()
        await h.until(lambda: h.engine.started == [rid(low)])
        await h.until(lambda: h.worker.wait_s == FULL_POLL_S, "the long wait once it runs")


async def test_a_tenant_arriving_at_a_full_worker_takes_its_share_and_nothing_is_lost(base):
    """Preemption: acme holds every slot; globex's requests start at once in the newest acme
    requests' slots, which run again later. Every request is answered once, every offset committed."""
    async with Harness(topology(base), slots=4) as h:
        flood = [request("low", "acme") for _ in range(6)]
        offsets = [h.publish(Band.low, value) for value in flood]
        await h.until(lambda: len(h.engine.running()) == 4, "acme fills the engine")
        streamed = request("low", "acme", stream=True)  # never preempted: its client has chunks
        small = [request("low", "globex") for _ in range(3)]
        offsets += [h.publish(Band.low, streamed)] + [h.publish(Band.low, value) for value in small]
        await h.until(lambda: sum(r in h.engine.active for r in map(rid, small)) == 2, "globex holds its share")
        # acme's two newest running requests were taken back (the oldest two keep running); globex's
        # third waits: 2 of 4 slots is its share of two tenants
        assert sorted(h.engine.cancelled) == sorted(map(rid, flood[2:4]))
        assert sorted(h.engine.running()) == sorted(map(rid, flood[:2] + small[:2]))
        assert h.worker.policy.in_flight == 4 and not h.worker._preempted
        with capture_logs() as logs:
            for value in list(flood) + [streamed] + small:  # the rest run as slots free, the taken ones again
                while rid(value) not in h.engine.started or rid(value) in h.engine.running():
                    h.engine.finish(rid(value))
                    await asyncio.sleep(0.01)
                await h.until(lambda: h.reply_for(value) is not None, "answered")
        assert not [e for e in logs if e["event"] == "preempted"], "no preemption once globex had its share"
        answered = [r.request_id for r in h.writer.replies]
        assert sorted(answered) == sorted(map(rid, flood + [streamed] + small)), "each answered exactly once"
        assert all(r.status is Status.ok for r in h.writer.replies)
        assert h.engine.started.count(rid(flood[3])) == 2 and rid(streamed) not in h.engine.cancelled
        await h.until(lambda: h.intake.committed.get(("p.low", 0)) == max(offsets) + 1, "every offset committed")


async def test_preemption_off_leaves_a_full_worker_alone(base):
    async with Harness(topology(base), slots=2) as h:
        h.worker.settings = h.worker.settings.model_copy(update={"preempt": False})
        flood = [request("low", "acme") for _ in range(3)]
        for value in flood:
            h.publish(Band.low, value)
        await h.until(lambda: len(h.engine.running()) == 2)
        small = request("low", "globex")
        h.publish(Band.low, small)
        await h.until(lambda: h.worker.policy.waiting_by_band()[Band.low] == 2, "globex's request buffered")
        for _ in range(5):  # loop turns with a full engine and globex waiting
            h.worker._wake.set()
            await asyncio.sleep(0.01)
        assert not h.engine.cancelled and rid(small) not in h.engine.started
        h.engine.finish(rid(flood[0]))
        await h.until(lambda: rid(small) in h.engine.started, "globex starts in the freed slot (fair order)")
