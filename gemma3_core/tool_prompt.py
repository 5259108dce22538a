"""Tool calling for Gemma 3: the prompt format, OpenAI messages → template messages, guided decoding.

Gemma 3 has no tool tokens and its chat template ignores `tools`, so tool use is a prompt convention.
We use **one** format, the JSON list (docs/tools.md has the full rationale):

    [{"name": "get_weather", "arguments": {"city": "Paris"}}]

- It maps 1:1 to a JSON schema (array of `{name: const, arguments: <the tool's parameters schema>}`), so
  `tool_choice: "required"` / a named function are enforced with TensorRT-LLM's `json_schema` guided
  decoding and the constrained output is byte-for-byte the format the model sees in its history.
- Arguments are JSON exactly as OpenAI transports them (no Python-literal conversion, no positional args,
  nested objects/unicode survive); Google's function-calling guide documents the same JSON-object form
  (with `parameters`), and the pythonic alternative (vLLM's Gemma 3 template) cannot express JSON
  `null`/`true` faithfully and breaks when the model adds fences.
- The parser (`gemma3_core.tool_parser`) still accepts the drifts Gemma produces (```` ```tool_code ````
  fences, Google's `parameters`, pythonic lists), so asking for the bare list costs nothing.

Conversation mapping (the template only knows alternating user/model turns):
- tool definitions + calling instructions go at the start of the first user turn (after the system text
  the template folds in), unless `tool_choice` is `"none"`;
- an assistant message with `tool_calls` becomes a model turn holding its text (if any) and the JSON list,
  i.e. exactly what the model is asked to produce;
- consecutive `tool` messages become one user turn: one ```` ```tool_output ```` block per result, headed
  with the function name and call id (Google's cookbook wraps results the same way); a user message right
  after the results joins that turn so roles keep alternating.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

FORMAT_EXAMPLE = '[{"name": "function_name", "arguments": {"argument_name": "value"}}]'
# OpenAI's function-name rule, the one pattern the request schema (gateway/schemas) also uses.
FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def named_tool_choice(tool_choice: Any) -> str | None:
    """The function name of `{"type": "function", "function": {"name": ...}}`, else None."""
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if isinstance(name, str):
            return name
    return None


def tools_active(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any) -> bool:
    """Whether the tool prompt is rendered and the output parsed for calls."""
    return bool(tools) and tool_choice != "none"


# --- rendering ------------------------------------------------------------------------------------
def _function_def(tool: Mapping[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    out: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def render_tool_prompt(tools: Sequence[Mapping[str, Any]], tool_choice: Any = "auto") -> str:
    """Tool definitions and calling instructions (goes at the start of the first user turn)."""
    # One function per line: readable for the model, far fewer tokens than indented JSON.
    defs = ",\n".join(json.dumps(_function_def(t), ensure_ascii=False) for t in tools)
    lines = [
        "You have access to the following functions:",
        f"[\n{defs}\n]",
        "",
        "To call functions, reply with ONLY a JSON list of the calls and no other text, "
        "in exactly this format:",
        FORMAT_EXAMPLE,
        "Put all the calls you need in that one list. Use only the functions listed above, with argument "
        "names from their parameters; argument values must be valid JSON. Do not wrap the list in markdown.",
        "Each result will be given back to you in a ```tool_output block.",
    ]
    name = named_tool_choice(tool_choice)
    if name is not None:
        lines.append(f"You MUST call the function {name!r} now.")
    elif tool_choice == "required":
        lines.append("You MUST call at least one of these functions now.")
    else:
        lines.append("If no function is needed, answer normally in plain text.")
    return "\n".join(lines)


def _arguments_obj(arguments: Any) -> Any:
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if arguments is None or arguments == "":
        return {}
    return json.loads(arguments)


def render_tool_calls(calls: Sequence[tuple[str, Any]]) -> str:
    """The exact text the model is asked to produce for `(name, arguments)` pairs.

    `arguments` is the JSON string OpenAI transports (or an already-decoded object).
    """
    items = [{"name": name, "arguments": _arguments_obj(args)} for name, args in calls]
    return json.dumps(items, ensure_ascii=False)


def _fence_for(text: str) -> str:
    # A fence longer than any backtick run inside keeps the result from closing it early (CommonMark rule).
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_tool_result(name: str | None, call_id: str, content: str) -> str:
    fence = _fence_for(content)
    label = f"{name} (call id {call_id})" if name else f"call id {call_id}"
    return f"Result of {label}:\n{fence}tool_output\n{content.strip()}\n{fence}"


# --- conversation mapping -------------------------------------------------------------------------
def _text_of(content: Any) -> str:
    """Text of a string or a list of text parts (tool results, assistant turns)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def _prefix_content(content: Any, prefix: str) -> Any:
    """`prefix` + a blank line + `content`, keeping list content (images) as parts.

    The template trims each text part and joins parts with nothing, so the prefix goes into the first
    text part; if the list starts with an image, a separate text part suffices (the image expansion
    brings its own blank lines).
    """
    if content is None:
        return prefix
    if isinstance(content, str):
        return f"{prefix}\n\n{content}" if content.strip() else prefix
    if isinstance(content, list):
        parts = list(content)
        if parts and isinstance(parts[0], Mapping) and parts[0].get("type") == "text":
            first = dict(parts[0])
            text = str(first.get("text", ""))
            first["text"] = f"{prefix}\n\n{text}" if text.strip() else prefix
            return [first, *parts[1:]]
        return [{"type": "text", "text": prefix}, *parts]
    return content  # leave odd content for the template to reject with its own message


def prepare_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any = None,
) -> list[dict[str, Any]]:
    """OpenAI chat messages → messages `gemma3_core.chat_template.render_chat` accepts.

    Only `system`/`user`/`assistant` roles come out, alternating user/assistant after an optional system
    message (for well-formed OpenAI conversations); image parts pass through untouched. The request is
    assumed valid (the gateway validates tools, tool_choice, replayed calls and tool_call_ids first); the
    template still judges the roles' order.
    """
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name
    pending_results: list[str] = []  # tool results waiting to become a user turn
    results_turn: dict[str, Any] | None = None  # the user turn holding the latest results

    def flush_results() -> None:
        nonlocal results_turn
        if pending_results:
            results_turn = {"role": "user", "content": "\n\n".join(pending_results)}
            out.append(results_turn)
            pending_results.clear()

    for message in messages:
        role = message.get("role")
        if role == "tool":
            call_id = message["tool_call_id"]
            content = _text_of(message.get("content"))
            pending_results.append(render_tool_result(call_names.get(call_id), call_id, content))
            continue
        if pending_results:
            flush_results()
            if role == "user":
                # A user message right after tool results joins their turn so roles keep alternating.
                assert results_turn is not None
                results_turn["content"] = _append_content(results_turn["content"], message.get("content"))
                results_turn = None
                continue
        results_turn = None
        if role == "assistant" and message.get("tool_calls"):
            out.append({"role": "assistant", "content": _assistant_text(message, call_names)})
            continue
        out.append(dict(message))
    flush_results()

    if tools_active(tools, tool_choice):
        assert tools is not None
        prompt = render_tool_prompt(tools, tool_choice)
        for m in out:
            if m.get("role") == "user":
                m["content"] = _prefix_content(m.get("content"), prompt)
                break
    return out


def _append_content(results_text: str, content: Any) -> Any:
    """Tool results (text) followed by a user message's content (string or parts)."""
    return _prefix_content(content, results_text)


def _assistant_text(message: Mapping[str, Any], call_names: dict[str, str]) -> str:
    pairs: list[tuple[str, Any]] = []
    for call in message["tool_calls"]:
        fn = call["function"]
        call_names[call["id"]] = fn["name"]
        pairs.append((fn["name"], fn.get("arguments")))
    text = _text_of(message.get("content")).strip()
    rendered = render_tool_calls(pairs)
    return f"{text}\n\n{rendered}" if text else rendered


# --- guided decoding ------------------------------------------------------------------------------
def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


DEFAULT_MAX_CALLS = 8


def tool_call_schema(
    tools: Sequence[Mapping[str, Any]], tool_choice: Any, max_calls: int = DEFAULT_MAX_CALLS
) -> dict[str, Any] | None:
    """JSON schema of the model output forced by `tool_choice` ("required" or a named function).

    The list is always bounded (`maxItems`): a small model asked for "at least one call" may otherwise
    repeat the same call until `max_tokens` cuts the list open. A named function is one call.
    """
    name = named_tool_choice(tool_choice)
    if name is not None:
        chosen = [t for t in tools if t["function"]["name"] == name]
        return {"type": "array", "minItems": 1, "maxItems": 1, "items": _call_schema(chosen[0])}
    if tool_choice == "required" and tools:
        items = [_call_schema(t) for t in tools]
        return {
            "type": "array",
            "minItems": 1,
            "maxItems": max(1, max_calls),
            "items": items[0] if len(items) == 1 else {"anyOf": items},
        }
    return None


def is_forced(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any) -> bool:
    """Whether `tool_choice` forces a call list ("required" or a named function) under guided decoding."""
    return bool(tools) and (tool_choice == "required" or named_tool_choice(tool_choice) is not None)


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """JSON schema for `response_format` json_object / json_schema (None for text/absent)."""
    kind = response_format.get("type") if response_format is not None else None
    if kind == "json_object":
        return {"type": "object"}  # OpenAI's JSON mode promises an object, not any JSON value
    if kind == "json_schema":
        schema = response_format["json_schema"].get("schema")
        return {"type": "object"} if schema is None else dict(schema)
    return None


def guided_decoding_for(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any,
    response_format: Any,
    max_calls: int = DEFAULT_MAX_CALLS,
) -> tuple[str, str] | None:
    """TensorRT-LLM `(guided_decoding_guide_type, guided_decoding_guide)` for a request, or None.

    Forced tool calls win over `response_format` (the output must be the call). With `tool_choice`
    "auto" plus a JSON response_format the schema applies; a single `{"name", "arguments"}` object
    is still recognised as a call by the parser. `max_calls` bounds a forced "required" list.
    """
    schema = tool_call_schema(tools, tool_choice, max_calls) if tools and tool_choice != "none" else None
    if schema is None:
        schema = response_format_schema(response_format)
    if schema is None:
        return None
    return "json_schema", json.dumps(schema, ensure_ascii=False)
