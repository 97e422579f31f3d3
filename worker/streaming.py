"""Streaming: a streamed request's text as ordered ``tierq.chunk/v1`` records.

The first chunk goes out as soon as the first token exists: time to first token is what a
person waiting on a chat feels. After that, text is coalesced so that a long answer is not one
record per token: a chunk is cut once ``interval`` has passed since the previous one or it holds
``size`` tokens, and both double after every chunk up to a cap (growing batches: the opening
words flow at once, a long tail costs few records). ``finish`` sends what is left as the
attempt's ``last`` chunk; the reply follows it on the same partition.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from schemas.messages import Chunk

FIRST_INTERVAL_S = 0.02
MAX_INTERVAL_S = 0.25
FIRST_SIZE = 4  # tokens
MAX_SIZE = 64


class ChunkStream:
    """Cuts one attempt's text into chunks; ``on_delta`` is the engine's ``Progress`` callback."""

    def __init__(self, request_id: str, tenant_id: str, attempt: int, send: Callable[[Chunk], None],
                 clock: Callable[[], float] = time.monotonic):
        self.request_id = request_id
        self.tenant_id = tenant_id
        self.attempt = attempt
        self._send = send
        self._clock = clock
        self.index = 0
        self._sent_chars = 0
        self._total_tokens = 0
        self._pending: list[str] = []
        self._pending_tokens = 0
        self._last_cut = clock()
        self._interval = FIRST_INTERVAL_S
        self._size = FIRST_SIZE

    def on_delta(self, text: str, tokens: int) -> None:
        self._pending.append(text)
        self._pending_tokens += tokens
        self._total_tokens += tokens
        first = self.index == 0
        if (first or self._pending_tokens >= self._size
                or self._clock() - self._last_cut >= self._interval):
            self._cut(last=False)
            if not first:
                self._interval = min(self._interval * 2, MAX_INTERVAL_S)
                self._size = min(self._size * 2, MAX_SIZE)

    def finish(self) -> None:
        """The attempt ended (finished or cancelled): send what is left, marked last."""
        self._cut(last=True)

    def _cut(self, last: bool) -> None:
        delta = "".join(self._pending)
        self._send(Chunk(request_id=self.request_id, tenant_id=self.tenant_id, attempt=self.attempt,
                         index=self.index, offset=self._sent_chars, delta=delta, tokens=self._pending_tokens,
                         completion_tokens=self._total_tokens, last=last))
        self.index += 1
        self._sent_chars += len(delta)
        self._pending.clear()
        self._pending_tokens = 0
        self._last_cut = self._clock()
