"""OpenAI compatibility of the gateway with the official openai client: content parts, logprobs,
n, OpenAI's shapes and errors; and a property-based run of schemathesis from the gateway's own
OpenAPI document (no 5xx, every error in OpenAI's shape).

Real gateway, real broker, a worker on the session's tiny vLLM engine (its text is random, so
structured outputs are tested on the real small model in test_structured_outputs.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
import pytest_asyncio

from tests.gateway_stack import GatewayStack, gateway_stack

pytestmark = [pytest.mark.integration, pytest.mark.engine]

TENANTS = {"acme": {"pool": "default", "max_priority": "high", "quotas": {"requests_per_s": 1000}}}
#: Examples per operation and generation mode: enough to find a 5xx, small enough to run in seconds.
SCHEMATHESIS_EXAMPLES = 10


@pytest_asyncio.fixture(scope="module")
async def stack(bootstrap: str, base_topology: Any, engine: Any,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayStack]:
    async with gateway_stack(bootstrap, base_topology, engine, tmp_path_factory.mktemp("openai"), TENANTS) as s:
        yield s


def assert_openai_error(body: dict[str, Any]) -> dict[str, Any]:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


async def test_text_content_parts_work(stack: GatewayStack):
    async with stack.client("acme") as client:
        chat = await client.chat.completions.create(
            model="tiny", max_tokens=4, temperature=0,
            messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": [{"type": "text", "text": "Name a colour"},
                                                   {"type": "text", "text": "in one word."}]}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 5


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
])
async def test_image_and_audio_parts_are_a_clear_400(stack: GatewayStack, part: dict[str, Any]):
    async with stack.client("acme") as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(
                model="tiny", max_tokens=4,
                messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}])
    error = assert_openai_error(refused.value.response.json())
    assert error["code"] == "invalid_request"
    assert f"'{part['type']}' parts are not supported" in error["message"] and "text only" in error["message"]


async def test_chat_logprobs_come_back_per_token_with_the_asked_alternatives(stack: GatewayStack):
    async with stack.client("acme") as client:
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=5, temperature=0,
            logprobs=True, top_logprobs=3)
        plain = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Count"}], max_tokens=5, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and isinstance(token.token, str)
        assert len(token.top_logprobs) == 3
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
        assert token.logprob <= token.top_logprobs[0].logprob + 1e-6  # greedy: the chosen token ranks first
    assert plain.choices[0].logprobs is None


async def test_completion_logprobs_in_the_legacy_shape(stack: GatewayStack):
    async with stack.client("acme") as client:
        completion = await client.completions.create(model="tiny", prompt="Once upon", max_tokens=4, temperature=0,
                                                     logprobs=2)
    logprobs = completion.choices[0].logprobs
    count = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == count
    assert all(len(alternatives) <= 2 for alternatives in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


async def test_n_returns_that_many_choices(stack: GatewayStack):
    async with stack.client("acme") as client:
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Say something"}], max_tokens=4, temperature=1.0,
            n=3, seed=7)
        completion = await client.completions.create(model="tiny", prompt="Roses are", max_tokens=3, n=2,
                                                     logprobs=0)
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Stream"}], max_tokens=3, n=2, stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in chat.choices)
    assert 3 <= chat.usage.completion_tokens <= 12  # every choice's tokens count
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(len(c.logprobs.tokens) >= 1 for c in completion.choices)
    finished = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert set(finished) == {0, 1}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 2


async def test_openapi_document_declares_the_request_bodies(stack: GatewayStack):
    async with stack.http() as http:
        document = (await http.get("/openapi.json")).json()
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    fields = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "n", "logprobs", "top_logprobs", "response_format", "max_tokens"} <= set(fields)
    assert "prompt" in document["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "BatchCreateRequest" in document["components"]["schemas"]


async def test_bad_bodies_are_400_in_openai_shape(stack: GatewayStack):
    async with stack.http("acme") as http:
        for body in ({"messages": []}, {"messages": [{"role": "user", "content": 3}]}, {"model": "x"},
                     {"messages": [{"role": "user", "content": "hi"}], "n": 0},
                     {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}):
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, (body, response.text)
            assert assert_openai_error(response.json())["code"] == "invalid_request"
        no_key = await http.post("/v1/chat/completions", json={"messages": []}, headers={"Authorization": ""})
        assert no_key.status_code == 401  # the key is checked before the body


def _schemathesis_run(url: str, key: str) -> dict[str, int]:
    """Every operation of the gateway's OpenAPI document, valid and invalid inputs: no 5xx, and every
    4xx is OpenAI's error object. Runs in a thread: the gateway serves on the test's event loop."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        # invalid inputs where there is a body to get wrong (string path parameters have no invalid value)
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:
            @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                response = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                where = f"{case.method} {case.formatted_path} body={str(case.body)[:300]}"
                assert response.status_code < 500, f"{where} -> {response.status_code}: {response.text[:300]}"
                if response.status_code >= 400:
                    body = orjson.loads(response.content)
                    assert "error" in body, f"{where} -> {response.status_code}: {response.text[:300]}"
                    assert_openai_error(body)

            check()
    return statuses


async def test_schemathesis_finds_no_server_error_and_only_openai_errors(stack: GatewayStack):
    started = time.monotonic()
    statuses = await asyncio.to_thread(_schemathesis_run, stack.url, stack.keys["acme"])
    print(f"schemathesis: {time.monotonic() - started:.1f} s, responses by status {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0
