"""The poison guard: the worker's one interface to engine-attempt accounting.

A request that kills the engine kills its worker and is delivered again to the next one;
the guard keeps the count of such attempts durable so that after ``max_attempts`` the
request is answered ``engine_error`` instead of crash-looping the pool. The mechanism
(held-to markers per partition, counts for suspects only) is described in worker.attempts;
the worker sees only: what attempt is this, make it durable before the engine sees it, and
the request is answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import NamedTuple

import structlog

from broker.topics import PartitionKey
from worker.attempts import NOTHING_HELD, AttemptsLedger, HeldMarkers
from worker.replies import ReplyWriter

log = structlog.get_logger("tierq.poison")


class Attempt(NamedTuple):
    number: int
    #: counted by request_id (a suspect): its count is tombstoned once the reply is durable
    counted: bool


class PoisonGuard:
    def __init__(self, ledger: AttemptsLedger, writer: ReplyWriter, group_id: str):
        self.ledger = ledger
        self.writer = writer
        self.held = HeldMarkers(writer, group_id)

    # ---- lifecycle -----------------------------------------------------------------------

    def connect(self, timeout: float) -> str | None:
        """None once the attempts topic is found and being read, else why not."""
        return self.ledger.connect(timeout)

    def load(self) -> None:
        self.ledger.load()

    def poll(self) -> None:
        self.ledger.poll()

    def close(self) -> None:
        self.ledger.close()

    # ---- per request ---------------------------------------------------------------------

    def prior_attempts(self, request_id: str, tp: PartitionKey, offset: int) -> int:
        return self.ledger.prior_attempts(request_id, tp, offset)

    def fetched(self, highest: dict[PartitionKey, int]) -> None:
        """A batch was fetched: write one held-to marker per partition, not one per request."""
        for tp, offset in highest.items():
            self.held.cover(tp, offset)

    async def start(self, request_id: str, tp: PartitionKey, offset: int) -> Attempt:
        """Make this attempt durable before the engine sees the request: its partition's held-to
        marker (usually durable already), or for a suspect its own count."""
        if not self.ledger.is_suspect(request_id, tp, offset):  # no count and not inherited: a first attempt
            if not self.held.covered(tp, offset):
                await self.held.wait_covered(tp, offset)
            return Attempt(1, counted=False)
        number = self.ledger.prior_attempts(request_id, tp, offset) + 1
        durable = asyncio.get_running_loop().create_future()
        self.writer.count_attempt(request_id, number, on_durable=lambda: durable.done() or durable.set_result(None))
        await durable
        self.ledger.record_count(request_id, number)
        return Attempt(number, counted=True)

    def answered(self, request_id: str, attempt: Attempt | None) -> None:
        """The request's reply is durable: a counted attempt's count is no longer needed."""
        if attempt is not None and attempt.counted:
            self.writer.clear_attempts(request_id)
            self.ledger.forget_count(request_id)

    # ---- partitions ----------------------------------------------------------------------

    def assigned(self, partitions: list[PartitionKey]) -> bool:
        """Take over partitions; False if a dead predecessor's marker may be unknown (unsafe)."""
        if not self.ledger.assigned(partitions):
            return False
        for tp in partitions:
            if (held_to := self.ledger.suspect_to[tp]) != NOTHING_HELD:
                log.warning("inherited_suspects", topic=tp[0], partition=tp[1], held_to=held_to,
                            why="the previous owner died or lost the partition; requests up to this "
                                "offset are counted as attempted once")
        return True

    def released(self, partitions: Iterable[PartitionKey], clean: bool) -> None:
        """Clean release: put back the marker we inherited (nothing we held was started by a dead
        worker). Otherwise the marker stays, and whoever gets these partitions counts what we held."""
        partitions = list(partitions)
        if clean:
            if self.held.release(partitions, clean=True, inherited=self.ledger.suspect_to):
                self.writer.flush(5)
        else:
            self.held.release(partitions, clean=False, inherited={})
        self.ledger.released(partitions)
