"""Tool calling and structured output, gateway side (the request was validated by gateway/validation.py).

Prompting (`gemma3_core.tool_prompt.prepare_messages`, called from gateway/prompt.py) and parsing
(`gemma3_core.tool_parser`) are shared modules; this one decides per request

- which guided-decoding inputs go to the engine (`tool_choice` "required"/named → the call list's JSON
  schema, bounded to one call when `parallel_tool_calls` is false, else to `GATEWAY_MAX_TOOL_CALLS`;
  `response_format` json_object/json_schema → that schema), and
- how the output is read:
  - forced (`required`/named): `ForcedCallReader`. The reply is a call list by construction, so it never
    becomes `content`; arguments stream as generated; exact duplicates are dropped; a list cut off by
    `max_tokens` keeps its complete calls with `finish_reason: "length"`.
  - `auto` (tools given, `tool_choice` not "none"): the tolerant parser; non-streamed text becomes
    `message.tool_calls`, streamed deltas go through `StreamingToolParser`, so raw call text never
    reaches `content`; `parallel_tool_calls: false` keeps the first call. A call the model leaves
    unfinished (cut off by `max_tokens`) is content, since nothing guarantees it was meant as a call.
  `finish_reason` becomes "tool_calls" when a call was found (as OpenAI), except for a cut-off forced list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.validation import PATTERN_GUIDES
from gemma3_core.tool_parser import (
    ForcedCallReader,
    StreamingToolParser,
    parse_forced_calls,
    parse_tool_calls,
)
from gemma3_core.tool_prompt import DEFAULT_MAX_CALLS, guided_decoding_for, is_forced, tools_active
from triton_io.contract import Ensemble

ToolReader = StreamingToolParser | ForcedCallReader


def assistant_message(content: str | None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A non-streamed `message` (OpenAI's schema requires `refusal`; this model never refuses by API)."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


@dataclass(frozen=True)
class ToolPlan:
    parse_tools: list[dict[str, Any]] | None  # tools to recognise in the output; None: plain text
    guided: tuple[str, str] | None  # (guide type, guide) for the engine
    forced: bool = False  # the output is a guided call list
    max_calls: int | None = None  # calls kept (None: all)

    def triton_inputs(self) -> dict[str, Any]:
        if self.guided is None:
            return {}
        return {Ensemble.GUIDE_TYPE: self.guided[0], Ensemble.GUIDE: self.guided[1]}

    def new_parser(self) -> ToolReader | None:
        if self.parse_tools is None:
            return None
        if self.forced:
            return ForcedCallReader(self.parse_tools, self.max_calls)
        return StreamingToolParser(self.parse_tools, self.max_calls)

    def finish_reason(self, reader: ToolReader, finish_reason: str) -> str:
        """The streamed choice's finish_reason once `reader` has seen all of its text."""
        if isinstance(reader, ForcedCallReader):
            return "tool_calls" if reader.calls and reader.closed else finish_reason
        return "tool_calls" if reader.has_tool_calls else finish_reason

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The non-streamed `message` and the (possibly overridden) finish_reason of one choice."""
        if self.parse_tools is None:
            return assistant_message(text), finish_reason
        if self.forced:
            calls, closed = parse_forced_calls(text, self.parse_tools, self.max_calls)
            reason = "tool_calls" if calls and closed else finish_reason
            return assistant_message(None, [c.to_openai() for c in calls]), reason
        parsed = parse_tool_calls(text, self.parse_tools)
        if not parsed.calls:
            return assistant_message(text), finish_reason
        kept = parsed.calls[: self.max_calls] if self.max_calls is not None else parsed.calls
        message = assistant_message(parsed.content, [call.to_openai() for call in kept])
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
    max_calls: int = DEFAULT_MAX_CALLS,
) -> ToolPlan:
    """`max_calls`: the deployment's cap on a forced call list (`parallel_tool_calls` false: one)."""
    cap = 1 if parallel_tool_calls is False else max_calls
    guided = guided_decoding_for(tools, tool_choice, response_format, cap) or _pattern_guide(response_format)
    parse = list(tools) if tools and tools_active(tools, tool_choice) else None
    if parse is None and guided is None:
        return NO_TOOLS
    forced = parse is not None and is_forced(tools, tool_choice)
    keep = cap if forced else (1 if parallel_tool_calls is False else None)
    return ToolPlan(parse_tools=parse, guided=guided, forced=forced, max_calls=keep)
