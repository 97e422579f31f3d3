"""Supervision with real processes: one per device, restarted with backoff, drained on stop.

The unit tests use a trivial child command; the integration test runs `tierq workers up`
with two CPU workers (real vLLM engines) on the real broker and SIGKILLs one of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from broker.topics import create_topics
from schemas.topology import Topology
from tests.conftest import isolated_topology
from tests.worker_fixtures import publish, request
from worker import launcher
from worker.launcher import Supervisor, WorkerSpec, cpu_devices

CHILD = [sys.executable, "-c",
         "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(600)"]


def specs(n: int) -> list[WorkerSpec]:
    return [WorkerSpec(d.label, d, "default", {"TIERQ_POOL": "default"}) for d in cpu_devices(n)]


def wait_until(predicate, timeout: float = 20.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_a_killed_worker_is_restarted_and_the_others_are_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "BACKOFF_START_S", 0.2)
    supervisor = Supervisor(specs(2), {}, tmp_path / "workers.json", command=CHILD)
    supervisor.start()
    try:
        first, second = (r.process.pid for r in supervisor.workers)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: (supervisor.step() and supervisor.workers[0].process is not None
                            and supervisor.workers[0].process.pid != first))
        assert supervisor.workers[1].process.pid == second, "the other worker must keep running"
        assert supervisor.workers[0].restarts == 1
        state = json.loads((tmp_path / "workers.json").read_text())
        assert state["cpu0"]["restarts"] == 1 and state["cpu0"]["exits"][0]["exit"] == -signal.SIGKILL
        assert state["cpu1"]["pid"] == second
    finally:
        supervisor.stop()
        wait_until(lambda: not supervisor.step())
    assert all(r.process is None for r in supervisor.workers)


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (killed, not yet reaped by init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_a_killed_workers_leftover_processes_are_reaped(tmp_path):
    """vLLM's engine processes outlive a worker killed with SIGKILL; the supervisor kills the
    worker's whole process group so they do not keep the device's memory."""
    pid_file = tmp_path / "grandchild.pid"
    child = [sys.executable, "-c",
             "import subprocess, sys, time; p = subprocess.Popen(['sleep', '600']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(600)"]
    supervisor = Supervisor(specs(1), {}, tmp_path / "workers.json", command=child)
    supervisor.start()
    try:
        grandchild = int(wait_until(lambda: pid_file.exists() and pid_file.read_text()))
        os.kill(supervisor.workers[0].process.pid, signal.SIGKILL)
        wait_until(lambda: supervisor.step() and supervisor.workers[0].process is None)
        wait_until(lambda: _gone(grandchild))
    finally:
        supervisor.stop()
        supervisor.kill_all()


def test_backoff_doubles_for_a_crash_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "BACKOFF_START_S", 0.05)
    crash = [sys.executable, "-c", "raise SystemExit(3)"]
    supervisor = Supervisor(specs(1), {}, tmp_path / "workers.json", command=crash)
    supervisor.start()
    wait_until(lambda: supervisor.step() and supervisor.workers[0].restarts >= 3)
    assert supervisor.workers[0].backoff_s >= 0.05 * 2 ** 3
    assert {e["exit"] for e in supervisor.workers[0].history} == {3}
    supervisor.stop()
    wait_until(lambda: not supervisor.step())


@pytest.mark.integration
@pytest.mark.engine
def test_workers_up_survives_a_sigkilled_worker_and_loses_nothing(bootstrap, base_topology, settings, tiny_model,
                                                                   tmp_path):
    import yaml

    topology: Topology = isolated_topology(base_topology, f"wu{uuid.uuid4().hex[:8]}")
    create_topics(settings, topology)
    topics_file = tmp_path / "topics.yaml"
    topics_file.write_text(yaml.safe_dump(topology.model_dump(mode="json")))
    env = {**os.environ, "TIERQ_STATE_DIR": str(tmp_path / "state"), "TIERQ_MODEL": tiny_model,
           "TIERQ_DTYPE": "float32", "TIERQ_MAX_MODEL_LEN": "512", "TIERQ_MAX_NUM_SEQS": "4",
           "TIERQ_ENGINE_EXTRA": '{"enforce_eager": true}', "TIERQ_SESSION_TIMEOUT_MS": "6000",
           "TIERQ_TENANTS_FILE": str(tmp_path / "tenants.yaml")}
    env.pop("TIERQ_BOOTSTRAP_SERVERS", None)
    state_file = tmp_path / "state" / "workers.json"
    up = subprocess.Popen([sys.executable, "-m", "tierq", "workers", "up", "--cpu", "2",
                           "--bootstrap", bootstrap, "--topics", str(topics_file),
                           "--log-dir", str(tmp_path / "logs")], env=env)
    try:
        pids = wait_until(lambda: state_file.exists() and json.loads(state_file.read_text()), timeout=60)
        first = publish(settings, topology, [request(max_tokens=8) for _ in range(30)])
        replies = {r.request_id for r in _collect(settings, topology, len(first))}
        assert replies == set(first), "both workers up: every request answered"

        victim = pids["cpu0"]["pid"]
        survivor = pids["cpu1"]["pid"]
        second = publish(settings, topology, [request(max_tokens=16) for _ in range(60)])
        os.kill(victim, signal.SIGKILL)
        third = publish(settings, topology, [request(max_tokens=8) for _ in range(30)])
        every = first + second + third
        answered = _collect(settings, topology, len(every), timeout=240)
        assert {r.request_id for r in answered} == set(every), "nothing is lost when a worker is killed"
        state = wait_until(lambda: (s := json.loads(state_file.read_text()))["cpu0"]["restarts"] >= 1 and s,
                           timeout=60)
        assert state["cpu0"]["pid"] not in (None, victim), "the killed worker is started again"
        assert state["cpu1"]["pid"] == survivor and state["cpu1"]["restarts"] == 0
        served_by = {r.worker for r in answered if r.request_id in set(third)}
        assert any(w.endswith("/cpu1") for w in served_by), "the surviving worker kept serving"
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            assert up.wait(timeout=120) == 0
        finally:
            if up.poll() is None:
                up.kill()
    state = json.loads(state_file.read_text())
    assert all(w["pid"] is None for w in state.values()), "SIGTERM drained every worker"


def _collect(settings, topology, expect, timeout=180):
    from producer.collector import ResultCollector

    with ResultCollector(settings, topology, "acme") as collector:
        return list(collector.replies(expect=expect, timeout=timeout))
