"""docker-compose.yml is valid compose for this project (no Docker engine needed to check)."""

import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import docker_engine_available

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_present(compose):
    assert {"kafka", "topics", "worker-gpu0", "gateway"} <= set(compose["services"])


def test_kafka_is_kraft(compose):
    env = compose["services"]["kafka"]["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "KAFKA_CONTROLLER_QUORUM_VOTERS" in env
    assert "zookeeper" not in str(compose).lower()


def test_dependencies_resolve(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_worker_reserves_a_gpu_and_runs_the_worker(compose):
    worker = compose["services"]["worker-gpu0"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert worker["command"][0] == "worker"
    assert worker["environment"]["TIERQ_BOOTSTRAP_SERVERS"] == "kafka:19092"


def test_workers_environment_is_valid_worker_settings(compose, monkeypatch):
    """Every TIERQ_* value the compose file gives a worker parses (a typo in the fetch waits' JSON
    would stop the worker at start), and each worker on Kafka uses long fetch waits."""
    from schemas.messages import Band
    from worker.settings import WorkerSettings

    workers = {name: s for name, s in compose["services"].items() if s.get("command", [None])[0] == "worker"}
    assert workers
    for name, service in workers.items():
        with monkeypatch.context() as env:  # this service's values only, none from another or the shell
            for key in [k for k in os.environ if k.startswith("TIERQ_")]:
                env.delenv(key)
            for key, value in service["environment"].items():
                if key.startswith("TIERQ_") and "${" not in str(value):
                    env.setenv(key, str(value))
            settings = WorkerSettings(_env_file=None)
        assert settings.fetch_wait_ms == dict.fromkeys(Band, 500), name
        assert settings.control_fetch_wait_ms == settings.attempts_fetch_wait_ms == 500, name


def test_topic_creation_is_one_shot(compose):
    topics = compose["services"]["topics"]
    assert topics["command"] == ["topics", "create"] and topics["restart"] == "no"


def test_compose_config_with_docker():
    if not docker_engine_available():
        pytest.skip("no Docker engine with the compose plugin on this machine; YAML checks above still ran")
    import subprocess

    result = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_prometheus_scrapes_every_worker_and_the_gateway(compose):
    scrape = yaml.safe_load(compose["configs"]["prometheus"]["content"])
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    for name, service in compose["services"].items():
        if name.startswith("worker-"):
            assert f"{name}:{service['environment']['TIERQ_METRICS_PORT']}" in targets
    assert "gateway:8000" in targets
