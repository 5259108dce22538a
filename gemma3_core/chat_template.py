"""The Gemma 3 instruction-tuned chat template, as Python.

Output is byte-identical to the official Jinja template shipped with google/gemma-3-*-it
(`chat_template.jinja` next to this file, used by the tests as the reference and copied into the
tokenizer directory for HF tools):

- `<bos>` first; a leading system message is folded into the first turn as `system + "\n\n"` (not trimmed;
  for list content only its first part's text is used, as the template does);
- roles must alternate user/model after that (only the user parity is checked, as in the template);
- string content and text parts are `trim`-med, text parts are joined with no separator, an image part
  becomes `<start_of_image>` in place (the processor expands it later);
- every turn ends with `<end_of_turn>\n`; the generation prompt is `<start_of_turn>model\n`.

OpenAI `image_url` parts must be turned into `{"type": "image"}` by the caller: the template drops any
other part type silently, which is how peers lose images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gemma3_core import constants as C

REFERENCE_TEMPLATE = Path(__file__).with_name("chat_template.jinja")


class TemplateError(ValueError):
    """A conversation the template rejects; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _system_prefix(content: Any) -> str:
    if isinstance(content, str):
        return content + "\n\n"
    if isinstance(content, Sequence) and content and isinstance(content[0], Mapping):
        return str(content[0].get("text", "")) + "\n\n"
    raise TemplateError(
        "system message content must be a string or a list of text parts", "messages[0].content"
    )


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        out: list[str] = []
        for j, item in enumerate(content):
            if not isinstance(item, Mapping):
                raise TemplateError("content parts must be objects", f"{param}[{j}]")
            kind = item.get("type")
            if kind == "image":
                out.append(C.START_OF_IMAGE)
            elif kind == "text":
                out.append(str(item.get("text", "")).strip())
        return "".join(out)
    raise TemplateError("Invalid content type: content must be a string or a list of parts", param)


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    if not messages:
        raise TemplateError("messages must not be empty", "messages")
    parts = [C.BOS]
    first_user_prefix = ""
    offset = 0
    if messages[0].get("role") == "system":
        first_user_prefix = _system_prefix(messages[0].get("content"))
        offset = 1
    for i, message in enumerate(messages[offset:]):
        idx = i + offset
        role = message.get("role")
        if (role == "user") != (i % 2 == 0):
            raise TemplateError(
                "Conversation roles must alternate user/assistant/user/assistant/... "
                f"(after an optional system message); messages[{idx}] has role {role!r}",
                f"messages[{idx}].role",
            )
        turn_role = "model" if role == "assistant" else str(role)
        parts.append(f"{C.START_OF_TURN}{turn_role}\n")
        if i == 0:
            parts.append(first_user_prefix)
        parts.append(_content(message.get("content"), f"messages[{idx}].content"))
        parts.append(f"{C.END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{C.START_OF_TURN}model\n")
    return "".join(parts)


def expand_image_markers(prompt: str) -> str:
    """Replace each `<start_of_image>` by the full image sequence, as HF's Gemma3Processor does.

    Tokenizing the expanded string in one pass merges the surrounding newlines into `\\n\\n\\n` tokens
    exactly as HF does, so prompt token counts match.
    """
    return prompt.replace(C.START_OF_IMAGE, C.FULL_IMAGE_SEQUENCE)
