"""Server-sent events for ``stream: true``: the worker's chunks as OpenAI chunk objects.

A streamed request's chunks arrive on the tenant's reply topic before its reply. After a worker
crash the retry starts the text over (a higher ``attempt``, ``offset`` from 0), so the client
must not see the same words twice: ``TextStream`` keeps the text already sent and passes on only
what extends it. A retry whose text differs from what was sent (sampling with temperature > 0 is
not repeatable) cannot be continued: the stream ends with an error event instead of garbled
text. The reply closes the stream with its finish reason (and usage, when the client asked
with ``stream_options.include_usage``); it also fills in any text whose chunks were missed.
"""

from __future__ import annotations

import time
from typing import Any

from schemas.messages import Chunk, Reply


class StreamDiverged(Exception):
    """A retry produced different text from what the client already has."""


class TextStream:
    """The text of one streamed request as sent to the client, fed with chunks and the reply."""

    def __init__(self) -> None:
        self.sent = ""
        self.attempt = 0

    def chunk(self, chunk: Chunk) -> str:
        """The part of this chunk the client has not seen ('' if none); chunks of an attempt older
        than the newest seen are stale."""
        if chunk.attempt < self.attempt:
            return ""
        self.attempt = chunk.attempt
        return self._extend(chunk.offset, chunk.delta)

    def reply(self, reply: Reply) -> str:
        """What the reply's text adds to what was sent (usually nothing)."""
        return self._extend(0, reply.text or "")

    def _extend(self, offset: int, delta: str) -> str:
        if offset > len(self.sent):  # an earlier chunk is missing: wait for the reply, which has it all
            return ""
        overlap = self.sent[offset:offset + len(delta)]
        if not delta.startswith(overlap):
            raise StreamDiverged(f"the retry's text differs from the text already streamed at character {offset}")
        new = delta[len(overlap):]
        self.sent += new
        return new


class ChunkFormat:
    """OpenAI ``chat.completion.chunk`` / ``text_completion`` chunk objects for one request."""

    def __init__(self, request_id: str, chat: bool, model: str, include_usage: bool):
        self.chat = chat
        self.include_usage = include_usage
        self._role_sent = False
        self._base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
                      "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": int(time.time()), "model": model}

    def text(self, text: str) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if not self._role_sent:
                delta = {"role": "assistant", "content": text}
                self._role_sent = True
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return self._chunk([choice])

    def finish(self, reply: Reply) -> list[dict[str, Any]]:
        """The closing chunk(s): finish reason, then usage on its own if asked (as OpenAI does)."""
        if self.chat:
            delta: dict[str, Any] = {} if self._role_sent else {"role": "assistant", "content": ""}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": reply.finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reply.finish_reason}
        chunks = [self._chunk([choice])]
        if self.include_usage:
            prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
            chunks.append({**self._chunk([]), "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                        "total_tokens": prompt + completion}})
        return chunks

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self._base, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk


def error_event(code: str, message: str) -> dict[str, Any]:
    """An error inside a stream that already started (the status line was 200): the openai
    clients raise it as an APIError."""
    return {"error": {"message": message, "type": "api_error", "param": None, "code": code}}
