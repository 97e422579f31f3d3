"""The attempts ledger against a real broker: what a worker taking over a partition learns."""

from __future__ import annotations

import asyncio

import confluent_kafka
import orjson
import pytest

from schemas.messages import Band
from worker.attempts import NOTHING_HELD, AttemptsLedger, HeldMarkers, marker_key

pytestmark = pytest.mark.integration


def produce(settings, topic: str, records: list[tuple[str, bytes | None]]) -> None:
    raw = confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers})
    for key, value in records:
        raw.produce(topic, key=key.encode(), value=value)
    assert raw.flush(10) == 0


def test_an_assignment_sees_markers_written_after_the_ledger_loaded(settings, topology):
    """A rebalance hands a running worker a partition whose owner just died: the marker it left
    was written after this worker started, and must be read before serving from the partition."""
    low = (topology.band_topic("default", Band.low), 0)
    ledger = AttemptsLedger(settings, topology.attempts.topic, "g1")
    assert ledger.connect() is None
    ledger.load(10)
    try:
        produce(settings, topology.attempts.topic, [
            (marker_key("g1", low), orjson.dumps({"held_to": 41})),
            (marker_key("other-group", (low[0], 1)), orjson.dumps({"held_to": 99})),
            ("req-1", orjson.dumps({"attempts": 2})),
            ("req-2", orjson.dumps({"attempts": 1})),
            ("req-2", None),
        ])
        assert ledger.assigned([low, (low[0], 1)])
        assert ledger.suspect_to == {low: 41, (low[0], 1): NOTHING_HELD}  # another group's marker is not ours
        assert ledger.counts == {"req-1": 2}
        assert ledger.prior_attempts("fresh", low, 41) == 1 and ledger.is_suspect("fresh", low, 41)
        assert ledger.prior_attempts("fresh", low, 42) == 0 and not ledger.is_suspect("fresh", low, 42)
        assert ledger.prior_attempts("req-1", low, 100) == 2 and ledger.is_suspect("req-1", low, 100)
        ledger.released([low])
        assert not ledger.is_suspect("fresh", low, 0)
    finally:
        ledger.close()


class RecordingWriter:
    def __init__(self) -> None:
        self.written: list[tuple[str, int]] = []
        self.callbacks: list = []

    def mark_held(self, key, offset, on_durable=None):
        self.written.append((key, offset))
        if on_durable is not None:
            self.callbacks.append(on_durable)


async def test_held_markers_cover_a_batch_with_one_record_and_wait_until_durable():
    writer = RecordingWriter()
    held = HeldMarkers(writer, "g")
    tp = ("t", 0)
    held.cover(tp, 17)
    held.cover(tp, 9)  # already covered by the pending marker
    assert writer.written == [(marker_key("g", tp), 17)]
    waiting = asyncio.ensure_future(held.wait_covered(tp, 12))
    await asyncio.sleep(0)
    assert not waiting.done()
    writer.callbacks.pop()()  # the broker acknowledged it
    await asyncio.wait_for(waiting, 1)
    await held.wait_covered(tp, 17)  # durable: no wait

    held.cover(tp, 30)
    assert held.release([tp], clean=True, inherited={tp: 5}) == 1
    assert writer.written[-1] == (marker_key("g", tp), 5)  # the inherited marker is put back
    writer.callbacks[0]()  # a late acknowledgement from before the release changes nothing
    late = asyncio.ensure_future(held.wait_covered(tp, 30))
    await asyncio.sleep(0)
    assert not late.done()
    late.cancel()
    assert held.release([tp], clean=False, inherited={}) == 0
