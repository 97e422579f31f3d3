from worker.offsets import OffsetTracker

TP = ("t", 0)


def test_commits_highest_contiguous_done_offset():
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.received(TP, offset)
    tracker.done(TP, 1)
    tracker.done(TP, 2)
    assert tracker.committable() == {}  # 0 still running
    tracker.done(TP, 0)
    assert tracker.committable() == {TP: 3}
    tracker.done(TP, 4)
    assert tracker.committable() == {}  # 3 still running
    tracker.done(TP, 3)
    assert tracker.committable() == {TP: 5}
    assert tracker.outstanding() == 0


def test_forgotten_partition_ignores_late_completions():
    tracker = OffsetTracker()
    tracker.received(TP, 7)
    tracker.forget(TP)
    tracker.done(TP, 7)
    assert tracker.committable() == {}


def test_partitions_are_independent():
    tracker = OffsetTracker()
    tracker.received(("t", 0), 10)
    tracker.received(("t", 1), 3)
    tracker.done(("t", 1), 3)
    assert tracker.committable() == {("t", 1): 4}
