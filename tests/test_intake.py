"""worker.intake.Intake against the real broker."""

from __future__ import annotations

import time
import uuid

import pytest

from schemas.messages import Band
from schemas.settings import Settings
from schemas.topology import Topology
from worker.intake import Intake
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration


def test_partition_counts_do_not_wait_behind_a_fetch_the_broker_holds(settings: Settings, topology: Topology):
    """The worker reads its topics' partition counts inside its loop after every rebalance. Asked
    on a band consumer, the metadata request queued behind the fetch the broker held for that
    consumer (up to fetch.wait.max.ms, for each band), with the whole loop held: with the 500 ms
    waits docker-compose gives workers on Kafka, up to 1.5 s after every rebalance. Here each band
    waits 6 s: the old way took 6 s or more (18 s once)."""
    worker_settings = WorkerSettings(_env_file=None, bootstrap_servers=settings.bootstrap_servers)
    group = f"intake-{uuid.uuid4().hex[:8]}"
    intake = Intake(worker_settings, topology.pool_topics("default"), topology.band_groups("default", group),
                    session_timeout_ms=6000, fetch_wait_ms=dict.fromkeys(Band, 6_000))
    try:
        intake.subscribe(lambda keys: None, lambda keys, lost: None)
        deadline = time.monotonic() + 60
        while intake.bands_assigned != set(Band):  # every band's consumer has its partitions ...
            assert time.monotonic() < deadline, "the band groups did not assign their partitions"
            intake.poll()
        settle = time.monotonic() + 2  # ... and a fetch of its empty partitions waiting at the broker
        while time.monotonic() < settle:
            intake.poll()
            time.sleep(0.05)
        started = time.monotonic()
        counts = intake.partition_counts()
        took = time.monotonic() - started
        expected = {topology.band_topic("default", band): topology.bands[band].partitions for band in Band}
        assert counts == expected
        assert took < 3.0, f"partition counts took {took:.1f} s: they waited behind a held fetch"
    finally:
        intake.close()
