"""`POST /v1/responses` against a scripted engine (tests/fixtures/backends.py), through the
official openai SDK's `client.responses`: plain, streamed (the documented event sequence) and a
function-call round trip; every answer and event is checked against OpenAI's openapi.yaml where the
shared copy exists."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fixtures.backends import TextEngine
from tests.fixtures.openai_spec import AsyncValidatingTransport, load_spec, require_spec, sse_events

MODEL = "gemma-test"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}
CALL = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'


def app_for(engine: TextEngine) -> Any:
    return create_app(GatewaySettings(model_id=MODEL, model_aliases=[]), backend=engine)


def sdk(engine: TextEngine) -> openai.AsyncOpenAI:
    transport = AsyncValidatingTransport(httpx.ASGITransport(app=app_for(engine)))
    http = httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30)
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0)


async def test_plain_text_with_instructions() -> None:
    engine = TextEngine("Bonjour!")
    response = await sdk(engine).responses.create(
        model=MODEL, instructions="Answer in French.", input="Say hello", max_output_tokens=20, store=False
    )
    assert response.status == "completed" and response.output_text == "Bonjour!"
    assert response.usage is not None and response.usage.output_tokens == 2
    prompt, values = engine.calls[0]
    assert "Answer in French." in prompt and "Say hello" in prompt and values["max_tokens"] == 20
    cut = await sdk(engine).responses.create(model=MODEL, input="Say hello", max_output_tokens=1)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens" and cut.output_text == "Bonj"


async def test_streamed_event_sequence() -> None:
    stream = await sdk(TextEngine("Hello there")).responses.create(model=MODEL, input="hi", stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 3 and "".join(deltas) == "Hello there"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "Hello there"  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
async def test_function_call_round_trip(stream: bool) -> None:
    engine = TextEngine(lambda prompt: "It is sunny." if "18C and sunny" in prompt else CALL)
    client = sdk(engine)
    ask: list[Any] = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}]
    if stream:
        events = [
            e async for e in await client.responses.create(model=MODEL, input=ask, tools=[TOOL], stream=True)
        ]
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        first = events[-1].response  # type: ignore[union-attr]
        assert args == '{"city": "Paris"}'
    else:
        first = await client.responses.create(model=MODEL, input=ask, tools=[TOOL], tool_choice="required")
        assert json.loads(engine.calls[0][1]["guided_decoding_guide"])["type"] == "array"
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert not [item for item in first.output if item.type == "message"]  # no call text as a message
    follow = [
        *ask,
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"},
    ]
    second = await client.responses.create(model=MODEL, input=follow, tools=[TOOL])
    assert second.output_text == "It is sunny."
    assert "18C and sunny" in engine.calls[-1][0] and call.call_id in engine.calls[-1][0]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"temperature": 3}, "temperature"),
    ],
)
async def test_unsupported_is_a_clear_400(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(TextEngine()).responses.create(**{"model": MODEL, "input": "hi", **fields})
    assert info.value.param == param  # type: ignore[attr-defined]


async def test_json_schema_text_format_and_schema_conformance() -> None:
    engine = TextEngine('{"city": "Paris"}')
    fmt = {"type": "json_schema", "name": "place", "schema": {"type": "object"}, "strict": True}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_for(engine)), base_url="http://gw"
    ) as c:
        body = {"model": MODEL, "input": "where?", "text": {"format": fmt}}
        plain = (await c.post("/v1/responses", json=body)).json()
        streamed = (await c.post("/v1/responses", json={**body, "stream": True})).content
    assert json.loads(engine.calls[0][1]["guided_decoding_guide"]) == {"type": "object"}
    assert plain["output"][0]["content"][0]["text"] == '{"city": "Paris"}' and plain["text"]["format"] == fmt
    if load_spec() is not None:
        spec = require_spec()
        spec.check("Response", plain)
        for name, data in sse_events(streamed):
            assert json.loads(data)["type"] == name
            spec.check("ResponseStreamEvent", json.loads(data))
