"""The admission policy on its own: order, aging, reserved slots, fairness, deadlines, caps."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.messages import BAND_ORDER, Band
from worker.admission import AdmissionPolicy, BandRules, Pending

H, M, L = Band.high, Band.medium, Band.low


def rules(medium_step=30.0, low_step=60.0, reserved=(2, 1, 0)):
    steps = {H: None, M: medium_step, L: low_step}
    return {b: BandRules(steps[b], reserved[b.rank]) for b in BAND_ORDER}


def item(rid, band, t=0.0, tenant="a", cost=1.0, deadline=float("inf")):
    return Pending(rid, tenant, band, submitted_ts=t, cost=cost, deadline_ts=deadline)


def drain(policy, now, finish=True):
    order = []
    while (nxt := policy.next(now)) is not None:
        order.append(nxt.request_id)
        if finish:
            policy.finished(nxt)
    return order


def test_strict_priority_then_age():
    policy = AdmissionPolicy(rules(), capacity=8)
    for rid, band, t in [("l1", L, 1), ("m1", M, 2), ("h1", H, 3), ("l0", L, 0), ("h0", H, 2.5)]:
        policy.add(item(rid, band, t))
    assert drain(policy, now=5) == ["h0", "h1", "m1", "l0", "l1"]


def test_aging_promotes_by_band_steps():
    policy = AdmissionPolicy(rules(medium_step=30, low_step=60), capacity=8)
    low = item("l", L, t=0)
    policy.add(low)
    assert policy.effective_band(low, 59.9) is L
    assert policy.effective_band(low, 60) is M
    assert policy.effective_band(low, 89.9) is M
    assert policy.effective_band(low, 90) is H


def test_aged_low_beats_fresh_medium_and_is_reported_served_as():
    policy = AdmissionPolicy(rules(), capacity=8)
    policy.add(item("fresh-m", M, t=65))
    policy.add(item("old-l", L, t=0))
    first = policy.next(now=70)  # promoted to medium at 60, to high only at 90
    assert first.request_id == "old-l" and first.served_as is M


def test_no_aging_when_disabled():
    policy = AdmissionPolicy(rules(), capacity=1, aging=False)
    policy.add(item("old-l", L, t=0))
    policy.add(item("h", H, t=1000))
    assert policy.next(now=10_000).request_id == "h"


def test_reserved_slots_keep_room_for_higher_bands():
    policy = AdmissionPolicy(rules(reserved=(2, 1, 0)), capacity=8)
    for i in range(20):
        policy.add(item(f"l{i}", L, t=i))
    started = drain(policy, now=0, finish=False)
    assert len(started) == 5  # 8 slots - 2 for high - 1 for medium
    policy.add(item("m", M, t=30))
    policy.add(item("h1", H, t=31))
    policy.add(item("h2", H, t=32))
    policy.add(item("h3", H, t=33))
    assert drain(policy, now=40, finish=False) == ["h1", "h2", "h3"]  # m would need slot 7 of limit 7
    assert policy.in_flight == 8


def test_full_only_once_even_a_high_request_would_find_no_slot():
    """The worker sleeps longer while ``full``: it must not be full while a reserved slot is free."""
    policy = AdmissionPolicy(rules(reserved=(2, 1, 0)), capacity=8)
    for i in range(20):
        policy.add(item(f"l{i}", L, t=i))
    started = drain(policy, now=0, finish=False)
    assert len(started) == 5 and policy.next(0) is None and not policy.full()  # lows stop; highs could start
    policy.add(item("m", M, t=1))
    assert drain(policy, now=1, finish=False) == ["m"] and not policy.full()  # 6 of 8, the rest kept for high
    assert policy.next(1) is None and not policy.full()
    for i in range(3):
        policy.add(item(f"h{i}", H, t=2 + i))
    assert drain(policy, now=1, finish=False) == ["h0", "h1"] and policy.full()
    assert policy.next(1) is None  # full: nothing may start, a high included
    policy.finished(Pending("l0", "a", L, submitted_ts=0))
    assert not policy.full() and policy.next(1).request_id == "h2" and policy.full()


def test_fair_share_between_tenants_in_one_band():
    policy = AdmissionPolicy(rules(), capacity=1)
    for i in range(100):
        policy.add(item(f"x{i}", L, t=i * 0.01, tenant="x"))
    for i in range(10):
        policy.add(item(f"y{i}", L, t=5 + i, tenant="y"))
    first_20 = drain(policy, now=0)[:20]
    assert sum(r.startswith("y") for r in first_20) == 10


def test_fair_share_weighs_token_cost():
    policy = AdmissionPolicy(rules(), capacity=1)
    for i in range(10):
        policy.add(item(f"big{i}", L, t=i, tenant="big", cost=100))
        policy.add(item(f"small{i}", L, t=i, tenant="small", cost=10))
    order = drain(policy, now=0)[:11]
    assert sum(r.startswith("small") for r in order) == 10


def test_idle_tenant_cannot_bank_credit():
    policy = AdmissionPolicy(rules(), capacity=1)
    for i in range(50):
        policy.add(item(f"x{i}", L, t=i, tenant="x"))
    for _ in range(40):
        policy.finished(policy.next(0))
    for i in range(5):
        policy.add(item(f"y{i}", L, t=100 + i, tenant="y"))
    order = drain(policy, now=0)[:4]
    assert order.count("y0") + order.count("y1") == 2 and any(r.startswith("x") for r in order)


def test_expired_requests_never_admitted():
    policy = AdmissionPolicy(rules(), capacity=8)
    policy.add(item("late", H, t=0, deadline=5))
    policy.add(item("fine", L, t=0, deadline=50))
    assert [p.request_id for p in policy.take_expired(now=10)] == ["late"]
    assert drain(policy, now=10) == ["fine"]


def test_expiry_is_seen_whatever_the_order_deadlines_arrive_in():
    """take_expired skips its scan until the earliest deadline it knows of; a later, earlier one counts."""
    policy = AdmissionPolicy(rules(), capacity=8)
    policy.add(item("far", L, deadline=100))
    assert policy.take_expired(now=50) == []
    policy.add(item("near", L, deadline=60))
    policy.add(item("never", L))
    assert [p.request_id for p in policy.take_expired(now=70)] == ["near"]
    assert policy.take_expired(now=99) == []
    assert [p.request_id for p in policy.take_expired(now=100)] == ["far"]
    assert [p.request_id for p in policy.waiting] == ["never"]


def test_tenant_in_flight_cap():
    policy = AdmissionPolicy(rules(), capacity=8, tenant_caps={"greedy": 2})
    for i in range(5):
        policy.add(item(f"g{i}", H, t=i, tenant="greedy"))
    policy.add(item("o", L, t=10, tenant="other"))
    assert drain(policy, now=10, finish=False) == ["g0", "g1", "o"]


pending_lists = st.lists(
    st.tuples(st.sampled_from(BAND_ORDER), st.floats(0, 100), st.sampled_from(["a", "b", "c"])),
    min_size=1, max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(pending_lists)
def test_property_strict_order_without_aging(items):
    policy = AdmissionPolicy(rules(), capacity=1, aging=False)
    for i, (band, t, tenant) in enumerate(items):
        policy.add(item(str(i), band, t, tenant))
    ranks = []
    while (nxt := policy.next(1000)) is not None:
        ranks.append(nxt.band.rank)
        policy.finished(nxt)
    assert ranks == sorted(ranks)
    assert len(ranks) == len(items)


@settings(max_examples=200, deadline=None)
@given(pending_lists, st.integers(1, 4))
def test_property_bounded_wait_and_no_double_admission(items, capacity):
    """With aging, a request waits at most the sum of steps to reach high, plus the high work ahead of it."""
    step = 10.0
    policy = AdmissionPolicy(rules(medium_step=step, low_step=step, reserved=(0, 0, 0)), capacity=capacity)
    for i, (band, t, tenant) in enumerate(items):
        policy.add(item(str(i), band, t, tenant))
    now, admitted, running = 0.0, {}, []
    while policy.waiting or running:
        while (nxt := policy.next(now)) is not None:
            assert nxt.request_id not in admitted
            admitted[nxt.request_id] = now
            running.append(nxt)
        now += 1.0  # each request takes one second
        for done in running:
            policy.finished(done)
        running = []
    assert len(admitted) == len(items)
    for i, (band, t, _tenant) in enumerate(items):
        wait = admitted[str(i)] - max(t, 0.0)
        assert wait <= 2 * step + len(items) / capacity + 1


def test_a_request_for_n_outputs_takes_n_slots():
    policy = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=4)
    wide = Pending("n3", "a", L, submitted_ts=0, slots=3)
    policy.add(wide)
    policy.add(Pending("n2", "a", L, submitted_ts=1, slots=2))
    policy.add(item("one", L, t=2))
    assert policy.next(now=5) is wide and policy.in_flight == 3
    assert policy.next(now=5) is None  # n2 does not fit in the one slot left, and nothing overtakes it
    policy.finished(wide)
    assert policy.in_flight == 0
    assert policy.next(now=5).request_id == "n2" and policy.in_flight == 2
    assert policy.next(now=5).request_id == "one" and policy.in_flight == 3


def test_n_counts_against_reserved_slots():
    policy = AdmissionPolicy(rules(reserved=(2, 0, 0)), capacity=4)  # low and medium may use 2 slots
    policy.add(item("l", L, t=0))
    policy.add(Pending("wide-m", "b", M, submitted_ts=1, slots=2))
    assert policy.next(now=5).request_id == "wide-m"  # medium before low, 2 of the 2 slots
    assert policy.next(now=5) is None  # the low request would take a reserved slot
    policy.add(Pending("wide-h", "c", H, submitted_ts=2, slots=2))
    assert policy.next(now=5).request_id == "wide-h" and policy.in_flight == 4


def test_a_request_wider_than_the_engine_starts_alone():
    policy = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=2)
    policy.add(item("small", L, t=0))
    policy.add(Pending("huge", "b", L, submitted_ts=1, slots=5))
    small = policy.next(now=5)
    assert small.request_id == "small" and policy.next(now=5) is None  # not while anything runs
    policy.finished(small)
    huge = policy.next(now=5)
    assert huge.request_id == "huge" and policy.in_flight == 5
    policy.finished(huge)
    assert policy.in_flight == 0 and policy.in_flight_by_tenant["b"] == 0


# ---- preemption for fair share ---------------------------------------------------------------

def _fill(policy, tenant, n, band=L, t0=0.0):
    """Admit ``n`` requests of ``tenant``; return them, oldest first."""
    for i in range(n):
        policy.add(item(f"{tenant}{i}", band, t=t0 + i, tenant=tenant))
    return [policy.next(t0 + n) for _ in range(n)]


def _preempt_until_fair(policy, running, now=100.0):
    """What the worker does: take the victim's newest request of the band or lower, requeue it once
    its task ended, start the waiting head. Returns the moves (victim, taken, started)."""
    moves = []
    while (choice := policy.preemption(now)) is not None:
        victim = next(r for r in reversed(running) if r.tenant_id == choice.tenant and r.band.rank >= choice.band.rank)
        started = policy.admit_preempting(choice)
        running.remove(victim)
        policy.requeue(victim)
        policy.finished(victim)
        running.append(started)
        moves.append((victim.tenant_id, victim.request_id, started.request_id))
        assert len(moves) <= policy.capacity, "preemption did not converge"
    return moves


def test_a_tenant_arriving_while_another_holds_every_slot_takes_its_share():
    policy = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=4)
    running = _fill(policy, "acme", 4)
    for i in range(4):
        policy.add(item(f"more{i}", L, t=10 + i, tenant="acme"))
    policy.add(item("g0", L, t=50, tenant="globex"))
    policy.add(item("g1", L, t=51, tenant="globex"))
    policy.add(item("g2", L, t=52, tenant="globex"))
    assert policy.next(100) is None  # every slot taken: without preemption globex waits for completions
    moves = _preempt_until_fair(policy, running)
    # acme's newest running requests go, globex's oldest start; then both hold their share (2 of 4)
    assert moves == [("acme", "acme3", "g0"), ("acme", "acme2", "g1")]
    assert dict(policy.in_flight_by_tenant) == {"acme": 2, "globex": 2} and policy.in_flight == 4
    # the taken requests wait again where they waited before: ahead of acme's younger ones
    assert [w.request_id for w in policy.waiting if w.tenant_id == "acme"][:2] == ["acme2", "acme3"]


def test_no_preemption_for_one_tenant_at_its_share_or_a_head_that_can_start():
    policy = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=4)
    running = _fill(policy, "acme", 2) + _fill(policy, "globex", 2, t0=10)
    policy.add(item("a9", L, t=20, tenant="acme"))
    policy.add(item("g9", L, t=21, tenant="globex"))
    assert policy.preemption(100) is None  # 2 and 2 of 4: both at their share
    alone = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=2)
    _fill(alone, "acme", 2)
    alone.add(item("a9", L, t=20, tenant="acme"))
    assert alone.preemption(100) is None  # one tenant: nobody to be fair to
    roomy = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=8)
    _fill(roomy, "acme", 7)
    roomy.add(item("g0", L, t=20, tenant="globex"))
    assert roomy.preemption(100) is None  # globex's head fits: admission starts it
    assert running and policy.in_flight == 4


def test_preemption_respects_caps_and_bands():
    capped = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=4, tenant_caps={"globex": 1})
    running = _fill(capped, "acme", 3) + _fill(capped, "globex", 1, t0=10)
    capped.add(item("g9", L, t=20, tenant="globex"))
    assert capped.preemption(100) is None  # globex is at its own cap
    assert len(running) == 4
    banded = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=4)
    _fill(banded, "acme", 4, band=H)
    banded.add(item("g0", L, t=50, tenant="globex"))
    choice = banded.preemption(100)
    # the policy names the waiting head's band: the worker takes only a request of that band or a
    # lower one, so a low request never takes a high request's slot (here: none to take)
    assert choice is not None and choice.band is L and choice.tenant == "acme"


def test_three_tenants_converge_without_trading_slots_back():
    policy = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=6)
    running = _fill(policy, "acme", 6)
    for i in range(6):
        policy.add(item(f"acme-w{i}", L, t=10 + i, tenant="acme"))
    for tenant in ("globex", "initech"):
        for i in range(3):
            policy.add(item(f"{tenant}{i}", L, t=20 + i, tenant=tenant))
    moves = _preempt_until_fair(policy, running)
    assert {v for v, _taken, _started in moves} == {"acme"} and len(moves) == 4
    assert dict(policy.in_flight_by_tenant) == {"acme": 2, "globex": 2, "initech": 2}
    assert policy.preemption(100) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(BAND_ORDER), st.floats(0, 20), st.sampled_from(["a", "b", "c"]),
                          st.integers(1, 3)), min_size=1, max_size=30),
       st.integers(2, 6), st.randoms(use_true_random=False))
def test_property_preemption_keeps_the_books_and_serves_everything(items, capacity, rng):
    """Requests arrive over time, finish at random, and the worker preempts whenever the policy
    says so: every request is finally served once, in-flight counts always match what runs, no
    request runs twice at once, a band never loses a slot to a lower band, and preemption stops
    (each round ends with the policy content, not taking slots back and forth)."""
    policy = AdmissionPolicy(rules(reserved=(0, 0, 0)), capacity=capacity, aging=False)
    arrivals = sorted(enumerate(items), key=lambda e: e[1][1])
    running: list[Pending] = []
    served: list[str] = []
    now = 0.0
    while arrivals or policy.waiting or running:
        while arrivals and arrivals[0][1][1] <= now:
            i, (band, t, tenant, slots) = arrivals.pop(0)
            policy.add(Pending(str(i), tenant, band, submitted_ts=t, slots=slots))
        while (nxt := policy.next(now)) is not None:
            assert nxt not in running
            running.append(nxt)
        moves = 0
        while (choice := policy.preemption(now)) is not None:
            victims = [r for r in running if r.tenant_id == choice.tenant and r.band.rank >= choice.band.rank
                       and r.slots >= choice.slots]
            if not victims:
                break
            victim = victims[-1]
            started = policy.admit_preempting(choice)
            assert started.tenant_id == choice.for_tenant and started.band.rank <= victim.band.rank
            running.remove(victim)
            policy.requeue(victim)
            policy.finished(victim)
            running.append(started)
            moves += 1
            assert moves <= capacity * len(items), "preemption never settles"
        assert policy.in_flight == sum(r.slots for r in running)
        assert all(policy.in_flight_by_tenant[t] == sum(1 for r in running if r.tenant_id == t) for t in "abc")
        now += 1.0
        for done in [r for r in running if rng.random() < 0.5]:
            running.remove(done)
            policy.finished(done)
            served.append(done.request_id)
    assert sorted(served, key=int) == [str(i) for i in range(len(items))]
