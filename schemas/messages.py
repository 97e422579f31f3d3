"""Wire messages: the request a producer publishes and the reply a worker writes.

The JSON form of these models *is* the contract: any Kafka client in any language can
produce a request and read a reply by following the exported JSON Schema files.
Validation is strict (unknown fields are rejected) so that a typo such as
``max_token`` fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import enum
import functools
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    TypeAdapter,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)

REQUEST_SCHEMA = "tierq.request/v1"
REPLY_SCHEMA = "tierq.reply/v1"
CHUNK_SCHEMA = "tierq.chunk/v1"
CANCEL_SCHEMA = "tierq.cancel/v1"

#: Tenant ids appear in topic names (``tierq.replies.<tenant>``), so they use the
#: characters Kafka allows in a topic name, lower case only.
TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
TenantId = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]
PoolName = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]
RequestId = Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)]


class Band(str, enum.Enum):
    """Priority band. Declaration order is priority order: ``high`` first."""

    high = "high"
    medium = "medium"
    low = "low"

    @functools.cached_property  # a property is a Python call per read; the worker reads it ~6 times a request
    def rank(self) -> int:
        """0 for high, 1 for medium, 2 for low; also the vLLM priority (lower runs first)."""
        return _RANK[self]


BAND_ORDER: tuple[Band, ...] = (Band.high, Band.medium, Band.low)
_RANK = {band: rank for rank, band in enumerate(BAND_ORDER)}


class Status(str, enum.Enum):
    ok = "ok"
    error = "error"
    expired = "expired"
    rejected = "rejected"
    cancelled = "cancelled"


class ErrorCode(str, enum.Enum):
    """Stable error codes. Clients may switch on these; never rename one."""

    invalid_request = "invalid_request"
    unsupported_schema = "unsupported_schema"
    prompt_too_long = "prompt_too_long"
    unknown_tenant = "unknown_tenant"
    unknown_pool = "unknown_pool"
    forbidden_priority = "forbidden_priority"
    forbidden_pool = "forbidden_pool"
    quota_exceeded = "quota_exceeded"
    deadline_exceeded = "deadline_exceeded"
    engine_error = "engine_error"
    cancelled = "cancelled"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class JsonSchemaFormat(_Strict):
    """OpenAI's ``response_format.json_schema``: the JSON Schema the output must validate against."""

    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "output"
    description: str | None = None
    schema_: dict[str, JsonValue] = Field(alias="schema", description="a JSON Schema (bound every string "
                                          "with maxLength or enum, or small models may run on to max_tokens)")
    strict: bool | None = Field(default=None, description="accepted for OpenAI compatibility; the output "
                                "is always constrained to the schema")


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: free text, any JSON object, or JSON valid against a schema.
    The worker constrains decoding (vLLM structured outputs), so the text parses as asked unless
    ``max_tokens`` cuts it off (``finish_reason: "length"``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type 'json_schema' and only then")
        return self


#: Most outputs one request may ask for (``n``) and most alternatives per token (``logprobs``).
MAX_N = 16
MAX_LOGPROBS = 20


class SamplingParams(_Strict):
    """The sampling parameters a request may set; each maps 1:1 to vLLM's.

    ``n``, ``logprobs`` and ``response_format`` were added to v1 as optional fields: a request
    without them reads exactly as before, and a worker older than them answers a request that
    sets them ``invalid_request`` (unknown field), never silently ignores them."""

    max_tokens: int = Field(default=128, ge=1, le=1_000_000)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list, max_length=16)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_N, exclude_if=lambda value: value == 1,
                   description="outputs to generate for the prompt; each takes an engine slot")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, exclude_if=lambda value: value is None,
                                 description="return each output token's log probability and this many most "
                                             "likely alternatives per position (0: the chosen token's only)")
    response_format: ResponseFormat | None = Field(default=None, exclude_if=lambda value: value is None,
                                                   description="constrain the output to JSON (structured outputs)")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


#: the tzinfo pydantic gives a validated UTC time ("Z", "+00:00"): one instance shared by all of
#: them, whose ``utcoffset()`` is a call into pydantic-core (~2.4k instructions; datetime's own
#: ``timezone.utc`` answers in C). Two times with the same tzinfo object subtract without asking it,
#: so ``timestamp`` and ``elapsed`` measure from an epoch in that tzinfo instead. A sentinel (never
#: a time's tzinfo) if pydantic ever stops sharing it or it is not UTC: then they take the plain way.
_PYDANTIC_UTC: Any = TypeAdapter(AwareDatetime).validate_python("1970-01-01T00:00:00Z").tzinfo
if _PYDANTIC_UTC is None or _PYDANTIC_UTC.utcoffset(None) != timedelta(0) or \
        TypeAdapter(AwareDatetime).validate_python("2000-01-01T00:00:00+00:00").tzinfo is not _PYDANTIC_UTC:
    _PYDANTIC_UTC = object()
    _PYDANTIC_EPOCH = _EPOCH = None
else:
    _PYDANTIC_EPOCH = datetime(1970, 1, 1, tzinfo=_PYDANTIC_UTC)
    _EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_UTC = timezone.utc


def timestamp(moment: datetime) -> float:
    """``moment.timestamp()`` of an aware time, the same float, without pydantic's ``utcoffset()``
    for a validated UTC time (the worker takes one per request)."""
    if moment.tzinfo is _PYDANTIC_UTC:
        return (moment - _PYDANTIC_EPOCH).total_seconds()
    return moment.timestamp()


def elapsed(start: datetime, end: datetime) -> timedelta:
    """``end - start`` of aware times, the same timedelta, without pydantic's ``utcoffset()`` when
    ``start`` is a validated UTC time and ``end`` one of ``utc_now``'s (a request's queue time)."""
    if start.tzinfo is _PYDANTIC_UTC and end.tzinfo is _UTC:
        return (end - _EPOCH) - (start - _PYDANTIC_EPOCH)
    return end - start


class Request(_Strict):
    """An inference request, as published on ``tierq.<pool>.<band>`` with key = tenant_id."""

    schema_: Literal["tierq.request/v1"] = Field(default=REQUEST_SCHEMA, alias="schema")
    request_id: RequestId
    tenant_id: TenantId
    priority: Band
    pool: PoolName = "default"
    prompt: Annotated[str, StringConstraints(min_length=1)] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams)
    submitted_at: AwareDatetime
    deadline: AwareDatetime | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    #: left out of the JSON when false, so an unstreamed request reads exactly as before this field
    #: existed; a worker older than it answers a streamed one ``invalid_request`` (unknown field)
    stream: bool = Field(default=False, exclude_if=lambda value: not value,
                         description="true: the worker also publishes tierq.chunk/v1 records as tokens come")

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> Request:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' must be given")
        if self.deadline is not None and self.deadline <= self.submitted_at:
            raise ValueError("'deadline' must be later than 'submitted_at'")
        return self


class ErrorInfo(_Strict):
    code: ErrorCode
    message: str


class Usage(_Strict):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Timing(_Strict):
    """When the request was published, fetched by a worker, admitted to the engine, ..."""

    submitted_at: AwareDatetime | None = None
    received_at: AwareDatetime | None = None
    dequeued_at: AwareDatetime | None = None
    first_token_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Strict):
    """One output token: its log probability and the most likely alternatives at its position."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Choice(_Strict):
    """One of a request's ``n`` outputs."""

    index: int = Field(ge=0)
    text: str
    finish_reason: str | None = None
    completion_tokens: int = Field(default=0, ge=0)
    logprobs: list[TokenLogprob] | None = None


class Reply(_Strict):
    """The answer to one request, on the tenant's reply topic with key = request_id."""

    schema_: Literal["tierq.reply/v1"] = Field(default=REPLY_SCHEMA, alias="schema")
    request_id: str
    tenant_id: str
    status: Status
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    error: ErrorInfo | None = None
    priority: Band | None = None
    served_as: Band | None = None
    worker: str | None = None
    attempt: int = 1
    timing: Timing = Field(default_factory=Timing)
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    simulated: bool = Field(default=False, description="true when a simulated engine (load testing) made it: no model ran")
    choices: list[Choice] | None = Field(
        default=None, exclude_if=lambda value: value is None,
        description="every output, when the request asked for n > 1 or logprobs (absent otherwise); "
                    "text and finish_reason repeat choices[0], usage.completion_tokens counts them all")

    @field_validator("schema_", mode="before")
    @classmethod
    def _known_schema(cls, value: Any) -> Any:
        if value != REPLY_SCHEMA:
            raise ValueError(f"unsupported schema {value!r}: this version of tierq reads {REPLY_SCHEMA!r}")
        return value

    @model_validator(mode="after")
    def _error_iff_not_ok(self) -> Reply:
        if (self.status is Status.ok) == (self.error is not None):
            raise ValueError("a reply carries 'error' exactly when its status is not 'ok'")
        return self


class Chunk(_Strict):
    """Part of a streamed request's text, on the tenant's reply topic with key = request_id, before
    its reply. ``index`` counts this attempt's chunks from 0; ``offset`` is how many characters of
    this attempt's text came before ``delta``, so a reader that saw an earlier attempt can skip what
    it already has. The reply that follows is complete on its own: chunks are an early view of it."""

    schema_: Literal["tierq.chunk/v1"] = Field(default=CHUNK_SCHEMA, alias="schema")
    request_id: str
    tenant_id: str
    attempt: int = Field(ge=1, description="the engine attempt that made this text (a retry after a crash starts over)")
    index: int = Field(ge=0)
    offset: int = Field(ge=0, description="characters of this attempt's text before delta")
    delta: str
    tokens: int = Field(ge=0, description="tokens in delta")
    completion_tokens: int = Field(ge=0, description="tokens of this attempt so far, delta included")
    last: bool = Field(default=False, description="this attempt's last chunk; the reply follows")


class Cancel(_Strict):
    """Cancel a request: on the pool's control topic with key = request_id, read by every worker of
    the pool. Honoured only when ``tenant_id`` is the request's tenant."""

    schema_: Literal["tierq.cancel/v1"] = Field(default=CANCEL_SCHEMA, alias="schema")
    request_id: RequestId
    tenant_id: TenantId
    requested_at: AwareDatetime = Field(default_factory=utc_now)
    reason: str | None = Field(default=None, max_length=500)
