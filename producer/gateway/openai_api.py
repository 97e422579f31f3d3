"""OpenAI wire shapes: error bodies, HTTP status per tierq error code, completion responses."""

from __future__ import annotations

import math
import time
from typing import Any

from schemas.messages import ErrorCode, Reply, Status

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


def completion_body(reply: Reply, chat: bool, model: str) -> dict[str, Any]:
    """An OpenAI ``text_completion`` or ``chat.completion`` object for an ``ok`` reply."""
    text = reply.text or ""
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": reply.finish_reason}
        return {"id": f"chatcmpl-{reply.request_id}", "object": "chat.completion", "created": _created(reply),
                "model": model, "choices": [choice], "usage": _usage(reply)}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reply.finish_reason}
    return {"id": f"cmpl-{reply.request_id}", "object": "text_completion", "created": _created(reply),
            "model": model, "choices": [choice], "usage": _usage(reply)}


def stream_chunks(reply: Reply, chat: bool, model: str) -> list[dict[str, Any]]:
    """The whole completion as SSE chunks: workers publish complete replies, not tokens,
    so a streaming client gets the text in one chunk once it is done."""
    text, created = reply.text or "", _created(reply)
    if chat:
        base = {"id": f"chatcmpl-{reply.request_id}", "object": "chat.completion.chunk", "created": created,
                "model": model}
        return [
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reply.finish_reason}],
             "usage": _usage(reply)},
        ]
    base = {"id": f"cmpl-{reply.request_id}", "object": "text_completion", "created": created, "model": model}
    return [
        {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": reply.finish_reason}],
         "usage": _usage(reply)},
    ]
