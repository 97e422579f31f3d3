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
OPENAI_PASSIVE = {"model", "user", "stream"}
#: Handled by ``_structured_fields``: n, logprobs and structured outputs.
OPENAI_STRUCTURED = {"n", "logprobs", "top_logprobs", "response_format"}
#: Content part types of a chat message: text is joined, the others are refused by name.
TEXT_PART = "text"
#: How vLLM's chat front end joins the text parts of one message.
PART_SEPARATOR = "\n"


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
    field = OPENAI_URLS[url]
    unknown = set(body) - set(OPENAI_PARAMS) - OPENAI_PASSIVE - OPENAI_STRUCTURED - extra_fields - {field, "priority"}
    if unknown:
        raise InvalidMessage(f"body: unsupported field(s) {', '.join(sorted(unknown))} for {url}")
    if field not in body:
        raise InvalidMessage(f"body.{field}: required for {url}")
    value = body[field]
    if field == "prompt" and isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise InvalidMessage("body.prompt: one prompt string per request (lists of prompts are not supported)")
        value = value[0]
    if field == "messages":
        value = _text_messages(value)
    params: dict[str, Any] = _structured_fields(url, body)
    for name, target in OPENAI_PARAMS.items():
        if name in body and body[name] is not None:
            params[target] = [body[name]] if name == "stop" and isinstance(body[name], str) else body[name]
    doc: dict[str, Any] = {field: value, "params": params, "metadata": {}}
    if body.get("model") is not None:
        doc["metadata"]["model"] = body["model"]
    if body.get("priority") is not None:
        doc["priority"] = body["priority"]
    return doc


def _structured_fields(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """``n``, ``logprobs`` and ``response_format`` as tierq params; value errors are the contract's.

    Chat asks for logprobs with ``logprobs: true`` and ``top_logprobs: k``; completions with
    ``logprobs: k``. tierq's ``params.logprobs`` is k either way."""
    params: dict[str, Any] = {}
    if body.get("n") is not None:
        params["n"] = body["n"]
    if body.get("response_format") is not None:
        params["response_format"] = body["response_format"]
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if url == "/v1/completions":
        if top is not None:
            raise InvalidMessage("body.top_logprobs: not a completions field; use logprobs: <k>")
        if logprobs is not None:
            params["logprobs"] = logprobs
    elif logprobs is True:
        params["logprobs"] = 0 if top is None else top
    elif logprobs not in (None, False):
        raise InvalidMessage("body.logprobs: must be true or false for chat completions (top_logprobs sets how many)")
    elif top is not None:
        raise InvalidMessage("body.top_logprobs: requires logprobs: true")
    return params


def _text_messages(messages: Any) -> Any:
    """Chat messages with their content parts joined into text; image, audio and file parts are refused."""
    if not isinstance(messages, list):
        return messages  # the contract names the problem
    result = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                where = f"body.messages[{i}].content[{j}]"
                if kind != TEXT_PART:
                    raise InvalidMessage(f"{where}: {kind!r} parts are not supported: this model takes text only"
                                         if isinstance(kind, str) else f"{where}: expected a part with a 'type'")
                if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise InvalidMessage(f"{where}: a text part is {{\"type\": \"text\", \"text\": \"...\"}}")
                texts.append(part["text"])
            message = {**message, "content": PART_SEPARATOR.join(texts)}
        result.append(message)
    return result


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
