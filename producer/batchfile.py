"""JSONL request files: tierq's request format and the OpenAI batch-file format.

An OpenAI batch line looks like
``{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``;
it becomes a tierq request whose ``metadata.custom_id`` carries the id back in the reply.
Body fields tierq does not implement are rejected, never silently dropped.
"""

from __future__ import annotations

from typing import Any

from schemas.codec import InvalidMessage

OPENAI_URLS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}
#: OpenAI body field -> tierq params field.
OPENAI_PARAMS = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
}
#: Accepted but with no effect on generation: recorded in metadata or ignored by design.
OPENAI_PASSIVE = {"model", "user", "stream", "n"}


def is_openai_batch_line(document: dict[str, Any]) -> bool:
    return "custom_id" in document and "body" in document


def from_openai_batch_line(document: dict[str, Any]) -> dict[str, Any]:
    """Translate one OpenAI batch line into a tierq request document (tenant/priority unset)."""
    url = document.get("url")
    if document.get("method", "POST") != "POST":
        raise InvalidMessage(f"method: {document.get('method')!r} is not supported; use POST")
    body = document["body"]
    if isinstance(body, dict) and body.get("stream", False):
        raise InvalidMessage("body.stream: not supported in batch files")
    doc = from_openai_body(url, body)
    doc["metadata"]["custom_id"] = document["custom_id"]
    return doc


def from_openai_body(url: Any, body: Any, *, extra_fields: frozenset[str] = frozenset()) -> dict[str, Any]:
    """An OpenAI completions/chat-completions body as a tierq request document.

    ``priority`` (a tierq extension) is passed through; fields in ``extra_fields`` are
    accepted and left to the caller; anything else unknown is an error.
    """
    if url not in OPENAI_URLS:
        raise InvalidMessage(f"url: {url!r} is not supported; use one of {', '.join(OPENAI_URLS)}")
    if not isinstance(body, dict):
        raise InvalidMessage("body: expected a JSON object")
    if body.get("n", 1) not in (1, None):
        raise InvalidMessage("body.n: only n = 1 is supported")
    field = OPENAI_URLS[url]
    unknown = set(body) - set(OPENAI_PARAMS) - OPENAI_PASSIVE - extra_fields - {field, "priority"}
    if unknown:
        raise InvalidMessage(f"body: unsupported field(s) {', '.join(sorted(unknown))} for {url}")
    if field not in body:
        raise InvalidMessage(f"body.{field}: required for {url}")
    value = body[field]
    if field == "prompt" and isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise InvalidMessage("body.prompt: one prompt string per request (lists of prompts are not supported)")
        value = value[0]
    params: dict[str, Any] = {}
    for name, target in OPENAI_PARAMS.items():
        if name in body and body[name] is not None:
            params[target] = [body[name]] if name == "stop" and isinstance(body[name], str) else body[name]
    doc: dict[str, Any] = {field: value, "params": params, "metadata": {}}
    if body.get("model") is not None:
        doc["metadata"]["model"] = body["model"]
    if body.get("priority") is not None:
        doc["priority"] = body["priority"]
    return doc


def to_request_document(
    document: dict[str, Any], *, tenant: str | None = None, priority: str | None = None
) -> dict[str, Any]:
    """Normalise one JSONL line; ``tenant``/``priority``, when given, override the line's values."""
    doc = from_openai_batch_line(document) if is_openai_batch_line(document) else dict(document)
    if tenant is not None:
        doc["tenant_id"] = tenant
    if priority is not None:
        doc["priority"] = priority
    return doc
