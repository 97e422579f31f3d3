"""Pool-wide tenant caps: each worker's share of a tenant's lanes, as pure logic."""

from __future__ import annotations

from schemas.messages import Band
from schemas.topology import Topology
from worker.pool_caps import pool_caps

TOPICS = {"p.high": 8, "p.medium": 8, "p.low": 16}
BANDS = {"p.high": Band.high, "p.medium": Band.medium, "p.low": Band.low}


def with_cap(base: Topology, cap: int | None) -> Topology:
    document = base.model_dump(mode="json")
    document["tenants"]["acme"]["quotas"]["max_in_flight"] = cap
    return Topology.model_validate(document)


def split(workers: int) -> list[set[tuple[str, int]]]:
    """Partitions dealt round-robin to ``workers`` members, as a balanced assignor would."""
    owned: list[set[tuple[str, int]]] = [set() for _ in range(workers)]
    i = 0
    for topic, count in TOPICS.items():
        for partition in range(count):
            owned[i % workers].add((topic, partition))
            i += 1
    return owned


def test_one_worker_holding_everything_enforces_the_whole_cap(base_topology):
    caps = pool_caps(with_cap(base_topology, 8), BANDS, TOPICS, split(1)[0])
    assert caps["acme"] == 8


def test_the_workers_caps_add_up_to_at_most_the_pool_cap(base_topology):
    for workers in (2, 3, 4):
        for cap in (4, 8, 13, 32):
            caps = [pool_caps(with_cap(base_topology, cap), BANDS, TOPICS, owned)["acme"] for owned in split(workers)]
            assert sum(caps) <= cap, (workers, cap, caps)
            assert all(c >= 1 for c in caps)


def test_a_share_follows_the_lanes_held(base_topology):
    lanes = {(t, p) for t, n in TOPICS.items() for p in base_topology.tenant_lanes("acme", BANDS[t], t, n)}
    half = set(sorted(lanes)[: len(lanes) // 2])
    assert pool_caps(with_cap(base_topology, 10), BANDS, TOPICS, half)["acme"] == 5


def test_unlimited_stays_unlimited_and_unknown_partitions_keep_the_cap(base_topology):
    assert pool_caps(with_cap(base_topology, None), BANDS, TOPICS, split(2)[0])["acme"] is None
    assert pool_caps(with_cap(base_topology, 6), BANDS, {}, set())["acme"] == 6
