"""worker.intake.RebalanceWatch: a band group that stays out of ``steady`` is reported once,
and its settling is reported too (pure logic; the broker case is in tests/test_faults.py)."""

from __future__ import annotations

import orjson
from structlog.testing import capture_logs

from schemas.messages import Band
from worker.intake import RebalanceWatch


def events(logs: list[dict]) -> list[str]:
    return [e["event"] for e in logs]


def test_a_member_unsteady_past_the_limit_is_reported_once_and_again_when_it_settles():
    watch = RebalanceWatch(Band.low, "g-low", stuck_after_s=10)
    watch.steady_at = 100.0
    with capture_logs() as logs:
        watch.observe("wait-join", 105.0)  # a rebalance under way: not yet
        watch.observe("wait-sync", 110.0)  # exactly the limit: not yet
        watch.observe("init", 110.5)
        watch.observe("wait-join", 130.0)  # still stuck: said once already
        watch.observe("steady", 131.0)
        watch.observe("steady", 200.0)
    assert events(logs) == ["band_group_stuck", "band_group_formed"]
    assert logs[0]["band"] == "low" and logs[0]["group"] == "g-low" and logs[0]["unsteady_s"] == 10.5
    assert logs[1]["after_s"] == 31.0


def test_steady_reports_restart_the_clock():
    watch = RebalanceWatch(Band.high, "g-high", stuck_after_s=10)
    watch.steady_at = 0.0
    with capture_logs() as logs:
        for t in range(0, 100, 5):  # a rebalance every few seconds, each one short
            watch.observe("steady" if t % 10 == 0 else "wait-join", float(t))
    assert events(logs) == []


def test_statistics_without_a_group_are_ignored():
    watch = RebalanceWatch(Band.medium, "g-medium", stuck_after_s=1)
    watch.steady_at = -1e9
    with capture_logs() as logs:
        watch.on_stats(orjson.dumps({"name": "c", "type": "consumer"}).decode())
        watch.on_stats(orjson.dumps({"cgrp": {"join_state": "wait-join"}}).decode())
    assert events(logs) == ["band_group_stuck"]
