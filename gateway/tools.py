"""Tool calling and structured output, gateway side (the request was validated by gateway/validation.py).

Prompting (`gemma3_core.tool_prompt.prepare_messages`, called from gateway/prompt.py) and parsing
(`gemma3_core.tool_parser`) are shared modules; this one decides per request

- which guided-decoding inputs go to the engine (`tool_choice` "required"/named → the call list's JSON
  schema; `response_format` json_object/json_schema → that schema), and
- whether the output is parsed for calls (tools given and `tool_choice` is not "none"): non-streamed text
  becomes `message.tool_calls`, streamed deltas go through `StreamingToolParser`, so raw call text never
  reaches `content`; `finish_reason` becomes "tool_calls" when a call was found (as OpenAI).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.validation import PATTERN_GUIDES
from gemma3_core.tool_parser import StreamingToolParser, parse_tool_calls
from gemma3_core.tool_prompt import guided_decoding_for, tools_active
from triton_io.contract import Ensemble


@dataclass(frozen=True)
class ToolPlan:
    parse_tools: list[dict[str, Any]] | None  # tools to recognise in the output; None: plain text
    guided: tuple[str, str] | None  # (guide type, guide) for the engine

    def triton_inputs(self) -> dict[str, Any]:
        if self.guided is None:
            return {}
        return {Ensemble.GUIDE_TYPE: self.guided[0], Ensemble.GUIDE: self.guided[1]}

    def new_parser(self) -> StreamingToolParser | None:
        return StreamingToolParser(self.parse_tools) if self.parse_tools is not None else None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The non-streamed `message` and the (possibly overridden) finish_reason of one choice."""
        if self.parse_tools is None:
            return {"role": "assistant", "content": text}, finish_reason
        parsed = parse_tool_calls(text, self.parse_tools)
        if not parsed.calls:
            return {"role": "assistant", "content": text}, finish_reason
        message = {
            "role": "assistant",
            "content": parsed.content,
            "tool_calls": [call.to_openai() for call in parsed.calls],
        }
        return message, parsed.finish_reason_override or finish_reason


NO_TOOLS = ToolPlan(parse_tools=None, guided=None)


def _pattern_guide(response_format: Any) -> tuple[str, str] | None:
    """response_format `regex` / `grammar` -> the engine's `regex` / `ebnf_grammar` guide."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in PATTERN_GUIDES:
        return None
    return PATTERN_GUIDES[kind], response_format[kind]


def plan_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    response_format: Any,
    parallel_tool_calls: bool | None = None,
) -> ToolPlan:
    guided = guided_decoding_for(tools, tool_choice, response_format) or _pattern_guide(response_format)
    forced = bool(tools) and tool_choice not in (None, "none", "auto")
    if guided is not None and forced and parallel_tool_calls is False:
        # OpenAI's parallel_tool_calls=false: at most one call. The forced guide is the call list's schema.
        schema = json.loads(guided[1])
        if schema.get("type") == "array":
            schema["maxItems"] = 1
            guided = (guided[0], json.dumps(schema, ensure_ascii=False))
    parse = list(tools) if tools and tools_active(tools, tool_choice) else None
    if parse is None and guided is None:
        return NO_TOOLS
    return ToolPlan(parse_tools=parse, guided=guided)
