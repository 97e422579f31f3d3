"""Pool-wide tenant caps: ``quotas.max_in_flight`` holds for the pool, not for each worker.

tierq's producers spread a tenant's requests over its lanes (schemas.lanes) by load, so a
worker receives about its share of the tenant's lanes' work. Each worker therefore enforces
the cap times its share of the tenant's lanes (summed over the bands), rounded down and at
least 1, re-derived on every rebalance. The workers' caps add up to at most the tenant's cap
whenever that cap is at least the number of workers holding its lanes; below that, each such
worker still runs one request (a cap of 0 would leave requests in its partitions unserved).
A worker holding none of the tenant's lanes (it only sees requests from outside clients that
set the key alone) counts as holding one lane.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from broker.topics import PartitionKey
from schemas.messages import Band
from schemas.topology import Topology


def pool_caps(topology: Topology, band_topics: Mapping[str, Band], partition_counts: Mapping[str, int],
              owned: set[PartitionKey]) -> dict[str, int | None]:
    """This worker's in-flight cap per tenant (None: unlimited)."""
    caps: dict[str, int | None] = {}
    for tenant_id, config in topology.tenants.items():
        cap = config.quotas.max_in_flight
        if cap is None:
            caps[tenant_id] = None
            continue
        total = mine = 0
        for topic, band in band_topics.items():
            partitions = partition_counts.get(topic)
            if not partitions:
                continue
            lanes = topology.tenant_lanes(tenant_id, band, topic, partitions)
            total += len(lanes)
            mine += sum(1 for p in lanes if (topic, p) in owned)
        if total == 0:
            caps[tenant_id] = cap
            continue
        caps[tenant_id] = max(1, math.floor(cap * max(mine, 1) / total))
    return caps
