"""The wire contract: what a request and a reply may and may not contain."""

from datetime import datetime, timedelta, timezone

import pytest

from schemas.codec import InvalidMessage, MalformedMessage, decode_reply, decode_request, dumps, encode
from schemas.messages import Band, ErrorCode, Reply, Status


def request_doc(**overrides):
    doc = {
        "schema": "tierq.request/v1",
        "request_id": "r-1",
        "tenant_id": "acme",
        "priority": "high",
        "pool": "default",
        "prompt": "hello",
        "params": {"max_tokens": 8, "temperature": 0.0},
        "submitted_at": "2026-11-24T10:00:00.000Z",
        "metadata": {"custom_id": "row-17"},
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not ...}


def test_valid_request_round_trips():
    request = decode_request(dumps(request_doc()))
    assert request.priority is Band.high and request.params.max_tokens == 8
    again = decode_request(encode(request))
    assert again == request
    assert b'"submitted_at":"2026-11-24T10:00:00Z"' in encode(request)


def test_chat_messages_are_accepted():
    request = decode_request(dumps(request_doc(prompt=..., messages=[{"role": "user", "content": "hi"}])))
    assert request.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"prompt": ...}, "exactly one of 'prompt' or 'messages'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "exactly one of 'prompt' or 'messages'"),
        ({"priority": "urgent"}, "priority"),
        ({"tenant_id": "Acme Corp"}, "tenant_id"),
        ({"request_id": ""}, "request_id"),
        ({"params": {"max_tokens": 0}}, "params.max_tokens"),
        ({"params": {"temperature": -1}}, "params.temperature"),
        ({"params": {"top_p": 0}}, "params.top_p"),
        ({"params": {"max_token": 5}}, "params.max_token: Extra inputs are not permitted"),
        ({"submitted_at": "2026-11-24T10:00:00"}, "submitted_at"),
        ({"deadline": "2026-11-24T09:00:00Z"}, "'deadline' must be later"),
        ({"surprise": 1}, "surprise"),
        ({"messages": [], "prompt": ...}, "messages"),
    ],
)
def test_invalid_requests_say_what_is_wrong(overrides, fragment):
    with pytest.raises(InvalidMessage) as info:
        decode_request(dumps(request_doc(**overrides)))
    assert info.value.code is ErrorCode.invalid_request
    assert fragment in info.value.message


def test_unknown_schema_version_has_its_own_code():
    with pytest.raises(InvalidMessage) as info:
        decode_request(dumps(request_doc(schema="tierq.request/v9")))
    assert info.value.code is ErrorCode.unsupported_schema
    assert "tierq.request/v9" in info.value.message
    assert info.value.document["request_id"] == "r-1"  # so the worker can still answer


@pytest.mark.parametrize("raw", [b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
def test_bytes_that_are_not_an_object_are_malformed(raw):
    with pytest.raises(MalformedMessage):
        decode_request(raw)


def test_reply_requires_error_exactly_when_not_ok():
    now = datetime.now(timezone.utc)
    ok = Reply(request_id="r", tenant_id="acme", status=Status.ok, text="hi")
    assert decode_reply(encode(ok)) == ok
    with pytest.raises(ValueError):
        Reply(request_id="r", tenant_id="acme", status=Status.error)
    failed = Reply(
        request_id="r", tenant_id="acme", status=Status.error,
        error={"code": "prompt_too_long", "message": "prompt has 900 tokens; the model allows 512"},
        timing={"submitted_at": now, "finished_at": now + timedelta(seconds=1), "e2e_ms": 1000},
    )
    assert decode_reply(encode(failed)).error.code is ErrorCode.prompt_too_long


def test_band_rank_is_vllm_priority_order():
    assert [b.rank for b in (Band.high, Band.medium, Band.low)] == [0, 1, 2]


def test_timestamp_and_elapsed_are_the_plain_forms():
    """``timestamp`` and ``elapsed`` skip pydantic's utcoffset() for validated UTC times: the same
    floats and timedeltas as ``.timestamp()`` and ``-``, for every offset and tzinfo kind."""
    from schemas.messages import _PYDANTIC_UTC, Request, elapsed, timestamp, utc_now

    now = utc_now()
    texts = ["2026-11-30T11:00:00.123456Z", "2026-11-30T11:00:00+00:00", "1969-12-31T23:59:59.999999Z",
             "2026-11-30T16:30:00.5+05:30", "2026-11-30T06:00:00-05:00"]
    times = [Request.model_validate({"request_id": "a" * 32, "tenant_id": "acme", "priority": "low", "prompt": "x",
                                     "submitted_at": text}).submitted_at for text in texts]
    assert times[0].tzinfo is _PYDANTIC_UTC and times[1].tzinfo is _PYDANTIC_UTC  # the fast way is taken
    times += [now, now.astimezone(timezone(timedelta(hours=-3))), datetime(2030, 1, 1, tzinfo=timezone.utc)]
    for moment in times:
        assert timestamp(moment) == moment.timestamp()
        for later in (now, now + timedelta(days=400, microseconds=7), times[3]):
            assert elapsed(moment, later) == later - moment
