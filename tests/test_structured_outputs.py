"""Structured outputs on the real small model (SmolLM2-135M-Instruct): through the gateway with the
official openai client, through the Batch API, and through Kafka with the request contract alone.

On the tiny random model vLLM's JSON grammar lets whitespace run on and raw control characters into
strings (nothing parses; ../shared/ENVIRONMENT.md), so these tests use the real model. Every schema
bounds its fields (maxLength, enum): a small model can otherwise run on until max_tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import orjson
import pytest
import pytest_asyncio

from schemas.messages import Status
from tests.gateway_stack import GatewayStack, gateway_stack
from tests.worker_fixtures import collect, publish

pytestmark = [pytest.mark.integration, pytest.mark.engine]

TENANTS = {"acme": {"pool": "default", "max_priority": "high", "quotas": {"requests_per_s": 100}}}
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Egypt", "Portugal", "Austria"]
PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "enum": COUNTRIES}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": PLACE, "strict": True}}


def question(country: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is the capital of {country}? Answer in JSON with city and country."}]


@pytest_asyncio.fixture(scope="module")
async def stack(bootstrap: str, base_topology: Any, smollm2_engine: Any,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayStack]:
    async with gateway_stack(bootstrap, base_topology, smollm2_engine, tmp_path_factory.mktemp("structured"),
                             TENANTS, max_num_seqs=4) as s:
        yield s


async def test_json_schema_output_validates_with_the_openai_client(stack: GatewayStack):
    async with stack.client("acme") as client:
        chat = await client.chat.completions.create(model="smollm2", messages=question("France"), max_tokens=64,
                                                    temperature=0, response_format=RESPONSE_FORMAT)
    choice = chat.choices[0]
    assert choice.finish_reason == "stop", choice
    answer = json.loads(choice.message.content)
    jsonschema.validate(answer, PLACE)
    assert answer["country"] == "France"


async def test_a_batch_of_structured_requests_all_validate(stack: GatewayStack):
    lines = [{"custom_id": f"capital-{country}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "smollm2", "messages": question(country), "max_tokens": 64, "temperature": 0,
                       "response_format": RESPONSE_FORMAT}} for country in COUNTRIES]
    content = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    async with stack.client("acme") as client:
        uploaded = await client.files.create(file=("places.jsonl", content), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        for _ in range(1200):
            batch = await client.batches.retrieve(batch.id)
            if batch.status in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.25)
        assert batch.status == "completed" and batch.request_counts.completed == len(COUNTRIES), batch
        output = (await client.files.content(batch.output_file_id)).content
    results = [orjson.loads(line) for line in output.splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)
    for result in results:
        text = result["response"]["body"]["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(text), PLACE)


async def test_the_contract_alone_carries_n_logprobs_and_a_schema_through_kafka(stack: GatewayStack):
    """What any Kafka client can do: a tierq.request/v1 with params.n, logprobs and response_format."""
    document = {"tenant_id": "acme", "priority": "high", "messages": question("Japan"),
                "params": {"max_tokens": 64, "temperature": 0.7, "seed": 3, "n": 2, "logprobs": 1,
                           "response_format": RESPONSE_FORMAT}}
    [request_id] = await asyncio.to_thread(publish, stack.settings, stack.topology, [document])
    replies = [r for r in await collect(stack.settings, stack.topology, "acme", expect=None, timeout=120)
               if r.request_id == request_id]
    for _ in range(600):
        if replies:
            break
        await asyncio.sleep(0.2)
        replies = [r for r in await collect(stack.settings, stack.topology, "acme", expect=None, timeout=5)
                   if r.request_id == request_id]
    [reply] = replies[:1]
    assert reply.status is Status.ok and reply.choices is not None and len(reply.choices) == 2
    assert reply.text == reply.choices[0].text
    assert reply.usage.completion_tokens == sum(c.completion_tokens for c in reply.choices)
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.text), PLACE)
        assert choice.logprobs is not None and len(choice.logprobs) == choice.completion_tokens
        assert all(len(token.top_logprobs) == 1 for token in choice.logprobs)
