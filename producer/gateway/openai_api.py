"""OpenAI wire shapes: error bodies, HTTP status per tierq error code, completion responses."""

from __future__ import annotations

import math
import time
from typing import Any

from schemas.messages import Choice, ErrorCode, Reply, Status

#: The HTTP status a tierq error code becomes.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 400,
    ErrorCode.unsupported_schema: 400,
    ErrorCode.prompt_too_long: 400,
    ErrorCode.unknown_tenant: 401,
    ErrorCode.unknown_pool: 403,
    ErrorCode.forbidden_priority: 403,
    ErrorCode.forbidden_pool: 403,
    ErrorCode.quota_exceeded: 429,
    ErrorCode.deadline_exceeded: 504,
    ErrorCode.engine_error: 502,
    ErrorCode.cancelled: 503,
}

_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and headers)."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPE.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}


def api_error_for(code: ErrorCode, message: str, retry_after: float | None = None) -> ApiError:
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return ApiError(HTTP_STATUS.get(code, 500), code.value, message, headers=headers)


def reply_error(reply: Reply) -> ApiError | None:
    """The ApiError for a reply that is not ``ok``; None for a good reply."""
    if reply.status is Status.ok:
        return None
    assert reply.error is not None
    if reply.status is Status.expired:
        return ApiError(504, reply.error.code.value, reply.error.message)
    return api_error_for(reply.error.code, reply.error.message)


def _created(reply: Reply) -> int:
    finished = reply.timing.finished_at
    return int(finished.timestamp()) if finished is not None else int(time.time())


def _usage(reply: Reply) -> dict[str, int]:
    prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choices(reply: Reply) -> list[Choice]:
    """Every output of an ``ok`` reply: its ``choices``, or the one its ``text`` carries."""
    if reply.choices:
        return list(reply.choices)
    return [Choice(index=0, text=reply.text or "", finish_reason=reply.finish_reason,
                   completion_tokens=reply.usage.completion_tokens)]


def chat_logprobs(choice: Choice) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}``."""
    if choice.logprobs is None:
        return None
    return {"content": [t.model_dump(mode="json") for t in choice.logprobs], "refusal": None}


def completion_logprobs(choice: Choice) -> dict[str, Any] | None:
    """OpenAI's legacy completions ``logprobs`` object: parallel lists per output token;
    ``text_offset`` counts characters from the start of the generated text."""
    if choice.logprobs is None:
        return None
    offsets, at = [], 0
    for token in choice.logprobs:
        offsets.append(at)
        at += len(token.token)
    return {"tokens": [t.token for t in choice.logprobs], "token_logprobs": [t.logprob for t in choice.logprobs],
            "top_logprobs": [{alt.token: alt.logprob for alt in t.top_logprobs} for t in choice.logprobs],
            "text_offset": offsets}


def completion_body(reply: Reply, chat: bool, model: str) -> dict[str, Any]:
    """An OpenAI ``text_completion`` or ``chat.completion`` object for an ``ok`` reply: one choice
    per output (``n``), each with its ``logprobs`` object when they were asked for."""
    if chat:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c), "finish_reason": c.finish_reason} for c in _choices(reply)]
        return {"id": f"chatcmpl-{reply.request_id}", "object": "chat.completion", "created": _created(reply),
                "model": model, "choices": choices, "usage": _usage(reply)}
    choices = [{"index": c.index, "text": c.text, "logprobs": completion_logprobs(c), "finish_reason": c.finish_reason}
               for c in _choices(reply)]
    return {"id": f"cmpl-{reply.request_id}", "object": "text_completion", "created": _created(reply),
            "model": model, "choices": choices, "usage": _usage(reply)}


def stream_chunks(reply: Reply, chat: bool, model: str) -> list[dict[str, Any]]:
    """A whole reply as SSE chunks (for requests whose tokens are not streamed through Kafka,
    e.g. ``n`` > 1 or logprobs): each choice's text in one chunk, then one closing chunk per
    choice, the last with the usage."""
    created, choices = _created(reply), _choices(reply)
    if chat:
        base = {"id": f"chatcmpl-{reply.request_id}", "object": "chat.completion.chunk", "created": created,
                "model": model}
        texts = [{**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": c.text},
                                       "logprobs": chat_logprobs(c), "finish_reason": None}]} for c in choices]
        ends = [{**base, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                      "finish_reason": c.finish_reason}]} for c in choices]
    else:
        base = {"id": f"cmpl-{reply.request_id}", "object": "text_completion", "created": created, "model": model}
        texts = [{**base, "choices": [{"index": c.index, "text": c.text, "logprobs": completion_logprobs(c),
                                       "finish_reason": None}]} for c in choices]
        ends = [{**base, "choices": [{"index": c.index, "text": "", "logprobs": None,
                                      "finish_reason": c.finish_reason}]} for c in choices]
    ends[-1]["usage"] = _usage(reply)
    return texts + ends
