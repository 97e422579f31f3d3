"""Harness of the pool benchmark (bench/pool.py): worker processes on simulated engines against
the embedded broker, a fresh topology per pool, CPU accounting per process, and reply arithmetic.

Each worker is its own ``python -m tierq worker --engine simulated`` process, as in production;
this module starts them, watches their logs for partition assignments, stops them with SIGTERM
(they drain) or SIGKILL, and reads CPU time of every process involved. Publishing goes through
the plain ``producer.client.Producer`` and reading through ``producer.collector.ResultCollector``,
so the benchmark measures whatever routing the Producer does.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.common import pct
from broker.topics import create_topics
from producer.client import Delivery, Producer
from producer.collector import ResultCollector
from schemas.messages import Reply
from schemas.tenants import load_topology
from schemas.topology import Topology
from worker.settings import WorkerSettings
from worker.simulated import SimParams

REPO = Path(__file__).resolve().parent.parent
TENANTS = ("acme", "globex", "initech")
BAND_PARTITIONS_KEY = "partitions"


# ---- the machine ------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"node": platform.node(), "arch": platform.machine(), "nproc": os.cpu_count(), "cpu_model": model,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def git_head() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}" if head else None


def other_processes(limit: int = 8) -> list[dict[str, Any]]:
    """The busiest processes that are not ours, over a short sample: what else is running."""
    me = psutil.Process()
    ours = {me.pid} | {c.pid for c in me.children(recursive=True)}
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.pid in ours:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            pass
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pct >= 5:
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])
            busy.append({"pid": p.pid, "cpu_pct": round(pct), "cmd": cmd[:100]})
    return sorted(busy, key=lambda b: -b["cpu_pct"])[:limit]


# ---- the simulated engine's capacity, from its own cost model -------------------------------

@dataclass(frozen=True)
class EngineShape:
    """What every worker of a pool runs: ``speed`` x the reference H100, ``slots`` sequences."""

    speed: float
    slots: int
    engine_queue: int = 2  # WorkerSettings.engine_queue's default: requests waiting inside the engine

    def tokens_per_s(self, speed: float | None = None) -> float:
        """Output tokens per second of one saturated engine (every step runs ``slots`` sequences),
        prefill ignored (a few ms per request at the bench's prompt size)."""
        p = SimParams(speed=speed or self.speed, max_num_seqs=self.slots)
        return self.slots / p.step_s(self.slots, 0)

    def request_s(self, tokens: float, speed: float | None = None) -> float:
        """Seconds one request of ``tokens`` takes in a saturated engine."""
        p = SimParams(speed=speed or self.speed, max_num_seqs=self.slots)
        return tokens * p.step_s(self.slots, 0)

    @property
    def in_flight(self) -> int:
        return self.slots + self.engine_queue


# ---- CPU accounting ---------------------------------------------------------------------------

def _cpu(process: psutil.Process | None) -> float | None:
    if process is None:
        return None
    try:
        t = process.cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


@dataclass
class CpuSample:
    at: float
    workers: dict[str, float]
    broker: float
    bench: float
    machine_busy: float


class CpuMeter:
    """CPU seconds of the workers, the broker and this process (producer + collector) between two
    samples, and of the whole machine: the rest is what else ran meanwhile."""

    def __init__(self, broker_pid: int | None):
        self._broker = psutil.Process(broker_pid) if broker_pid else None
        self._me = psutil.Process()
        self._last_known: dict[str, float] = {}

    def sample(self, workers: Iterable[WorkerProcess]) -> CpuSample:
        values = {}
        for w in workers:
            cpu = w.cpu_s()
            if cpu is not None:
                values[w.worker_id] = cpu
        return CpuSample(time.monotonic(), values, _cpu(self._broker) or 0.0, _cpu(self._me) or 0.0,
                         _machine_busy_s())

    @staticmethod
    def between(a: CpuSample, b: CpuSample) -> dict[str, Any]:
        wall = max(b.at - a.at, 1e-9)
        # a worker started after ``a`` counts from its start
        per_worker = {w: round((b.workers[w] - a.workers.get(w, 0.0)) / wall * 100, 1) for w in b.workers}
        workers = sum(b.workers[w] - a.workers.get(w, 0.0) for w in b.workers)
        broker, bench = b.broker - a.broker, b.bench - a.bench
        machine = b.machine_busy - a.machine_busy
        ours = workers + broker + bench
        return {
            "wall_s": round(wall, 2),
            # percent of one core, averaged over the window
            "workers_pct": round(workers / wall * 100, 1), "per_worker_pct": per_worker,
            "broker_pct": round(broker / wall * 100, 1), "bench_process_pct": round(bench / wall * 100, 1),
            "machine_busy_pct": round(machine / wall * 100, 1),
            "others_pct": round(max(machine - ours, 0.0) / wall * 100, 1),
            "cores": os.cpu_count(),
            "workers_cpu_s": round(workers, 3), "broker_cpu_s": round(broker, 3), "bench_cpu_s": round(bench, 3),
        }


# ---- worker processes -------------------------------------------------------------------------

def _parse_ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


ASSIGNMENT_EVENTS = ("partitions_assigned", "partitions_revoked", "partitions_lost")


class WorkerProcess:
    """One ``tierq worker --engine simulated`` process; its JSON log lines land in a file."""

    def __init__(self, worker_id: str, env: dict[str, str], workdir: Path, speed: float, slots: int):
        self.worker_id = worker_id
        self.speed = speed
        self.log_path = workdir / f"{worker_id}.log"
        command = [sys.executable, "-m", "tierq", "worker", "--engine", "simulated",
                   "--sim-speed", str(speed), "--max-num-seqs", str(slots)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=workdir, env={**env, "TIERQ_WORKER_ID": worker_id},
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.started_at = time.time()
        self._ps = psutil.Process(self.process.pid)
        self._last_cpu = 0.0
        self.signalled: tuple[str, float] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def cpu_s(self) -> float:
        cpu = _cpu(self._ps) if self.alive else None
        if cpu is not None:
            self._last_cpu = cpu
        return self._last_cpu

    def events(self) -> list[dict[str, Any]]:
        out = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event:
                out.append(event)
        return out

    def assignments(self) -> list[tuple[float, str, set[tuple[str, int]]]]:
        """(when, event, partitions) of each assignment event in the log, in order."""
        return [(_parse_ts(e["timestamp"]), e["event"], {(t, p) for t, p in e.get("partitions") or []})
                for e in self.events() if e["event"] in ASSIGNMENT_EVENTS]

    def owned(self) -> set[tuple[str, int]]:
        """Partitions held now, replayed from the log's assignment events."""
        owned: set[tuple[str, int]] = set()
        for _at, event, keys in self.assignments():
            owned = owned | keys if event == "partitions_assigned" else owned - keys
        return owned if self.alive else set()

    def holds_at(self, topic: str, count: int) -> float | None:
        """When it first held ``count`` partitions of ``topic``: with the cooperative assignor a
        joiner's partitions come over two or more rounds of its band group (the others give theirs
        up in one round, it gets them in the next), so its first partition is not yet its share."""
        held: set[tuple[str, int]] = set()
        for at, event, keys in self.assignments():
            keys = {k for k in keys if k[0] == topic}
            held = held | keys if event == "partitions_assigned" else held - keys
            if keys and len(held) >= count:
                return at
        return None

    def first_assigned_at(self) -> float | None:
        return next((at for at, event, keys in self.assignments() if event == "partitions_assigned" and keys), None)

    def errors(self) -> list[str]:
        return [json.dumps(e)[:300] for e in self.events() if e.get("level") in ("error", "critical")]

    def terminate(self) -> None:
        if self.alive:
            self.signalled = ("SIGTERM", time.time())
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.alive:
            self.signalled = ("SIGKILL", time.time())
            self.cpu_s()
            self.process.kill()

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# ---- a pool: topology, workers, producer -----------------------------------------------------

class Pool:
    """A fresh topology (its own topic names) and the worker processes serving it.

    Tenants get max_priority high and no quotas unless ``tenants`` says otherwise; ``bands``
    changes the band settings (e.g. reserved_slots 0 for the throughput scenarios).
    Its pool has a name of its own, so its consumer group (the default ``tierq-<pool>``, which is
    also the group a producer reads backlog from) is new as well.
    """

    def __init__(self, bench: Bench, name: str, shape: EngineShape,
                 bands: dict[str, dict[str, Any]] | None = None,
                 tenants: dict[str, dict[str, Any]] | None = None):
        self.bench = bench
        self.name = name
        self.shape = shape
        self.worker_env: dict[str, str] = {}  # extra TIERQ_* settings for its workers (e.g. TIERQ_PREEMPT)
        self.prefix = f"pool{uuid.uuid4().hex[:8]}"
        # a pool name of its own: its consumer group (tierq-<pool>) is new too, so no state a previous
        # pool left in the broker's group coordinator can hold this one up, and a producer that reads
        # the pool group's backlog reads this pool's
        self.pool_name = f"b{self.prefix[4:]}"
        document = load_topology(REPO / "topics.yaml").with_topic_prefix(self.prefix).model_dump(mode="json")
        document["pools"] = {self.pool_name: next(iter(document["pools"].values()))}
        for rule in document.get("devices") or []:
            rule["pool"] = self.pool_name
        for band, values in (bands or {}).items():
            document["bands"][band].update(values)
        for tenant_id, tenant in document["tenants"].items():
            tenant["pool"] = self.pool_name
            tenant["max_priority"] = "high"
            tenant["quotas"] = {}
            tenant.update((tenants or {}).get(tenant_id, {}))
        self.topology = Topology.model_validate(document)
        self.settings = WorkerSettings(_env_file=None, bootstrap_servers=bench.bootstrap, session_timeout_ms=6000)
        create_topics(self.settings, self.topology)
        self.topics_file = bench.workdir / f"{self.prefix}.yaml"
        self.topics_file.write_text(yaml.safe_dump(self.topology.model_dump(mode="json"), sort_keys=False))
        self.partitions = {(topic, p) for band, topic in self.topology.pool_topics(self.pool_name).items()
                           for p in range(self.topology.bands[band].partitions)}
        self.workers: list[WorkerProcess] = []
        self.producer: Producer | None = None
        self.deliveries: list[Delivery] = []
        self.producer_options: dict[str, Any] = {}
        self.owners_at_start: dict[tuple[str, int], str] = {}
        self._pending: list[Any] = []

    # workers
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIERQ_")}
        env.update({
            "TIERQ_BOOTSTRAP_SERVERS": self.bench.bootstrap,
            "TIERQ_TOPICS_FILE": str(self.topics_file),
            "TIERQ_POOL": self.pool_name,
            "TIERQ_TENANTS_FILE": str(self.bench.workdir / "no-tenants.yaml"),
            "TIERQ_STATE_DIR": str(self.bench.workdir / "state"),
            "TIERQ_SESSION_TIMEOUT_MS": "6000",
            "TIERQ_ENGINE": "simulated",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
            **self.worker_env,
        })
        return env

    def start_worker(self, speed: float | None = None) -> WorkerProcess:
        worker_id = f"w{len(self.workers) + 1}"
        w = WorkerProcess(worker_id, self.env(), self.bench.workdir / self.prefix, speed or self.shape.speed,
                          self.shape.slots)
        self.workers.append(w)
        return w

    def start(self, n: int, speeds: Sequence[float] | None = None) -> float:
        """Start ``n`` workers, connect the producer meanwhile, wait until the group is stable.
        Returns seconds from the first start to a stable group."""
        (self.bench.workdir / self.prefix).mkdir(exist_ok=True)
        t0 = time.time()
        for i in range(n):
            self.start_worker(speeds[i] if speeds else None)
        self.producer = Producer(self.settings, self.topology, on_quota="off", **self.producer_options)
        self.producer.connect()
        took = self.wait_stable(since=t0)
        self.owners_at_start = self.owners()
        return took

    @property
    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    def stable(self) -> bool:
        live = self.live
        owned = [w.owned() for w in live]
        if not live or any(not o for o in owned):
            return False
        union: set[tuple[str, int]] = set()
        for o in owned:
            if union & o:
                return False
            union |= o
        return union == self.partitions

    def wait_stable(self, since: float | None = None, timeout: float = 90.0) -> float:
        since = since or time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for w in self.workers:
                if not w.alive and w.signalled is None:
                    raise RuntimeError(f"worker {w.worker_id} exited ({w.process.returncode}); "
                                       f"log {w.log_path}:\n" + "\n".join(w.log_path.read_text().splitlines()[-15:]))
            if self.stable():
                return round(time.time() - since, 2)
            time.sleep(0.1)
        raise RuntimeError(f"pool {self.name}: group not stable after {timeout:.0f}s: "
                           + ", ".join(f"{w.worker_id}: {len(w.owned())}" for w in self.live))

    def owners(self) -> dict[tuple[str, int], str]:
        return {key: w.worker_id for w in self.live for key in w.owned()}

    def stop(self, timeout: float = 60.0) -> dict[str, int]:
        """SIGTERM every live worker (they drain), reap all; exit codes by worker."""
        for w in self.workers:
            w.terminate()
        codes = {w.worker_id: w.wait(timeout) for w in self.workers}
        if self.producer is not None:
            self.flush()
            self.producer.close()
            self.producer = None
        return codes

    # publishing: the plain Producer API
    def submit(self, docs: Iterable[dict[str, Any]]) -> list[str]:
        assert self.producer is not None
        futures = [self.producer.submit(d) for d in docs]
        self._pending += futures
        return [f.request_id for f in futures]

    def flush(self, timeout: float = 60.0) -> None:
        assert self.producer is not None
        self.producer.flush(timeout)
        pending, self._pending = self._pending, []
        self.deliveries += [f.result(timeout=timeout) for f in pending]

    def recent_deliveries(self, count: int) -> list[Delivery]:
        """The last ``count`` acknowledged records, including those not flushed yet."""
        done = [f.result(0) for f in self._pending if f.done() and not f.failed]
        return (self.deliveries + done)[-count:]

    def committed(self) -> dict[tuple[str, int], int]:
        """The band groups' committed offset per band-topic partition (its log start where none)."""
        from broker.backlog import BacklogReader

        reader = BacklogReader(self.settings, self.topology.band_groups(self.pool_name))
        try:
            loads = reader.read(sorted(self.topology.pool_topics(self.pool_name).values()))
        finally:
            reader.close()
        return {key: load.committed for key, load in loads.items()}

    def publish(self, docs: Iterable[dict[str, Any]]) -> list[str]:
        ids = self.submit(docs)
        self.flush()
        return ids

    def pace(self, schedule: Sequence[tuple[float, dict[str, Any]]], start: float,
             events: dict[float, Any] | None = None) -> list[tuple[float, str, dict[str, Any]]]:
        """Publish each document at ``start + offset`` (open loop); run ``events`` callbacks at
        their offsets. Returns (sent_at, request_id, doc)."""
        assert self.producer is not None
        sent = []
        pending_events = sorted((events or {}).items(), key=lambda e: e[0])
        i = 0
        while i < len(schedule) or pending_events:
            now = time.time() - start
            while pending_events and pending_events[0][0] <= now:
                pending_events.pop(0)[1]()
            batch = []
            while i < len(schedule) and schedule[i][0] <= now:
                batch.append(schedule[i][1])
                i += 1
            if batch:
                at = time.time()
                sent += [(at, rid, d) for rid, d in zip(self.submit(batch), batch)]
            self.producer.poll(0)
            upcoming = [schedule[i][0]] if i < len(schedule) else []
            upcoming += [pending_events[0][0]] if pending_events else []
            if upcoming:
                time.sleep(max(0.0, min(min(upcoming) - (time.time() - start), 0.02)))
        self.flush()
        return sent

    # reading replies
    def collect(self, tenant: str, expect: int | None = None, timeout: float = 120.0) -> list[Reply]:
        """A tenant's replies: ``expect`` of them (or until ``timeout``), else everything written so far."""
        with ResultCollector(self.settings, self.topology, tenant) as collector:
            if expect is None:
                return list(collector.replies(timeout=timeout))
            return list(collector.replies(expect=expect, timeout=timeout))

    def collect_all(self, tenants: Iterable[str] = TENANTS) -> list[Reply]:
        return [r for t in tenants for r in self.collect(t)]


class Bench:
    """The broker and scratch directory for the whole benchmark run."""

    def __init__(self, bootstrap: str, broker_pid: int | None):
        self.bootstrap = bootstrap
        self.broker_pid = broker_pid
        self.workdir = Path(tempfile.mkdtemp(prefix="tierq-pool-bench-"))
        self.cpu = CpuMeter(broker_pid)
        self.machine: dict[str, Any] = {}


# ---- reply arithmetic -------------------------------------------------------------------------

def ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def token_times(reply: Reply) -> list[float]:
    """When each output token was produced: evenly spaced from the first to the last."""
    n = reply.usage.completion_tokens if reply.usage else 0
    first, last = ts(reply.timing.first_token_at), ts(reply.timing.finished_at)
    if not n or first is None or last is None:
        return []
    if n == 1:
        return [last]
    step = (last - first) / (n - 1)
    return [first + k * step for k in range(n)]


def tokens_between(replies: Iterable[Reply], t0: float, t1: float) -> int:
    return sum(1 for r in replies for t in token_times(r) if t0 <= t < t1)


def in_flight_mean(replies: Iterable[Reply], t0: float, t1: float) -> float:
    """Mean number of the replies' requests admitted to the engine (dequeued, not finished) over [t0, t1)."""
    total = 0.0
    for r in replies:
        a, b = ts(r.timing.dequeued_at), ts(r.timing.finished_at)
        if a is not None and b is not None:
            total += max(0.0, min(b, t1) - max(a, t0))
    return total / (t1 - t0)


def by_worker(replies: Iterable[Reply]) -> dict[str, list[Reply]]:
    out: dict[str, list[Reply]] = {}
    for r in replies:
        out.setdefault(r.worker or "?", []).append(r)
    return dict(sorted(out.items()))


def queue_stats(replies: Sequence[Reply]) -> dict[str, Any]:
    queue = [r.timing.queue_ms for r in replies if r.timing.queue_ms is not None]
    e2e = [r.timing.e2e_ms for r in replies if r.timing.e2e_ms is not None]
    # queue = time in Kafka until a worker fetched it + time in that worker's buffer
    kafka = [(r.timing.received_at - r.timing.submitted_at).total_seconds() * 1000
             for r in replies if r.timing.received_at and r.timing.submitted_at]
    buffered = [(r.timing.dequeued_at - r.timing.received_at).total_seconds() * 1000
                for r in replies if r.timing.received_at and r.timing.dequeued_at]
    return {"count": len(replies), "queue_ms_p50": pct(queue, 50), "queue_ms_p90": pct(queue, 90),
            "queue_ms_p99": pct(queue, 99), "queue_ms_max": round(max(queue), 1) if queue else None,
            "in_kafka_ms_p50": pct(kafka, 50), "in_kafka_ms_p99": pct(kafka, 99),
            "in_worker_buffer_ms_p50": pct(buffered, 50), "in_worker_buffer_ms_p99": pct(buffered, 99),
            "e2e_ms_p50": pct(e2e, 50), "e2e_ms_p99": pct(e2e, 99)}


def with_censored(replies: Sequence[Reply], censored_ms: Sequence[float]) -> dict[str, float]:
    """Queue p50 and p99 over ``replies`` and the requests still waiting when the pool was stopped,
    counted with their wait so far (``censored_ms``): lower bounds while any is censored."""
    q = sorted([r.timing.queue_ms for r in replies] + list(censored_ms))
    return {"queue_ms_p50": round(q[len(q) // 2], 1), "queue_ms_p99": round(q[min(len(q) - 1, int(0.99 * len(q)))], 1)}


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return None if a is None or not b else round(a / b, digits)


def partitions_used(deliveries: Iterable[Delivery], ids: set[str] | None = None) -> dict[str, int]:
    """How many records each band topic's partitions got (topic suffix -> {partition: count})."""
    out: dict[str, dict[int, int]] = {}
    for d in deliveries:
        if ids is not None and d.request_id not in ids:
            continue
        band = d.topic.rsplit(".", 1)[-1]
        out.setdefault(band, {}).setdefault(d.partition, 0)
        out[band][d.partition] += 1
    return {band: dict(sorted(parts.items())) for band, parts in out.items()}  # type: ignore[misc]


def partitions_by_worker(owners: dict[tuple[str, int], str]) -> dict[str, dict[str, int]]:
    """How many partitions of each band each worker holds: {worker: {band: count}}."""
    out: dict[str, dict[str, int]] = {}
    for (topic, _p), worker in owners.items():
        band = topic.rsplit(".", 1)[-1]
        out.setdefault(worker, {"high": 0, "medium": 0, "low": 0})[band] += 1
    return dict(sorted(out.items()))


def ceil(x: float) -> int:
    return int(math.ceil(x))
