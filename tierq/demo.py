"""``tierq demo``: the whole local stack on one machine, and what priority scheduling does.

Starts a broker (embedded unless one is configured), creates the topics, runs one worker
with an in-process engine, publishes a low backlog first and medium/high work after it
(chat prompts: short questions and longer tasks in every band), collects every reply and
prints latency per band and a few answers of each band.

vLLM's start-up logs (and the broker's and worker's) go to ``<state dir>/demo.log`` unless
``--verbose``: the engine core is a spawned process, so its output is redirected at the file
descriptor level before the engine starts; the terminal gets progress lines and the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from broker.embedded import local_broker
from producer.client import Producer
from producer.collector import ResultCollector
from schemas.codec import encode
from schemas.logs import configure
from schemas.messages import BAND_ORDER, Reply
from schemas.topology import Topology
from worker.engine import Engine, EngineStartError
from worker.runner import ModelChoice, choose_model, engine_config
from worker.service import build_worker
from worker.settings import WorkerSettings

SYSTEM = "You are a helpful assistant. Answer clearly and briefly."
# (prompt, max_tokens): every band gets both kinds, alternating
SHORT = [("What is the capital of France?", 32), ("Name the three primary colours.", 32),
         ("How many days are there in a leap year?", 32), ("What does CPU stand for?", 32),
         ("Translate 'good night' into French.", 32), ("What is the boiling point of water in Celsius?", 32)]
LONG = [("Explain in a short paragraph why a message queue helps a web service absorb bursts of traffic.", 64),
        ("Write a haiku about waiting in a queue.", 64),
        ("Give three tips for writing clear emails, one sentence each.", 64),
        ("Summarise the story of Little Red Riding Hood in three sentences.", 64),
        ("Describe how a priority queue differs from an ordinary queue, with an example.", 64)]
SAMPLES_PER_BAND = 3


def prompt_for(i: int, shift: int = 0) -> tuple[str, int]:
    """Short questions at even i, longer tasks at odd i; ``shift`` varies the start per band."""
    kind = SHORT if i % 2 == 0 else LONG
    return kind[(i // 2 + shift) % len(kind)]


def workload(topology: Topology, low: int, medium: int, high: int) -> list[dict[str, Any]]:
    """Low first (the backlog), then medium, then high, spread over the tenants allowed each band."""
    docs = []
    for band, count in (("low", low), ("medium", medium), ("high", high)):
        rank = [b.value for b in BAND_ORDER].index(band)
        allowed = [t for t, c in topology.tenants.items() if c.max_priority.rank <= rank]
        for i in range(count):
            question, max_tokens = prompt_for(i, shift=2 * rank)
            docs.append({"tenant_id": allowed[i % len(allowed)], "priority": band,
                         "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                         "params": {"max_tokens": max_tokens, "temperature": 0.3, "seed": i},
                         "metadata": {"custom_id": f"{band}-{i}"}})
    return docs


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def table(replies: list[Reply]) -> str:
    rows = [f"{'band':8}{'count':>7}{'ok':>6}{'queue p50':>11}{'queue p95':>11}{'e2e p50':>10}{'e2e p95':>10}{'promoted':>10}"]
    for band in BAND_ORDER:
        mine = [r for r in replies if r.priority is band]
        if not mine:
            continue
        queue = [r.timing.queue_ms for r in mine if r.timing.queue_ms is not None]
        e2e = [r.timing.e2e_ms for r in mine if r.timing.e2e_ms is not None]
        ok = sum(1 for r in mine if r.status.value == "ok")
        promoted = sum(1 for r in mine if r.served_as is not None and r.served_as.rank < band.rank)
        cells = [f"{percentile(v, q):>{w}.0f}ms" if v else f"{'-':>{w + 2}}"
                 for v, q, w in ((queue, 50, 9), (queue, 95, 9), (e2e, 50, 8), (e2e, 95, 8))]
        rows.append(f"{band.value:8}{len(mine):>7}{ok:>6}{''.join(cells)}{promoted:>10}")
    return "\n".join(rows)


def question_of(doc: dict[str, Any]) -> str:
    return doc["messages"][-1]["content"] if "messages" in doc else doc["prompt"]


def shorten(text: str, width: int) -> str:
    """One line, whitespace collapsed, control characters (random models emit them) replaced, cut at a
    word boundary with an ellipsis."""
    printable = "".join(c if c.isprintable() or c.isspace() else "\ufffd" for c in text)
    return textwrap.shorten(" ".join(printable.split()), width=width, placeholder=" …") or "(empty)"


def samples(replies: list[Reply], docs: list[dict[str, Any]], *, per_band: int = SAMPLES_PER_BAND,
            width: int = 100, answer_chars: int = 240) -> str:
    """A few answers of each band, short and long prompts alike, truncated to a few lines each."""
    asked = {d["metadata"]["custom_id"]: d for d in docs}
    lines = []
    for band in BAND_ORDER:
        mine = sorted((r for r in replies if r.priority is band and r.metadata.get("custom_id") in asked),
                      key=lambda r: int(str(r.metadata["custom_id"]).rsplit("-", 1)[1]))
        if not mine:
            continue
        lines.append(f"{band.value}:")
        for reply in mine[:per_band]:
            doc = asked[reply.metadata["custom_id"]]
            lines.append(f"  {reply.tenant_id} asked: {shorten(question_of(doc), width - 14)}")
            if reply.status.value == "ok":
                answer = shorten(reply.text or "", answer_chars)
                if reply.finish_reason == "length" and not answer.endswith("…"):
                    answer += " …"
                if answer.endswith(" …"):
                    answer = answer[:-2] + "\u00a0…"  # wrapped, the ellipsis stays on the last word's line
            else:
                code = reply.error.code.value if reply.error else reply.status.value
                answer = f"[{reply.status.value}: {code}: {reply.error.message if reply.error else ''}]"
            lines.extend(textwrap.wrap(answer, width=width, initial_indent="    -> ", subsequent_indent="       "))
    return "\n".join(lines)


def report(replies: list[Reply], docs: list[dict[str, Any]]) -> str:
    """The latency table, its legend and sample answers per band."""
    return "\n".join([
        table(replies), "",
        "queue = submitted_at to admission; e2e = submitted_at to last token; "
        "promoted = admitted in a higher band by aging", "",
        "Sample answers (all of them: --out FILE):", samples(replies, docs)])


@dataclass
class Console:
    """Where the demo itself writes: the terminal, even while fds 1 and 2 go to the log."""

    out: TextIO
    err: TextIO
    log_path: Path | None  # None with --verbose


@contextlib.contextmanager
def engine_output(log_path: Path, verbose: bool) -> Iterator[Console]:
    """Send everything written to fds 1 and 2 (this process, the broker, vLLM's engine core and its
    workers, which inherit them) to ``log_path``; yield streams that still reach the terminal."""
    if verbose:
        yield Console(sys.stdout, sys.stderr, None)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    out = os.fdopen(os.dup(saved_out), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield Console(out, err, log_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        out.close()
        err.close()


def columns(stream: TextIO) -> int:
    """The terminal's width for progress lines (100 when it does not say, e.g. a pipe or a 0x0 pty)."""
    try:
        width = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        width = 0
    return min(width, 120) if width > 20 else 100


@contextlib.contextmanager
def ticking(console: Console, label: str) -> Iterator[None]:
    """A progress line with the elapsed time while something without progress reports runs."""
    bar = tqdm(total=None, desc=label, bar_format="{desc} {elapsed}", file=console.err, ncols=columns(console.err),
               disable=None)  # None: only on a terminal; a log file gets the plain lines around it
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()


def describe(choice: ModelChoice) -> str:
    if choice.kind == "prepared":
        return f"SmolLM2-135M-Instruct ({choice.path})"
    if choice.kind == "tiny":
        return "the tiny random test model (its answers are random text)"
    return choice.path


async def _run(settings: WorkerSettings, topology: Topology, engine: Engine, docs: list[dict[str, Any]],
               console: Console) -> tuple[list[Reply], float]:
    worker = build_worker(settings, topology, engine)
    serving = asyncio.create_task(worker.run())
    while not worker.intake.assigned:  # group join; publishing earlier would count it as queueing
        if serving.done():
            return [], 0.0
        await asyncio.sleep(0.05)
    started = time.monotonic()
    with Producer(settings, topology, on_quota="wait") as producer:
        for doc in docs:
            producer.submit(doc)
    expected: dict[str, int] = {}
    for doc in docs:
        expected[doc["tenant_id"]] = expected.get(doc["tenant_id"], 0) + 1
    bands = {band.value: 0 for band in BAND_ORDER}
    totals = {band.value: sum(1 for d in docs if d["priority"] == band.value) for band in BAND_ORDER}
    lock = threading.Lock()
    bar = tqdm(total=len(docs), desc="requests answered", unit="req", file=console.err, ncols=columns(console.err),
               disable=None)

    def collect(tenant: str, count: int) -> list[Reply]:
        got = []
        with ResultCollector(settings, topology, tenant) as collector:
            for reply in collector.replies(expect=count, timeout=900):
                got.append(reply)
                with lock:
                    if reply.priority is not None:
                        bands[reply.priority.value] += 1
                    bar.set_postfix_str("  ".join(f"{b} {bands[b]}/{n}" for b, n in totals.items() if n),
                                        refresh=False)
                    bar.update(1)
        return got

    try:
        batches = await asyncio.gather(*(asyncio.to_thread(collect, t, n) for t, n in expected.items()))
    finally:
        bar.close()
    elapsed = time.monotonic() - started
    worker.request_stop()
    await serving
    return [r for batch in batches for r in batch], elapsed


def run_demo(settings: WorkerSettings, *, low: int, medium: int, high: int, out: Path | None = None,
             verbose: bool = False) -> int:
    configure(level="INFO" if verbose else "WARNING")
    topology = settings.load_topology()
    docs = workload(topology, low, medium, high)
    choice = choose_model(settings, topology)
    with engine_output(settings.state_dir / "demo.log", verbose) as console:
        def say(line: str) -> None:
            print(f"tierq demo: {line}", file=console.err, flush=True)

        if choice.warning:
            say(f"warning: {choice.warning}")
        say(f"model: {describe(choice)}")
        if console.log_path is not None:
            say(f"engine, broker and worker logs: {console.log_path} (--verbose shows them here)")
        with local_broker(settings, topology) as local:
            say(f"broker {local.bootstrap_servers}; {len(docs)} requests "
                f"(low {low} first, then medium {medium}, then high {high})")
            try:
                with ticking(console, "tierq demo: starting the vLLM engine (20-60 s on a CPU)"):
                    started = time.monotonic()
                    engine = Engine.start(engine_config(local, topology, choice))
                say(f"engine started in {time.monotonic() - started:.0f} s")
            except EngineStartError as exc:
                say(f"error: {exc}" + (f" (details: {console.log_path})" if console.log_path else ""))
                return 3
            try:
                replies, elapsed = asyncio.run(_run(local, topology, engine, docs, console))
            except KeyboardInterrupt:
                say("interrupted; stopping")
                return 130
            finally:
                with ticking(console, "tierq demo: stopping the engine"):
                    engine.shutdown()
        rate = f" ({len(replies) / elapsed:.1f} req/s)" if elapsed else ""
        print(f"\n{len(replies)} of {len(docs)} requests answered in {elapsed:.1f} s{rate} by worker "
              f"{settings.worker_id}, model: {describe(choice)}\n", file=console.out)
        print(report(replies, docs), file=console.out, flush=True)
        if choice.kind == "tiny":
            say("these answers are random: run `tierq model prepare` for a real model" if choice.warning else
                "these answers are random (--model tiny)")
    if out is not None:
        out.write_bytes(b"".join(encode(r) + b"\n" for r in replies))
    return 0 if len(replies) == len(docs) else 1
