"""Recognise tool calls in Gemma 3 output, in one go or while streaming.

Gemma 3 has no tool tokens: a call is text whose *structure* matches the format we prompt for
(`gemma3_core.tool_prompt`: a bare JSON list `[{"name": ..., "arguments": {...}}]`). Real outputs
drift from that, so the parser accepts, anywhere in the text (leading prose is fine):

- a JSON list of call objects, or one call object; a call object is `{"name", "arguments"}`, Google's
  `{"name", "parameters"}`, or OpenAI's `{"type": "function", "function": {...}}`; `arguments` may be a
  JSON string holding the object; Python literals (`'x'`, `True`, `None`) are accepted too;
- the pythonic list `[f(a=1, b="x"), g()]` (keyword arguments, literal values only);
- either of the above inside a fence ```` ```tool_code ````, ```` ```tool_call ````, ```` ```json ````,
  or a bare ```` ``` ````; inside a fence, bare calls `f(a=1)` (one per line, `print(f(...))` as
  in Google's examples) count too;
- ```` ```python ```` fences count **only when the fence is the whole response**: a python block next to
  prose is the model explaining code, not calling a tool.

A block is a call only if *every* call in it parses and (when `tools` are given) names a known
function; otherwise the block stays content, verbatim. Nothing is ever evaluated (own AST walker, no
`eval`/`literal_eval` on unknown node types). Arguments are always re-serialised with
`json.dumps(ensure_ascii=False)`. A ```` ```tool_output ```` block right after a call is the model
inventing the result: it is dropped. Whitespace between content and a call is dropped.

One scanner does both modes: `parse_tool_calls` feeds it the whole text, `StreamingToolParser` feeds it
deltas. Every decision it takes depends only on text it has already seen (it waits when it cannot
decide yet), so both modes produce the same content and calls for any split of the text.
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gemma3_core.tool_prompt import FUNCTION_NAME_RE

# Fence languages that may hold calls; `python`/`py` only under the whole-response rule.
CALL_FENCE_LANGS = frozenset({"", "tool_code", "tool_call", "tool_calls", "json", "python", "py"})
PYTHON_FENCE_LANGS = frozenset({"python", "py"})
TOOL_OUTPUT_FENCE_LANG = "tool_output"

_CALL_KEYS = frozenset({"name", "arguments", "parameters", "id", "type", "function"})
_INNER_FUNCTION_KEYS = frozenset({"name", "arguments", "parameters"})
_MAX_DOTTED_NAME = 64  # a prefixed name (`default_api.f`) is held to a function name's length
_IDENT_CHARS = frozenset(string.ascii_letters + string.digits + "_.")
_ID_ALPHABET = string.ascii_letters + string.digits
_WS = " \t\r\n"
_SPECIAL = re.compile(r"[`\[{]")


def new_call_id() -> str:
    """An OpenAI-style tool call id (`call_` + 24 random alphanumerics)."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments_json: str
    id: str = field(default_factory=new_call_id, compare=False)

    def to_openai(self) -> dict[str, Any]:
        """The `message.tool_calls[]` entry of a chat completion."""
        fn = {"name": self.name, "arguments": self.arguments_json}
        return {"id": self.id, "type": "function", "function": fn}


@dataclass
class ParsedOutput:
    content: str | None
    calls: list[ToolCall]

    @property
    def finish_reason_override(self) -> str | None:
        """`"tool_calls"` when calls were found (OpenAI replaces the engine's `stop`)."""
        return "tool_calls" if self.calls else None


def tool_names(tools: Iterable[Mapping[str, Any] | str] | None) -> frozenset[str] | None:
    """Function names of an OpenAI `tools` list (plain strings accepted); None means "any name"."""
    if tools is None:
        return None
    names: set[str] = set()
    for tool in tools:
        if isinstance(tool, str):
            names.add(tool)
        elif isinstance(tool, Mapping):
            fn = tool.get("function")
            if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
                names.add(fn["name"])
    return frozenset(names)


# --- turning parsed structures into calls ---------------------------------------------------------
class _NotACall(Exception):
    pass


def _dumps(args: dict[str, Any]) -> str:
    try:
        return json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _NotACall from e


def _resolve_name(raw: Any, names: frozenset[str] | None) -> str:
    if not isinstance(raw, str) or len(raw) > _MAX_DOTTED_NAME:
        raise _NotACall
    # `default_api.get_weather` / `functions.get_weather`: Gemini-style prefixes Gemma sometimes copies.
    # Every dotted part must itself be a function name; the call names the last one.
    parts = raw.split(".")
    if not all(FUNCTION_NAME_RE.fullmatch(part) for part in parts):
        raise _NotACall
    if names is None or raw in names:
        return raw
    if parts[-1] in names:
        return parts[-1]
    raise _NotACall


def _call_from_dict(obj: Any, names: frozenset[str] | None) -> ToolCall:
    if not isinstance(obj, dict) or not set(obj) <= _CALL_KEYS:
        raise _NotACall
    if "function" in obj:  # OpenAI shape {"type": "function", "function": {"name", "arguments"}}
        fn = obj["function"]
        if "name" in obj or obj.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _NotACall
        if not set(fn) <= _INNER_FUNCTION_KEYS:
            raise _NotACall
        return _call_from_dict(fn, names)
    if obj.get("type", "function") != "function" or ("arguments" in obj and "parameters" in obj):
        raise _NotACall
    name = _resolve_name(obj.get("name"), names)
    if "arguments" in obj or "parameters" in obj:
        args = obj.get("arguments", obj.get("parameters"))
    elif names is not None:
        args = {}  # a known function called without arguments
    else:
        raise _NotACall  # without a tools list, {"name": ...} alone is too weak a signal
    if isinstance(args, str):  # arguments stringified the way OpenAI transports them
        try:
            args = json.loads(args)
        except ValueError as e:
            raise _NotACall from e
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _NotACall
    return ToolCall(name, _dumps(args))


def _calls_from_obj(obj: Any, names: frozenset[str] | None) -> list[ToolCall]:
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise _NotACall
    return [_call_from_dict(item, names) for item in items]


_PY_NAME_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}


def _literal(node: ast.AST) -> Any:
    """JSON-able value of a literal AST node; anything else (names, calls, operators) is refused."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotACall
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise _NotACall  # `**spread` (k is None) or non-string keys
            out[k.value] = _literal(v)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if isinstance(operand, bool) or not isinstance(operand, (int, float)):
            raise _NotACall
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.Name) and node.id in _PY_NAME_LITERALS:  # JSON spellings inside a python call
        return _PY_NAME_LITERALS[node.id]
    raise _NotACall


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise _NotACall


def _call_from_ast(node: ast.AST, names: frozenset[str] | None) -> ToolCall:
    if not isinstance(node, ast.Call):
        raise _NotACall
    # print(f(...)) is how Google's tool_code examples spell a call.
    if (
        isinstance(node.func, ast.Name)
        and node.func.id == "print"
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Call)
    ):
        node = node.args[0]
    name = _resolve_name(_dotted(node.func), names)
    if node.args:  # positional arguments cannot be mapped to parameter names reliably
        raise _NotACall
    args: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise _NotACall
        args[kw.arg] = _literal(kw.value)
    return ToolCall(name, _dumps(args))


def _calls_from_python(src: str, names: frozenset[str] | None, *, bare_calls: bool) -> list[ToolCall]:
    try:
        tree = ast.parse(src, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _NotACall from e
    calls: list[ToolCall] = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Expr):
            raise _NotACall
        value = stmt.value
        if isinstance(value, ast.List) and value.elts and all(isinstance(e, ast.Call) for e in value.elts):
            calls.extend(_call_from_ast(e, names) for e in value.elts)
        elif isinstance(value, (ast.List, ast.Dict)) and len(tree.body) == 1:
            calls.extend(_calls_from_obj(_literal(value), names))  # Python-literal spelling of the JSON form
        elif bare_calls and isinstance(value, ast.Call):
            calls.append(_call_from_ast(value, names))
        else:
            raise _NotACall
    if not calls:
        raise _NotACall
    return calls


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def parse_call_block(src: str, names: frozenset[str] | None, *, fenced: bool) -> list[ToolCall] | None:
    """Calls in one candidate block (a bracketed structure, or a call fence's body), or None."""
    text = src.strip()
    if not text:
        return None
    try:
        if text[0] in "[{":
            try:
                obj = json.loads(text, parse_constant=_reject_constant)
            except (ValueError, RecursionError):
                pass
            else:
                return _calls_from_obj(obj, names)
        return _calls_from_python(text, names, bare_calls=fenced)
    except (_NotACall, RecursionError):
        return None


# --- deciding, from a prefix, whether a structure can still become a call -------------------------
_KEY_PREFIXES = tuple(_CALL_KEYS)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _viable_object(text: str, i: int) -> bool | None:
    """text[i] == '{'. True: plausible call object; False: certainly not; None: need more text."""
    j = _skip_ws(text, i + 1)
    if j >= len(text):
        return None
    quote = text[j]
    if quote not in "\"'":
        return False
    end = text.find(quote, j + 1)
    key = text[j + 1 : end if end != -1 else len(text)]
    if end == -1:
        return None if any(k.startswith(key) for k in _KEY_PREFIXES) else False
    if key not in _CALL_KEYS:
        return False
    k = _skip_ws(text, end + 1)
    if k >= len(text):
        return None
    return text[k] == ":"


def _viable_call(text: str, i: int) -> bool | None:
    """text[i] starts an identifier: plausible only as `name(` / `a.b(`."""
    if not (text[i].isalpha() or text[i] == "_"):
        return False
    j = i
    while j < len(text) and text[j] in _IDENT_CHARS:
        j += 1
    if j >= len(text):
        return None
    return text[j] == "("


def _viable(text: str, i: int, *, bare_calls: bool) -> bool | None:
    """Can a call structure start at text[i]? (tri-state, see `_viable_object`)."""
    if i >= len(text):
        return None
    ch = text[i]
    if ch == "{":
        return _viable_object(text, i)
    if ch == "[":
        j = _skip_ws(text, i + 1)
        if j >= len(text):
            return None
        if text[j] == "{":
            return _viable_object(text, j)
        return _viable_call(text, j) if text[j] in _IDENT_CHARS else False
    if bare_calls and ch in _IDENT_CHARS:
        return _viable_call(text, i)
    return False


_CLOSERS = {"[": "]", "{": "}", "(": ")"}


class _BracketScan:
    """Finds where a bracketed structure closes, resumable as text grows (string-aware)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.pos = start
        self.stack: list[str] = []
        self.quote: str | None = None
        self.result: int | None = None

    def end(self, text: str) -> int | None:
        """Index just past the structure, or None while it is still open."""
        if self.result is not None:
            return self.result
        i = self.pos
        n = len(text)
        while i < n:
            ch = text[i]
            if self.quote is not None:
                if ch == "\\":
                    if i + 1 >= n:
                        break  # the escaped character has not arrived yet
                    i += 2
                    continue
                if ch == self.quote:
                    self.quote = None
            elif ch in "\"'":
                self.quote = ch
            elif ch in _CLOSERS:
                self.stack.append(_CLOSERS[ch])
            # A mismatched closer ends the structure too; parsing it then fails and it stays content.
            elif ch in ")]}" and (not self.stack or self.stack.pop() != ch or not self.stack):
                self.result = i + 1
                return self.result
            i += 1
        self.pos = i
        return None


# --- the scanner ----------------------------------------------------------------------------------
@dataclass
class _Decision:
    kind: str  # "content" | "calls" | "opaque" | "drop" | "py_pending"
    length: int
    calls: list[ToolCall] | None = None
    fence_run: int = 0


class _Scanner:
    """Splits model text into content and call blocks; the same decisions for any chunking."""

    def __init__(self, names: frozenset[str] | None) -> None:
        self.names = names
        self.buf = ""
        self.events: list[tuple[str, Any]] = []  # ("content", str) | ("calls", list[ToolCall])
        self.has_calls = False
        self.content_seen = False  # non-whitespace content emitted
        self.anything_seen = False  # content or calls emitted (python-fence rule)
        self.last_was_call = False  # nothing but whitespace since the last call
        self.fence: str | None = None  # None | "opaque" | "drop": inside a non-call fence
        self.fence_run = 0
        self.fence_line_start = True
        self.pending_py: tuple[str, list[ToolCall]] | None = None
        self._scan: _BracketScan | None = None

    # emission
    def _content(self, text: str) -> None:
        if not text:
            return
        self.events.append(("content", text))
        if text.strip(_WS):
            self.content_seen = True
            self.anything_seen = True
            self.last_was_call = False

    def _calls(self, calls: list[ToolCall]) -> None:
        self.events.append(("calls", calls))
        self.has_calls = True
        self.anything_seen = True
        self.last_was_call = True

    def _consume(self, n: int) -> str:
        if n <= 0:
            return ""
        head, self.buf = self.buf[:n], self.buf[n:]
        self._scan = None  # offsets moved
        return head

    def feed(self, text: str) -> None:
        self.buf += text
        self._run(final=False)

    def finish(self) -> None:
        self._run(final=True)

    def _run(self, final: bool) -> None:
        while True:
            progressed = self._step_fence(final) if self.fence is not None else self._step_text(final)
            if not progressed:
                return

    # inside a fence that holds no call: stream it as content (or drop it), line by line
    def _step_fence(self, final: bool) -> bool:
        if not self.buf:
            return False
        closing = re.compile(r"[ \t]{0,3}`{" + str(self.fence_run) + ",}")
        nl = self.buf.find("\n")
        line = self.buf if nl == -1 else self.buf[:nl]
        if self.fence_line_start:
            m = closing.match(line)
            if m and (m.end() < len(self.buf) or final):
                self._fence_out(self._consume(m.end()))
                self.fence = None
                return True
            if (m or (nl == -1 and re.fullmatch(r"[ \t]{0,3}`*", line))) and not final:
                return False  # may still become (or extend) the closing fence
        if nl == -1:
            self._fence_out(self._consume(len(self.buf)))
            self.fence_line_start = False
            return False
        self._fence_out(self._consume(nl + 1))
        self.fence_line_start = True
        return True

    def _fence_out(self, text: str) -> None:
        if self.fence == "opaque":
            self._content(text)

    def _step_text(self, final: bool) -> bool:
        if self.pending_py is not None:
            j = _skip_ws(self.buf, 0)
            if j >= len(self.buf):
                if not final:
                    return False
                _, calls = self.pending_py
                self.pending_py = None
                self._consume(len(self.buf))
                self._calls(calls)
                return False
            # More text follows the python block: it was an explanation, not a call.
            block, _ = self.pending_py
            self.pending_py = None
            self._content(block)
            return True
        if not self.buf:
            return False
        if self.last_was_call and not self.content_seen:
            j = _skip_ws(self.buf, 0)
            self._consume(j)  # whitespace after a leading call is not content
            if not self.buf:
                return False
        m = _SPECIAL.search(self.buf)
        if m is None:
            body = self.buf.rstrip(_WS)
            if final:
                # Trailing whitespace is content only when the response holds no call.
                tail = self._consume(len(self.buf))
                self._content(tail if not self.has_calls else body)
                return False
            self._content(self._consume(len(body)))
            return False
        p = m.start()
        q = len(self.buf[:p].rstrip(_WS))
        self._content(self._consume(q))
        decision = self._decide(p - q, final)
        if decision is None:
            if final:  # cannot happen: _decide always decides at the end
                self._content(self._consume(len(self.buf)))
            return False
        head = self._consume(p - q + decision.length)  # held whitespace + candidate
        if decision.kind == "content":
            self._content(head)
        elif decision.kind == "calls":
            assert decision.calls is not None
            self._calls(decision.calls)
        elif decision.kind == "py_pending":
            assert decision.calls is not None
            self.pending_py = (head, decision.calls)
        elif decision.kind == "opaque":
            self._content(head)
            self.fence, self.fence_run, self.fence_line_start = "opaque", decision.fence_run, True
        elif decision.kind == "drop":
            self.fence, self.fence_run, self.fence_line_start = "drop", decision.fence_run, True
        return True

    def _decide(self, i: int, final: bool) -> _Decision | None:
        """Classify the candidate at buf[i] (None: need more text)."""
        buf = self.buf
        rest = len(buf) - i
        if buf[i] == "`":
            return self._decide_fence(i, final)
        verdict = _viable(buf, i, bare_calls=False)
        if verdict is None:
            return _Decision("content", rest) if final else None
        if verdict is False:
            return _Decision("content", 1)
        if self._scan is None or self._scan.start != i:
            self._scan = _BracketScan(i)
        end = self._scan.end(buf)
        if end is None:
            return _Decision("content", rest) if final else None
        calls = parse_call_block(buf[i:end], self.names, fenced=False)
        return _Decision("calls", end - i, calls) if calls else _Decision("content", end - i)

    def _decide_fence(self, i: int, final: bool) -> _Decision | None:
        buf = self.buf
        rest = len(buf) - i
        run = len(buf) - i - len(buf[i:].lstrip("`"))
        if i + run >= len(buf) and not final:
            return None
        if run < 3:
            return _Decision("content", run)  # inline code
        nl = buf.find("\n", i + run)
        if nl == -1:
            return _Decision("content", rest) if final else None
        lang = buf[i + run : nl].strip().lower()
        opener = nl + 1 - i
        if lang == TOOL_OUTPUT_FENCE_LANG and self.last_was_call:
            return _Decision("drop", opener, fence_run=run)
        if lang not in CALL_FENCE_LANGS:
            return _Decision("opaque", opener, fence_run=run)
        body_start = _skip_ws(buf, nl + 1)
        verdict = _viable(buf, body_start, bare_calls=True)
        if verdict is False:
            return _Decision("opaque", opener, fence_run=run)
        search_from: int | None = nl + 1
        if verdict and buf[body_start] in "[{":
            # Look for the closing fence after the JSON/list structure, so backticks in strings don't end it.
            if self._scan is None or self._scan.start != body_start:
                self._scan = _BracketScan(body_start)
            search_from = self._scan.end(buf)
        close = buf.find("`" * run, search_from) if search_from is not None else -1
        if close == -1 or verdict is None:
            if not final:
                return None
            # Truncated (or never closed) fence: its body may still be a complete call.
            body, end = buf[nl + 1 :].rstrip(_WS).rstrip("`"), len(buf)
        else:
            end = close + run
            while end < len(buf) and buf[end] == "`":
                end += 1
            if end >= len(buf) and not final:
                return None  # the closing backtick run may continue
            body = buf[nl + 1 : close]
        calls = parse_call_block(body, self.names, fenced=True)
        if not calls:
            return _Decision("content", end - i)
        if lang in PYTHON_FENCE_LANGS:
            if self.anything_seen:
                return _Decision("content", end - i)
            return _Decision("py_pending", end - i, calls)
        return _Decision("calls", end - i, calls)


def parse_tool_calls(text: str, tools: Iterable[Mapping[str, Any] | str] | None = None) -> ParsedOutput:
    """Split a complete model output into content and tool calls (never raises on odd text)."""
    scanner = _Scanner(tool_names(tools))
    scanner.feed(text)
    scanner.finish()
    content = "".join(t for kind, t in scanner.events if kind == "content")
    calls = [c for kind, cs in scanner.events if kind == "calls" for c in cs]
    return ParsedOutput(content or None, calls)


class StreamingToolParser:
    """Turns streamed text deltas into OpenAI `delta` objects.

    `feed(text)` / `finish()` return a list of deltas, each either `{"content": str}` or
    `{"tool_calls": [...]}`: the first delta of a call carries `index`, `id`, `type: "function"`,
    `function.name` and `function.arguments: ""`; the next carries the arguments JSON. Content is emitted
    only once it cannot be part of a call; a call that never completes is released as content by
    `finish()`. Concatenated content deltas equal `parse_tool_calls(full_text).content or ""`; with
    `max_calls`, the calls equal the first `max_calls` of `parse_tool_calls(full_text).calls`.
    """

    def __init__(
        self, tools: Iterable[Mapping[str, Any] | str] | None = None, max_calls: int | None = None
    ) -> None:
        self._scanner = _Scanner(tool_names(tools))
        self.max_calls = max_calls  # calls beyond it are dropped (`parallel_tool_calls: false` keeps one)
        self._seen_events = 0
        self.calls: list[ToolCall] = []
        self._content: list[str] = []
        self._finished = False

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    @property
    def content(self) -> str | None:
        return "".join(self._content) or None

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if text:
            self._scanner.feed(text)
        return self._drain()

    def finish(self) -> list[dict[str, Any]]:
        if not self._finished:
            self._finished = True
            self._scanner.finish()
        return self._drain()

    def _drain(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        events = self._scanner.events[self._seen_events :]
        self._seen_events = len(self._scanner.events)
        pending_text: list[str] = []
        for kind, payload in events:
            if kind == "content":
                pending_text.append(payload)
                continue
            if pending_text:
                out.append({"content": "".join(pending_text)})
                pending_text = []
            for call in payload:
                if self.max_calls is not None and len(self.calls) >= self.max_calls:
                    continue
                index = len(self.calls)
                self.calls.append(call)
                out.append(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
                out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments_json}}]})
        if pending_text:
            out.append({"content": "".join(pending_text)})
        self._content.extend(d["content"] for d in out if "content" in d)
        return out


# --- forced call lists ----------------------------------------------------------------------------
# The head of one call object as the forced grammar writes it: `{"name": "f", "arguments": ` (the
# schema lists `name` first; any JSON whitespace is allowed, as TensorRT-LLM's default grammar allows it).
_W = r"[ \t\r\n]*"
_FORCED_HEAD = re.compile(rf'\{{{_W}"name"{_W}:{_W}"((?:[^"\\]|\\.)*)"{_W},{_W}"arguments"{_W}:{_W}')


class ForcedCallReader:
    """Reads the call list a forced `tool_choice` produces under guided decoding, as it grows.

    The grammar guarantees the shape `[{"name": "f", "arguments": {...}}, ...]`, so a call is announced as
    soon as its name is known and its arguments stream as they are generated: the argument deltas are
    the raw JSON text of the `arguments` value, and that same text is the call's `arguments` one-shot,
    so joined deltas equal the non-streamed arguments byte for byte, for any split of the text.

    - An exact duplicate of an earlier call (same name, same arguments text) is dropped; a call that may
      still turn out to be one is held back until it differs.
    - At most `max_calls` calls; the rest of the list is ignored.
    - A list cut off (by `max_tokens`) keeps its complete calls; `closed` says whether the list ended.
      While streaming, a call cut off inside its arguments has been announced with partial arguments
      (as OpenAI streams do); one-shot leaves it out.
    - Text the grammar cannot have produced (no guide applied) falls back to `parse_tool_calls` at the end.
    """

    def __init__(self, tools: Iterable[Mapping[str, Any] | str] | None, max_calls: int | None = None) -> None:
        self.names = tool_names(tools)
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []  # complete calls, in list order
        self.closed = False  # the list's closing `]` was read (or the call cap reached)
        self.content: str | None = None  # a forced reply has no content
        self._buf = ""
        self._pos = 0
        self._state = "start"  # start | next | head | args | item_end | done | broken
        self._announced = 0  # calls announced so far (stream indexes)
        self._current: ToolCall | None = None  # the call whose arguments are being read, once announced
        self._name = ""
        self._args_start = 0
        self._sent = 0  # argument characters of the current call already sent
        self._scan: _BracketScan | None = None
        self._finished = False

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._run()

    def finish(self) -> list[dict[str, Any]]:
        if self._finished:
            return []
        self._finished = True
        out = self._run()
        if self._state == "broken" and not self.calls and self._announced == 0:
            for call in parse_tool_calls(self._buf, self.names).calls:
                if self._is_duplicate(call.name, call.arguments_json) or self._full():
                    continue
                out.extend(self._announce(call.name, call.id))
                out.append(self._args_delta(call.arguments_json))
                self.calls.append(call)
        return out

    # --- helpers ---------------------------------------------------------------------------------
    def _full(self) -> bool:
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def _is_duplicate(self, name: str, arguments: str) -> bool:
        return any(c.name == name and c.arguments_json == arguments for c in self.calls)

    def _may_be_duplicate(self, name: str, prefix: str) -> bool:
        return any(c.name == name and c.arguments_json.startswith(prefix) for c in self.calls)

    def _announce(self, name: str, call_id: str) -> list[dict[str, Any]]:
        self._announced += 1
        head = {"index": self._announced - 1, "id": call_id, "type": "function"}
        return [{"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]}]

    def _args_delta(self, piece: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": self._announced - 1, "function": {"arguments": piece}}]}

    def _skip_ws(self) -> bool:
        self._pos = _skip_ws(self._buf, self._pos)
        return self._pos < len(self._buf)

    # --- the state machine -----------------------------------------------------------------------
    def _run(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list[dict[str, Any]]) -> bool:
        """One transition; False when it needs more text (or is done)."""
        state, buf = self._state, self._buf
        if state in ("done", "broken"):
            return False
        if state == "args":
            return self._step_args(out)
        if not self._skip_ws():
            return False
        ch = buf[self._pos]
        if state == "start":
            if ch != "[":
                self._state = "broken"
                return False
            self._pos += 1
            self._state = "next"
            return True
        if state == "item_end":
            if ch != "}":
                self._state = "broken"
                return False
            self._pos += 1
            self._state = "next"
            return True
        if state == "next":
            if ch == ",":
                self._pos += 1
                return True
            if ch == "]":
                self._pos += 1
                self.closed, self._state = True, "done"
                return False
            if ch != "{":
                self._state = "broken"
                return False
            if self._full():
                self.closed, self._state = True, "done"
                return False
            self._state = "head"
            return True
        # state == "head"
        m = _FORCED_HEAD.match(buf, self._pos)
        if m is None or m.end() >= len(buf):
            # Not (yet) the head: wait, unless the text already cannot become it.
            if m is None and len(buf) - self._pos > 512:
                self._state = "broken"
            return False
        try:
            name = json.loads(f'"{m.group(1)}"')
            name = _resolve_name(name, self.names)
        except (ValueError, _NotACall):
            self._state = "broken"
            return False
        if buf[m.end()] != "{":
            self._state = "broken"
            return False
        self._name, self._args_start, self._sent = name, m.end(), 0
        self._scan, self._current = _BracketScan(m.end()), None
        self._state = "args"
        return True

    def _step_args(self, out: list[dict[str, Any]]) -> bool:
        assert self._scan is not None
        end = self._scan.end(self._buf)
        raw = self._buf[self._args_start : end if end is not None else len(self._buf)]
        if end is None:
            if self._current is None and not self._may_be_duplicate(self._name, raw):
                self._current = ToolCall(self._name, "")
                out.extend(self._announce(self._name, self._current.id))
            if self._current is not None and len(raw) > self._sent:
                out.append(self._args_delta(raw[self._sent :]))
                self._sent = len(raw)
            return False
        try:
            valid = isinstance(json.loads(raw, parse_constant=_reject_constant), dict)
        except (ValueError, RecursionError):
            valid = False
        if not valid:
            self._state = "broken"
            return False
        self._pos = end
        self._state = "item_end"
        if self._current is None and self._is_duplicate(self._name, raw):
            return True  # an exact repeat of an earlier call: never announced, dropped
        if self._current is None:
            self._current = ToolCall(self._name, "")
            out.extend(self._announce(self._name, self._current.id))
        if len(raw) > self._sent:
            out.append(self._args_delta(raw[self._sent :]))
        self.calls.append(ToolCall(self._name, raw, self._current.id))
        self._current = None
        return True


def parse_forced_calls(
    text: str, tools: Iterable[Mapping[str, Any] | str] | None, max_calls: int | None = None
) -> tuple[list[ToolCall], bool]:
    """(complete calls, whether the list closed) of a whole forced reply; see `ForcedCallReader`."""
    reader = ForcedCallReader(tools, max_calls)
    reader.feed(text)
    reader.finish()
    return reader.calls, reader.closed
