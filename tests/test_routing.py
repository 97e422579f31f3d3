"""Lanes and load-aware routing, as pure logic (a fake backlog source stands in for Kafka)."""

from __future__ import annotations

import threading
import time
from collections import Counter

from producer.routing import SETTLING_GRACE_S, STALL_AFTER_S, LaneRouter
from schemas.lanes import lane_count, tenant_lanes
from schemas.messages import Band
from schemas.topology import Topology

LOW = "tierq.default.low"


def test_lanes_are_stable_sized_and_different_per_tenant():
    acme = tenant_lanes("acme", LOW, 16)
    assert acme == tenant_lanes("acme", LOW, 16)
    assert len(acme) == 12 == lane_count(16, None)
    assert len(tenant_lanes("acme", LOW, 16, lanes=4)) == 4
    assert tenant_lanes("acme", LOW, 3, lanes=10) == [0, 1, 2]
    globex = tenant_lanes("globex", LOW, 16)
    assert acme != globex and set(globex) - set(acme), "globex needs lanes that acme's flood never fills"



def test_a_tenants_high_requests_may_use_every_partition_and_a_band_may_say_otherwise(base_topology: Topology):
    """Fewer high lanes than partitions land unevenly on the workers (6 of 8 over 4 workers
    holding 2 each: 2, 2, 1, 1), and a high trickle then overflows the busier workers' reserved
    slots; medium and low keep 3/4 so a flood leaves other tenants partitions of their own."""
    lanes = {band: base_topology.tenant_lanes("acme", band, f"t.{band.value}", 8) for band in Band}
    assert lanes[Band.high] == list(range(8)) and len(lanes[Band.medium]) == len(lanes[Band.low]) == 6
    document = base_topology.model_dump(mode="json")
    document["bands"]["high"]["lane_share"] = 0.5
    document["bands"]["low"]["lane_share"] = 1.0
    configured = Topology.model_validate(document)
    assert len(configured.tenant_lanes("acme", Band.high, "t.high", 8)) == 4
    assert configured.tenant_lanes("acme", Band.low, "t.low", 16) == list(range(16))
    document["tenants"]["acme"]["lanes"] = 3  # the tenant's own setting wins in every band
    assert len(Topology.model_validate(document).tenant_lanes("acme", Band.high, "t.high", 8)) == 3

def test_growing_partitions_keeps_most_lanes():
    before, after = set(tenant_lanes("acme", LOW, 16, lanes=8)), set(tenant_lanes("acme", LOW, 32, lanes=8))
    assert all(p < 16 for p in before)
    # rendezvous hashing: a lane moves only to one of the new partitions
    assert before - after <= before and all(p >= 16 for p in after - before)


def router(topology: Topology, backlog: dict[tuple[str, int], int] | None = None,
           committed: dict[tuple[str, int], int] | None = None, settling: set[str] | None = None,
           **options: int) -> LaneRouter:
    """A router over a fake reading: ``backlog`` (and ``committed`` offsets) per partition; the
    topics in ``settling`` have their consumer group re-forming."""
    counts = {topology.band_topic("default", band): topology.bands[band].partitions for band in Band}

    def source(topics: list[str]) -> dict[tuple[str, int], tuple[int, ...]]:
        if settling is None:  # the plain (backlog, committed) form outside sources may give
            return {tp: (load, (committed or {}).get(tp, 0)) for tp, load in (backlog or {}).items()}
        return {tp: (load, (committed or {}).get(tp, 0), tp[0] not in settling) for tp, load in (backlog or {}).items()}

    return LaneRouter(topology, counts.get, source if backlog is not None else None, **options)


def ticking_router(monkeypatch, topology: Topology, backlog: dict[tuple[str, int], int],
                   committed: dict[tuple[str, int], int], settling: set[str] | None = None) -> LaneRouter:
    """``router`` on a clock that moves one second per reading, with its first reading taken."""
    clock = iter(range(1000))
    monkeypatch.setattr("producer.routing.time.monotonic", lambda: float(next(clock)))
    routing = router(topology, backlog, committed, settling)
    routing.refresh()
    return routing


def test_a_burst_spreads_over_every_partition_and_a_flood_queues_only_in_the_tenants_lanes(
        base_topology: Topology):
    """Without a reading the counts decide. While a partition outside the tenant's lanes holds
    fewer than a quarter of the read-ahead of its records (and fewer than three quarters of
    everyone's), it takes the tenant's requests too (overflow: 12 lanes of 16 partitions land
    unevenly on 4 workers, all 16 evenly); past that only the lanes do, so a flood never fills
    the partitions that only other tenants use."""
    routing = router(base_topology, read_ahead=40)
    partitions = base_topology.bands[Band.low].partitions
    lanes = routing.lanes("acme", Band.low, base_topology.band_topic("default", Band.low))
    assert lanes is not None and len(lanes) < partitions
    burst = Counter(routing.partition_for("acme", "default", Band.low) for _ in range(8 * partitions))
    assert burst == Counter({p: 8 for p in range(partitions)})
    flood = Counter(routing.partition_for("acme", "default", Band.low) for _ in range(20 * partitions))
    others = set(range(partitions)) - set(lanes)
    assert all(burst[p] + flood[p] == 10 for p in others)  # a quarter of the read-ahead, then no more
    assert set(flood) == set(lanes) | {p for p in others if flood[p]}
    assert max(flood[p] for p in lanes) - min(flood[p] for p in lanes) <= 1


def test_backlog_the_workers_cannot_have_read_yet_counts_against_a_lane(base_topology: Topology):
    topic = base_topology.band_topic("default", Band.low)
    lanes = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    idle = lanes[0]
    backlog = {(topic, p): 50 for p in range(base_topology.bands[Band.low].partitions)}  # none is light
    backlog[(topic, idle)] = 0
    routing = router(base_topology, backlog, read_ahead=10)
    routing.refresh()
    chosen = [routing.partition_for("acme", "default", Band.low) for _ in range(60)]
    # 40 records beyond the workers' read-ahead on every other lane: the idle lane takes every
    # request until acme's own outstanding requests there reach those 40
    assert chosen[:40] == [idle] * 40
    assert len(set(chosen[40:])) > 1


def test_another_tenants_backlog_within_the_read_ahead_does_not_push_a_tenant_away(base_topology: Topology):
    """The pool fairness case: acme floods its lanes; the worker reads past acme's records and
    shares its slots, so globex keeps using every partition (hence all workers), not only the few
    acme leaves empty."""
    topic = base_topology.band_topic("default", Band.low)
    partitions = base_topology.bands[Band.low].partitions
    acme, globex = tenant_lanes("acme", topic, partitions), tenant_lanes("globex", topic, partitions)
    shared = set(acme) & set(globex)
    assert shared and set(globex) - shared
    backlog = {(topic, p): 40 if p in acme else 0 for p in range(partitions)}
    routing = router(base_topology, backlog)
    routing.refresh()
    chosen = Counter(routing.partition_for("globex", "default", Band.low) for _ in range(4 * partitions))
    assert chosen == Counter({p: 4 for p in range(partitions)})



def test_a_small_tenant_overflows_into_partitions_a_flood_filled_within_the_read_ahead(base_topology: Topology):
    """acme's flood holds 150 records in every partition, within the workers' read-ahead (256):
    globex's requests still spread over every partition, its lanes or not, so every worker's fair
    share sees them; at three quarters of the read-ahead a partition outside its lanes takes no more."""
    topic = base_topology.band_topic("default", Band.low)
    partitions = base_topology.bands[Band.low].partitions
    backlog = {(topic, p): 150 for p in range(partitions)}
    routing = router(base_topology, backlog)
    routing.refresh()
    assert Counter(routing.partition_for("globex", "default", Band.low) for _ in range(2 * partitions)) == \
        Counter({p: 2 for p in range(partitions)})
    backlog.update({tp: 200 for tp in backlog})
    routing.refresh()
    lanes = routing.lanes("globex", Band.low, topic)
    assert {routing.partition_for("globex", "default", Band.low) for _ in range(40)} == set(lanes)

def test_a_tenants_own_requests_count_until_the_group_commits_past_them(base_topology: Topology):
    topic = base_topology.band_topic("default", Band.high)
    lanes = base_topology.tenant_lanes("acme", Band.high, topic, base_topology.bands[Band.high].partitions)
    backlog = {(topic, p): 0 for p in lanes}
    committed = {(topic, p): 0 for p in lanes}
    routing = router(base_topology, backlog, committed)
    routing.refresh()
    for _ in range(len(lanes) * 5):
        partition = routing.partition_for("acme", "default", Band.high)
        routing.delivered("acme", topic, partition, committed[(topic, partition)])
        committed[(topic, partition)] += 1  # the next offset there
    first = lanes[0]
    offsets_after = dict(committed)
    committed.update({tp: 0 for tp in committed})
    committed[(topic, first)] = offsets_after[(topic, first)]  # the workers did only lanes[0]'s five
    backlog.update({(topic, p): 5 for p in lanes[1:]})
    routing.refresh()
    assert [routing.partition_for("acme", "default", Band.high) for _ in range(5)] == [first] * 5
    # another tenant's records are not acme's: globex spreads over its lanes from the start
    assert routing.partition_for("globex", "default", Band.high) is not None


def test_a_record_not_written_stops_counting(base_topology: Topology):
    topic = base_topology.band_topic("default", Band.high)
    lanes = base_topology.tenant_lanes("acme", Band.high, topic, base_topology.bands[Band.high].partitions)
    routing = router(base_topology)
    sent = Counter(routing.partition_for("acme", "default", Band.high) for _ in range(5 * len(lanes)))
    assert sent == Counter({p: 5 for p in lanes})  # unacknowledged: each counts
    failed = lanes[-1]
    for _ in range(5):
        routing.delivered("acme", topic, failed, None)
    assert [routing.partition_for("acme", "default", Band.high) for _ in range(5)] == [failed] * 5


def test_configured_lanes_bound_where_a_tenants_backlog_queues(base_topology: Topology):
    document = base_topology.model_dump(mode="json")
    document["tenants"]["acme"]["lanes"] = 2
    topic = base_topology.band_topic("default", Band.low)
    busy = {(topic, p): 200 for p in range(base_topology.bands[Band.low].partitions)}  # none is light
    routing = router(Topology.model_validate(document), busy)
    routing.refresh()
    assert len({routing.partition_for("acme", "default", Band.low) for _ in range(50)}) == 2


def test_unknown_partition_counts_fall_back_to_the_key(base_topology: Topology):
    routing = LaneRouter(base_topology, lambda topic: None, None)
    assert routing.partition_for("acme", "default", Band.low) is None


def test_a_lane_that_drains_faster_gets_more_requests(base_topology: Topology, monkeypatch):
    topic = base_topology.band_topic("default", Band.low)
    fast, slow, *others = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    backlog = {(topic, p): 1000 for p in range(base_topology.bands[Band.low].partitions)}
    backlog |= {(topic, fast): 40, (topic, slow): 40}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed)
    committed[(topic, fast)], committed[(topic, slow)] = 40, 10  # in one second: 40/s against 10/s
    routing.refresh()
    chosen = Counter(routing.partition_for("acme", "default", Band.low) for _ in range(200))
    # equal backlog, 4x the drain rate: the fast lane takes requests until the expected waits are
    # equal (about 123), then about 4 of every 5 (waits are equalised, not backlogs)
    assert chosen[fast] > 3 * chosen[slow] > 0 and sum(chosen.values()) == chosen[fast] + chosen[slow]


def test_a_lane_with_backlog_and_no_progress_for_a_while_gets_nothing(base_topology: Topology, monkeypatch):
    topic = base_topology.band_topic("default", Band.high)
    dead, *alive = base_topology.tenant_lanes("acme", Band.high, topic, base_topology.bands[Band.high].partitions)
    backlog = {(topic, p): 20 for p in [dead, *alive]}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed)
    for second in range(1, int(STALL_AFTER_S) + 1):
        for p in alive:
            committed[(topic, p)] = 2 * second
        routing.refresh()
    assert dead not in {routing.partition_for("acme", "default", Band.high) for _ in range(40)}
    committed[(topic, dead)] = 3  # its worker is back: the lane is measured afresh
    routing.refresh()
    assert dead in {routing.partition_for("acme", "default", Band.high) for _ in range(200)}


def test_a_lane_is_not_judged_stalled_or_slow_while_its_group_re_forms(base_topology: Topology, monkeypatch):
    """While a worker joins or leaves, librdkafka holds the members' commits back until the group
    has settled (seconds on Kafka, tens of seconds on Tansu), so committed offsets stand still on
    healthy workers. Judged stalled, a busy worker's lanes got no requests and it ran dry
    (bench.pool's events scenario, one run in three). Afterwards the held-back commits land at
    once: not a drain rate either."""
    topic = base_topology.band_topic("default", Band.low)
    lanes = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    backlog = {(topic, p): 20 for p in lanes}
    committed = {tp: 0 for tp in backlog}
    settling: set[str] = set()
    routing = ticking_router(monkeypatch, base_topology, backlog, committed, settling)
    for p in lanes:  # one second of progress: 2/s everywhere
        committed[(topic, p)] = 2
    routing.refresh()
    rates = dict(routing._rates)
    settling.add(topic)
    for _ in range(3 * int(STALL_AFTER_S)):  # the group re-forms: no commits for 15 s
        routing.refresh()
    assert not routing._stalled and routing._rates == rates
    assert set(lanes) <= {routing.partition_for("acme", "default", Band.low) for _ in range(200)}
    settling.clear()
    for p in lanes:  # settled: 30 held-back commits land in one reading
        committed[(topic, p)] += 30
    routing.refresh()
    assert routing._rates == rates, "the jump is not a drain rate"
    for _ in range(int(STALL_AFTER_S) + 1):  # settled and standing still: stalled as before
        routing.refresh()
    assert routing._stalled == {(topic, p) for p in lanes}


def test_a_group_that_never_re_forms_has_its_lanes_judged_again(base_topology: Topology, monkeypatch):
    """On Tansu 0.6.0 a group whose leader leaves while it re-forms never settles, and its
    partitions may have no owner: after SETTLING_GRACE_S its lanes are judged as any other."""
    topic = base_topology.band_topic("default", Band.low)
    dead, *alive = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    backlog = {(topic, p): 20 for p in [dead, *alive]}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed, {topic})
    for _ in range(int(SETTLING_GRACE_S) - 1):
        routing.refresh()
    assert not routing._stalled
    for second in range(1, int(STALL_AFTER_S) + 3):
        for p in alive:  # the lanes that still have an owner move on
            committed[(topic, p)] = 2 * second
        routing.refresh()
    assert routing._stalled == {(topic, dead)}


def test_a_lane_whose_long_requests_hold_its_offset_still_is_not_judged_stalled_again(base_topology: Topology,
                                                                                    monkeypatch):
    """The committed offset moves only past the oldest request: on a healthy worker, a long
    generation at the head holds it still for as long as it runs. Once a lane has shown such a
    gap, it is judged stalled only after twice that gap."""
    topic = base_topology.band_topic("default", Band.low)
    slow, *others = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    backlog = {(topic, p): 5 for p in [slow, *others]}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed)

    def stalled_for(seconds: int) -> list[bool]:
        judged = []
        for _ in range(seconds):
            for p in others:
                committed[(topic, p)] += 1
            routing.refresh()
            judged.append((topic, slow) in routing._stalled)
        committed[(topic, slow)] += 1  # the head finished: the offset moves
        routing.refresh()
        return judged

    assert stalled_for(8)[-1], "a lane that never showed such a gap: stalled after STALL_AFTER_S"
    assert (topic, slow) not in routing._stalled  # it moved: not stalled
    assert not any(stalled_for(8)), "the same gap again: within twice the longest gap shown"
    assert stalled_for(20)[-1], "a far longer standstill: stalled (its worker may be gone)"

def test_a_lane_that_has_not_finished_a_request_yet_is_not_judged_stalled(base_topology: Topology, monkeypatch):
    """A burst's first second: the lanes whose first request is still running have committed
    nothing yet. Their speed is unknown, not zero: they keep taking requests (the router once
    counted them as stalled and sent the whole burst to the lanes that happened to commit). They
    count at 1/s (no request done in the second they had work) against the lucky lane's 2/s, so
    they take fewer than it and than the idle partitions, and some each."""
    topic = base_topology.band_topic("default", Band.low)
    lanes = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    lucky, *running = lanes
    backlog = {(topic, p): 4 for p in lanes}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed)
    committed[(topic, lucky)] = 2
    backlog[(topic, lucky)] = 2
    routing.refresh()
    chosen = Counter(routing.partition_for("acme", "default", Band.low) for _ in range(4 * len(lanes)))
    assert all(chosen[p] >= 2 for p in running), chosen


def test_a_lane_with_work_and_no_request_done_for_long_counts_as_slow(base_topology: Topology, monkeypatch):
    """A slow worker's lanes show their rate last. Until then a lane that has had work for t
    seconds without finishing any counts at 1/t when that is below the others' average rate: it
    takes fewer of the requests than the lanes that have shown their speed, not an equal share."""
    topic = base_topology.band_topic("default", Band.low)
    slow, *fast = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    backlog = {(topic, p): 8 for p in (slow, *fast)}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed)
    for second in range(1, 5):  # the fast lanes finish 2 a second; the slow one none in 4 s
        for p in fast:
            committed[(topic, p)] = 2 * second
        routing.refresh()
    chosen = Counter(routing.partition_for("acme", "default", Band.low) for _ in range(10 * len(fast)))
    assert chosen[slow] * 4 <= min(chosen[p] for p in fast), chosen


def test_a_slow_lane_does_not_look_fast_right_after_it_finishes_a_request(base_topology: Topology, monkeypatch):
    """A busy worker's partition finishes a request every few seconds. A rate leaning on the last
    reading or two jumped with each one done, so right after its request a slow worker's lane
    looked nearly as fast as the others and took more than its share (bench.pool's hetero
    scenario: the half-speed worker served up to 19% of the work for 14% of the capacity). Over
    its window it counts near its true half (0.3 against 0.5 at this, its least favourable moment)."""
    topic = base_topology.band_topic("default", Band.low)
    slow, *fast = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    backlog = {(topic, p): 8 for p in (slow, *fast)}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed)
    for second in range(1, 13):  # fast lanes finish one request every 2 s, the slow one every 4 s
        for p in fast:
            committed[(topic, p)] += second % 2 == 0
        committed[(topic, slow)] += second % 4 == 0
        routing.refresh()
    # second 12: every lane has just finished one
    rates = routing._rates
    assert rates[(topic, slow)] <= 0.7 * min(rates[(topic, p)] for p in fast), rates
    chosen = Counter(routing.partition_for("acme", "default", Band.low) for _ in range(10 * len(fast)))
    assert chosen[slow] <= 0.7 * sum(chosen[p] for p in fast) / len(fast), chosen


def test_a_lane_that_stops_finishing_requests_loses_its_share_before_it_is_judged_stalled(
        base_topology: Topology, monkeypatch):
    """A lane whose worker died keeps the requests it finished in its rate's window for 10 s, but
    it cannot be faster than 1/t after t seconds without finishing one: within a few seconds it
    takes far less than the others, before it is judged stalled (an average that halved each
    reading did that on its own; the window alone kept sending it requests for those seconds)."""
    topic = base_topology.band_topic("default", Band.low)
    dead, *alive = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    backlog = {(topic, p): 8 for p in (dead, *alive)}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed)
    for second in range(1, 17):  # every lane finishes a request a second; the dead one until second 12
        for p in alive:
            committed[(topic, p)] += 1
        committed[(topic, dead)] += second <= 12
        routing.refresh()
    assert (topic, dead) not in routing._stalled  # 4 s without progress: not stalled yet
    # its window still says 0.6 a second (6 in 10 s); 4 s without one says at most 0.25
    chosen = Counter(routing.partition_for("acme", "default", Band.low) for _ in range(10 * len(alive)))
    assert chosen[dead] <= 0.4 * sum(chosen[p] for p in alive) / len(alive), chosen


def test_a_lane_idle_for_a_while_forgets_its_drain_rate(base_topology: Topology, monkeypatch):
    topic = base_topology.band_topic("default", Band.low)
    fast, slow, *others = base_topology.tenant_lanes("acme", Band.low, topic, base_topology.bands[Band.low].partitions)
    lanes = [fast, slow, *others]
    backlog = {(topic, p): 40 for p in lanes}
    committed = {tp: 0 for tp in backlog}
    routing = ticking_router(monkeypatch, base_topology, backlog, committed)
    committed[(topic, fast)], committed[(topic, slow)] = 40, 1
    routing.refresh()
    assert Counter(routing.partition_for("acme", "default", Band.low) for _ in range(10))[slow] == 0
    backlog.update({tp: 0 for tp in backlog})  # all drained: an old burst's rates say nothing now
    for _ in range(4):
        routing.refresh()
    chosen = Counter(routing.partition_for("acme", "default", Band.low) for _ in range(10 * len(lanes)))
    assert max(chosen.values()) - min(chosen.values()) <= 10 and chosen[slow] > 0


def test_the_backlog_source_is_released_only_after_its_last_reading(base_topology: Topology):
    """Closing the producer while a reading hangs on an absent broker must not destroy the
    reader's clients under it: the reading thread releases them once its reading returns."""
    reading, release = threading.Event(), threading.Event()
    events: list[str] = []

    def source(topics: list[str]) -> dict[tuple[str, int], tuple[int, int]]:
        reading.set()
        release.wait(10)
        events.append("read")
        return {}

    routing = LaneRouter(base_topology, lambda topic: 16, source, close_source=lambda: events.append("closed"))
    routing.start()
    assert reading.wait(10)
    routing.close(timeout=0.1)
    assert events == [], "released while a reading was under way"
    release.set()
    deadline = time.monotonic() + 10
    while "closed" not in events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events == ["read", "closed"]
    plain = LaneRouter(base_topology, lambda topic: 16, source, close_source=lambda: events.append("plain"))
    plain.close()  # never started: released at once
    assert events[-1] == "plain"
