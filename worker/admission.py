"""Admission: which buffered request the engine gets next. Pure logic, no Kafka, no clock.

Rules, in order:
1. **Deadline**: a request whose deadline has passed is expired, never admitted.
2. **Strict priority with aging**: the effective band is the topic's band, promoted one
   band each time the request has waited that band's ``aging_step_s`` since
   ``submitted_at`` (so every worker computes the same band). The promotion times are
   fixed when the request arrives; only the comparison with ``now`` changes.
3. **Reserved slots**: a request in effective band *r* may start only while fewer than
   ``capacity - sum(reserved_slots of bands above r)`` requests are in flight, so a burst
   of high requests finds free slots even when low work is plentiful. A request for ``n``
   outputs counts as the ``n`` slots it takes (``Pending.slots``).
4. **Fair share within a band**: start-time fair queuing over tenants, with the request's
   token budget as its cost: a tenant's next start tag is
   ``max(band virtual time, that tenant's last finish tag)`` and the smallest tag goes first;
   ties go to the older request. A tenant with 10x the backlog gets no more than its share.
5. **Per-tenant in-flight cap** (``quotas.max_in_flight``): a tenant at its cap is skipped.
6. **Preemption for fair share** (``preemption``): admission alone cannot help a tenant that
   arrives while another holds every slot: it waits for completions, however fair the order
   after them. When nothing may start, a waiting tenant below its fair share of the slots
   (capacity over the tenants with work here) takes one from the tenant holding the most,
   if that one is above its share: the waiting head starts at once (``admit_preempting``) and
   the victim's request goes back to its queue (``requeue``) to run again later. Only a
   request of the same or a lower band is taken, and a move never pushes the victim below its
   share nor the waiting tenant above it, so no two tenants trade slots back and forth. Its
   counterpart in rule 4: a freed slot goes to a tenant below its share before one at or above
   it (fair queuing decides among each), so admission never hands out a slot that preemption
   would take back.

Waiting requests are kept in one queue per (topic band, tenant), oldest first. Within such a
queue the oldest request always has the highest effective band (promotion times grow with
``submitted_at``) and the same fair-share tag, so only queue heads can be next: selection
scans the heads (a few per tenant) each time, not every buffered request, and no order ever
depends on the clock except through that comparison with ``now``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from schemas.messages import BAND_ORDER, Band

NEVER = float("inf")


@dataclass(frozen=True)
class BandRules:
    """The admission-relevant part of one band's topics.yaml entry."""

    aging_step_s: float | None
    reserved_slots: int


@dataclass(eq=False)
class Pending:
    """A buffered request. ``submitted_ts``/``deadline_ts`` are epoch seconds."""

    request_id: str
    tenant_id: str
    band: Band
    submitted_ts: float
    cost: float = 1.0
    deadline_ts: float = NEVER
    payload: Any = None
    promote_at: tuple[float, ...] = ()
    seq: int = 0
    served_as: Band | None = field(default=None)
    slots: int = 1  # engine slots it takes: a request for n outputs runs n sequences
    source: Any = None  # where it was read from (the worker: its partition), counted by ``waiting_by_source``
    size: int = 0  # bytes it was read as, summed in ``waiting_bytes``


class Preemption(NamedTuple):
    """``tenant`` gives up one admitted request of ``band`` or a lower band, ``slots`` wide or
    wider, to the head of the waiting ``queue`` (its key: topic band, tenant; the head's
    effective band is ``band``)."""

    tenant: str
    band: Band
    slots: int
    queue: tuple[Band, str]

    @property
    def for_tenant(self) -> str:
        """The tenant the slot goes to: the waiting queue's."""
        return self.queue[1]


class AdmissionPolicy:
    """Buffered requests in, one admitted request out; tracks what is in flight."""

    def __init__(
        self,
        bands: dict[Band, BandRules],
        capacity: int,
        tenant_caps: dict[str, int | None] | None = None,
        aging: bool = True,
    ):
        self.bands = bands
        self.capacity = capacity
        self.tenant_caps = tenant_caps or {}
        self.aging = aging
        #: (topic band, tenant) -> its waiting requests, oldest first
        self._queues: dict[tuple[Band, str], list[Pending]] = {}
        self._earliest_deadline = math.inf  # no waiting request expires before this (maybe later)
        self.in_flight = 0
        self.in_flight_by_tenant: dict[str, int] = defaultdict(int)
        self._limit = {}
        reserved_above = 0
        for band in BAND_ORDER:
            self._limit[band] = max(capacity - reserved_above, 1)
            reserved_above += bands[band].reserved_slots
        #: per band, the aging steps a request of that band waits through on its way up, its own
        #: band's first, up to the first band that does not age (bands, like limits, are fixed here)
        self._aging_steps: dict[Band, tuple[float, ...]] = {}
        for band in BAND_ORDER:
            steps = []
            for rank in range(band.rank, 0, -1):
                step = bands[BAND_ORDER[rank]].aging_step_s
                if step is None:
                    break
                steps.append(step)
            self._aging_steps[band] = tuple(steps)
        self._full_at = self._limit[Band.high]  # in flight at which even a high request finds no slot
        self._virtual_time = {band: 0.0 for band in BAND_ORDER}
        self._finish_tag: dict[Band, dict[str, float]] = {band: {} for band in BAND_ORDER}
        self._seq = itertools.count()
        #: waiting requests per ``Pending.source`` and their bytes, kept as they come and go, so the
        #: worker's read-ahead check costs nothing per loop turn however deep its buffer
        self._by_source: dict[Any, int] = defaultdict(int)
        self.waiting_bytes = 0

    def limit(self, band: Band) -> int:
        """In-flight requests below which a request of effective ``band`` may start."""
        return self._limit[band]

    def full(self) -> bool:
        """Nothing may start, whatever arrives: even a high request finds no slot (reserved ones
        included). Only a finished request changes that (``finished``)."""
        return self.in_flight >= self._full_at

    def add(self, item: Pending) -> None:
        item.seq = next(self._seq)
        item.promote_at = self._promotion_times(item) if self.aging else ()
        self._enqueue(item)

    def requeue(self, item: Pending) -> None:
        """Put back an admitted request that was preempted (``preemption``): it waits again where
        it waited before (its age, arrival order and promotion times are kept). The caller frees
        its slot with ``finished``, as for any admitted request."""
        item.served_as = None
        self._enqueue(item)

    def _enqueue(self, item: Pending) -> None:
        key = (item.band, item.tenant_id)
        queue = self._queues.get(key)
        if queue is None:  # not setdefault: that would make a new empty list for every request
            queue = self._queues[key] = []
        last = queue[-1] if queue else None
        if last is None or (last.submitted_ts, last.seq) <= (item.submitted_ts, item.seq):  # _age_order, inline
            queue.append(item)  # where insort puts it; requests mostly arrive oldest first (no bisect)
        else:
            bisect.insort(queue, item, key=_age_order)
        self._by_source[item.source] += 1
        self.waiting_bytes += item.size
        self._earliest_deadline = min(self._earliest_deadline, item.deadline_ts)

    def _promotion_times(self, item: Pending) -> tuple[float, ...]:
        """Epoch times at which the item reaches each higher band, nearest first."""
        times = []
        at = item.submitted_ts
        for step in self._aging_steps[item.band]:
            at += step
            times.append(at)
        return tuple(times)

    @staticmethod
    def effective_band(item: Pending, now: float) -> Band:
        promotions = 0
        for at in item.promote_at:
            if now < at:
                break
            promotions += 1
        return BAND_ORDER[item.band.rank - promotions]

    @property
    def waiting(self) -> list[Pending]:
        """Every waiting request (a copy; for gauges and tests, not the hot path)."""
        return [item for queue in self._queues.values() for item in queue]

    def take_expired(self, now: float) -> list[Pending]:
        if now < self._earliest_deadline:  # the worker asks every loop turn: skip the scan
            return []
        expired = self.remove_where(lambda item: item.deadline_ts <= now)
        self._earliest_deadline = min((item.deadline_ts for queue in self._queues.values() for item in queue),
                                      default=math.inf)
        return expired

    def next(self, now: float) -> Pending | None:
        """Remove and return the request to start now, or None if nothing may start."""
        if not self._queues or self.full():  # skip the scan
            return None
        best_queue: list[Pending] | None = None
        best_key: tuple[int, bool, float, float, int] | None = None
        best_band: Band | None = None
        held = self.in_flight_by_tenant
        share = self._share() if len(self._queues) > 1 else None  # one queue: nobody to compare with
        for (_band, tenant_id), queue in self._queues.items():
            count = held[tenant_id]
            cap = self.tenant_caps.get(tenant_id)
            if cap is not None and count >= cap:
                continue
            head = queue[0]
            band = self.effective_band(head, now) if head.promote_at else head.band
            start = max(self._virtual_time[band], self._finish_tag[band].get(tenant_id, 0.0))
            # a tenant below its share of the slots goes before those at or above it (rule 6's
            # counterpart: a freed slot is not handed to a tenant that would be preempted for it)
            key = (band.rank, share is not None and count + 1 > share, start, head.submitted_ts, head.seq)
            if best_key is None or key < best_key:
                best_queue, best_key, best_band = queue, key, band
        if best_queue is None:
            return None
        assert best_key is not None and best_band is not None
        if not self._fits(best_queue[0].slots, best_band):
            return None
        return self._take(best_queue, best_band, best_key[2])

    def _share(self) -> float | None:
        """Each tenant's fair share of the slots: capacity over the tenants with requests waiting
        or in flight here; None while there is only one such tenant."""
        tenants = {tenant for (_band, tenant) in self._queues}
        tenants.update(tenant for tenant, count in self.in_flight_by_tenant.items() if count > 0)
        return self.capacity / len(tenants) if len(tenants) > 1 else None

    def _take(self, queue: list[Pending], band: Band, start: float) -> Pending:
        """Admit ``queue``'s head as effective ``band`` with fair-share start tag ``start``."""
        best = queue.pop(0)
        if not queue:
            del self._queues[(best.band, best.tenant_id)]
        self._gone(best)
        self._virtual_time[band] = start
        self._finish_tag[band][best.tenant_id] = start + best.cost
        best.served_as = band
        self.in_flight += best.slots
        self.in_flight_by_tenant[best.tenant_id] += 1
        return best

    def preemption(self, now: float) -> Preemption | None:
        """Whose slot a waiting tenant should take, when nothing may start now (call after ``next``
        returned None); None when admission alone is fair enough.

        The waiting tenant: the one holding the fewest requests, below its fair share
        (``capacity`` over the tenants with requests waiting or in flight here) by at least one,
        not at its cap, whose head could not start now for want of a slot. The victim: the tenant
        holding the most, at least its share plus one. A move of one request from the victim to
        the waiting tenant leaves the victim at or above its share and the waiting tenant at or
        below it, so no two tenants ever trade slots back and forth. Which of the victim's
        requests goes is the caller's choice (of ``Preemption.band`` or a lower band, at least
        ``Preemption.slots`` wide); ``admit_preempting`` then starts the waiting head."""
        if not self._queues or (share := self._share()) is None:
            return None
        held = self.in_flight_by_tenant
        needy: tuple[int, int, float, int] | None = None
        needy_key: tuple[Band, str] | None = None
        needy_band: Band | None = None
        for key, queue in self._queues.items():
            tenant_id = key[1]
            count = held.get(tenant_id, 0)
            if count + 1 > share:
                continue
            cap = self.tenant_caps.get(tenant_id)
            if cap is not None and count >= cap:
                continue
            head = queue[0]
            band = self.effective_band(head, now) if head.promote_at else head.band
            if self._fits(head.slots, band):
                continue  # it can start as it is
            rank = (count, band.rank, head.submitted_ts, head.seq)
            if needy is None or rank < needy:
                needy, needy_key, needy_band = rank, key, band
        if needy_key is None or needy_band is None:  # set together with ``needy``
            return None
        victim, most = None, 0
        for tenant_id, count in held.items():
            if tenant_id != needy_key[1] and count - 1 >= share and count > most:
                victim, most = tenant_id, count
        if victim is None:
            return None
        return Preemption(victim, needy_band, self._queues[needy_key][0].slots, needy_key)

    def admit_preempting(self, preemption: Preemption) -> Pending:
        """Start the waiting head ``preemption`` was for, now: the caller has taken a request of
        ``preemption.tenant`` (it frees its slot with ``finished`` once the engine let it go, so
        for that short while one request more than ``capacity`` is in flight)."""
        band = preemption.band
        start = max(self._virtual_time[band], self._finish_tag[band].get(preemption.for_tenant, 0.0))
        return self._take(self._queues[preemption.queue], band, start)

    def _fits(self, slots: int, band: Band) -> bool:
        """Room for ``slots`` more under ``band``'s limit; a request larger than the limit starts
        alone, once nothing else is in flight, instead of never."""
        return self.in_flight + slots <= self._limit[band] or self.in_flight == 0

    def finished(self, item: Pending) -> None:
        self.in_flight -= item.slots
        self.in_flight_by_tenant[item.tenant_id] -= 1

    def remove_where(self, predicate: Any) -> list[Pending]:
        """Drop waiting items matching ``predicate`` (e.g. from revoked partitions)."""
        removed = []
        for key in list(self._queues):
            queue = self._queues[key]
            gone = [item for item in queue if predicate(item)]
            if gone:
                removed += gone
                for item in gone:
                    self._gone(item)
                kept = [item for item in queue if not predicate(item)]
                if kept:
                    self._queues[key] = kept
                else:
                    del self._queues[key]
        return removed

    def _gone(self, item: Pending) -> None:
        left = self._by_source[item.source] - 1
        if left:
            self._by_source[item.source] = left
        else:
            del self._by_source[item.source]
        self.waiting_bytes -= item.size

    def waiting_by_source(self) -> dict[Any, int]:
        """Waiting requests per ``Pending.source`` (a copy; kept up to date, no scan)."""
        return dict(self._by_source)

    def waiting_by_band(self) -> dict[Band, int]:
        counts = {band: 0 for band in BAND_ORDER}
        for (band, _tenant), queue in self._queues.items():
            counts[band] += len(queue)
        return counts


def _age_order(item: Pending) -> tuple[float, int]:
    return item.submitted_ts, item.seq


def band_rules(bands: Iterable[tuple[Band, Any]]) -> dict[Band, BandRules]:
    """BandRules from topology band configs."""
    return {band: BandRules(config.aging_step_s, config.reserved_slots) for band, config in bands}
