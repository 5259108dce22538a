"""Tool calling and structured output in the gateway (gateway/tools.py, gateway/responses.py) against a
scripted Triton stand-in: the guide sent to the engine, calls in the message and as streamed deltas."""

from __future__ import annotations

import json
from typing import Any

from tests.fixtures.asgi import engine_client as client
from tests.fixtures.backends import MODEL, USER, Engine
from tests.fixtures.sse import chunks


def sse(text: str) -> list[dict[str, Any]]:
    return chunks(text)


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


CALL_TEXT = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'


async def test_tool_call_non_streaming_and_guide() -> None:
    engine = Engine(text=CALL_TEXT)
    async with client(engine) as c:
        body = {"model": MODEL, "messages": USER, "tools": [TOOL], "tool_choice": "required"}
        response = await c.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    prompt, values = engine.calls[0]
    assert "get_weather" in prompt  # the tool prompt was rendered
    assert values["guided_decoding_guide_type"] == "json_schema"
    guide = json.loads(values["guided_decoding_guide"])
    assert guide["type"] == "array" and guide["minItems"] == 1 and guide["maxItems"] == 1


async def test_tool_call_streaming_deltas() -> None:
    engine = Engine(text="Sure. " + CALL_TEXT)
    async with client(engine) as c:
        body = {"model": MODEL, "messages": USER, "tools": [TOOL], "stream": True}
        response = await c.post("/v1/chat/completions", json=body)
    chunks = sse(response.text)
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Sure."  # no call text in content
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function" and calls[0]["id"]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
    finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert [f for f in finishes if f] == ["tool_calls"]
    assert "guided_decoding_guide" not in engine.calls[0][1]  # "auto": free text, parsed


async def test_tool_choice_none_and_response_format() -> None:
    engine = Engine(text=CALL_TEXT)
    async with client(engine) as c:
        body = {"model": MODEL, "messages": USER, "tools": [TOOL], "tool_choice": "none"}
        plain = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        assert plain["message"]["content"] == CALL_TEXT and plain["finish_reason"] == "stop"
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        await c.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "response_format": fmt})
        assert json.loads(engine.calls[-1][1]["guided_decoding_guide"]) == schema
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
        response = await c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": USER, "response_format": bad}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "response_format.json_schema.schema"


async def test_tool_results_rendered() -> None:
    engine = Engine()
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    async with client(engine) as c:
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 200, response.text
    assert "```tool_output\nsunny\n```" in engine.calls[0][0]


async def test_forced_list_cut_off_by_max_tokens_stays_tool_calls() -> None:
    paris = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text = f"[{paris}, {paris}, {paris}, " + '{"name": "get_weather", "arguments": {"city": "Ro'
    engine = Engine(text=text)
    body = {"model": MODEL, "messages": USER, "tools": [TOOL], "tool_choice": "required", "max_tokens": 2}
    async with client(engine, max_tool_calls=3) as c:
        plain = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        streamed = sse((await c.post("/v1/chat/completions", json={**body, "stream": True})).text)
    assert plain["finish_reason"] == "length"
    assert plain["message"]["content"] is None and plain["message"]["refusal"] is None
    (call,) = plain["message"]["tool_calls"]  # the duplicates are dropped, the cut-off call too
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert json.loads(engine.calls[0][1]["guided_decoding_guide"])["maxItems"] == 3  # GATEWAY_MAX_TOOL_CALLS
    deltas = [ch["choices"][0] for ch in streamed if ch["choices"]]
    assert not any(d["delta"].get("content") for d in deltas)
    arguments = [tc["function"]["arguments"] for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert (
        "".join(arguments) == '{"city": "Paris"}{"city": "Ro'
    )  # streamed as generated; the cut-off call shows
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["length"]


async def test_parallel_tool_calls_false_under_auto_keeps_the_first_call() -> None:
    two = (
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {}}]'
    )
    engine = Engine(text=two)
    body = {"model": MODEL, "messages": USER, "tools": [TOOL], "parallel_tool_calls": False}
    async with client(engine) as c:
        plain = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        streamed = sse((await c.post("/v1/chat/completions", json={**body, "stream": True})).text)
        both = (await c.post("/v1/chat/completions", json={**body, "parallel_tool_calls": True})).json()
    assert [tc["function"]["arguments"] for tc in plain["message"]["tool_calls"]] == ['{"city": "Paris"}']
    ids = {
        tc.get("id")
        for ch in streamed
        if ch["choices"]
        for tc in ch["choices"][0]["delta"].get("tool_calls", [])
    }
    assert len(ids - {None}) == 1
    assert len(both["choices"][0]["message"]["tool_calls"]) == 2
    assert "guided_decoding_guide" not in engine.calls[0][1]
