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
        (openai_line(logprobs=2), "body.logprobs: must be true or false"),
        (openai_line(top_logprobs=2), "requires logprobs: true"),
        (openai_line("/v1/completions", top_logprobs=2), "not a completions field"),
        (openai_line(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "'image_url' parts are not supported: this model takes text only"),
        (openai_line(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                            {"type": "input_audio", "input_audio": {}}]}]),
         "'input_audio' parts are not supported"),
        (openai_line(messages=[{"role": "user", "content": [{"text": "a"}]}]), "expected a part with a 'type'"),
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


def test_n_logprobs_and_response_format_become_params():
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    doc = to_request_document(openai_line(n=3, logprobs=True, top_logprobs=2, response_format=response_format))
    assert doc["params"] == {"n": 3, "logprobs": 2, "response_format": response_format}
    assert to_request_document(openai_line(logprobs=True))["params"] == {"logprobs": 0}
    assert to_request_document(openai_line(logprobs=False))["params"] == {}
    assert to_request_document(openai_line("/v1/completions", logprobs=3))["params"] == {"logprobs": 3}


def test_text_content_parts_are_joined():
    parts = [{"type": "text", "text": "Name the capital"}, {"type": "text", "text": "of France."}]
    doc = to_request_document(openai_line(messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": parts}]))
    assert doc["messages"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Name the capital\nof France."}]


def test_contract_checks_the_new_params():
    from schemas.messages import SamplingParams
    from pydantic import ValidationError

    assert SamplingParams(n=2, logprobs=0).n == 2
    for bad in ({"n": 0}, {"n": 17}, {"logprobs": 21}, {"response_format": {"type": "json_schema"}},
                {"response_format": {"type": "text", "json_schema": {"schema": {}}}}, {"response_format": {"type": "xml"}}):
        with pytest.raises(ValidationError):
            SamplingParams.model_validate(bad)
    assert "n" not in SamplingParams().model_dump()  # an old-style request reads exactly as before
