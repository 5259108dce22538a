"""Tool calling and structured output end to end (issue 6): openai SDK → gateway → CPU Triton.

Forced calls (`tool_choice` "required" / a named function) and `response_format` json_schema run under
guided decoding, so even the small base model produces valid calls/JSON; the tests check the OpenAI shapes
(calls in `message.tool_calls`, `finish_reason: "tool_calls"`, streamed call deltas, no call text in
`content`) and that arguments validate against the tools' schemas. Schemas use enums so outputs stay short.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures.gateway import GatewayTarget

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_TOKENS = 48

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Tokyo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "enum": ["Europe/Paris", "Asia/Tokyo"]}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def check_call(name: str, arguments: str, allowed: set[str]) -> dict[str, Any]:
    assert name in allowed, name
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def collect_stream(chunks: list[Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """(content, calls, finish_reason) of a streamed choice, checking OpenAI's tool-call delta shape."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    finish: str | None = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                # The first delta of a call names it: index, id, type and function.name.
                assert tc.id and tc.type == "function" and tc.function and tc.function.name, tc
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and (tc.function is None or tc.function.name is None), tc
            calls[tc.index]["arguments"] += (tc.function.arguments if tc.function else None) or ""
        if choice.finish_reason is not None:
            assert finish is None, "one finish_reason per choice"
            finish = choice.finish_reason
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[i] for i in sorted(calls)], finish


NAMED = {"type": "function", "function": {"name": "get_weather"}}


def check_forced(
    sdk: openai.OpenAI, kwargs: dict[str, Any], allowed: set[str]
) -> tuple[list[Any], list[Any]]:
    """One forced call, plain and streamed: both in OpenAI's tool-call shape, no call text in `content`.
    Returns (plain calls, streamed calls)."""
    completion = sdk.chat.completions.create(**kwargs)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    plain = choice.message.tool_calls or []
    assert plain and not choice.message.content
    for call in plain:
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments, allowed)
    content, streamed, finish = collect_stream(list(sdk.chat.completions.create(stream=True, **kwargs)))
    assert finish == "tool_calls"
    assert content == ""  # the raw call text never leaks into content
    assert streamed
    for call in streamed:
        check_call(call["name"], call["arguments"], allowed)
    return plain, streamed


def _forced(gateway: GatewayTarget, tool_choice: Any, **extra: Any) -> dict[str, Any]:
    return {
        "model": gateway.model,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


def test_forced_tool_call_required(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    # One call at most (the guide gets maxItems 1): the base model would otherwise list calls until
    # max_tokens.
    check_forced(sdk, _forced(gateway, "required", parallel_tool_calls=False), set(SCHEMAS))


def test_forced_named_tool_call_streamed_and_plain_agree(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    # A named tool_choice is one call by definition; greedy, so streamed and plain calls are the same.
    plain, streamed = check_forced(sdk, _forced(gateway, NAMED), {"get_weather"})
    assert len(plain) == 1
    assert [(c.function.name, c.function.arguments) for c in plain] == [
        (c["name"], c["arguments"]) for c in streamed
    ]


def test_response_format_json_schema(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "sure": {"type": "boolean"},
        },
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    completion = sdk.chat.completions.create(
        model=gateway.model,
        messages=[{"role": "user", "content": "Is Paris in France? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_response_format_json_object(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model=gateway.model,
        messages=[{"role": "user", "content": "Give me a JSON object describing Paris."}],
        response_format={"type": "json_object"},
        max_tokens=16,
        temperature=0,
    )
    content = completion.choices[0].message.content or ""
    assert content.startswith("{")  # guided: an object from the first token (may be cut by max_tokens)
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_tool_result_round_trip(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_weather_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_weather_1", "content": "18 degrees, sunny"},
    ]
    completion = sdk.chat.completions.create(
        model=gateway.model, messages=messages, tools=TOOLS, max_tokens=16, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert (
        completion.usage is not None and completion.usage.prompt_tokens > 50
    )  # the tool prompt was rendered


def fake_tool(name: str, args: dict[str, Any]) -> str:
    if name == "get_weather":
        return json.dumps({"city": args["city"], "temperature": 18, "unit": args["unit"], "sky": "sunny"})
    return json.dumps({"timezone": args["timezone"], "time": "14:05"})


def test_agent_loop_with_two_tools(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    """A LangChain-style loop by hand: call → run the tool → feed the result → … → a text answer.

    The base model is steered so the loop ends deterministically: the first turn must call a tool, the
    second must call get_time (so both tools run), the last may not call tools.
    """
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a travel assistant. Use the tools."},
        {"role": "user", "content": "What is the weather in Paris, and what time is it there?"},
    ]
    schedule: list[Any] = ["required", {"type": "function", "function": {"name": "get_time"}}, "none"]
    used: list[str] = []
    answer: str | None = None
    for turn in range(5):
        choice_arg = schedule[min(turn, len(schedule) - 1)]
        completion = sdk.chat.completions.create(
            model=gateway.model,
            messages=messages,
            tools=TOOLS,
            tool_choice=choice_arg,
            parallel_tool_calls=False,
            max_tokens=MAX_TOKENS if choice_arg != "none" else 24,
            temperature=0,
        )
        message = completion.choices[0].message
        if not message.tool_calls:
            assert choice_arg == "none", f"turn {turn}: forced turn returned no call"
            answer = message.content
            break
        assert completion.choices[0].finish_reason == "tool_calls"
        messages.append(message.model_dump(exclude_none=True))  # the SDK object, replayed as the agent does
        for call in message.tool_calls:
            args = check_call(call.function.name, call.function.arguments, set(SCHEMAS))
            used.append(call.function.name)
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": fake_tool(call.function.name, args)}
            )
    assert answer, "the loop should end with a text answer"
    assert "get_time" in used and len(used) >= 2
    assert sum(m["role"] == "tool" for m in messages) == len(used)


# --- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
            "tools[0].function.parameters",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
            "response_format.json_schema.schema",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ],
    ids=["bad-parameters-schema", "bad-response-schema", "unknown-named-tool"],
)
def test_bad_tools_are_400(
    gateway: GatewayTarget, http: httpx.Client, fields: dict[str, Any], param: str
) -> None:
    response = http.post(
        "/v1/chat/completions", json={"model": gateway.model, "messages": ASK, "max_tokens": 4, **fields}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
