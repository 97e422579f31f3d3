"""Worker processes stopped mid-run: SIGTERM drains and commits; SIGKILL loses nothing.

One scenario, three workers in one consumer group, so the engine starts only twice more:
A is stopped with SIGTERM mid-run, B is killed with SIGKILL mid-run, C (in-process, on the
shared engine) finishes. Every request must be answered; a request answered twice must
have one answer from B (it was in flight, uncommitted, when B died); nothing A answered
is answered again (A committed everything it finished). C counts what B held as attempted
once (B's held-to marker), and nothing A held (A released its partitions cleanly).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict

import pytest
import yaml

from schemas.codec import decode_reply
from tests.kafka_helpers import read_to_end
from tests.worker_fixtures import Publisher, custom_topology, publish, request

pytestmark = [pytest.mark.integration, pytest.mark.engine]


def spawn_worker(settings, topics_path, model, group, name, log_path):
    env = {**os.environ, "TIERQ_GROUP_ID": group, "TIERQ_WORKER_ID": name, "TIERQ_DTYPE": "float32",
           "TIERQ_MAX_MODEL_LEN": "512", "TIERQ_ENGINE_EXTRA": '{"enforce_eager": true}',
           # the default session: at 6 s a starved machine (a CPU hog beside the suite) once timed out
           # A's session, and a lost session may serve again what was answered (see the test)
           "TIERQ_SESSION_TIMEOUT_MS": "10000", "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tierq", "worker", "--bootstrap", settings.bootstrap_servers,
         "--topics", str(topics_path), "--model", model, "--max-num-seqs", "4"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    log.close()
    return process


def kill_group(process):
    """SIGKILL the worker and vLLM's engine processes, which outlive a worker killed alone."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def replies_by_id(settings, topology, attempts=False):
    """request_id -> the workers that answered it (with ``attempts``: (worker, attempt) pairs)."""
    messages = read_to_end(settings.bootstrap_servers, [topology.reply_topic("acme")])
    seen = defaultdict(list)
    for msg in messages:
        reply = decode_reply(msg.value())
        seen[reply.request_id].append((reply.worker, reply.attempt) if attempts else reply.worker)
    return seen


async def wait_for_replies_from(settings, topology, worker_name, at_least, process, timeout=180):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        assert process.poll() is None, f"worker {worker_name} exited early with {process.returncode}"
        seen = await asyncio.to_thread(replies_by_id, settings, topology)
        if sum(worker_name in workers for workers in seen.values()) >= at_least:
            return
        await asyncio.sleep(2)  # each look reads the whole reply topic: spare the 2-core broker
    raise AssertionError(f"worker {worker_name} produced fewer than {at_least} replies in {timeout}s")


@pytest.mark.timeout(600)  # three engine start-ups (~25 s each, a minute on a busy machine)
async def test_sigterm_drains_and_sigkill_loses_nothing(settings, base_topology, start_worker, tiny_model, tmp_path):
    topology = custom_topology(base_topology, settings, bands={"low": {"aging_step_s": None},
                                                              "medium": {"aging_step_s": None}})
    topics_path = tmp_path / "topics.yaml"
    topics_path.write_text(yaml.safe_dump(topology.model_dump(mode="json")))
    group = f"life-{uuid.uuid4().hex[:8]}"
    # enough work that A and B each hold requests when signalled and C inherits the rest: 20 replies
    # from each of A and B leave ~160 for C (~30 s on the tiny model), inside pytest's 300 s with
    # three engine start-ups (600 requests here needed ~160 s of C alone: the test ran out of time)
    ids = publish(settings, topology, [request(priority="low", max_tokens=64) for _ in range(200)])

    a = spawn_worker(settings, topics_path, tiny_model, group, "A", tmp_path / "a.log")
    try:
        await wait_for_replies_from(settings, topology, "A", 20, a)
        a.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(a.wait, 60) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        kill_group(a)
    answered_by_a = {rid for rid, w in replies_by_id(settings, topology).items() if "A" in w}
    # A's group session timed out before the SIGTERM (seen twice in full-suite runs on 2 cores: the
    # embedded broker answered none of A's heartbeats for the whole session): its partitions were *lost*, not released, so it could not commit what it answered
    # (the group had moved on) nor put back its held-to marker. At-least-once then allows what A
    # answered to be served again, as after a crash; nothing may be lost either way.
    a_lost_session = '"partitions_lost"' in (tmp_path / "a.log").read_text()

    # B may answer everything of the first batch before it is killed (a quiet machine serves it
    # fast): a second batch, acknowledged just before the kill, is work B holds or has not read
    # yet, for C (a producer made in advance: a new one's first send waits ~0.5 s for its id)
    publisher = Publisher(settings, topology)
    b = spawn_worker(settings, topics_path, tiny_model, group, "B", tmp_path / "b.log")
    try:
        await wait_for_replies_from(settings, topology, "B", 20, b)
        ids += await publisher.send([request(priority="low", max_tokens=64) for _ in range(60)])
        b.send_signal(signal.SIGKILL)
        await asyncio.to_thread(b.wait, 30)
    finally:
        kill_group(b)
        publisher.close()

    start_worker(topology, group_id=group, worker_id="C")
    loop = asyncio.get_running_loop()
    end = loop.time() + 240
    while loop.time() < end:
        seen = await asyncio.to_thread(replies_by_id, settings, topology)
        if len(seen) == len(ids):
            break
        await asyncio.sleep(2)

    served = Counter(w for workers in seen.values() for w in workers)
    assert set(seen) == set(ids), f"{len(set(ids) - set(seen))} requests never answered (served: {dict(served)})"
    assert any("C" in workers for workers in seen.values()), "B's kill should have left work for C"
    if a_lost_session:  # (pytest turns warnings into errors here: say it on stdout)
        print("A lost its group session before the SIGTERM: only no-loss was checked")
        return
    for rid, workers in seen.items():
        assert len(workers) <= 2, (rid, workers)
        if len(workers) == 2:
            assert "B" in workers, f"{rid} answered twice without a crash in between: {workers}"
        if rid in answered_by_a:
            assert workers == ["A"], f"{rid} was answered by A (committed) and again by {workers}"
    # attempts: A stopped cleanly, so B inherited no suspects; what B held when it died is C's
    # second attempt (B's held-to marker covered it before B's engine saw it)
    for rid, answers in replies_by_id(settings, topology, attempts=True).items():
        for worker, attempt in answers:
            if worker in ("A", "B"):
                assert attempt == 1, (rid, answers)
        if [w for w, _ in answers] == ["B", "C"]:
            assert answers[1][1] == 2, (rid, answers)
