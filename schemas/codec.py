"""JSON (de)serialisation of wire messages with orjson, and errors a person can act on.

Two failure kinds matter downstream:
- ``MalformedMessage``: not a JSON object at all; nobody can be answered, so the record
  goes to the dead-letter topic with its raw bytes.
- ``InvalidMessage``: a JSON object that breaks the contract; when it names a usable
  request_id and tenant_id the worker answers with an error reply, else it dead-letters it.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from schemas.messages import (CHUNK_SCHEMA, REQUEST_SCHEMA, Cancel, Chunk, ErrorCode, ErrorInfo, Reply, Request, Timing,
                              Usage)

_DUMP_OPTS = orjson.OPT_UTC_Z


class MessageError(ValueError):
    """A message that cannot be accepted; ``code`` is the stable error code."""

    code: ErrorCode = ErrorCode.invalid_request

    def __init__(self, message: str, *, code: ErrorCode | None = None, document: Any = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.document = document

    @property
    def message(self) -> str:
        return str(self.args[0])


class MalformedMessage(MessageError):
    """The bytes are not a JSON object (bad UTF-8, bad JSON, or a non-object)."""


class InvalidMessage(MessageError):
    """A JSON object that does not satisfy the message schema."""


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, ``field.path: what is wrong``, without pydantic's URLs."""
    parts = []
    for err in exc.errors(include_url=False, include_context=False):
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def loads_object(raw: bytes | str) -> dict[str, Any]:
    """Parse one JSON object or raise ``MalformedMessage``."""
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(document).__name__}")
    return document


def validate_request(document: dict[str, Any]) -> Request:
    """Validate a parsed request object; unknown schema versions get their own code."""
    version = document.get("schema", REQUEST_SCHEMA)
    if version != REQUEST_SCHEMA:
        raise InvalidMessage(
            f"unsupported schema {version!r}: this version of tierq reads {REQUEST_SCHEMA!r}",
            code=ErrorCode.unsupported_schema,
            document=document,
        )
    try:  # model_validate's validator, without its Python wrapper (one request at a time, thousands a second)
        return Request.__pydantic_validator__.validate_python(document)
    except ValidationError as exc:
        raise InvalidMessage(describe_validation_error(exc), document=document) from None


def decode_request(raw: bytes) -> Request:
    return validate_request(loads_object(raw))


def decode_reply(raw: bytes) -> Reply:
    document = loads_object(raw)
    try:
        return Reply.model_validate(document)
    except ValidationError as exc:
        raise InvalidMessage(describe_validation_error(exc), document=document) from None


def _validate(model: type[Any], document: dict[str, Any]) -> Any:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise InvalidMessage(describe_validation_error(exc), document=document) from None


def decode_reply_topic_record(raw: bytes, headers: list[tuple[str, bytes]] | None = None) -> Reply | Chunk:
    """A record of a reply topic: a reply, or a chunk of a streamed request (readers of replies skip
    those). The ``schema`` header says which without parsing; records without it (outside
    writers) are told apart by their ``schema`` field."""
    document = loads_object(raw)
    kind = next((value for key, value in headers or () if key == "schema"), None)
    if kind == CHUNK_SCHEMA.encode() or (kind is None and document.get("schema") == CHUNK_SCHEMA):
        return _validate(Chunk, document)
    return _validate(Reply, document)


def decode_cancel(raw: bytes) -> Cancel:
    return _validate(Cancel, loads_object(raw))


def encode(message: BaseModel) -> bytes:
    """Serialise a wire message to compact JSON (UTC times end in ``Z``). ``model_dump(mode="python",
    by_alias=True)`` is this serializer call behind a Python wrapper (~1 us; a reply is encoded per
    request)."""
    return orjson.dumps(message.__pydantic_serializer__.to_python(message, by_alias=True), option=_DUMP_OPTS)


def encode_reply(reply: Reply) -> bytes:
    """``encode(reply)``, the same bytes (tests/test_reply_builder.py), for ~60% of its instructions
    (cachegrind: 25k against 40k a served reply, most of them orjson's): a worker encodes one per
    request. The document the model's serializer would make is read off the instances' ``__dict__``s
    (every field, in order, values as ``to_python`` returns them in Python mode: datetimes, enums and
    metadata unchanged, for orjson to write). Replies with ``choices`` (nested models all the way
    down) and instances of subclasses go through ``encode``."""
    fields = reply.__dict__
    usage, timing, error = fields["usage"], fields["timing"], fields["error"]
    if (fields["choices"] is not None or type(reply) is not Reply or type(usage) is not Usage
            or type(timing) is not Timing or (error is not None and type(error) is not ErrorInfo)):
        return encode(reply)
    return orjson.dumps({
        "schema": fields["schema_"], "request_id": fields["request_id"], "tenant_id": fields["tenant_id"],
        "status": fields["status"], "text": fields["text"], "finish_reason": fields["finish_reason"],
        "usage": usage.__dict__, "error": None if error is None else error.__dict__,
        "priority": fields["priority"], "served_as": fields["served_as"], "worker": fields["worker"],
        "attempt": fields["attempt"], "timing": timing.__dict__, "metadata": fields["metadata"],
        "simulated": fields["simulated"],
    }, option=_DUMP_OPTS)


def dumps(document: Any) -> bytes:
    return orjson.dumps(document, option=_DUMP_OPTS)
