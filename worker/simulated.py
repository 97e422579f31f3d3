"""A simulated engine: the worker runs unchanged, no model and no GPU, and time passes as on a GPU.

For load tests of a Kafka deployment (partition counts, consumer groups, autoscaling) and for
benchmarks that run many workers on one small machine. It has ``Engine``'s interface and models
vLLM's continuous batching with its priority scheduler:

- at most ``max_num_seqs`` sequences run at once; the others wait in the engine's own queue,
  lowest ``priority`` number first, then arrival order (vLLM's ``scheduling_policy="priority"``);
- the engine advances in steps, each ``decode_base_ms + decode_per_seq_ms * batch`` plus
  ``prefill_ms_per_token`` times the prompt tokens of the sequences that join in that step, all
  divided by ``speed`` (2.0 = a GPU twice as fast); every running sequence gets one token per step
  (a joining one its first), and a sequence finishes after ``max_tokens`` tokens ("length");
- a waiting request joins at the start of the first step that has a free slot; cancelling a
  ``generate`` call removes its sequence at once, so the next step can admit a waiting one.

Default times come from published measurements of Llama-3.1-8B-Instruct on one NVIDIA H100:

- decode: InferenceBench, "Recipe: concurrency sweep"
  (https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/): Llama-3.1-8B-Instruct, fp16,
  vLLM 0.21.0, one H100-80GB-HBM3; median time per output token 6.48 ms at concurrency 1,
  6.59 ms at 4, 10.94 ms at 16 (46.91 ms at 64). The line through 1 and 16 gives
  ``decode_base_ms = 6.2`` and ``decode_per_seq_ms = 0.3``; it is within 12% at 4 and
  underestimates past 16 (25 ms at 64 against the 47 ms measured there, where TTFT p99 hit 465 ms).
- prefill: io.net, "TTFT optimization" (https://io.net/p/ttft-optimization-how-to-reduce-time-to-first-token-by-70):
  Llama 3.1 8B on an H100 SXM, time to first token 12 ms for a 512-token prompt and 45 ms for 4K;
  the slope (45 - 12) / (4096 - 512) gives ``prefill_ms_per_token = 0.0092`` (the model then says
  11 ms and 44 ms for a lone request).
- ``speed``: the same model on an A100-40GB decodes ~75 tokens/s single-stream (13.3 ms a token;
  https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on, vLLM), so ``speed=0.5`` approximates it.

Prompts are not tokenized: ~1 token per 4 UTF-8 bytes (chat: the contents plus a few tokens a
message). The text is a deterministic filler and ``Completion.simulated`` is True.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from schemas.messages import Choice, Request, utc_now
from worker.engine import Completion, EngineDead, Progress, check_length

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

BYTES_PER_TOKEN = 4  # a common rule of thumb for English text with BPE tokenizers
TOKENS_PER_MESSAGE = 4  # role and separators around each chat message
TOKENS_PER_CHAT = 3  # the assistant turn's header after the last message
FILLER = "tok "  # the text of one simulated token
FILLER_TOKEN_ID = 1
CATCH_UP_LIMIT_S = 0.05  # a step that starts later than this behind schedule resets the schedule


@dataclass(frozen=True)
class SimParams:
    """The engine's cost model; times in ms on the reference GPU, divided by ``speed``."""

    decode_base_ms: float = 6.2
    decode_per_seq_ms: float = 0.3
    prefill_ms_per_token: float = 0.0092
    speed: float = 1.0
    max_num_seqs: int = 16
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"speed must be > 0, not {self.speed}")
        if min(self.decode_base_ms, self.decode_per_seq_ms, self.prefill_ms_per_token) < 0:
            raise ValueError("simulated engine times must be >= 0")
        if self.max_num_seqs < 1 or self.max_model_len < 2:
            raise ValueError("max_num_seqs must be >= 1 and max_model_len >= 2")

    def step_s(self, batch: int, joining_prompt_tokens: int) -> float:
        """Seconds one step takes with ``batch`` sequences running, of which new ones bring these prompt tokens."""
        ms = self.decode_base_ms + self.decode_per_seq_ms * batch + self.prefill_ms_per_token * joining_prompt_tokens
        return ms / self.speed / 1000.0


@dataclass(frozen=True)
class Step:
    """What one step did: the engine's own accounting (``duration_s`` is modelled time)."""

    index: int
    batch: int
    joined: tuple[str, ...]
    finished: tuple[str, ...]
    prompt_tokens: int
    duration_s: float


@dataclass(eq=False, slots=True)  # one per request: slots, no instance dict to make
class _Seq:
    request_id: str
    priority: int
    arrival: int
    prompt_tokens: int
    max_tokens: int
    future: asyncio.Future[None]
    progress: Progress | None = None
    generated: int = 0
    first_token_at: datetime | None = None
    finished_at: datetime | None = None


Sleep = Callable[[float], Awaitable[object]]


@dataclass(eq=False)
class SimulatedEngine:
    """``Engine``'s interface over a modelled GPU. ``sleep`` and ``clock`` are injectable for tests."""

    params: SimParams = field(default_factory=SimParams)
    sleep: Sleep = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    step_log: int = 1000  # how many recent steps ``steps`` keeps

    def __post_init__(self) -> None:
        self.max_model_len = self.params.max_model_len
        self.steps: deque[Step] = deque(maxlen=self.step_log)
        self.step_count = 0
        self.tokens_generated = 0
        self.modelled_s = 0.0  # total modelled busy time
        #: heap of (priority, arrival, seq): tuples compare in C (a Python __lt__ was ~6 calls a request)
        self._waiting: list[tuple[int, int, _Seq]] = []
        self._running: list[_Seq] = []
        self._arrivals = itertools.count()
        self._driver: asyncio.Task[None] | None = None
        self._deadline: float | None = None
        self._shut = False

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> SimulatedEngine:
        sim = settings.simulated
        params = SimParams(decode_base_ms=sim.decode_base_ms, decode_per_seq_ms=sim.decode_per_seq_ms,
                           prefill_ms_per_token=sim.prefill_ms_per_token, speed=sim.speed,
                           max_num_seqs=settings.max_num_seqs,
                           max_model_len=settings.max_model_len or SimParams.max_model_len)
        return cls(params)

    # -- the Engine interface -------------------------------------------------------------------

    def render(self, request: Request) -> list[int]:
        """Approximate prompt tokens (no tokenizer): ~1 per 4 UTF-8 bytes, plus a few per chat message."""
        if request.messages is not None:
            count = TOKENS_PER_CHAT + sum(
                TOKENS_PER_MESSAGE + _approx_tokens(m.content) for m in request.messages)
        else:
            assert request.prompt is not None
            count = max(1, _approx_tokens(request.prompt))
        return [FILLER_TOKEN_ID] * count

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        check_length(prompt_tokens, max_tokens, self.max_model_len)

    async def generate(self, request: Request, prompt_ids: list[int], priority: int,
                       progress: Progress | None = None) -> Completion:
        """Queue the sequence, wait for its last token; cancelling the awaiting task removes it at once.
        ``progress`` gets each token's filler as the step that made it ends."""
        if self._shut:
            raise EngineDead("the simulated engine was shut down")
        seq = _Seq(request.request_id, priority, next(self._arrivals), len(prompt_ids), request.params.max_tokens,
                   asyncio.get_running_loop().create_future(), progress)
        heapq.heappush(self._waiting, (seq.priority, seq.arrival, seq))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive(), name="tierq-simulated-engine")
        try:
            await seq.future
        except asyncio.CancelledError:
            self._remove(seq)
            raise
        assert seq.finished_at is not None
        return _completion(request, seq)

    @property
    def dead(self) -> bool:
        return self._shut

    def shutdown(self) -> None:
        """Stop stepping; sequences still queued or running fail with ``EngineDead``."""
        self._shut = True
        for seq in [*self._running, *(entry[2] for entry in self._waiting)]:
            if not seq.future.done() and not seq.future.get_loop().is_closed():
                seq.future.set_exception(EngineDead("the simulated engine was shut down"))
        self._running.clear()
        self._waiting.clear()
        driver, self._driver = self._driver, None
        if driver is not None and not driver.done() and not driver.get_loop().is_closed():
            driver.cancel()

    # -- state, for tests and for whoever watches the engine ----------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the step loop ---------------------------------------------------------------------------

    def _remove(self, seq: _Seq) -> None:
        if seq in self._running:
            self._running.remove(seq)
        elif (entry := (seq.priority, seq.arrival, seq)) in self._waiting:
            self._waiting.remove(entry)
            heapq.heapify(self._waiting)

    async def _drive(self) -> None:
        """One task steps the engine while anything runs or waits, then ends (the next request restarts it)."""
        self._deadline = None
        while not self._shut and (self._running or self._waiting):
            # a cancelled generate() has cancelled its future at once; its task may not have run yet
            self._running = [seq for seq in self._running if not seq.future.done()]
            joined: list[_Seq] = []
            while self._waiting and len(self._running) < self.params.max_num_seqs:
                seq = heapq.heappop(self._waiting)[2]
                if seq.future.done():
                    continue
                self._running.append(seq)
                joined.append(seq)
            if not self._running:
                continue
            prompt_tokens = sum(seq.prompt_tokens for seq in joined)
            batch = len(self._running)
            duration = self.params.step_s(batch, prompt_tokens)
            await self._sleep_step(duration)
            finished = self._advance()
            self.step_count += 1
            self.modelled_s += duration
            self.steps.append(Step(self.step_count, batch, tuple(s.request_id for s in joined),
                                   tuple(s.request_id for s in finished), prompt_tokens, duration))
        self._driver = None

    async def _sleep_step(self, duration: float) -> None:
        """Sleep to the step's end on a schedule, so event-loop lateness does not add up over many steps;
        far behind (a busy machine), the schedule restarts from now instead of bursting to catch up."""
        now = self.clock()
        if self._deadline is None or now - self._deadline > CATCH_UP_LIMIT_S:
            self._deadline = now
        self._deadline += duration
        await self.sleep(max(0.0, self._deadline - now))

    def _advance(self) -> list[_Seq]:
        """Every running sequence gets one token; those at max_tokens finish and leave the batch."""
        now = utc_now()
        finished: list[_Seq] = []
        for seq in self._running:
            if seq.future.done():  # cancelled during this step
                continue
            seq.generated += 1
            self.tokens_generated += 1
            if seq.progress is not None:
                seq.progress.add(FILLER, 1)
            if seq.first_token_at is None:
                seq.first_token_at = now
            if seq.generated >= seq.max_tokens:
                seq.finished_at = now
                finished.append(seq)
                seq.future.set_result(None)
        self._running = [seq for seq in self._running if not seq.future.done()]
        return finished


def _completion(request: Request, seq: _Seq) -> Completion:
    """Filler text, ``n`` identical outputs (the model runs one sequence for them all) and no
    logprobs: nothing in a simulated reply (``simulated: true``) came from a model."""
    text, n = FILLER * seq.generated, request.params.n
    choices = tuple(Choice(index=i, text=text, finish_reason="length", completion_tokens=seq.generated)
                    for i in range(n)) if n > 1 else ()
    # positional: a NamedTuple made with keywords goes through a slower path (one per request)
    return Completion(text, "length", seq.prompt_tokens, seq.generated * n, seq.first_token_at, seq.finished_at,
                      True, choices)


def _approx_tokens(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)
