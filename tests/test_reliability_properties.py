"""Property tests (hypothesis) of the gateway's encoders and parsers: whatever comes in, the answer is a
well-formed value or a 4xx `APIError`, never another exception. (Tool-call parsing and the chat template
have their own property tests in test_tool_parser.py and test_gemma3_core.py.)
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import sse
from gateway.errors import APIError
from gateway.prompt import render_prompt
from gateway.settings import GatewaySettings
from gateway.stop_strings import StopMatcher
from gateway.validation import _fast_validator, _validator, load_schema, parse_chat_request

SETTINGS = GatewaySettings(model_id="m", model_aliases=[])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@given(st.text(), st.integers(0, 7), st.booleans())
def test_sse_chunk_is_one_event_and_round_trips(text: str, index: int, usage: bool) -> None:
    factory = sse.ChunkFactory("chatcmpl-x", 1, "m", usage)
    raw = factory.content(index, text)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert b"\n" not in raw[:-2]  # a newline inside the payload would split the event
    event = json.loads(raw[6:-2].decode("utf-8"))
    assert event["choices"][0] == {
        "index": index,
        "delta": {"content": text},
        "logprobs": None,
        "finish_reason": None,
    }


@given(JSON)
def test_sse_error_event_is_valid_utf8_json(payload: Any) -> None:
    raw = sse.error_event({"error": payload})
    assert json.loads(raw[6:-2].decode("utf-8")) == {"error": payload}


@given(
    st.text(alphabet="ab\u00e9\U0001f600 ", max_size=40),
    st.lists(st.text(alphabet="ab\u00e9\U0001f600 ", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(1, 6), max_size=20),
)
def test_stop_matcher_streaming_equals_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    matcher = StopMatcher(stops)
    out, pos = "", 0
    for size in [*cuts, len(text)]:
        out += matcher.feed(text[pos : pos + size])
        pos += size
        if pos >= len(text):
            break
    out += matcher.flush()
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    assert out == (text if first < 0 else text[:first])
    assert matcher.stopped == (first >= 0)


ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "bogus"])
CONTENT = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "other"]), "text": st.text(max_size=10)}
        ),
        max_size=3,
    ),
    st.none(),
)


@given(st.lists(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}), max_size=6), st.booleans())
def test_prompt_renderer_renders_or_rejects_cleanly(messages: list[dict[str, Any]], images: bool) -> None:
    """Validation, then rendering (which assumes a validated request): a prompt or a 400, never a crash."""
    try:
        settings = SETTINGS.model_copy(update={"images_enabled": images})
        request = parse_chat_request(json.dumps({"messages": messages}).encode(), settings)
        prompt = render_prompt(request.messages, request.tools, request.tool_choice)
    except APIError as exc:
        assert exc.status == 400 and exc.param
        return
    assert prompt.startswith("<bos>") and prompt.endswith("<start_of_turn>model\n")


@settings(max_examples=300)
@given(
    st.one_of(
        JSON,
        st.fixed_dictionaries(
            {"messages": JSON}, optional={"max_tokens": JSON, "n": JSON, "stop": JSON, "stream": JSON}
        ),
    )
)
def test_request_parser_accepts_or_rejects_cleanly(body: Any) -> None:
    try:
        request = parse_chat_request(json.dumps(body).encode(), SETTINGS)
    except APIError as exc:
        assert 400 <= exc.status < 500
        return
    assert isinstance(request.messages, list) and request.messages


@given(st.binary(max_size=64))
def test_request_parser_on_raw_bytes(raw: bytes) -> None:
    try:
        parse_chat_request(raw, SETTINGS)
    except APIError as exc:
        assert 400 <= exc.status < 500


# Near-valid chat bodies: known fields with values that are sometimes right, sometimes not.
_FIELDS = sorted(set(load_schema()["properties"]) - {"model", "messages"})
_VALUE = JSON | st.sampled_from(["user", "assistant", "tool", "auto", "none", "json_object", "a\n", ""])
_MESSAGE = st.dictionaries(
    st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id", "type", "text"]),
    _VALUE,
    max_size=4,
)
_BODY = st.fixed_dictionaries(
    {"model": st.text(max_size=5), "messages": st.lists(_MESSAGE | _VALUE, max_size=3)},
    optional={f: _VALUE for f in _FIELDS},
)


@settings(max_examples=400)
@given(_BODY | JSON)
def test_fast_validator_never_accepts_what_the_reference_rejects(body: Any) -> None:
    """The Rust fast path only says "valid": it must never pass a body the reference (jsonschema) rejects."""
    if _fast_validator().is_valid(body):
        assert _validator().is_valid(body), body
