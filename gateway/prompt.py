"""OpenAI messages → the Gemma 3 prompt, via the shared template (gemma3_core.chat_template).

The gateway only adapts the message shape of a validated request: `developer` is OpenAI's new name for
`system`, and content parts are reduced to what the template knows (`text`, `image`). The template decides
the rest; its own rejections (role alternation, bad content) become 400s naming the message.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import bad_request
from gemma3_core.chat_template import TemplateError, render_chat
from gemma3_core.tool_prompt import prepare_messages


def _content(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":  # only in requests validated with images enabled
            # The template only emits <start_of_image> for {"type": "image"}; image_url parts vanish.
            parts.append({"type": "image"})
    return parts


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        role = "system" if message["role"] == "developer" else message["role"]
        converted = {"role": role, "content": _content(message.get("content"))}
        if message.get("tool_calls"):
            converted["tool_calls"] = message["tool_calls"]
        out.append(converted)
    return out


def render_prompt(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
) -> str:
    try:
        if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            # Tool definitions, replayed calls and results become plain turns (docs/tools.md).
            messages = prepare_messages(messages, tools, tool_choice)
        return render_chat(template_messages(messages), add_generation_prompt=True)
    except TemplateError as exc:
        raise bad_request(exc.message, exc.param or "messages", "invalid_conversation") from None
