"""Every kind of reply the worker builds is a valid tierq.reply/v1 message (the builder skips
pydantic's validation on the hot path, so this is where its output is checked)."""

from __future__ import annotations

from datetime import timedelta

import jsonschema
import orjson

from schemas.codec import encode
from schemas.export import json_schemas
from schemas.messages import Band, ErrorCode, Reply, Request, Status, utc_now
from worker.engine import Completion
from worker.reply_builder import ReplyBuilder

REPLY_SCHEMA = json_schemas()["tierq.reply.v1.schema.json"]


def roundtrip(reply: Reply) -> Reply:
    raw = encode(reply)
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
