"""Tool-call parser: a corpus of realistic Gemma 3 outputs, round-trip and streaming properties."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma3_core.tool_parser import (
    ForcedCallReader,
    StreamingToolParser,
    ToolCall,
    parse_forced_calls,
    parse_tool_calls,
)
from gemma3_core.tool_prompt import render_tool_calls

TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "search_web", "send_email", "get_time", "create_event")
]

W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
CALL_W = ("get_weather", {"city": "Paris"})

# (id, model output, expected content, expected calls). Decisions documented in docs/tools.md.
CORPUS: list[tuple[str, str, str | None, list[tuple[str, dict[str, Any]]]]] = [
    ("bare_list", f"[{W}]", None, [CALL_W]),
    (
        "parallel_calls",
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}]',
        None,
        [CALL_W, ("get_weather", {"city": "Rome", "unit": "celsius"})],
    ),
    ("tool_code_fence", f"```tool_code\n[{W}]\n```", None, [CALL_W]),
    (
        "json_fence_google_parameters",
        '```json\n{"name": "search_web", "parameters": {"query": "gemma 3 release date"}}\n```',
        None,
        [("search_web", {"query": "gemma 3 release date"})],
    ),
    (
        "leading_text_then_fence",
        f"Sure, let me check the weather for you.\n\n```tool_code\n[{W}]\n```",
        "Sure, let me check the weather for you.",
        [CALL_W],
    ),
    (
        "pythonic_list",
        "[get_weather(city=\"Paris\"), search_web(query='best croissant', limit=3, safe=True, lang=None)]",
        None,
        [CALL_W, ("search_web", {"query": "best croissant", "limit": 3, "safe": True, "lang": None})],
    ),
    ("tool_code_bare_call", "```tool_code\nget_weather(city='Paris')\n```", None, [CALL_W]),
    (
        "tool_code_print_default_api",
        '```tool_code\nprint(default_api.get_weather(city="Paris"))\n```',
        None,
        [CALL_W],
    ),
    (
        "nested_json_arguments",
        '[{"name": "create_event", "arguments": {"title": "Sync", "attendees": [{"email": "a@x.io", '
        '"optional": false}, {"email": "b@x.io", "optional": true}], "meta": {"room": {"floor": 3, '
        '"tags": ["quiet", null]}, "duration_h": 1.5}}}]',
        None,
        [
            (
                "create_event",
                {
                    "title": "Sync",
                    "attendees": [
                        {"email": "a@x.io", "optional": False},
                        {"email": "b@x.io", "optional": True},
                    ],
                    "meta": {"room": {"floor": 3, "tags": ["quiet", None]}, "duration_h": 1.5},
                },
            )
        ],
    ),
    (
        "unicode_arguments",
        '[{"name": "send_email", "arguments": {"to": "josé@exemplo.br", "subject": "Olá 👋", '
        '"body": "東京で会いましょう\\nÇa va? \\u00e9"}}]',
        None,
        [
            (
                "send_email",
                {"to": "josé@exemplo.br", "subject": "Olá 👋", "body": "東京で会いましょう\nÇa va? é"},
            )
        ],
    ),
    (
        "truncated_list",
        '[{"name": "get_weather", "arguments": {"city": "Par',
        '[{"name": "get_weather", "arguments": {"city": "Par',
        [],
    ),
    (
        "truncated_fence",
        'Checking.\n```tool_code\n[{"name": "get_weather", "argu',
        'Checking.\n```tool_code\n[{"name": "get_weather", "argu',
        [],
    ),
    ("prose_only", "The capital of France is Paris.", "The capital of France is Paris.", []),
    (
        "prose_with_brackets",
        'Arrays look like [1, 2, 3], sets like {1, 2}, and links like [docs](https://x.io). {"a": 1}',
        'Arrays look like [1, 2, 3], sets like {1, 2}, and links like [docs](https://x.io). {"a": 1}',
        [],
    ),
    (
        "python_block_explaining_code",
        'You can call the API like this:\n```python\nget_weather(city="Paris")\n```\nIt returns a dict.',
        'You can call the API like this:\n```python\nget_weather(city="Paris")\n```\nIt returns a dict.',
        [],
    ),
    ("python_block_whole_response", '```python\nget_weather(city="Paris")\n```', None, [CALL_W]),
    (
        "unknown_function",
        '```json\n[{"name": "book_flight", "arguments": {"to": "NYC"}}]\n```',
        '```json\n[{"name": "book_flight", "arguments": {"to": "NYC"}}]\n```',
        [],
    ),
    (
        "stringified_arguments",
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
        None,
        [CALL_W],
    ),
    (
        "openai_shape",
        '[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]',
        None,
        [CALL_W],
    ),
    (
        "hallucinated_tool_output_dropped",
        f'```tool_code\n[{W}]\n```\n```tool_output\n{{"temp_c": 18}}\n```\n',
        None,
        [CALL_W],
    ),
    (
        "javascript_block_is_opaque",
        f"Example:\n```javascript\nconst calls = [{W}];\n```",
        f"Example:\n```javascript\nconst calls = [{W}];\n```",
        [],
    ),
    ("unclosed_fence_complete_body", f"```tool_code\n[{W}]\n", None, [CALL_W]),
    (
        "json_answer_not_a_call",
        '{"name": "Alice", "age": 30}',
        '{"name": "Alice", "age": 30}',
        [],
    ),
    (
        "two_fences",
        f'```tool_code\n[{W}]\n```\n\n```tool_code\n[{{"name": "get_time", "arguments": {{}}}}]\n```',
        None,
        [CALL_W, ("get_time", {})],
    ),
    (
        "trailing_text",
        f"[{W}]\nI'll report back once I have it.",
        "I'll report back once I have it.",
        [CALL_W],
    ),
    (
        "text_call_text",
        f"Let me look.\n[{W}]\nOne moment.",
        "Let me look.\nOne moment.",
        [CALL_W],
    ),
    (
        "positional_args_not_a_call",
        '```tool_code\nget_weather("Paris")\n```',
        '```tool_code\nget_weather("Paris")\n```',
        [],
    ),
    (
        "code_injection_is_content",
        "[get_weather(city=__import__('os').system('echo pwned'))]",
        "[get_weather(city=__import__('os').system('echo pwned'))]",
        [],
    ),
    ("no_arguments_key", '[{"name": "get_time"}]', None, [("get_time", {})]),
    ("pythonic_no_args", "[get_time()]", None, [("get_time", {})]),
    (
        "python_literal_dicts",
        "[{'name': 'get_weather', 'arguments': {'city': 'Paris', 'metric': True, 'extra': None}}]",
        None,
        [("get_weather", {"city": "Paris", "metric": True, "extra": None})],
    ),
    ("leading_newlines", f"\n\n[{W}]\n", None, [CALL_W]),
    (
        "backticks_inside_argument",
        '```tool_code\n[{"name": "send_email", "arguments": {"body": "run ```ls``` now"}}]\n```',
        None,
        [("send_email", {"body": "run ```ls``` now"})],
    ),
    ("inline_code", "Use `get_weather` with a `city`.", "Use `get_weather` with a `city`.", []),
    ("empty_list", "[]", "[]", []),
    (
        "nan_rejected",
        '[{"name": "get_weather", "arguments": {"x": NaN}}]',
        '[{"name": "get_weather", "arguments": {"x": NaN}}]',
        [],
    ),
]


def _calls(calls: list[ToolCall]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments_json)) for c in calls]


def _stream(
    text: str, cuts: list[int], tools: Any = TOOLS
) -> tuple[str, list[dict[str, Any]], StreamingToolParser]:
    parser = StreamingToolParser(tools)
    deltas: list[dict[str, Any]] = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(text)]:
        deltas += parser.feed(text[prev:cut])
        prev = cut
    deltas += parser.finish()
    content = "".join(d["content"] for d in deltas if "content" in d)
    return content, deltas, parser


def _assemble(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What an OpenAI client accumulates from the tool-call deltas."""
    out: dict[int, dict[str, Any]] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            slot = out.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:
                assert slot["id"] is None, "id sent twice"
                assert tc["type"] == "function"
                slot["id"], slot["name"] = tc["id"], tc["function"]["name"]
            slot["arguments"] += tc["function"].get("arguments", "")
    return [out[i] for i in sorted(out)]


@pytest.mark.parametrize(("text", "content", "calls"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_corpus(text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]]) -> None:
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content == content
    assert _calls(parsed.calls) == calls
    for call in parsed.calls:
        # Re-serialised, compact JSON with non-ASCII kept.
        assert call.arguments_json == json.dumps(json.loads(call.arguments_json), ensure_ascii=False)
        assert call.id.startswith("call_") and len(call.id) == 29
    assert parsed.finish_reason_override == ("tool_calls" if calls else None)
    # Token-by-token-ish streaming gives the same split.
    for step in (1, 3, 7):
        streamed, deltas, parser = _stream(text, list(range(step, len(text), step)))
        assert streamed == (content or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in _assemble(deltas)] == calls
        assert parser.has_tool_calls == bool(calls)


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 20


def test_unknown_names_allowed_without_tools() -> None:
    parsed = parse_tool_calls('[{"name": "anything", "arguments": {"a": 1}}]')
    assert _calls(parsed.calls) == [("anything", {"a": 1})]
    # Without a tools list, a bare {"name": ...} is too weak a signal.
    assert parse_tool_calls('{"name": "Alice"}').calls == []


def test_tool_names_accept_plain_strings() -> None:
    assert _calls(parse_tool_calls(f"[{W}]", ["get_weather"]).calls) == [CALL_W]
    assert parse_tool_calls(f"[{W}]", ["other"]).calls == []


def test_streaming_deltas_shape() -> None:
    text = f'Checking.\n[{W}, {{"name": "get_time", "arguments": {{}}}}]'
    parser = StreamingToolParser(TOOLS)
    deltas = parser.feed(text) + parser.finish()
    assert deltas[0] == {"content": "Checking."}
    first, second, third, fourth = deltas[1:]
    tc = first["tool_calls"][0]
    assert tc["index"] == 0 and tc["type"] == "function" and tc["id"].startswith("call_")
    assert tc["function"] == {"name": "get_weather", "arguments": ""}
    assert second == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}
    assert third["tool_calls"][0]["index"] == 1 and third["tool_calls"][0]["function"]["name"] == "get_time"
    assert fourth["tool_calls"][0]["function"] == {"arguments": "{}"}
    assert [c.id for c in parser.calls] == [first["tool_calls"][0]["id"], third["tool_calls"][0]["id"]]
    assert parser.content == "Checking."


def test_streaming_holds_back_possible_call() -> None:
    parser = StreamingToolParser(TOOLS)
    assert parser.feed("Hello ") == [{"content": "Hello"}]  # trailing space held (a call may follow)
    assert parser.feed("[") == []
    assert parser.feed('{"name"') == []
    assert parser.feed(': "get_weather", "arguments": {}}') == []
    assert parser.feed("]")[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert parser.finish() == []


def test_streaming_releases_non_calls_quickly() -> None:
    parser = StreamingToolParser(TOOLS)
    assert parser.feed("See [1") == [{"content": "See [1"}]
    assert parser.feed("] and ```bash\nls -la\n") == [{"content": "] and ```bash\nls -la\n"}]
    assert parser.feed("```\nDone.") == [{"content": "```\nDone."}]


def test_feed_after_finish_raises() -> None:
    parser = StreamingToolParser(TOOLS)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# --- properties -----------------------------------------------------------------------------------
NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ARGS = st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=5)
PROSE = st.text(alphabet=st.characters(blacklist_characters="`[{", blacklist_categories=("Cs",)), max_size=40)
WRAPPERS = st.sampled_from(
    ["{}", "```tool_code\n{}\n```", "```json\n{}\n```", "```\n{}\n```", "```tool_call\n{}"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=st.lists(st.tuples(NAMES, ARGS), min_size=1, max_size=3), prose=PROSE, wrapper=WRAPPERS)
def test_render_parse_round_trip(calls: list[tuple[str, dict[str, Any]]], prose: str, wrapper: str) -> None:
    rendered = render_tool_calls([(name, json.dumps(args)) for name, args in calls])
    text = (prose + "\n" if prose.strip() else "") + wrapper.replace("{}", rendered, 1)
    names = [name for name, _ in calls]
    parsed = parse_tool_calls(text, names)
    assert [(c.name, c.arguments_json) for c in parsed.calls] == [
        (name, json.dumps(args, ensure_ascii=False)) for name, args in calls
    ]
    # Leading prose stays (minus the whitespace before the call).
    assert parsed.content == (prose.rstrip(" \t\r\n") if prose.strip() else None)
    # Streaming, in arbitrary pieces, yields the same and never leaks call text into content.
    content, deltas, _ = _stream(text, list(range(1, len(text), 5)), names)
    assert content == (parsed.content or "")
    assert '"arguments"' not in content
    assert [(c["name"], c["arguments"]) for c in _assemble(deltas)] == [
        (c.name, c.arguments_json) for c in parsed.calls
    ]


FRAGMENTS = st.sampled_from(
    [
        f"[{W}]",
        f"```tool_code\n[{W}]\n```",
        '```python\nget_weather(city="Paris")\n```',
        "```tool_output\nx\n```",
        "```bash\necho [1]\n```",
        '{"name": "get_time"}',
        '[{"name": "get_weather", "arguments": {"city": "Par',
        "[get_time()]",
        "[see above](#x)",
        "`code`",
        "``",
        "```",
        "\n",
        "  ",
        "Hello",
        " world.",
        "{",
        "[",
        '"',
        "'",
        "\\",
        "}",
        "]",
        "é東👋",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(FRAGMENTS | st.text(max_size=6), max_size=10),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_streaming_matches_non_streaming(pieces: list[str], cuts: list[int]) -> None:
    text = "".join(pieces)
    parsed = parse_tool_calls(text, TOOLS)
    content, deltas, parser = _stream(text, [c for c in cuts if c <= len(text)])
    assert content == (parsed.content or "")
    assembled = _assemble(deltas)
    assert [(c["name"], c["arguments"]) for c in assembled] == [
        (c.name, c.arguments_json) for c in parsed.calls
    ]
    assert [c["id"] for c in assembled] == [c.id for c in parser.calls]
    if not parsed.calls:
        assert parsed.content == (text or None)  # no call: the text is untouched


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_parser_never_raises(text: str) -> None:
    parsed = parse_tool_calls(text, TOOLS)
    if not parsed.calls:
        assert parsed.content == (text or None)


# --- forced call lists (ForcedCallReader) ---------------------------------------------------------
def _forced_stream(
    text: str, cuts: list[int], max_calls: int | None = None
) -> tuple[list[dict[str, Any]], ForcedCallReader]:
    reader = ForcedCallReader(TOOLS, max_calls)
    deltas: list[dict[str, Any]] = []
    prev = 0
    for cut in [*sorted(set(cuts)), len(text)]:
        deltas += reader.feed(text[prev:cut])
        prev = cut
    deltas += reader.finish()
    assert not any("content" in d for d in deltas)  # a forced reply never becomes text
    return deltas, reader


def _forced_list(calls: list[tuple[str, dict[str, Any]]], sep: str = ", ", colon: str = ": ") -> str:
    items = [
        "{" + f'"name"{colon}{json.dumps(n)}{sep}"arguments"{colon}{json.dumps(a, ensure_ascii=False)}' + "}"
        for n, a in calls
    ]
    return "[" + sep.join(items) + "]"


def test_forced_arguments_stream_incrementally() -> None:
    text = _forced_list([("get_weather", {"city": "Paris", "unit": "celsius"})])
    deltas, reader = _forced_stream(text, list(range(1, len(text))))
    pieces = [tc["function"]["arguments"] for d in deltas for tc in d["tool_calls"] if "id" not in tc]
    assert len(pieces) > 5  # many argument deltas, not one at the end
    assert "".join(pieces) == reader.calls[0].arguments_json == '{"city": "Paris", "unit": "celsius"}'
    assert reader.closed


def test_forced_cut_off_list_keeps_complete_calls_and_drops_duplicates() -> None:
    paris, rome = ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})
    full = _forced_list([paris, paris, rome, ("get_weather", {"city": "Tokyo"})])
    text = full[: full.rindex("Tokyo") + 2]  # cut inside the last call's arguments
    calls, closed = parse_forced_calls(text, TOOLS)
    assert _calls(calls) == [paris, rome] and not closed
    deltas, reader = _forced_stream(text, list(range(0, len(text), 3)))
    assembled = _assemble(deltas)
    # Streamed: the same complete calls; the cut-off last call was announced with partial arguments.
    assert [(c["name"], c["arguments"]) for c in assembled[:2]] == [(c.name, c.arguments_json) for c in calls]
    assert len(assembled) == 3 and assembled[2]["arguments"] == '{"city": "To'
    # A duplicate is never announced (held back while it may still become one).
    deltas, reader = _forced_stream(_forced_list([paris, paris]), [7, 40, 41])
    assert len(_assemble(deltas)) == 1 and reader.closed


def test_forced_call_cap() -> None:
    text = _forced_list([("get_time", {"tz": str(i)}) for i in range(5)])
    calls, closed = parse_forced_calls(text, TOOLS, max_calls=2)
    assert [json.loads(c.arguments_json)["tz"] for c in calls] == ["0", "1"] and closed


def test_forced_fallback_for_unexpected_shapes() -> None:
    # Not the grammar's shape (no guide applied): the tolerant parser still finds the call, never content.
    calls, _ = parse_forced_calls('```json\n{"name": "get_time", "parameters": {}}\n```', TOOLS)
    assert _calls(calls) == [("get_time", {})]
    deltas, reader = _forced_stream("no call at all", [3])
    assert deltas == [] and reader.calls == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(st.tuples(st.sampled_from(["get_weather", "get_time"]), ARGS), min_size=1, max_size=4),
    spaced=st.booleans(),
    cut=st.integers(min_value=0, max_value=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_forced_streaming_matches_one_shot(
    calls: list[tuple[str, dict[str, Any]]], spaced: bool, cut: int, cuts: list[int]
) -> None:
    full = _forced_list(calls, sep=",\n  " if spaced else ", ", colon=" : " if spaced else ": ")
    text = full[: min(cut, len(full))] if cut < len(full) else full
    one_shot, closed = parse_forced_calls(text, TOOLS)
    deltas, reader = _forced_stream(text, [c for c in cuts if c <= len(text)])
    assembled = _assemble(deltas)
    complete = [(c["name"], c["arguments"]) for c in assembled[: len(one_shot)]]
    # Joined argument deltas equal the one-shot arguments byte for byte; ids match the reader's calls.
    assert complete == [(c.name, c.arguments_json) for c in one_shot]
    assert [c["id"] for c in assembled[: len(one_shot)]] == [c.id for c in reader.calls]
    assert len(assembled) - len(one_shot) in (0, 1)  # at most one cut-off call, announced while streaming
    assert closed == reader.closed == (text == full)
    # Exact duplicates are dropped, order kept.
    expected = list(dict.fromkeys((n, json.dumps(a, ensure_ascii=False)) for n, a in calls))
    if closed:
        assert [(c.name, c.arguments_json) for c in one_shot] == expected
