"""Fixtures for tests that need the real vLLM engine: one engine per session, workers per test."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
import pytest_asyncio

from broker.topics import create_topics
from producer.client import Producer
from producer.collector import ResultCollector
from schemas.messages import Reply
from schemas.topology import Topology
from tests.conftest import isolated_topology
from worker.engine import Engine, EngineConfig
from worker.service import build_worker
from worker.settings import WorkerSettings
from worker.tinymodel import make_tiny_model

ENGINE_SLOTS = 4


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="session")
def smollm2_model() -> str:
    """The real small model (SmolLM2-135M-Instruct), prepared once per user into the models directory
    that ``tierq model prepare`` uses: later sessions find it there (download + conversion: ~1 min)."""
    from worker.models import PrepareError, prepare_smollm2

    try:
        return str(prepare_smollm2(check=False))
    except PrepareError as exc:
        pytest.fail(f"cannot prepare SmolLM2 for the structured-output tests: {exc}")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_model: str) -> Any:
    """A second, small engine on the real model, only for the tests that need real text (structured outputs)."""
    engine = Engine.start(EngineConfig(model=smollm2_model, dtype="float32", max_model_len=1024, max_num_seqs=4,
                                       extra={"enforce_eager": True}))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def engine(tiny_model: str) -> Any:
    engine = Engine.start(EngineConfig(model=tiny_model, dtype="float32", max_model_len=512,
                                       max_num_seqs=ENGINE_SLOTS, extra={"enforce_eager": True}))
    yield engine
    engine.shutdown()


def custom_topology(base: Topology, settings: Any, **changes: Any) -> Topology:
    """An isolated, created topology with ``bands``/``tenants`` changes applied."""
    document = isolated_topology(base, f"w{uuid.uuid4().hex[:10]}").model_dump(mode="json")
    for band, values in changes.get("bands", {}).items():
        document["bands"][band].update(values)
    for tenant, values in changes.get("tenants", {}).items():
        document["tenants"][tenant].update(values)
    topology = Topology.model_validate(document)
    create_topics(settings, topology)
    return topology


def spawn_worker(engine: Any, bootstrap: str, topology: Topology, **overrides: Any) -> tuple[Worker, asyncio.Task[int]]:
    """A Worker on the shared engine, running as a task of the current loop."""
    values: dict[str, Any] = {
        "bootstrap_servers": bootstrap, "max_num_seqs": ENGINE_SLOTS,
        "group_id": f"g-{uuid.uuid4().hex[:8]}", "session_timeout_ms": 6000, "worker_id": "test/worker",
    }
    worker = build_worker(WorkerSettings(_env_file=None, **{**values, **overrides}), topology, engine)
    return worker, asyncio.get_running_loop().create_task(worker.run())


@pytest_asyncio.fixture
async def start_worker(engine: Any, settings: Any) -> AsyncIterator[Callable[..., Worker]]:
    """Factory: run a Worker on the shared engine in the background until the test ends."""
    running: list[tuple[Worker, asyncio.Task[int]]] = []

    def start(topology: Topology, **overrides: Any) -> Worker:
        running.append(spawn_worker(engine, settings.bootstrap_servers, topology, **overrides))
        return running[-1][0]

    yield start
    for worker, task in running:
        worker.request_stop()
        worker.request_stop()
    for _worker, task in running:
        assert await asyncio.wait_for(task, 60) == 0


def every_partition(topology: Topology, pool: str = "default") -> set[tuple[str, int]]:
    """Each (topic, partition) of ``pool``'s band topics, as topics.yaml sizes them."""
    return {(topic, p) for band, topic in topology.pool_topics(pool).items() for p in range(topology.bands[band].partitions)}


def settled(workers: Sequence[Worker], newest: Worker, partitions: set[tuple[str, int]]) -> bool:
    """The group has settled after ``newest`` joined: each of ``partitions`` owned by exactly one of
    ``workers``, and ``newest`` holding some of every band. A worker must not leave before this:
    Tansu 0.6.0 loses a group for good when its leader leaves while it re-forms (README, known
    problems; tests/test_faults.py::test_a_band_group_that_never_re_forms_is_reported)."""
    owned = [w.intake.assigned for w in workers]
    bands_of_newest = {newest.intake.topic_band[topic] for topic, _p in newest.intake.assigned}
    return (bands_of_newest == set(newest.intake.topic_band.values())
            and sum(map(len, owned)) == len(partitions) and set().union(*owned) == partitions)


async def collect(settings: Any, topology: Topology, tenant: str, expect: int, timeout: float = 120) -> list[Reply]:
    """Replies of one tenant, gathered off the event loop so the worker keeps running."""
    def read() -> list[Reply]:
        with ResultCollector(settings, topology, tenant) as collector:
            return list(collector.replies(expect=expect, timeout=timeout))

    return await asyncio.to_thread(read)


def publish(settings: Any, topology: Topology, documents: list[dict[str, Any]], routing: bool = True) -> list[str]:
    """Publish and wait for the acknowledgements; ``routing=False``: Kafka's key hash (one tenant,
    one partition per band, offsets in publishing order)."""
    with Producer(settings, topology, on_quota="off", routing=routing) as producer:
        futures = [producer.submit(doc) for doc in documents]
        return [f.result(timeout=30).request_id for f in futures]


class Publisher:
    """A long-lived producer used from one thread of its own, so publishing never blocks the
    worker's loop. Make it before the worker starts: a new idempotent producer's first send waits
    up to 0.5 s for its producer id (librdkafka retries that on a fixed 500 ms timer when the
    client has no broker connection yet, which a brand-new client never has)."""

    def __init__(self, settings: Any, topology: Topology, routing: bool = True):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publisher")
        self._producer = self._executor.submit(Producer, settings, topology, on_quota="off", routing=routing).result()
        self._executor.submit(self._producer.connect).result()

    def _send(self, documents: list[dict[str, Any]]) -> list[str]:
        futures = [self._producer.submit(doc) for doc in documents]
        return [f.result(timeout=30).request_id for f in futures]

    async def send(self, documents: list[dict[str, Any]]) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._send, documents)

    def close(self) -> None:
        self._executor.submit(self._producer.close).result()
        self._executor.shutdown()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(tenant: str = "acme", priority: str = "low", max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    doc = {"tenant_id": tenant, "priority": priority, "prompt": "The quick brown fox",
           "params": {"max_tokens": max_tokens, "temperature": 0.0}}
    doc.update(extra)
    return doc


def now() -> float:
    return time.time()
