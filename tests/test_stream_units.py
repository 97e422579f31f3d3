"""Pure logic of streaming and cancellation: chunk coalescing, the gateway's text continuation
across attempts, the worker's memory of early cancels, and how reply readers tell chunks apart."""

from __future__ import annotations

import pytest

from producer.gateway.streaming import StreamDiverged, TextStream
from schemas.codec import decode_reply_topic_record, encode
from schemas.messages import CHUNK_SCHEMA, Cancel, Chunk, Reply, Status
from worker.control import CancelBook
from worker.streaming import MAX_SIZE, ChunkStream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chunk(attempt: int, index: int, offset: int, delta: str, last: bool = False) -> Chunk:
    return Chunk(request_id="r1", tenant_id="acme", attempt=attempt, index=index, offset=offset, delta=delta,
                 tokens=1, completion_tokens=index + 1, last=last)


def test_the_first_token_goes_at_once_then_batches_grow_and_the_rest_goes_last():
    sent: list[Chunk] = []
    clock = Clock()
    stream = ChunkStream("r1", "acme", 1, sent.append, clock=clock)
    for _ in range(300):  # tokens arriving faster than any interval: cut by size
        stream.on_delta("a", 1)
    stream.finish()
    sizes = [c.tokens for c in sent]
    assert sizes[0] == 1 and sizes[1:5] == [4, 8, 16, 32] and max(sizes) == MAX_SIZE
    assert sent[-1].last and not any(c.last for c in sent[:-1])
    assert [c.index for c in sent] == list(range(len(sent)))
    assert "".join(c.delta for c in sent) == "a" * 300 and sent[-1].completion_tokens == 300
    assert all(c.offset == sum(len(p.delta) for p in sent[:i]) for i, c in enumerate(sent))
    assert len(sent) < 15  # not one record per token


def test_slow_tokens_are_cut_by_time():
    sent: list[Chunk] = []
    clock = Clock()
    stream = ChunkStream("r1", "acme", 1, sent.append, clock=clock)
    stream.on_delta("x", 1)
    clock.now += 0.05
    stream.on_delta("y", 1)  # past the 20 ms interval: cut although it holds one token
    assert [c.delta for c in sent] == ["x", "y"]


def test_a_retry_continues_the_text_without_repeating_it():
    text = TextStream()
    assert text.chunk(chunk(1, 0, 0, "Hello")) == "Hello"
    assert text.chunk(chunk(1, 1, 5, " wor")) == " wor"
    # the worker died; attempt 2 starts over with the same (greedy) text
    assert text.chunk(chunk(2, 0, 0, "Hel")) == ""
    assert text.chunk(chunk(2, 1, 3, "lo world")) == "ld"
    assert text.chunk(chunk(1, 2, 9, "XYZ")) == ""  # a late chunk of the dead attempt is stale
    reply = Reply(request_id="r1", tenant_id="acme", status=Status.ok, text="Hello world!")
    assert text.reply(reply) == "!" and text.sent == "Hello world!"


def test_a_retry_with_different_text_is_refused_not_garbled():
    text = TextStream()
    text.chunk(chunk(1, 0, 0, "Hello"))
    with pytest.raises(StreamDiverged):
        text.chunk(chunk(2, 0, 0, "Howdy"))


def test_a_missed_chunk_waits_for_the_reply():
    text = TextStream()
    assert text.chunk(chunk(1, 0, 0, "ab")) == "ab"
    assert text.chunk(chunk(1, 2, 4, "ef")) == ""  # chunk 1 ("cd") not seen
    assert text.reply(Reply(request_id="r1", tenant_id="acme", status=Status.ok, text="abcdef")) == "cdef"


def test_early_cancels_are_kept_for_their_ttl_and_bounded():
    clock = Clock()
    book = CancelBook(ttl_s=10, limit=2, clock=clock)
    book.remember(Cancel(request_id="a", tenant_id="acme"))
    clock.now = 5
    book.remember(Cancel(request_id="b", tenant_id="acme"))
    book.remember(Cancel(request_id="c", tenant_id="acme"))  # over the limit: the oldest goes
    assert book.take("a") is None and len(book) == 2
    clock.now = 14
    assert book.take("b") is not None and book.take("b") is None
    clock.now = 16  # c is 11 s old
    assert book.take("c") is None and len(book) == 0


def test_reply_readers_tell_chunks_from_replies_with_or_without_the_header():
    record = encode(chunk(1, 0, 0, "x"))
    assert isinstance(decode_reply_topic_record(record, [("schema", CHUNK_SCHEMA.encode())]), Chunk)
    assert isinstance(decode_reply_topic_record(record), Chunk)  # an outside writer set no header
    reply = encode(Reply(request_id="r1", tenant_id="acme", status=Status.ok, text="x"))
    assert isinstance(decode_reply_topic_record(reply), Reply)
