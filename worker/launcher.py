"""``tierq workers up``: one worker process per device, supervised.

Planning is pure: devices + the ``devices:`` rules of topics.yaml -> one ``WorkerSpec``
per device (pool, engine sizing, environment). Supervision runs each spec as its own
process (a crash takes down one device's worker, never the others), restarts a worker
that exits with exponential backoff, and on SIGTERM drains them all (a second signal
aborts). The current pids are written to ``<state_dir>/workers.json`` for operators.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from broker.embedded import die_with_parent
from schemas.topology import DeviceMatch, DeviceRule, Topology
from worker.devices import GIB, Device

log = structlog.get_logger("tierq.launcher")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0
#: A worker that ran this long before exiting gets its backoff reset.
HEALTHY_AFTER_S = 60.0


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    device: Device
    pool: str
    env: dict[str, str]


def matches(match: DeviceMatch, device: Device) -> bool:
    checks = [
        match.kind is None or match.kind == device.kind,
        match.label is None or match.label == device.label,
        match.uuid is None or match.uuid == device.uuid,
        match.profile is None or (device.profile or "").lower() == match.profile.lower(),
        match.name_contains is None or match.name_contains.lower() in device.name.lower(),
    ]
    return all(checks)


def rule_for(rules: list[DeviceRule], device: Device) -> DeviceRule:
    for rule in rules:
        if matches(rule.match, device):
            return rule
    return DeviceRule()


def default_sizing(device: Device) -> tuple[int | None, float | None]:
    """(max_num_seqs, gpu_memory_utilization) from the device's own memory; None on the CPU."""
    if device.kind == "cpu" or device.memory_bytes is None:
        return None, None
    gib = device.memory_bytes / GIB
    seqs = 8 if gib < 8 else 16 if gib < 16 else 32 if gib < 32 else 64 if gib < 64 else 128
    return seqs, (0.85 if gib < 16 else 0.90)


def plan(devices: list[Device], topology: Topology, *, host: str | None = None,
         metrics_port_base: int | None = None) -> list[WorkerSpec]:
    """One worker per device that an enabled rule (or the default) assigns to a pool."""
    host = host or socket.gethostname()
    specs = []
    for device in devices:
        rule = rule_for(topology.devices, device)
        if not rule.enabled:
            continue
        seqs, utilization = default_sizing(device)
        env = {
            "TIERQ_POOL": rule.pool,
            "TIERQ_WORKER_ID": f"{host}/{device.label}",
            "TIERQ_GROUP_ID": f"tierq-{rule.pool}",
        }
        if device.kind == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            # GPU and MIG instances are addressed by UUID; see worker/gpu_compat.py for
            # vLLM versions that cannot parse a MIG UUID.
            env["CUDA_VISIBLE_DEVICES"] = device.uuid or str(device.index)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["TIERQ_DEVICE_MEMORY_BYTES"] = str(device.memory_bytes or "")
            if device.kind == "mig":
                env["TIERQ_PARENT_GPU_INDEX"] = str(device.index)
        if rule.max_num_seqs or seqs:
            env["TIERQ_MAX_NUM_SEQS"] = str(rule.max_num_seqs or seqs)
        if rule.gpu_memory_utilization or utilization:
            env["TIERQ_GPU_MEMORY_UTILIZATION"] = str(rule.gpu_memory_utilization or utilization)
        if rule.model:
            env["TIERQ_MODEL"] = rule.model
        if rule.engine_extra:
            env["TIERQ_ENGINE_EXTRA"] = json.dumps(rule.engine_extra)
        if metrics_port_base is not None:
            env["TIERQ_METRICS_PORT"] = str(metrics_port_base + len(specs))
        specs.append(WorkerSpec(device.label, device, rule.pool, env))
    return specs


def cpu_devices(count: int) -> list[Device]:
    return [Device(kind="cpu", name="cpu", index=i) for i in range(count)]


@dataclass
class Running:
    spec: WorkerSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a worker's process group. A worker that dies hard (SIGKILL, OOM)
    leaves vLLM's engine-core and model processes behind, holding the device's memory."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Runs and restarts one worker process per spec."""

    def __init__(self, specs: list[WorkerSpec], base_env: dict[str, str], state_file: Path,
                 command: list[str] | None = None, log_dir: Path | None = None):
        self.workers = [Running(spec) for spec in specs]
        self.base_env = base_env
        self.state_file = state_file
        self.command = command or [sys.executable, "-m", "tierq", "worker"]
        self.log_dir = log_dir
        self._stopping = 0

    def start(self) -> None:
        for running in self.workers:
            self._spawn(running)
        self._write_state()

    def _spawn(self, running: Running) -> None:
        env = {**os.environ, **self.base_env, **running.spec.env}
        stdout = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stdout = open(self.log_dir / f"worker-{running.spec.name}.log", "ab")
        # own process group: vLLM's engine processes join it, so they can be reaped with the worker
        running.process = subprocess.Popen(self.command, env=env, stdout=stdout, stderr=subprocess.STDOUT
                                           if stdout else None, preexec_fn=die_with_parent, start_new_session=True)
        if stdout is not None:
            stdout.close()
        running.started_at = time.monotonic()
        running.restart_at = None
        log.info("worker_started", worker=running.spec.name, pool=running.spec.pool, pid=running.process.pid,
                 restarts=running.restarts)

    def stop(self) -> None:
        """First call: SIGTERM every worker (they drain). Second call: SIGTERM again (abort)."""
        self._stopping += 1
        for running in self.workers:
            if running.process is not None and running.process.poll() is None:
                running.process.send_signal(signal.SIGTERM)
        log.info("stopping_workers", signal_count=self._stopping)

    def step(self) -> bool:
        """Reap exited workers and restart them when due; False once stopped and all are gone."""
        now = time.monotonic()
        changed = False
        for running in self.workers:
            process = running.process
            if process is not None and process.poll() is not None:
                _kill_group(process.pid)
                code = process.returncode
                ran = now - running.started_at
                running.history.append({"pid": process.pid, "exit": code, "ran_s": round(ran, 1)})
                running.process = None
                changed = True
                if self._stopping:
                    log.info("worker_exited", worker=running.spec.name, code=code)
                    continue
                if ran >= HEALTHY_AFTER_S:
                    running.backoff_s = BACKOFF_START_S
                running.restart_at = now + running.backoff_s
                log.error("worker_died", worker=running.spec.name, pid=process.pid, code=code,
                          restart_in_s=running.backoff_s)
                running.backoff_s = min(running.backoff_s * 2, BACKOFF_MAX_S)
            if (not self._stopping and running.process is None and running.restart_at is not None
                    and now >= running.restart_at):
                running.restarts += 1
                self._spawn(running)
                changed = True
        if changed:
            self._write_state()
        return not (self._stopping and all(r.process is None for r in self.workers))

    def kill_all(self) -> None:
        for running in self.workers:
            if running.process is not None:
                _kill_group(running.process.pid)

    def _write_state(self) -> None:
        state = {
            r.spec.name: {
                "pid": r.process.pid if r.process is not None else None,
                "pool": r.spec.pool,
                "device": r.spec.device.as_json(),
                "restarts": r.restarts,
                "exits": r.history[-10:],
            }
            for r in self.workers
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)

    def run(self, drain_timeout_s: float) -> int:
        """Supervise until SIGTERM/SIGINT; returns 0 after a clean drain."""
        def on_signal(_signum: int, _frame: Any) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        stop_deadline = None
        while self.step():
            if self._stopping and stop_deadline is None:
                stop_deadline = time.monotonic() + drain_timeout_s + 15
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                log.error("drain_timeout_killing_workers")
                self.kill_all()
                stop_deadline = float("inf")
            time.sleep(0.2)
        self._write_state()
        return 0
