"""Lanes: the partitions of a band that a tenant's requests may go to.

Kafka's consumer group gives each partition to one worker, so the partitions a tenant's
requests land on decide which workers can serve it. Keyed by tenant alone, a tenant's band is
one partition, hence one worker. tierq's producers instead spread each tenant over a set of
partitions per band, its *lanes*, and send each request to the least-loaded lane
(producer.routing). The trade-off the lane count sets:

- more lanes: a tenant alone reaches more workers (all lanes -> every worker);
- fewer lanes: a flooding tenant occupies fewer partitions, so another tenant has lanes with
  no flood backlog in front of its requests (inside a worker, fair share does the rest; it
  cannot help a request still queued in Kafka behind a flood).

The default for medium and low, three quarters of the band's partitions, keeps both: with 16
partitions and 4 workers a worker holds none of a tenant's 12 lanes with probability 1/1820, and
two tenants' lane sets leave each about 3 partitions the other never uses. The high band's
default is every partition: fewer lanes than partitions land unevenly on the workers (6 lanes
of 8 partitions, 2 per worker of 4: two workers hold 2 of the tenant's lanes, two hold 1), so a
high trickle spread evenly over the lanes gives two workers twice the others' share, more than
their reserved high slots take at once, and the rest waits for a low to finish (bench.pool's
priority scenario: high queue p99 5.1x the idle pool's with 6 lanes, 1.0x with all 8). Per band:
``bands.<band>.lane_share`` in topics.yaml; per tenant: ``tenants.<id>.lanes``. The choice is rendezvous
hashing (highest random weight) of (tenant, band, partition): stable, spread out, different
for each tenant, and it moves as few lanes as possible when partitions are added. Producers
and workers compute the same lanes (workers derive pool-wide in-flight caps from them).
"""

from __future__ import annotations

import hashlib
import math

#: a tenant's lanes per band when neither the tenant nor the band says: this share of the band's
#: partitions (``HIGH_LANE_SHARE`` for the high band)
DEFAULT_LANE_SHARE = 0.75
#: the high band's default: every partition, so a tenant's high requests spread evenly over workers
HIGH_LANE_SHARE = 1.0

#: records a worker reads ahead of each partition's oldest unstarted request by default
#: (``TIERQ_READ_AHEAD_PER_PARTITION``): past a flood to the other tenants' requests behind it, so
#: that its fair share sees them. Routers count a lane's backlog beyond it as what blocks a request
#: whatever its tenant (the worker cannot have read it yet).
READ_AHEAD_PER_PARTITION = 256


def lane_count(partitions: int, lanes: int | None, share: float = DEFAULT_LANE_SHARE) -> int:
    """How many lanes a tenant has in a band of ``partitions``: ``lanes`` when configured, else
    the band's ``share`` of its partitions."""
    wanted = lanes if lanes is not None else math.ceil(partitions * share - 1e-9)
    return max(1, min(partitions, wanted))


def _weight(tenant_id: str, topic: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{tenant_id}\0{topic}\0{partition}".encode(), digest_size=8).digest()


def tenant_lanes(tenant_id: str, topic: str, partitions: int, lanes: int | None = None,
                 share: float = DEFAULT_LANE_SHARE) -> list[int]:
    """The tenant's lanes in ``topic`` (which has ``partitions`` partitions), sorted
    (``Topology.tenant_lanes`` applies the tenant's and the band's configuration)."""
    count = lane_count(partitions, lanes, share)
    if count == partitions:
        return list(range(partitions))
    ranked = sorted(range(partitions), key=lambda p: _weight(tenant_id, topic, p), reverse=True)
    return sorted(ranked[:count])
