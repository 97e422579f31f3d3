"""The vLLM engine adapter: one long-lived ``AsyncLLM`` in priority mode.

Errors follow vLLM's split: ``RequestRejected`` (this request is bad: a reply with its
code), ``EngineRequestError`` (this request failed inside the engine: ``engine_error``),
``EngineDead`` (the engine is gone: stop consuming, commit nothing more, exit non-zero
so the launcher restarts the process).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from schemas.messages import ErrorCode, Request, utc_now


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


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    first_token_at: datetime | None
    finished_at: datetime
    simulated: bool = False  # True when made by worker.simulated.SimulatedEngine (no model ran)


class EngineAdapter(Protocol):
    """What the worker needs of an engine: ``Engine`` (vLLM) or ``SimulatedEngine`` (load tests)."""

    max_model_len: int

    def render(self, request: Request) -> list[int]: ...

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None: ...

    async def generate(self, request: Request, prompt_ids: list[int], priority: int) -> Completion:
        """One completion; cancelling the awaiting task aborts it and frees its slot."""
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
    def start(cls, config: EngineConfig) -> Engine:
        """Build the engine (tens of seconds on the CPU); raise ``EngineStartError`` with the cause."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineStartError(
                f"vLLM is not installed ({exc}); install tierq[cpu] or tierq[gpu]"
            ) from None
        try:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**config.engine_args()))
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
                seed=p.seed, output_kind=RequestOutputKind.DELTA,
            )
        except (ValueError, TypeError) as exc:
            raise RequestRejected(ErrorCode.invalid_request, f"params: {exc}") from None

    async def generate(self, request: Request, prompt_ids: list[int], priority: int) -> Completion:
        """Generate one completion; cancelling the awaiting task aborts it in the engine."""
        params = self.sampling_params(request)
        prompt = {"prompt_token_ids": prompt_ids, "cache_salt": request.tenant_id}
        pieces: list[str] = []
        first_token_at = None
        completion_tokens = 0
        finish_reason = None
        try:
            async for output in self._llm.generate(prompt, params, request_id=request.request_id, priority=priority):
                delta = output.outputs[0]
                if delta.token_ids and first_token_at is None:
                    first_token_at = utc_now()
                completion_tokens += len(delta.token_ids)
                pieces.append(delta.text)
                if output.finished:
                    finish_reason = delta.finish_reason
        except Exception as exc:
            raise self._classify(exc) from exc
        return Completion("".join(pieces), finish_reason, len(prompt_ids), completion_tokens, first_token_at,
                          utc_now())

    @staticmethod
    def _classify(exc: Exception) -> Exception:
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            return EngineDead(str(exc))
        if isinstance(exc, ValueError):
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
