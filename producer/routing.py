"""Load-aware routing: which partition of its band topic a request goes to.

Each request goes to the partition where *its tenant's* request would wait least: one of its
lanes (schemas.lanes), or, **overflow**, another partition of the band while that one holds
fewer than a quarter of the workers' read-ahead of the tenant's records and fewer than three
quarters of everyone's. Lanes bound where a tenant's backlog can queue in Kafka (a flood fills
its lanes, never the partitions only others use, beyond what the workers read); the overflow lets a
burst or a steady load that the workers can see whole spread over every partition, hence evenly
over the workers: fewer lanes than partitions land unevenly on them (12 lanes of 16 partitions,
4 per worker of 4: one worker may hold 4 of a tenant's lanes and another 2, and a burst spread
evenly over the lanes then keeps the first twice as long; bench.pool's fairness scenario).
What a new record of tenant T on partition P waits for, the larger of:

- **the part of P's backlog the worker cannot have read yet**: workers read each partition up
  to ``read_ahead`` records ahead (``TIERQ_READ_AHEAD_PER_PARTITION``, worker.intake), so
  records beyond that are in front of T's whatever their tenant. P's backlog is the last
  reading (end offset minus the pool group's committed offset, refreshed in the background
  about once a second by ``broker.backlog.BacklogReader``, which reads true end offsets even
  on Tansu) plus what this producer sent there since;
- **T's own requests there not done yet**: this producer's records of T on P that are not
  acknowledged yet or at or past P's committed offset (delivery reports give the offsets).

Other tenants' records within the read-ahead are *not* counted: the worker has them in its
buffer and shares its slots fairly between tenants (worker.admission), so they do not stand in
front of T's. Counting them (as this router did before) sends a small tenant away from every
partition a flood fills, onto the few lanes it alone uses, hence onto few workers.

That count is divided by the rate at which P's committed offset has been advancing while it
had work (records over seconds, over its last ``RATE_WINDOW_S`` seconds with work: a partition
finishes a request every few seconds, and a rate read from one or two readings made a slow
worker's lanes look as fast as any other's right after each request they finished; forgotten after
``RATE_IDLE_FORGET_S`` without work),
so a partition whose worker is slow or shared with more partitions gets fewer requests, in
proportion; one with backlog and no progress for ``STALL_AFTER_S`` (its worker is gone), or for
twice the longest gap between advances it has shown (a long generation holds the committed
offset still on a healthy worker), gets none while any other lane can take them. Not while its
consumer group re-forms (a worker joins or leaves): librdkafka then holds every member's commits
back until the group has settled, so committed offsets stand still on healthy, busy workers; read
as stalls, they starved a worker of new requests until it ran dry (bench.pool's events scenario).
Those readings, and the first after (the held-back commits land at once), measure nothing (for
at most ``SETTLING_GRACE_S``: a group that never re-forms may leave lanes without an owner).
Lanes whose drain rate is not known yet (no request done since they had work, or none within
the window) count at the average rate of the others. Any lane that has had work for t seconds
without finishing a request counts at 1/t when that is lower than its rate: a slow worker's lanes
show their rate last, precisely because they are slow (counted at the average until then, they
took a fast lane's share of a burst's first seconds; bench.pool's hetero scenario), and a lane
whose worker died keeps its finished requests in its window for 10 s, but is slower than 1/t
from the moment it stopped, and stalled only after ``STALL_AFTER_S``. With no rate known at all
the counts alone decide, so a new producer spreads a tenant's requests evenly (over every
partition while they are light, then over its lanes). The record key stays the tenant id, so the contract is unchanged for clients that only
set the key.

Known approximations: a tenant's records done out of order (fair share serves them before
older records of others) count as outstanding until the committed offset passes them, which
leans a tenant slightly away from partitions it shares with a flood; requests of the same
tenant from other producers are seen only as backlog beyond the read-ahead; a rate is the
partition's, not the tenant's share of it.

Least-loaded of all lanes rather than the power of two choices: the choice is per tenant and
cheap (a few dozen lanes), and it spreads a burst exactly. Several producers can herd onto the
same lane between two readings; each one's own counts spread it, and the next reading
corrects the rest.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import structlog

from broker.topics import PartitionKey
from schemas.lanes import READ_AHEAD_PER_PARTITION
from schemas.messages import Band
from schemas.topology import Topology

log = structlog.get_logger("tierq.routing")


class LaneReading(NamedTuple):
    """One partition in a backlog reading."""

    backlog: int
    committed: int
    #: False while the partition's consumer group re-forms: its owner's commits wait for the group
    #: (``BacklogReader.settling_groups``), so the committed offset standing still says nothing
    #: about the worker's progress
    settled: bool = True


#: reads (topics) -> {(topic, partition): (backlog, committed offset[, settled])}; raises on failure
#: (the last reading is kept)
BacklogSource = Callable[[list[str]], Mapping[PartitionKey, tuple[int, ...]]]
#: topic -> number of partitions (None while unknown)
PartitionCounter = Callable[[str], int | None]

REFRESH_S = 1.0
#: a lane's drain rate: records done over the last this many seconds it had work (measured
#: readings only). Longer than a few requests' time: a partition of a busy worker finishes one every
#: few seconds, and an average that leant on the last reading or two (weight 0.5 each, as this
#: router once had) jumped with each request done, so a slow worker's lanes often looked as fast
#: as the others' and took more than their share (bench.pool's hetero scenario)
RATE_WINDOW_S = 10.0
#: a lane whose committed offset has not moved for this long while it had backlog counts as
#: stalled (its worker is gone, or stuck): it gets requests only when every lane is. A single
#: reading without progress says nothing: a lane's first request may take longer than a reading's
#: interval (counting that as stalled herded every request onto the few lanes that happened to
#: commit in the first second of a burst: bench.pool's hetero scenario)
STALL_AFTER_S = 5.0
#: ... or for this many times the longest gap between two advances the lane has shown while it
#: had work, when that is longer: the committed offset moves only past the oldest request, so a
#: long generation at the head holds it still for as long as it runs, on a healthy worker
STALL_GAP_FACTOR = 2.0
#: a lane's group re-forming for longer than this counts as settled again: a group that never
#: re-forms (Tansu 0.6.0 when its leader leaves mid-rebalance; a member hung mid-rebalance on Kafka)
#: may leave lanes without an owner, and those must be judged stalled like any other
#: (WorkerSettings.rebalance_stuck_s says the same of a worker's own group)
SETTLING_GRACE_S = 60.0
#: two readings further apart than this many refresh intervals (the backlog could not be read in
#: between) measure no rate: one such interval would weigh as much as the rest of the window
MEASURED_GAP_FACTOR = 5.0
#: drain rates (records/s) at or below this are no rate: the lane has not shown its speed yet
MIN_RATE = 0.01
#: a lane without backlog for this long forgets its drain rate (a rate is measured under load;
#: one measured from a few records long ago, of a worker whose load has changed since, misleads)
RATE_IDLE_FORGET_S = 3.0
#: overflow (module doc): a partition outside a tenant's lanes takes its requests while it holds
#: fewer of them than this share of the workers' read-ahead ...
OVERFLOW_OWN_SHARE = 0.25
#: ... and fewer records of all tenants than this share, so that the tenants whose lane it is
#: still find their requests within the read-ahead (three floods overflowing into it stop short)
OVERFLOW_LOAD_SHARE = 0.75
#: acknowledged offsets kept per (tenant, partition) while no reading prunes them (the oldest go first)
MAX_TRACKED = 65536


NO_READING = LaneReading(0, 0)


class _Mine:
    """This producer's records of one tenant in one partition that the pool may not have done."""

    __slots__ = ("unacked", "offsets")

    def __init__(self) -> None:
        self.unacked = 0  # sent, no delivery report yet
        self.offsets: deque[int] = deque(maxlen=MAX_TRACKED)  # acknowledged, not known committed

    def outstanding(self, committed: int) -> int:
        offsets = self.offsets
        while offsets and offsets[0] < committed:
            offsets.popleft()
        return self.unacked + len(offsets)


class LaneRouter:
    """Chooses partitions for one producer. ``partition_for`` runs on the producer's thread;
    the backlog reading runs on a daemon thread of its own and swaps in whole snapshots."""

    def __init__(self, topology: Topology, partition_count: PartitionCounter, backlog: BacklogSource | None,
                 refresh_s: float = REFRESH_S, read_ahead: int = READ_AHEAD_PER_PARTITION,
                 close_source: Callable[[], None] | None = None):
        """``close_source`` releases what ``backlog`` reads with; the router calls it once no reading
        can be under way (see ``close``)."""
        self.topology = topology
        self._close_source = close_source
        self.read_ahead = read_ahead
        self._partition_count = partition_count
        self._backlog_source = backlog
        self._refresh_s = refresh_s
        self._lanes: dict[tuple[str, str, int], frozenset[int]] = {}
        self._counts: dict[str, int] = {}
        #: the last reading, swapped in whole: (topic, partition) -> (backlog, committed offset)
        self._reading: Mapping[PartitionKey, LaneReading] = {}
        self._rates: dict[PartitionKey, float] = {}
        #: per lane: the measured readings within its rate window, (seconds, records done)
        self._window: dict[PartitionKey, deque[tuple[float, int]]] = {}
        self._idle_since: dict[PartitionKey, float] = {}
        #: per lane: when its committed offset last moved, or it last had no backlog
        self._progress_at: dict[PartitionKey, float] = {}
        #: per lane: the longest time its committed offset stood still while it had work and then
        #: moved (forgotten with its rate)
        self._longest_gap: dict[PartitionKey, float] = {}
        #: per lane: since when its group has been re-forming (absent while settled)
        self._settling_since: dict[PartitionKey, float] = {}
        #: lanes with backlog and no progress for their stall time (swapped in whole)
        self._stalled: frozenset[PartitionKey] = frozenset()
        #: lanes with work: 1 / how long they have had work without finishing any, the most their
        #: rate can be now (swapped in whole)
        self._no_progress: dict[PartitionKey, float] = {}
        self._previous: tuple[dict[PartitionKey, LaneReading], float] | None = None
        self._reading_seen: Mapping[PartitionKey, LaneReading] | None = None
        self._sent: dict[PartitionKey, int] = {}  # all tenants', since the last reading
        self._mine: dict[tuple[str, PartitionKey], _Mine] = {}
        self._lock = threading.Lock()  # _mine: delivery reports may come on another thread
        self._topics = sorted({t for pool in topology.pools for t in topology.pool_topics(pool).values()})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LaneRouter:
        """Start refreshing backlogs in the background (nothing to do without a source)."""
        if self._backlog_source is not None and self._thread is None:
            self._thread = threading.Thread(target=self._refresh_forever, name="tierq-routing", daemon=True)
            self._thread.start()
        return self

    def refresh(self) -> None:
        """Read the backlog now (the background thread does this every ``refresh_s``) and update
        each lane's drain rate from how far its committed offset moved while it had backlog."""
        assert self._backlog_source is not None
        now = time.monotonic()
        reading = {tp: self._graced(tp, LaneReading(*load), now)
                   for tp, load in self._backlog_source(self._topics).items()}
        rates = dict(self._rates)
        if self._previous is not None:
            before, then = self._previous
            elapsed = now - then
            for tp, (backlog, committed, settled) in reading.items():
                old = before.get(tp)
                if not settled or (old is not None and not old.settled):
                    # its group re-forms (or just did: the held-back commits land at once): no
                    # measure of progress, and no stall either
                    self._progress_at[tp] = now
                    if backlog > 0:
                        self._idle_since.pop(tp, None)
                    continue
                if old is not None and old[0] > 0 and committed > old[1]:
                    gap = now - self._progress_at.get(tp, then)
                    self._longest_gap[tp] = max(gap, self._longest_gap.get(tp, 0.0))
                if backlog == 0 or old is None or committed > old[1]:
                    self._progress_at[tp] = now
                if backlog > 0:
                    self._idle_since.pop(tp, None)
                elif now - self._idle_since.setdefault(tp, now) >= RATE_IDLE_FORGET_S:
                    rates.pop(tp, None)
                    self._window.pop(tp, None)
                    self._longest_gap.pop(tp, None)
                if old is None or old[0] == 0 or elapsed <= 0:
                    continue  # nothing to drain: its rate says nothing
                if elapsed > MEASURED_GAP_FACTOR * self._refresh_s:
                    continue  # readings failed in between: whether it had work all along is not known
                done = self._measure(tp, elapsed, max(0, committed - old[1]))
                if done is None:
                    rates.pop(tp, None)  # no request done within its window: speed unknown, not zero
                else:
                    rates[tp] = done
        else:
            self._progress_at.update({tp: now for tp in reading})
        gaps = self._longest_gap
        self._stalled = frozenset(
            tp for tp, (backlog, _c, _s) in reading.items()
            if backlog > 0 and now - self._progress_at.get(tp, now)
            >= max(STALL_AFTER_S, STALL_GAP_FACTOR * gaps.get(tp, 0.0)))
        self._no_progress = {tp: 1.0 / (now - self._progress_at[tp]) for tp, (backlog, _c, _s) in reading.items()
                             if backlog > 0 and now > self._progress_at.get(tp, now)}
        self._previous = reading, now
        self._rates = rates
        self._reading = reading

    def _measure(self, tp: PartitionKey, elapsed: float, done: int) -> float | None:
        """Add one measured reading to the lane's window; its rate over the window (None when it
        finished nothing within it)."""
        window = self._window.setdefault(tp, deque())
        window.append((elapsed, done))
        seconds = sum(s for s, _ in window)
        while len(window) > 1 and seconds - window[0][0] >= RATE_WINDOW_S:
            seconds -= window.popleft()[0]
        records = sum(d for _, d in window)
        return records / seconds if records > 0 else None

    def _graced(self, tp: PartitionKey, load: LaneReading, now: float) -> LaneReading:
        """``load``, counted as settled once its group has been re-forming for ``SETTLING_GRACE_S``
        (a group that does not re-form: its lanes may have no owner)."""
        if load.settled:
            self._settling_since.pop(tp, None)
        elif now - self._settling_since.setdefault(tp, now) >= SETTLING_GRACE_S:
            return load._replace(settled=True)
        return load

    def _refresh_forever(self) -> None:
        failing = False
        try:
            while not self._stop.is_set():
                try:
                    self.refresh()
                    failing = False
                except Exception as exc:  # broker away: keep routing on the last reading and own counts
                    if not failing:
                        log.warning("backlog_unavailable", error=str(exc), note="routing on the last reading")
                    failing = True
                self._stop.wait(self._refresh_s)
        finally:
            self._release_source()

    def _release_source(self) -> None:
        close, self._close_source = self._close_source, None
        if close is not None:
            close()

    def update_tenants(self, topology: Topology) -> None:
        self.topology = topology
        self._lanes.clear()

    def _partitions(self, topic: str) -> int | None:
        """From the latest reading (it covers every partition, so it sees a topic grow), else metadata."""
        counted = self._counts.get(topic)
        if counted is None:
            counted = self._partition_count(topic)
            if counted:
                self._counts[topic] = counted
        return counted

    def lanes(self, tenant_id: str, band: Band, topic: str) -> list[int] | None:
        known = self._lanes_of(tenant_id, band, topic)
        return sorted(known[1]) if known else None

    def _lanes_of(self, tenant_id: str, band: Band, topic: str) -> tuple[int, frozenset[int]] | None:
        """The topic's partition count and the tenant's lanes in it (None while the count is unknown)."""
        partitions = self._partitions(topic)
        if not partitions:
            return None
        key = (tenant_id, topic, partitions)
        lanes = self._lanes.get(key)
        if lanes is None:
            lanes = self._lanes[key] = frozenset(self.topology.tenant_lanes(tenant_id, band, topic, partitions))
        return partitions, lanes

    def partition_for(self, tenant_id: str, pool: str, band: Band) -> int | None:
        """The partition where the tenant's request would wait least (see the module doc); None when the
        topic's partitions are not known yet (Kafka's partitioner then places the record by its key).
        Call ``delivered`` with the record's delivery report."""
        reading = self._reading
        if reading is not self._reading_seen:  # a new reading includes what we sent before it
            self._reading_seen = reading
            self._sent.clear()
            for counted_topic, partition in reading:
                self._counts[counted_topic] = max(self._counts.get(counted_topic, 0), partition + 1)
        topic = self.topology.band_topic(pool, band)
        known_lanes = self._lanes_of(tenant_id, band, topic)
        if known_lanes is None:
            return None
        partition_count, lanes = known_lanes
        rates, stalled, no_progress = self._rates, self._stalled, self._no_progress
        candidates = range(partition_count)  # its lanes, and the band's other partitions while light
        known = [rates[(topic, p)] for p in candidates if rates.get((topic, p), 0.0) > MIN_RATE]
        average = sum(known) / len(known) if known else None
        own_below, load_below = self.read_ahead * OVERFLOW_OWN_SHARE, self.read_ahead * OVERFLOW_LOAD_SHARE
        best_wait, best = None, []
        with self._lock:
            for partition in candidates:
                tp = (topic, partition)
                backlog, committed, _settled = reading.get(tp, NO_READING)
                load = backlog + self._sent.get(tp, 0)
                mine = self._mine.get((tenant_id, tp))
                own = mine.outstanding(committed) if mine else 0
                if partition not in lanes and (own >= own_below or load >= load_below):
                    continue  # not its lane, and not light: a tenant's backlog queues only in its lanes
                # own records sit in the backlog too: each is counted once
                ahead = max(own, load - self.read_ahead)
                if tp in stalled:
                    wait = float("inf")
                elif average is None:
                    wait = float(ahead)
                else:
                    rate = rates.get(tp, average)
                    rate = min(rate, no_progress.get(tp, rate))
                    wait = (ahead + 1) / max(rate, MIN_RATE)
                if best_wait is None or wait < best_wait:
                    best_wait, best = wait, [partition]
                elif wait == best_wait:
                    best.append(partition)
            choice = best[0] if len(best) == 1 else random.choice(best)
            tp = (topic, choice)
            mine = self._mine.get((tenant_id, tp))
            if mine is None:
                mine = self._mine[(tenant_id, tp)] = _Mine()
            mine.unacked += 1
        self._sent[tp] = self._sent.get(tp, 0) + 1
        return choice

    def delivered(self, tenant_id: str, topic: str, partition: int, offset: int | None) -> None:
        """The delivery report of a record ``partition_for`` placed: its offset, or None when it
        was not written (it then counts no more)."""
        with self._lock:
            mine = self._mine.get((tenant_id, (topic, partition)))
            if mine is None:
                return
            mine.unacked = max(0, mine.unacked - 1)
            if offset is not None and offset >= 0:
                mine.offsets.append(offset)

    def close(self, timeout: float = 10.0) -> None:
        """Stop reading. The reading thread releases the source itself as it ends: a reading can
        outlast ``timeout`` while the broker is away (each of its calls has its own timeout), and
        an admin client destroyed under a call still in flight takes the process down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        else:
            self._release_source()


def backlog_reader_source(settings: Any, topology: Topology) -> tuple[BacklogSource, Callable[[], None]]:
    """A ``BacklogSource`` over each pool's band groups (``tierq-<pool>-<band>``), and its closer."""
    from broker.backlog import BacklogReader

    readers = {pool: BacklogReader(settings, topology.band_groups(pool)) for pool in topology.pools}
    topics_of = {pool: set(topology.pool_topics(pool).values()) for pool in topology.pools}

    def read(topics: list[str]) -> dict[PartitionKey, LaneReading]:
        loads: dict[PartitionKey, LaneReading] = {}
        for pool, reader in readers.items():
            mine = [t for t in topics if t in topics_of[pool]]
            if mine:
                pool_loads = reader.read(mine)  # first: the describe only once the broker has answered
                settling = reader.settling_groups((reader.group_for(t) for t in mine), timeout=2.0)
                loads.update({tp: LaneReading(load.backlog, load.committed, reader.group_for(tp[0]) not in settling)
                              for tp, load in pool_loads.items()})
        return loads

    def close() -> None:
        for reader in readers.values():
            reader.close()

    return read, close
