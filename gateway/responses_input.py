"""A Responses API request body (already checked against schemas/responses_request.schema.json) → the
equivalent chat completions body, so the Responses endpoint runs the chat path unchanged.

- `instructions` → a leading `system` message; `input` as a string → one user message.
- message items keep their role; `input_text`/`output_text`/`refusal` parts become text, `input_image`
  an `image_url` part (user turns; other roles get their text joined).
- `function_call` items → an assistant message's `tool_calls` (consecutive calls, and a call right after
  an assistant message, join that message); `function_call_output` items → `tool` messages.
- flat function `tools` → chat `tools`; `tool_choice {"type": "function", "name"}` → the chat form;
  `text.format` → `response_format`; `max_output_tokens` → `max_tokens`.
"""

from __future__ import annotations

from typing import Any

_PASSED = (
    "model",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop",
    "stream",
    "user",
    "parallel_tool_calls",
    "top_logprobs",
)


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", part.get("refusal", "")) for part in content)


def _user_parts(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if part["type"] == "input_image":
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            parts.append({"type": "text", "text": part.get("text", part.get("refusal", ""))})
    return parts


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body["input"]
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    open_assistant: dict[str, Any] | None = None  # the assistant turn later function calls join
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if open_assistant is None:
                open_assistant = {"role": "assistant", "content": None}
                messages.append(open_assistant)
            open_assistant.setdefault("tool_calls", []).append(call)
            continue
        if kind == "function_call_output":
            output = item["output"]
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(output)})
            open_assistant = None
            continue
        role, content = item["role"], item["content"]
        if role == "user":
            messages.append({"role": "user", "content": _user_parts(content)})
            open_assistant = None
        elif role == "assistant":
            open_assistant = {"role": "assistant", "content": _text(content)}
            messages.append(open_assistant)
        else:
            messages.append({"role": role, "content": _text(content)})
            open_assistant = None
    return messages


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if not fmt or fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": schema}


def to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    chat: dict[str, Any] = {k: body[k] for k in _PASSED if body.get(k) is not None}
    chat["messages"] = _messages(body)
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    k: tool[k]
                    for k in ("name", "description", "parameters", "strict")
                    if tool.get(k) is not None
                },
            }
            for tool in body["tools"]
        ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        chat["tool_choice"] = choice
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    return chat
