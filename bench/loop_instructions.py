"""Instructions per request of the worker loop, load-independent: one Worker drains N requests in
memory (the real Triage, ReplyBuilder, ReplyWriter with its encoding, PoisonGuard and the simulated
engine at speed 1e6; fake Kafka clients: tests/test_worker_loop.py's intake and control, a producer
that acknowledges every record at the next poll, an attempts ledger in memory). Run it under
cachegrind twice; instructions per request = the difference over the difference in N:

    for n in 300 2300; do PYTHONHASHSEED=0 valgrind --tool=cachegrind --cache-sim=no \
        --cachegrind-out-file=/dev/null .venv/bin/python -m bench.loop_instructions $n 2>&1 | grep "I *refs"; done

(PYTHONHASHSEED=0: the same run gives the same count to a few hundred instructions.)
"""
import asyncio
import sys
import uuid
from pathlib import Path

import orjson

from schemas.logs import configure
from schemas.messages import Band, utc_now
from schemas.tenants import load_topology
from schemas.topology import Topology
from worker import replies as replies_mod
from worker.attempts import AttemptsLedger
from worker.poison import PoisonGuard
from worker.runner import settle_gc
from worker.service import Worker
from worker.settings import SimulatedSettings, WorkerSettings
from worker.simulated import SimulatedEngine

from tests.test_worker_loop import TOPICS, FakeControl, FakeIntake


class FakeProducer:
    def __init__(self, config):
        self._cbs = []
    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None):
        self._cbs.append(on_delivery)
    def poll(self, timeout=0):
        cbs, self._cbs = self._cbs, []
        for cb in cbs:
            if cb is not None:
                cb(None, None)
        return len(cbs)
    def flush(self, timeout=0):
        self.poll(); return 0
    def __len__(self):
        return len(self._cbs)
    def purge(self): self._cbs = []
    def close(self): pass


class MemLedger(AttemptsLedger):
    def __init__(self):
        self.topic = "attempts"; self.counts = {}; self.markers = {}; self.suspect_to = {}
        self._marker_prefix = "held/g/"; self.connected = True
    def connect(self, timeout=5.0): return None
    def load(self, timeout=30.0): pass
    def catch_up(self, timeout=30.0): return True
    def poll(self, timeout=0): pass
    def close(self): pass


def topology():
    document = load_topology(Path("topics.yaml")).model_dump(mode="json")
    document["pools"]["default"]["topics"] = {band.value: topic for band, topic in TOPICS.items()}
    for band in ("high", "medium", "low"):
        document["bands"][band].update(reserved_slots=0)
    for tenant in document["tenants"].values():
        tenant["quotas"] = {}
    return Topology.model_validate(document)


async def main(n: int) -> None:
    replies_mod.confluent_kafka.Producer = FakeProducer
    topo = topology()
    settings = WorkerSettings(_env_file=None, bootstrap_servers="fake:9092", max_num_seqs=256, engine_queue=0,
                              worker_id="bench/ceiling", pool="default", engine="simulated",
                              simulated=SimulatedSettings(speed=1e6))
    writer = replies_mod.ReplyWriter(settings, topo.dlq.topic, topo.attempts.topic)
    guard = PoisonGuard(MemLedger(), writer, "g")
    intake = FakeIntake()
    worker = Worker(settings, topo, SimulatedEngine.from_settings(settings), intake=intake, writer=writer,
                    guard=guard, control=FakeControl())
    now = utc_now()
    docs = [orjson.dumps({"schema": "tierq.request/v1", "request_id": uuid.uuid4().hex, "tenant_id": "acme",
                          "priority": "low", "pool": "default", "prompt": "hi",
                          "params": {"max_tokens": 1, "temperature": 0.0}, "submitted_at": now},
                         option=orjson.OPT_UTC_Z) for _ in range(n)]
    for d in docs:
        intake.publish(Band.low, d)
    del docs
    settle_gc()
    task = asyncio.get_running_loop().create_task(worker.run())
    while worker.served < n:
        await asyncio.sleep(0.002)
    worker.request_stop()
    await task
    assert worker.served == n, worker.served
    print("served", worker.served, "turns", worker.turns, "committed", intake.committed, file=sys.stderr)

if __name__ == "__main__":
    configure(level="WARNING")
    asyncio.run(main(int(sys.argv[1])))
