"""Every kind of reply the worker builds is a valid tierq.reply/v1 message (the builder skips
pydantic's validation on the hot path, so this is where its output is checked)."""

from __future__ import annotations

from datetime import timedelta

import jsonschema
import orjson

from schemas.codec import encode, encode_reply
from schemas.export import json_schemas
from schemas.messages import Band, ErrorCode, Reply, Request, Status, utc_now
from worker.engine import Completion
from worker.reply_builder import ReplyBuilder

REPLY_SCHEMA = json_schemas()["tierq.reply.v1.schema.json"]


def roundtrip(reply: Reply) -> Reply:
    raw = encode(reply)
    assert raw == orjson.dumps(reply.model_dump(mode="python", by_alias=True), option=orjson.OPT_UTC_Z)
    assert encode_reply(reply) == raw  # what ReplyWriter writes
    jsonschema.validate(orjson.loads(raw), REPLY_SCHEMA)
    return Reply.model_validate_json(raw)  # full validation, including "error exactly when not ok"


def request() -> Request:
    now = utc_now()
    return Request.model_validate({"request_id": "a" * 32, "tenant_id": "acme", "priority": "low", "prompt": "x",
                                   "submitted_at": now - timedelta(seconds=1), "deadline": now,
                                   "metadata": {"custom_id": "row-1"}})


def test_every_reply_kind_validates():
    builder, req, now = ReplyBuilder("host/gpu0"), request(), utc_now()
    completion = Completion("hello", "stop", 3, 2, now, now, simulated=True)
    served = roundtrip(builder.served(req, Band.low, Band.medium, completion, attempt=2, received_at=now,
                                      dequeued_at=now))
    assert served.status is Status.ok and served.usage.completion_tokens == 2 and served.simulated
    assert served.metadata == {"custom_id": "row-1"} and served.served_as is Band.medium and served.attempt == 2
    failed = roundtrip(builder.failed(req, Band.low, Band.low, ErrorCode.engine_error, "boom", received_at=now,
                                      dequeued_at=now))
    assert failed.status is Status.error and failed.error.code is ErrorCode.engine_error
    expired = roundtrip(builder.expired(req, Band.low))
    assert expired.status is Status.expired and expired.error.code is ErrorCode.deadline_exceeded
    refused = roundtrip(builder.refused("b" * 32, "acme", {}, Band.high, ErrorCode.invalid_request, "bad"))
    assert refused.status is Status.error and refused.worker == "host/gpu0"


def test_construct_makes_what_model_construct_makes():
    """The builder's own ``construct`` skips model_construct's per-call walk; the instances must not differ."""
    from schemas.messages import Choice, ErrorInfo, Timing, Usage
    from worker.reply_builder import construct

    now = utc_now()
    cases = [
        (Timing, {"submitted_at": now, "queue_ms": 1.5, "e2e_ms": None}),
        (Usage, {"prompt_tokens": 3}),
        (Usage, {}),
        (Reply, {"request_id": "a" * 32, "tenant_id": "acme", "status": Status.ok, "text": "hi",
                 "timing": Timing(submitted_at=now), "metadata": {"k": 1},
                 "choices": [Choice(index=0, text="hi")]}),
        (Reply, {"request_id": "a" * 32, "tenant_id": "acme", "status": Status.error,
                 "error": ErrorInfo(code=ErrorCode.engine_error, message="x")}),
    ]
    for cls, values in cases:
        ours, theirs = construct(cls, **values), cls.model_construct(**values)
        assert list(ours.__dict__) == list(theirs.__dict__) and ours == theirs
        assert ours.model_fields_set == theirs.model_fields_set
        assert ours.__pydantic_extra__ == theirs.__pydantic_extra__
        assert ours.__pydantic_private__ == theirs.__pydantic_private__
        assert encode(ours) == encode(theirs)
    first, second = construct(Reply, request_id="a" * 32, tenant_id="t", status=Status.ok), \
        construct(Reply, request_id="b" * 32, tenant_id="t", status=Status.ok)
    assert first.metadata is not second.metadata and first.usage is not second.usage  # factories, not shared


def test_served_timings_are_the_plain_differences():
    """``served`` subtracts across the request's tzinfo (pydantic's) once and adds timedeltas for e2e:
    the figures must be those of the plain differences."""
    req, now = request(), utc_now()
    dequeued, first, finished = now + timedelta(microseconds=1), now + timedelta(seconds=1.000333), \
        now + timedelta(seconds=2, microseconds=777)
    timing = ReplyBuilder("w").served(req, Band.low, Band.low, Completion("x", "stop", 1, 1, first, finished),
                                      attempt=1, received_at=now, dequeued_at=dequeued).timing
    ms = lambda a, b: round((b - a).total_seconds() * 1000, 3)  # noqa: E731
    assert (timing.queue_ms, timing.ttft_ms, timing.e2e_ms) == (ms(req.submitted_at, dequeued), ms(dequeued, first),
                                                                ms(req.submitted_at, finished))
    assert timing.e2e_ms > 3000


def test_served_makes_what_construct_makes():
    """``served`` builds its three models without ``construct``'s generic steps: the same instances
    (fields in order, fields set, no extra or private), with and without a first token and choices."""
    from schemas.messages import Choice, Timing, Usage
    from worker.reply_builder import construct

    req, now = request(), utc_now()
    ms = lambda a, b: None if a is None or b is None else round((b - a).total_seconds() * 1000, 3)  # noqa: E731
    choices = (Choice(index=0, text="a", finish_reason="stop", completion_tokens=1),
               Choice(index=1, text="b", finish_reason="length", completion_tokens=2))
    for first, picks in ((now + timedelta(seconds=1), ()), (None, ()), (now, choices)):
        finished = now + timedelta(seconds=3, microseconds=5)
        completion = Completion("hello", "stop", 3, 2, first, finished, simulated=True, choices=picks)
        ours = ReplyBuilder("host/gpu0").served(req, Band.low, Band.medium, completion, attempt=2,
                                                received_at=now, dequeued_at=now)
        timing = construct(Timing, submitted_at=req.submitted_at, received_at=now, dequeued_at=now,
                           first_token_at=first, finished_at=finished, queue_ms=ms(req.submitted_at, now),
                           ttft_ms=ms(now, first), e2e_ms=ms(req.submitted_at, finished))
        theirs = construct(Reply, request_id=req.request_id, tenant_id=req.tenant_id, status=Status.ok,
                           priority=Band.low, worker="host/gpu0", metadata=req.metadata, text="hello",
                           finish_reason="stop", served_as=Band.medium,
                           usage=construct(Usage, prompt_tokens=3, completion_tokens=2), attempt=2, timing=timing,
                           simulated=True, choices=list(picks) or None)
        for a, b in ((ours, theirs), (ours.timing, theirs.timing), (ours.usage, theirs.usage)):
            assert type(a) is type(b) and list(a.__dict__) == list(b.__dict__) and a.__dict__ == b.__dict__
            assert a.model_fields_set == b.model_fields_set and a.model_fields_set is not b.model_fields_set
            assert a.__pydantic_extra__ is None and a.__pydantic_private__ is None
        assert ours == theirs and encode(ours) == encode(theirs)
        roundtrip(ours)


def test_milliseconds_are_those_of_rounding_the_seconds():
    """``served`` divides timedeltas by a millisecond instead of rounding ``total_seconds() * 1000``
    to three places: the same floats, for durations from microseconds to years, either sign."""
    import random

    from worker.reply_builder import _MS

    rng = random.Random(13)
    deltas = [timedelta(microseconds=rng.randrange(-10**scale, 10**scale))
              for scale in range(1, 16) for _ in range(2000)]
    deltas += [timedelta(0), timedelta(microseconds=1), timedelta(microseconds=-1),
               timedelta(days=3650, microseconds=999_999)]
    for delta in deltas:
        assert delta / _MS == round(delta.total_seconds() * 1000, 3), delta


def test_encode_reply_writes_what_encode_writes():
    """``encode_reply`` reads the document off the models' ``__dict__``s instead of the serializer:
    the same bytes for every kind of reply, built or validated, whatever its metadata and offsets."""
    from datetime import timezone

    from worker.engine import Progress

    builder, now = ReplyBuilder("host/gpu0"), utc_now()
    req = request()
    india = timezone(timedelta(hours=5, minutes=30))
    offset = Request.model_validate({**req.model_dump(by_alias=True), "request_id": "b" * 32,
                                     "submitted_at": (now - timedelta(seconds=2)).astimezone(india), "deadline": None,
                                     "metadata": {"nested": {"list": [1, 2.5, None, True, "x"]}, "unicode": "é\u2028"}})
    progress = Progress()
    progress.add("hel", 2)
    completion = Completion("hello", None, 3, 2, None, now, simulated=False)
    replies = [
        builder.served(offset, Band.high, Band.high, completion, attempt=1, received_at=now, dequeued_at=now),
        builder.cancelled(req, Band.low, Band.low, prompt_tokens=4, progress=progress, received_at=now,
                          dequeued_at=now),
        builder.cancelled(offset, Band.low, None, received_at=now),
        builder.refused("c" * 32, "acme", {"k": [1]}, Band.medium, ErrorCode.forbidden_priority, "no", now),
    ]
    replies += [Reply.model_validate_json(encode(reply)) for reply in replies]  # validated, not constructed
    replies.append(replies[0].model_copy(update={"text": "other"}))
    for reply in replies:
        assert encode_reply(reply) == encode(reply)
