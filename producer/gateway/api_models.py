"""Typed request bodies of the HTTP API, for FastAPI's validation and the OpenAPI document.

They declare what the gateway reads, so the OpenAPI document is complete and an unknown field
is refused by name (``body.best_of: Extra inputs are not permitted``). Value rules stay with the
request contract (``schemas.messages``, reached through ``producer.batchfile.from_openai_body``),
which checks the raw body again as every other entry point does. Image and audio content parts
are declared so that they are refused with a message that says so, not as a shape error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.messages import MAX_LOGPROBS, MAX_N, Band, ResponseFormat


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(_Part):
    """Declared so that it is refused by name: tierq serves text models."""

    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(BaseModel):
    data: str
    format: str


class AudioPart(_Part):
    """Declared so that it is refused by name: tierq serves text models."""

    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] = Field(description="text, or content parts: text parts are joined with "
                                                         "newlines; image and audio parts are refused (400)")


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class _Generation(_Body):
    model: str | None = Field(default=None, description="echoed in the response; the tenant's pool decides the model")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N, description="choices to generate; each takes an engine slot")
    response_format: ResponseFormat | None = Field(default=None, description="structured outputs: json_object or "
                                                                             "json_schema (vLLM constrains decoding)")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Band | None = Field(default=None, description="tierq: the priority band (the X-Priority header wins)")


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``; fields OpenAI has and tierq lacks are refused with their names."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, description="return log probabilities of the output tokens")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                     description="most likely alternatives per token (needs logprobs: true)")


class CompletionRequest(_Generation):
    """``POST /v1/completions``; one prompt per request."""

    prompt: str | list[str] = Field(description="a prompt, or a list holding exactly one")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="log probabilities of the output tokens and this many alternatives")


class BatchCreateRequest(BaseModel):
    """``POST /v1/batches``."""

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, Any] | None = None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI's validation errors as one line naming each bad field, and the first field as ``param``."""
    parts, param = [], None
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}", None
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg')}")
        if param is None and len(error.get("loc", ())) > 1:
            param = ".".join(str(p) for p in error["loc"][1:])
    return "; ".join(parts[:5]) or "invalid request", param
