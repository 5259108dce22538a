"""Tool prompt: OpenAI conversations → Gemma 3 template messages, guided-decoding schemas, the name rule.

Tools, tool_choice and tool turns are checked by gateway/validation.py (tests/test_gateway_validation.py).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from gateway.validation import load_schema
from gemma3_core.chat_template import render_chat
from gemma3_core.tool_parser import parse_tool_calls
from gemma3_core.tool_prompt import (
    FORMAT_EXAMPLE,
    FUNCTION_NAME_RE,
    guided_decoding_for,
    prepare_messages,
    render_tool_calls,
    render_tool_prompt,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, TIME]


def _call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _assert_alternates(messages: list[dict[str, Any]]) -> None:
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    assert roles == ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Rome, and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            _call("call_a", "get_weather", {"city": "Paris"}),
            _call("call_b", "get_weather", {"city": "Rome", "unit": "celsius"}),
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "18°C, sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "21°C"}]},
    {
        "role": "assistant",
        "content": "Paris 18°C, Rome 21°C.",
        "tool_calls": [_call("call_c", "get_time", {})],
    },
    {"role": "tool", "tool_call_id": "call_c", "content": "12:00"},
    {"role": "user", "content": "Thanks! Tomorrow?"},
]


def test_full_tool_conversation_renders() -> None:
    out = prepare_messages(CONVERSATION, TOOLS, "auto")
    _assert_alternates(out)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user"]
    prompt = render_chat(out)
    assert prompt.startswith(
        "<bos><start_of_turn>user\nYou are terse.\n\nYou have access to the following functions:"
    )
    assert prompt.endswith("<start_of_turn>model\n")
    # Tool definitions come before the user's question in the first user turn.
    first = out[1]["content"]
    assert first.index("get_weather") < first.index("Weather in Paris and Rome")
    assert FORMAT_EXAMPLE in first
    # Assistant tool calls are re-rendered in exactly the requested format and parse back.
    assert out[2]["content"] == (
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}]'
    )
    parsed = parse_tool_calls(out[2]["content"], TOOLS)
    assert [(c.name, json.loads(c.arguments_json)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome", "unit": "celsius"}),
    ]
    assert parsed.content is None
    # Both results in one user turn, each with name and id.
    results = out[3]["content"]
    assert "Result of get_weather (call id call_a):\n```tool_output\n18°C, sunny\n```" in results
    assert "Result of get_weather (call id call_b):\n```tool_output\n21°C\n```" in results
    # Assistant text + calls; the last results merged with the following user message.
    assert out[4]["content"] == 'Paris 18°C, Rome 21°C.\n\n[{"name": "get_time", "arguments": {}}]'
    assert out[5]["content"].startswith("Result of get_time (call id call_c):")
    assert out[5]["content"].endswith("```\n\nThanks! Tomorrow?")
    assert parse_tool_calls(out[4]["content"], TOOLS).content == "Paris 18°C, Rome 21°C."


def test_input_not_mutated() -> None:
    before = json.dumps(CONVERSATION)
    prepare_messages(CONVERSATION, TOOLS, "auto")
    assert json.dumps(CONVERSATION) == before


def test_no_tools_or_tool_choice_none_leaves_prompt_alone() -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert prepare_messages(msgs, None, None) == msgs
    assert prepare_messages(msgs, [], None) == msgs
    assert prepare_messages(msgs, TOOLS, "none") == msgs
    # History with tool calls still renders when tools are switched off.
    out = prepare_messages(CONVERSATION, TOOLS, "none")
    assert "You have access" not in render_chat(out)
    _assert_alternates(out)


def test_required_and_named_instructions() -> None:
    assert "MUST call at least one" in render_tool_prompt(TOOLS, "required")
    named = render_tool_prompt(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert "MUST call the function 'get_time'" in named
    assert "answer normally" in render_tool_prompt(TOOLS, "auto")


def test_image_parts_pass_through() -> None:
    image_first = [{"type": "image"}, {"type": "text", "text": "What city is this? Weather there?"}]
    out = prepare_messages([{"role": "user", "content": image_first}], TOOLS, "auto")
    parts = out[0]["content"]
    assert parts[0]["type"] == "text" and parts[0]["text"].startswith("You have access")
    assert parts[1:] == image_first
    text_first = [{"type": "text", "text": "Weather here?"}, {"type": "image"}]
    parts = prepare_messages([{"role": "user", "content": text_first}], TOOLS, "auto")[0]["content"]
    assert len(parts) == 2 and parts[1] == {"type": "image"}
    assert parts[0]["text"].endswith("\n\nWeather here?")  # one part: the template's trim keeps the gap
    rendered = render_chat(prepare_messages([{"role": "user", "content": text_first}], TOOLS, "auto"))
    assert "plain text.\n\nWeather here?<start_of_image>" in rendered


def test_user_with_images_after_tool_results() -> None:
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("c1", "get_weather", {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3°C"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And here?"}]},
    ]
    out = prepare_messages(msgs, TOOLS, "auto")
    _assert_alternates(out)
    last = out[-1]["content"]
    assert last[0]["type"] == "text" and "```tool_output\n-3°C\n```" in last[0]["text"]
    assert last[1:] == msgs[-1]["content"]
    render_chat(out)


def test_tool_result_with_backticks_gets_longer_fence() -> None:
    msgs = [
        {"role": "user", "content": "Run it"},
        {"role": "assistant", "content": None, "tool_calls": [_call("c1", "get_time", {})]},
        {"role": "tool", "tool_call_id": "c1", "content": "```\ncode\n```"},
    ]
    out = prepare_messages(msgs, TOOLS, "auto")
    assert "````tool_output\n```\ncode\n```\n````" in out[-1]["content"]


def test_function_name_rule_is_the_request_schemas() -> None:
    """One function-name rule: the request schema's pattern for a tool's name is FUNCTION_NAME_RE's."""
    tool = load_schema()["components"]["schemas"]["Tool"]
    assert tool["properties"]["function"]["properties"]["name"]["pattern"] == FUNCTION_NAME_RE.pattern
    assert FUNCTION_NAME_RE.fullmatch("get_weather-2") and not FUNCTION_NAME_RE.fullmatch("a.b")


# --- guided decoding ------------------------------------------------------------------------------
def _schema(tools: Any, tool_choice: Any, response_format: Any = None) -> dict[str, Any]:
    guide = guided_decoding_for(tools, tool_choice, response_format)
    assert guide is not None and guide[0] == "json_schema"
    schema = json.loads(guide[1])
    jsonschema.validators.validator_for(schema).check_schema(schema)
    return schema


def _valid(schema: dict[str, Any], value: Any) -> bool:
    return jsonschema.validators.validator_for(schema)(schema).is_valid(value)


def test_guided_required() -> None:
    schema = _schema(TOOLS, "required")
    good = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]
    assert _valid(schema, good)
    assert not _valid(schema, [])
    assert not _valid(schema, [{"name": "get_weather", "arguments": {}}])  # city required
    assert not _valid(schema, [{"name": "nope", "arguments": {}}])
    assert not _valid(schema, [{"name": "get_time", "arguments": {}, "extra": 1}])
    # What the model is forced to produce is exactly what the parser reads.
    parsed = parse_tool_calls(json.dumps(good), TOOLS)
    assert [c.name for c in parsed.calls] == ["get_weather", "get_time"] and parsed.content is None


def test_guided_named_function() -> None:
    schema = _schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    one = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]
    assert _valid(schema, one)
    assert not _valid(schema, one * 2)
    assert not _valid(schema, [{"name": "get_time", "arguments": {}}])
    assert not _valid(schema, [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}])


def test_guided_response_format() -> None:
    assert _schema(None, None, {"type": "json_object"}) == {"type": "object"}
    user_schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": user_schema}}
    assert _schema(None, None, rf) == user_schema
    # auto + response_format: the format applies; forced calls win over it.
    assert _schema(TOOLS, "auto", rf) == user_schema
    assert _schema(TOOLS, "required", rf)["type"] == "array"
    assert guided_decoding_for(None, None, None) is None
    assert guided_decoding_for(None, None, {"type": "text"}) is None
    assert guided_decoding_for(TOOLS, "auto", None) is None
    assert guided_decoding_for(TOOLS, "none", None) is None


def test_render_tool_calls_accepts_objects_and_strings() -> None:
    assert render_tool_calls([("f", {"a": 1}), ("g", '{"b": "é"}'), ("h", "")]) == (
        '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": "é"}}, '
        '{"name": "h", "arguments": {}}]'
    )
