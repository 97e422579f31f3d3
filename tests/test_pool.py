"""The pool: several workers in one consumer group behave as one scheduler.

Against the real broker, with workers on simulated engines (worker.simulated; cheap enough
to run several on one small machine) and one test on the real vLLM engine. Outcomes, not
timings: who served what, how many ran at once, that every request was answered.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import confluent_kafka
import pytest
import pytest_asyncio

from broker.backlog import BacklogReader
from schemas.codec import encode
from schemas.messages import Band, Request, utc_now
from schemas.topology import Topology
from tests.worker_fixtures import Publisher, collect, custom_topology, every_partition, request, settled, spawn_worker
from worker.service import Worker, build_worker
from worker.settings import SimulatedSettings, WorkerSettings
from worker.simulated import SimulatedEngine

pytestmark = [pytest.mark.integration]


@pytest_asyncio.fixture
async def start_simulated(settings: Any) -> AsyncIterator[Callable[..., Worker]]:
    """Factory: a worker on a simulated engine of its own, in this loop, stopped at the end."""
    running: list[tuple[Worker, asyncio.Task[int]]] = []

    def start(topology: Topology, group_id: str, worker_id: str, speed: float = 0.2, slots: int = 4) -> Worker:
        worker_settings = WorkerSettings(
            _env_file=None, bootstrap_servers=settings.bootstrap_servers, group_id=group_id, worker_id=worker_id,
            session_timeout_ms=6000, engine="simulated", max_num_seqs=slots, engine_queue=0,
            simulated=SimulatedSettings(speed=speed))
        worker = build_worker(worker_settings, topology, SimulatedEngine.from_settings(worker_settings))
        running.append((worker, asyncio.get_running_loop().create_task(worker.run())))
        return worker

    yield start
    for worker, _task in running:
        worker.request_stop()
        worker.request_stop()
    for _worker, task in running:
        assert await asyncio.wait_for(task, 60) == 0


async def until(predicate: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def pool_topology(base: Topology, settings: Any, **tenants: dict[str, Any]) -> Topology:
    no_reserve = {band: {"reserved_slots": 0, "aging_step_s": None} for band in ("medium", "low")}
    return custom_topology(base, settings, bands={"high": {"reserved_slots": 0}, **no_reserve}, tenants=tenants)


async def test_one_tenants_requests_are_served_by_every_worker(settings, base_topology, start_simulated):
    topology = pool_topology(base_topology, settings)
    group = f"g-{uuid.uuid4().hex[:8]}"
    with Publisher(settings, topology) as publisher:
        workers = [start_simulated(topology, group, f"w{i}") for i in range(2)]
        await until(lambda: all(w.intake.assigned for w in workers)
                    and len(workers[0].intake.assigned | workers[1].intake.assigned) == 32, "both workers joined")
        ids = await publisher.send([request("acme", "low", max_tokens=16) for _ in range(60)])
    replies = await collect(settings, topology, "acme", expect=len(ids))
    assert {r.request_id for r in replies} == set(ids)
    served_by = {r.worker for r in replies}
    assert served_by == {"w0", "w1"}, f"one tenant's requests reached only {served_by}"
    assert all(r.simulated for r in replies)


async def test_the_in_flight_cap_holds_for_the_pool_not_per_worker(settings, base_topology, start_simulated):
    cap = 4
    topology = pool_topology(base_topology, settings, acme={"quotas": {"max_in_flight": cap}})
    group = f"g-{uuid.uuid4().hex[:8]}"
    with Publisher(settings, topology) as publisher:
        workers = [start_simulated(topology, group, f"w{i}", speed=0.05, slots=8) for i in range(2)]
        await until(lambda: len(workers[0].intake.assigned | workers[1].intake.assigned) == 32
                    and all(w.intake.assigned for w in workers), "both workers joined")
        ids = await publisher.send([request("acme", "low", max_tokens=16) for _ in range(40)])
        peak, per_worker_peak = 0, [0, 0]
        answered = asyncio.create_task(collect(settings, topology, "acme", expect=len(ids)))
        while not answered.done():
            running = [w.policy.in_flight_by_tenant["acme"] for w in workers]
            peak = max(peak, sum(running))
            per_worker_peak = [max(a, b) for a, b in zip(per_worker_peak, running)]
            await asyncio.sleep(0.002)
        replies = answered.result()
    assert {r.request_id for r in replies} == set(ids)
    assert all(per_worker_peak), f"the test needs both workers serving acme: {per_worker_peak}"
    assert peak <= cap, f"{peak} acme requests ran at once across the pool; its cap is {cap}"


async def test_an_outside_client_that_sets_only_the_key_is_served(settings, base_topology, start_simulated):
    topology = pool_topology(base_topology, settings)
    start_simulated(topology, f"g-{uuid.uuid4().hex[:8]}", "w0")
    producer = confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers})
    ids = []
    for _ in range(5):
        doc = Request.model_validate({**request("globex", "medium", max_tokens=4),
                                      "request_id": uuid.uuid4().hex, "submitted_at": utc_now()})
        producer.produce(topology.band_topic("default", doc.priority), key=b"globex", value=encode(doc))
        ids.append(doc.request_id)
    assert producer.flush(30) == 0
    replies = await collect(settings, topology, "globex", expect=len(ids))
    assert {r.request_id for r in replies} == set(ids)


async def test_a_worker_joining_and_one_leaving_lose_nothing_under_lane_routing(settings, base_topology,
                                                                                  start_simulated):
    topology = pool_topology(base_topology, settings)
    group = f"g-{uuid.uuid4().hex[:8]}"
    sent: list[str] = []
    with Publisher(settings, topology) as publisher:
        first = start_simulated(topology, group, "w0", speed=0.1)
        await until(lambda: len(first.intake.assigned) == 32, "the first worker holds everything")
        sent += await publisher.send([request("acme", "low", max_tokens=16) for _ in range(40)])
        second = start_simulated(topology, group, "w1", speed=0.1)
        await until(lambda: bool(second.intake.assigned), "the second worker joins")
        sent += await publisher.send([request("acme", "low", max_tokens=16) for _ in range(40)])
        # the join settles in every band group before the leave (worker_fixtures.settled: Tansu 0.6.0
        # loses a group whose leader leaves while it re-forms)
        await until(lambda: settled((first, second), second, every_partition(topology)),
                    "the join has settled: the two own every partition once, the second in every band")
        await until(lambda: first.served > 0 and second.served > 0, "both workers serving")
        first.request_stop()  # drains what it started; the rest is redelivered to the second
        await until(lambda: len(second.intake.assigned) == 32, "the second worker holds everything")
        sent += await publisher.send([request("acme", "low", max_tokens=16) for _ in range(20)])
    replies = await collect(settings, topology, "acme", expect=len(sent), timeout=180)
    assert {r.request_id for r in replies} == set(sent)
    assert {r.worker for r in replies} == {"w0", "w1"}


async def test_a_joining_worker_holds_partitions_of_every_band(settings, base_topology, start_simulated):
    """One consumer group per band: a group balances only partition counts over its topics, so in
    one group for all bands a joiner could take every high partition and no low one."""
    topology = pool_topology(base_topology, settings)
    group = f"g-{uuid.uuid4().hex[:8]}"
    topics = topology.pool_topics("default")
    first = start_simulated(topology, group, "w0")
    await until(lambda: len(first.intake.assigned) == 32, "the first worker holds everything")
    second = start_simulated(topology, group, "w1")

    def bands(worker: Worker) -> dict[str, int]:
        return {band.value: sum(1 for t, _p in worker.intake.assigned if t == topic) for band, topic in topics.items()}

    def balanced() -> bool:
        together = first.intake.assigned | second.intake.assigned
        return (len(together) == 32 and not first.intake.assigned & second.intake.assigned
                and all(all(bands(w).values()) for w in (first, second)))

    await until(balanced, "both workers hold partitions of every band")
    for worker in (first, second):  # and each band is split evenly, not merely touched
        for band, topic in topics.items():
            total = topology.bands[band].partitions
            assert bands(worker)[band.value] in (total // 2, (total + 1) // 2), (worker.settings.worker_id, bands(worker))


async def test_a_pool_upgraded_from_one_group_continues_from_its_committed_offsets(settings, base_topology,
                                                                                      start_simulated):
    """Earlier versions consumed the three bands in one group (``tierq-<pool>``, or TIERQ_GROUP_ID):
    the band groups start where it left off instead of serving everything again."""
    topology = pool_topology(base_topology, settings)
    group = f"g-{uuid.uuid4().hex[:8]}"
    low = topology.band_topic("default", Band.low)
    producer = confluent_kafka.Producer({"bootstrap.servers": settings.bootstrap_servers})
    ids = []
    for _ in range(10):
        doc = Request.model_validate({**request("globex", "low", max_tokens=4),
                                      "request_id": uuid.uuid4().hex, "submitted_at": utc_now()})
        producer.produce(low, key=b"globex", value=encode(doc), partition=0)
        producer.flush(30)  # one record per batch: offsets 0..9 in this order
        ids.append(doc.request_id)
    old = confluent_kafka.Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": group})
    old.commit(offsets=[confluent_kafka.TopicPartition(low, 0, 6)], asynchronous=False)  # 6 answered before
    old.close()

    start_simulated(topology, group, "w0")
    replies = await collect(settings, topology, "globex", expect=4)
    assert {r.request_id for r in replies} == set(ids[6:])
    with BacklogReader(settings, topology.band_groups("default", group)) as reader:
        await until(lambda: reader.read([low])[(low, 0)].committed == 10, "the low group committed offset 10")
    # every reply there is, once the last is committed: none for the six the old group had answered
    everything = await collect(settings, topology, "globex", expect=None, timeout=10)
    assert sorted(r.request_id for r in everything) == sorted(ids[6:])


@pytest.mark.engine
async def test_two_workers_on_the_real_engine_share_one_tenants_load(settings, base_topology, engine):
    """The same routing with vLLM behind both workers (they share the session's engine)."""
    topology = pool_topology(base_topology, settings)
    group = f"g-{uuid.uuid4().hex[:8]}"
    started = [spawn_worker(engine, settings.bootstrap_servers, topology, group_id=group, worker_id=f"v{i}")
               for i in range(2)]
    try:
        with Publisher(settings, topology) as publisher:
            await until(lambda: len(started[0][0].intake.assigned | started[1][0].intake.assigned) == 32
                        and all(w.intake.assigned for w, _t in started), "both workers joined")
            ids = await publisher.send([request("acme", "low", max_tokens=8) for _ in range(30)])
        replies = await collect(settings, topology, "acme", expect=len(ids))
        assert {r.request_id for r in replies} == set(ids)
        assert {r.worker for r in replies} == {"v0", "v1"}
        assert not any(r.simulated for r in replies)
    finally:
        for worker, _task in started:
            worker.request_stop()
        for _worker, task in started:
            assert await asyncio.wait_for(task, 60) == 0
