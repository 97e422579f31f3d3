"""The vLLM engine adapter: one long-lived ``AsyncLLM`` in priority mode.

Errors follow vLLM's split: ``RequestRejected`` (this request is bad: a reply with its
code), ``EngineRequestError`` (this request failed inside the engine: ``engine_error``),
``EngineDead`` (the engine is gone: stop consuming, commit nothing more, exit non-zero
so the launcher restarts the process).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from schemas.messages import Choice, ErrorCode, Request, ResponseFormat, TokenLogprob, TopLogprob, utc_now


class EngineStartError(RuntimeError):
    """The engine could not be built (bad model path, out of memory, ...)."""


class RequestRejected(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class EngineRequestError(Exception):
    """The engine failed this request but is still alive."""


class EngineDead(Exception):
    """The engine process died; the worker must stop."""


@dataclass(frozen=True)
class EngineConfig:
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 16
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    extra: dict[str, Any] | None = None

    def engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "max_num_seqs": self.max_num_seqs,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "scheduling_policy": "priority",
            "disable_log_stats": True,
        }
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        args.update(self.extra or {})
        return args


class Completion(NamedTuple):
    """One finished generation. A NamedTuple, not a frozen dataclass: immutable as well, and made
    in a third of the time (one per request; a frozen dataclass sets each field through
    ``object.__setattr__``)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    first_token_at: datetime | None
    finished_at: datetime
    simulated: bool = False  # True when made by worker.simulated.SimulatedEngine (no model ran)
    choices: tuple[Choice, ...] = ()  # every output, when the request asked for n > 1 or logprobs


#: A log probability JSON can carry (it has no -inf).
LOWEST_LOGPROB = -9999.0


class Outputs:
    """A request's ``n`` outputs as vLLM streams them: deltas, each tagged with its output's index."""

    def __init__(self, n: int = 1, logprobs: int | None = None):
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._tokens = [0] * n
        self._finish: list[str | None] = [None] * n
        self._top = logprobs
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]

    def add(self, delta: Any) -> None:
        """One ``CompletionOutput`` delta."""
        i = delta.index
        self._texts[i].append(delta.text)
        self._tokens[i] += len(delta.token_ids)
        if delta.finish_reason is not None:
            self._finish[i] = delta.finish_reason
        if self._top is not None and delta.logprobs:
            self._logprobs[i] += token_logprobs(delta.token_ids, delta.logprobs, self._top)

    @property
    def completion_tokens(self) -> int:
        return sum(self._tokens)

    def finish_reason(self, index: int = 0) -> str | None:
        return self._finish[index]

    def choices(self) -> tuple[Choice, ...]:
        """Every output, or none when one output without logprobs was asked for (the reply's text says it all)."""
        if len(self._texts) == 1 and self._top is None:
            return ()
        return tuple(Choice(index=i, text="".join(self._texts[i]), finish_reason=self._finish[i],
                            completion_tokens=self._tokens[i],
                            logprobs=self._logprobs[i] if self._top is not None else None)
                     for i in range(len(self._texts)))


def token_logprobs(token_ids: Any, positions: Any, top: int) -> list[TokenLogprob]:
    """vLLM's per-position ``{token_id: Logprob}`` as OpenAI's objects: the chosen token's log
    probability and the ``top`` most likely tokens (vLLM adds the chosen one even when it ranks lower)."""
    result = []
    for token_id, candidates in zip(token_ids, positions):
        ranked = sorted((c for c in candidates.values() if c.rank is not None and c.rank <= top),
                        key=lambda c: c.rank)[:top]
        chosen = candidates.get(token_id)
        text = (chosen.decoded_token if chosen is not None else None) or ""
        result.append(TokenLogprob(
            token=text, logprob=_finite(chosen.logprob if chosen is not None else None),
            bytes=list(text.encode("utf-8")),
            top_logprobs=[TopLogprob(token=c.decoded_token or "", logprob=_finite(c.logprob),
                                     bytes=list((c.decoded_token or "").encode("utf-8"))) for c in ranked],
        ))
    return result


def _finite(logprob: float | None) -> float:
    return LOWEST_LOGPROB if logprob is None or logprob != logprob else max(float(logprob), LOWEST_LOGPROB)


def structured_outputs(response_format: ResponseFormat | None) -> Any:
    """vLLM's ``StructuredOutputsParams`` for a ``response_format`` (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    assert response_format.json_schema is not None
    return StructuredOutputsParams(json=dict(response_format.json_schema.schema_))


class Progress:
    """What a generation has made so far, kept up to date by the engine as tokens arrive: a streamed
    request's chunks are cut from ``on_delta`` calls, and a cancelled one still reports its usage."""

    def __init__(self, on_delta: Callable[[str, int], None] | None = None):
        self.pieces: list[str] = []
        self.completion_tokens = 0
        self.first_token_at: datetime | None = None
        self._on_delta = on_delta

    def add(self, text: str, tokens: int) -> None:
        if tokens and self.first_token_at is None:
            self.first_token_at = utc_now()
        self.completion_tokens += tokens
        if text:
            self.pieces.append(text)
        if self._on_delta is not None and (text or tokens):
            self._on_delta(text, tokens)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class EngineAdapter(Protocol):
    """What the worker needs of an engine: ``Engine`` (vLLM) or ``SimulatedEngine`` (load tests)."""

    max_model_len: int

    def render(self, request: Request) -> list[int]: ...

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None: ...

    async def generate(self, request: Request, prompt_ids: list[int], priority: int,
                       progress: Progress | None = None) -> Completion:
        """One completion; cancelling the awaiting task aborts it and frees its slot. ``progress``
        sees each new piece of text as it is made."""
        ...

    @property
    def dead(self) -> bool: ...

    def shutdown(self) -> None: ...


def check_length(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Reject a request that does not fit the model's context (shared by every engine)."""
    if prompt_tokens >= max_model_len:
        raise RequestRejected(
            ErrorCode.prompt_too_long,
            f"prompt has {prompt_tokens} tokens; the model allows {max_model_len} in all",
        )
    if prompt_tokens + max_tokens > max_model_len:
        raise RequestRejected(
            ErrorCode.invalid_request,
            f"params.max_tokens: {max_tokens} + {prompt_tokens} prompt tokens exceeds the model's "
            f"{max_model_len}; at most {max_model_len - prompt_tokens} fit",
        )


class Engine:
    """Renders prompts, checks them against the model's limits, and streams generations."""

    def __init__(self, llm: Any, tokenizer: Any, max_model_len: int):
        self._llm = llm
        self._tokenizer = tokenizer
        self.max_model_len = max_model_len

    @classmethod
    def start(cls, config: EngineConfig, stat_loggers: list[Any] | None = None) -> Engine:
        """Build the engine (tens of seconds on the CPU); raise ``EngineStartError`` with the cause.

        ``stat_loggers``: vLLM stat logger factories (``(vllm_config, engine_index) -> StatLoggerBase``),
        called with the engine's per-step scheduler stats; with any, vLLM computes its stats each step
        (a little CPU in the engine core and here) even though ``disable_log_stats`` stays set."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineStartError(
                f"vLLM is not installed ({exc}); install tierq[cpu] or tierq[gpu]"
            ) from None
        try:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**config.engine_args()), stat_loggers=stat_loggers)
        except Exception as exc:  # vLLM raises many types here; all mean "cannot start"
            raise EngineStartError(f"cannot start vLLM for model {config.model!r}: {exc}") from exc
        engine = cls(llm, llm.get_tokenizer(), llm.model_config.max_model_len)
        # vLLM's imports above keep this frame alive (a frame of the import chain is held for good), and
        # with it its locals: an `llm` left here outlives shutdown() and AsyncLLM.__del__ runs at
        # interpreter exit, when its module globals are gone (TypeError: 'NoneType' object is not callable)
        del llm
        return engine

    def render(self, request: Request) -> list[int]:
        """Prompt token ids; chat messages go through the model's chat template."""
        if request.messages is not None:
            messages = [m.model_dump() for m in request.messages]
            try:
                text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:
                raise RequestRejected(ErrorCode.invalid_request, f"messages: cannot apply chat template: {exc}")
            return list(self._tokenizer.encode(text, add_special_tokens=False))
        assert request.prompt is not None
        return list(self._tokenizer.encode(request.prompt))

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        check_length(prompt_tokens, max_tokens, self.max_model_len)

    def sampling_params(self, request: Request) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        try:
            return SamplingParams(
                max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, stop=p.stop or None,
                seed=p.seed, output_kind=RequestOutputKind.DELTA, n=p.n, logprobs=p.logprobs,
                structured_outputs=structured_outputs(p.response_format),
            )
        except (ValueError, TypeError) as exc:
            raise RequestRejected(ErrorCode.invalid_request, f"params: {exc}") from None

    async def generate(self, request: Request, prompt_ids: list[int], priority: int,
                       progress: Progress | None = None) -> Completion:
        """Generate one completion; cancelling the awaiting task aborts it in the engine."""
        params = self.sampling_params(request)
        prompt = {"prompt_token_ids": prompt_ids, "cache_salt": request.tenant_id}
        made = progress if progress is not None else Progress()
        outputs = Outputs(request.params.n, request.params.logprobs)
        try:
            async for output in self._llm.generate(prompt, params, request_id=request.request_id, priority=priority):
                for delta in output.outputs:  # with n > 1, a delta of each output that advanced
                    outputs.add(delta)
                    if delta.index == 0:  # a streamed request streams its first output
                        made.add(delta.text, len(delta.token_ids))
        except Exception as exc:
            raise self._classify(exc) from exc
        return Completion(made.text, outputs.finish_reason(0), len(prompt_ids), outputs.completion_tokens,
                          made.first_token_at, utc_now(), choices=outputs.choices())

    @staticmethod
    def _classify(exc: Exception) -> Exception:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            from vllm.exceptions import VLLMClientError
        except ImportError:  # older vLLM: request errors are ValueErrors
            VLLMClientError = ValueError  # noqa: N806
        if isinstance(exc, EngineDeadError):
            return EngineDead(str(exc))
        if isinstance(exc, (ValueError, VLLMClientError)):  # e.g. a JSON schema the grammar backend refuses
            return RequestRejected(ErrorCode.invalid_request, str(exc))
        return EngineRequestError(f"{type(exc).__name__}: {exc}")

    @property
    def dead(self) -> bool:
        return self._llm is None or bool(getattr(self._llm, "errored", False))

    def shutdown(self) -> None:
        """Stop the engine core; drop our reference so vLLM's __del__ does not shut down twice at exit."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            del llm
            gc.collect()
