"""Wire messages: the request a producer publishes and the reply a worker writes.

The JSON form of these models *is* the contract: any Kafka client in any language can
produce a request and read a reply by following the exported JSON Schema files.
Validation is strict (unknown fields are rejected) so that a typo such as
``max_token`` fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
    model_validator,
)

REQUEST_SCHEMA = "tierq.request/v1"
REPLY_SCHEMA = "tierq.reply/v1"

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

    @property
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


class SamplingParams(_Strict):
    """The sampling parameters a request may set; each maps 1:1 to vLLM's."""

    max_tokens: int = Field(default=128, ge=1, le=1_000_000)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[Annotated[str, StringConstraints(min_length=1)]] = Field(default_factory=list, max_length=16)
    seed: int | None = None


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


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
