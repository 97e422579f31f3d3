"""Where a benchmark's time goes: the engine's own steps (vLLM's per-step scheduler stats), CPU
by process and by thread group, CPU by core, and CPU hogs to measure under contention.

Used by ``bench.overhead``; cheap enough to leave on for both phases of a comparison (they then
pay the same: with a stat logger vLLM builds its stats every step).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import psutil  # a vLLM dependency


class EngineSteps:
    """One row per engine step, as vLLM's output handler (in this process) reports it:
    ``(perf_counter, running, waiting, generated tokens, prompt tokens, finished)``.

    ``running``/``waiting`` are the scheduler's counts after the step; ``generated`` is the number
    of sequences that produced a token in the step, i.e. the step's decode batch (a prefill that
    completes also produces one)."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, int, int, int, int, int]] = []

    def factory(self) -> Any:
        """A vLLM per-engine stat logger factory that appends to ``rows``."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        rows = self.rows

        class StepLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0):
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is None:
                    return
                if iteration_stats is None:
                    generated = prompt = finished = 0
                else:
                    generated = iteration_stats.num_generation_tokens
                    prompt = iteration_stats.num_prompt_tokens
                    finished = len(iteration_stats.finished_requests)
                rows.append((time.perf_counter(), scheduler_stats.num_running_reqs,
                             scheduler_stats.num_waiting_reqs, generated, prompt, finished))

            def log_engine_initialized(self) -> None:
                pass

        return lambda vllm_config, engine_index=0: StepLogger(vllm_config, engine_index)

    def mark(self) -> int:
        return len(self.rows)

    def summary(self, start: int, end: int, requests: int, t0: float, slots: int,
                bin_s: float = 0.1) -> dict[str, Any]:
        """Steps ``rows[start:end]`` of one phase of ``requests`` requests that began at ``t0``."""
        rows = self.rows[start:end]
        if not rows:
            return {"steps": 0}
        batches = [r[3] for r in rows]
        in_engine = [r[1] + r[2] for r in rows]
        decode = [b for b in batches if b]
        gaps = [b[0] - a[0] for a, b in zip(rows, rows[1:])]
        series: dict[int, list[int]] = {}
        for r in rows:
            series.setdefault(int((r[0] - t0) / bin_s), []).append(r[1] + r[2])
        return {
            "steps": len(rows),
            "steps_per_request": round(len(rows) / requests, 2),
            "generated_tokens": sum(batches),
            # sequences that made a token per step: the decode batch the engine ran
            "batch_mean": round(statistics.fmean(batches), 2),
            "batch_mean_nonempty": round(statistics.fmean(decode), 2) if decode else 0,
            "batch_full_share": round(sum(1 for b in batches if b >= slots) / len(batches), 3),
            "batch_hist": dict(sorted(Counter(batches).items())),
            "step_ms_mean": round(statistics.fmean(gaps) * 1000, 3) if gaps else None,
            "step_ms_p50": round(statistics.median(gaps) * 1000, 3) if gaps else None,
            "step_ms_p90": round(sorted(gaps)[int(0.9 * len(gaps))] * 1000, 3) if gaps else None,
            # requests inside the engine after each step (running + waiting)
            "in_engine_mean": round(statistics.fmean(in_engine), 2),
            "in_engine_hist": dict(sorted(Counter(in_engine).items())),
            "waiting_mean": round(statistics.fmean(r[2] for r in rows), 2),
            "in_engine_series": {"bin_s": bin_s,
                                 "mean": [round(statistics.fmean(series[k]), 1) if k in series else None
                                          for k in range(max(series) + 1)],
                                 "steps": [len(series.get(k, ())) for k in range(max(series) + 1)]},
        }


def thread_group(pid: int, tid: int) -> str:
    """The event loop's thread ("main"), librdkafka's, ZeroMQ's (vLLM's engine client), the rest."""
    if tid == pid:
        return "main"
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            name = f.read().strip()
    except OSError:
        return "other"
    if name.startswith("rdk:"):
        return "librdkafka"
    if name.startswith("ZMQ"):
        return "zmq"
    return "other"


class CpuMeter:
    """CPU seconds by role: this process (split into its event-loop thread, librdkafka's threads,
    ZeroMQ's and the rest), vLLM's engine core and model processes, the broker, the load process,
    the hogs; and busy seconds per core for the whole machine (``/proc/stat``)."""

    def __init__(self, broker_pid: int | None):
        self.broker_pid = broker_pid
        self.load_pid: int | None = None
        self.hog_pids: set[int] = set()

    def role(self, process: psutil.Process) -> str:
        if process.pid == self.broker_pid:
            return "broker"
        if process.pid == self.load_pid:
            return "load"
        if process.pid in self.hog_pids:
            return "hog"
        try:
            name = process.name()
        except psutil.Error:
            return "other"
        if name.startswith("VLLM::EngineCore"):
            return "engine_core"
        if name.startswith("VLLM::Worker"):
            return "model"
        return "other"

    def read(self) -> dict[str, Any]:
        me = psutil.Process()
        roles: dict[str, float] = {}
        for process in me.children(recursive=True):
            try:
                t = process.cpu_times()
            except psutil.Error:
                continue
            role = self.role(process)
            roles[role] = roles.get(role, 0.0) + t.user + t.system
        own = me.cpu_times()
        roles["client"] = own.user + own.system
        for thread in me.threads():
            group = "client_" + thread_group(me.pid, thread.id)
            roles[group] = roles.get(group, 0.0) + thread.user_time + thread.system_time
        per_core = [c.user + c.nice + c.system + c.irq + c.softirq + c.steal
                    for c in psutil.cpu_times(percpu=True)]
        return {"roles": roles, "cores": per_core, "at": time.perf_counter()}

    @staticmethod
    def since(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        roles = {k: round(after["roles"].get(k, 0.0) - before["roles"].get(k, 0.0), 3)
                 for k in sorted(set(before["roles"]) | set(after["roles"]))}
        wall = after["at"] - before["at"]
        busy = [round((a - b) / wall, 3) for a, b in zip(after["cores"], before["cores"])]
        return {"by_role_s": roles, "core_busy_share": busy, "wall_s": round(wall, 3)}


def start_hogs(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` busy-loop processes allowed on every CPU (the bench keeps its own processes off the
    model's core; a neighbour's work is not so kind)."""
    hogs = []
    for _ in range(n):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
        try:
            os.sched_setaffinity(hog.pid, range(os.cpu_count() or 1))
        except OSError:
            pass
        hogs.append(hog)
    return hogs


def stop_hogs(hogs: list[subprocess.Popen[bytes]]) -> None:
    for hog in hogs:
        hog.terminate()
    for hog in hogs:
        try:
            hog.wait(5)
        except subprocess.TimeoutExpired:
            hog.kill()
