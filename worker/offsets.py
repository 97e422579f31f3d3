"""What may be committed: per partition, the highest offset below which all work is done.

Rule: an offset is *done* once its reply (or DLQ record) is acknowledged by the broker.
Completions arrive out of order, so the commit position of a partition is the first
offset that is not done yet; nothing past unfinished work is ever committed.
"""

from __future__ import annotations

from collections import OrderedDict

from broker.topics import PartitionKey



class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[PartitionKey, OrderedDict[int, bool]] = {}
        self._committed: dict[PartitionKey, int] = {}

    def received(self, tp: PartitionKey, offset: int) -> None:
        offsets = self._pending.get(tp)
        if offsets is None:  # not setdefault: that would make an OrderedDict for every record
            offsets = self._pending[tp] = OrderedDict()
        offsets[offset] = False

    def done(self, tp: PartitionKey, offset: int) -> None:
        """Mark done; ignored for partitions no longer owned (revoked meanwhile)."""
        offsets = self._pending.get(tp)
        if offsets is not None and offset in offsets:
            offsets[offset] = True

    def committable(self) -> dict[PartitionKey, int]:
        """Next offset to commit per partition, only where it advanced since last asked."""
        advanced = {}
        for tp, offsets in self._pending.items():
            last_done = None
            while offsets:
                offset, is_done = next(iter(offsets.items()))
                if not is_done:
                    break
                offsets.popitem(last=False)
                last_done = offset
            if last_done is not None and last_done + 1 > self._committed.get(tp, -1):
                advanced[tp] = last_done + 1
                self._committed[tp] = last_done + 1
        return advanced

    def outstanding(self, tp: PartitionKey | None = None) -> int:
        if tp is not None:
            return len(self._pending.get(tp, ()))
        return sum(len(o) for o in self._pending.values())

    def forget(self, tp: PartitionKey) -> None:
        self._pending.pop(tp, None)
        self._committed.pop(tp, None)
