"""OpenAI batch lines become tierq requests; what tierq cannot honour is rejected."""

import pytest

from producer.batchfile import to_request_document
from schemas.codec import InvalidMessage


def openai_line(url="/v1/chat/completions", **body):
    body.setdefault("model", "m")
    if url.endswith("chat/completions"):
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        body.setdefault("prompt", "hi")
    return {"custom_id": "row-1", "method": "POST", "url": url, "body": body}


def test_chat_line():
    doc = to_request_document(openai_line(max_tokens=5, stop="\n", temperature=0), tenant="acme", priority="low")
    assert doc == {
        "messages": [{"role": "user", "content": "hi"}],
        "params": {"max_tokens": 5, "stop": ["\n"], "temperature": 0},
        "metadata": {"custom_id": "row-1", "model": "m"},
        "tenant_id": "acme",
        "priority": "low",
    }


def test_completion_line_and_max_completion_tokens():
    doc = to_request_document(openai_line("/v1/completions", max_completion_tokens=7))
    assert doc["prompt"] == "hi" and doc["params"] == {"max_tokens": 7}


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (openai_line("/v1/embeddings"), "url"),
        ({**openai_line(), "method": "GET"}, "method"),
        (openai_line(logprobs=True), "unsupported field(s) logprobs"),
        (openai_line(n=3), "only n = 1"),
        (openai_line(stream=True), "stream"),
        (openai_line("/v1/completions", prompt=["a", "b"]), "one prompt string"),
        (openai_line(prompt="hi"), "unsupported field(s) prompt"),
        ({"custom_id": "x", "url": "/v1/completions", "body": {"model": "m"}}, "body.prompt: required"),
        ({"custom_id": "x", "url": "/v1/completions", "body": []}, "body: expected a JSON object"),
    ],
)
def test_rejections(line, fragment):
    with pytest.raises(InvalidMessage, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        to_request_document(line)


def test_tierq_line_overrides():
    doc = to_request_document({"tenant_id": "acme", "priority": "high", "prompt": "x"}, priority="low")
    assert doc["priority"] == "low" and doc["tenant_id"] == "acme"
