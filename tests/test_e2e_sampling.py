"""End to end, official `openai` SDK -> real gateway -> real Triton (CPU stack): log probs, logit_bias,
cached-token usage and regex/grammar output."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from stack.triton_launcher import free_port
from tests.fixtures.gateway import GatewayTarget, gateway_env, run_gateway
from tests.fixtures.openai_spec import check_answer, require_spec
from tests.fixtures.remote import local_only

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ASK = [{"role": "user", "content": "Write one short sentence about the sea."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}


def _model(sdk: openai.OpenAI) -> str:
    return sdk.models.list().data[0].id


def _check_entries(entries: list[Any], content: str) -> None:
    """Joined tokens equal the content; each token's bytes are exact; log probs are log probs."""
    assert "".join(e.token for e in entries) == content
    joined = b"".join(bytes(e.bytes) for e in entries)
    assert joined.decode("utf-8", "replace") == content
    assert all(e.logprob <= 0 for e in entries)


@pytest.fixture(scope="module")
def greedy_logprobs(sdk: openai.OpenAI) -> Any:
    """The greedy answer to ASK with log probs; two tests start from this same request, asked once."""
    return sdk.chat.completions.create(model=_model(sdk), messages=ASK, logprobs=True, **GREEDY)


def test_logprobs_non_streamed(sdk: openai.OpenAI, gateway: GatewayTarget) -> None:
    local_only(gateway, "top_logprobs > 0 needs the CPU reference engine's top-k extension")
    r = sdk.chat.completions.create(model=_model(sdk), messages=ASK, logprobs=True, top_logprobs=3, **GREEDY)
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    _check_entries(entries, choice.message.content or "")
    assert len(entries) == r.usage.completion_tokens
    for e in entries:
        assert len(e.top_logprobs) == 3
        ranked = [t.logprob for t in e.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # greedy: the sampled token is the most likely one
        assert e.top_logprobs[0].bytes == e.bytes and e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_logprobs_streamed_match_non_streamed(sdk: openai.OpenAI, greedy_logprobs: Any) -> None:
    model = _model(sdk)
    whole = greedy_logprobs
    stream = sdk.chat.completions.create(
        model=model,
        messages=ASK,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    content, entries, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            if c.logprobs is not None and c.logprobs.content:
                entries += c.logprobs.content
    _check_entries(entries, content)
    assert content == whole.choices[0].message.content
    assert [e.bytes for e in entries] == [e.bytes for e in whole.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx(
        [e.logprob for e in whole.choices[0].logprobs.content]
    )
    assert all(e.top_logprobs == [] for e in entries)  # top_logprobs left out: none
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0


def _check_legacy(lp: Any, text: str, top: int) -> None:
    """Legacy completions logprobs: tokens join to the text, offsets walk it, each map holds the sampled
    token (under its `tokens` string) and the `top` most likely ones."""
    assert lp is not None and "".join(lp.tokens) == text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.tokens)
    for token, value, best in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and best[token] == value
        assert top <= len(best) <= top + 1 if top else best == {token: value}


def test_completions_logprobs_sampled_tokens(sdk: openai.OpenAI, gateway: GatewayTarget) -> None:
    """`logprobs: 0` (the sampled tokens only, which a GPU deployment returns too), streamed and not; every
    answer is also checked against OpenAI's schema, explicitly here and by the `sdk` fixture."""
    model = _model(sdk)
    prompts = ["The capital of France is", "1, 2, 3,"]
    done = sdk.completions.create(model=model, prompt=prompts, logprobs=0, **GREEDY)
    for choice in done.choices:
        _check_legacy(choice.logprobs, choice.text, top=0)
    assert done.usage is not None
    assert sum(len(c.logprobs.tokens) for c in done.choices) == done.usage.completion_tokens  # type: ignore[union-attr]
    text, tokens, values, offsets = "", [], [], []
    for chunk in sdk.completions.create(model=model, prompt=prompts[1], logprobs=0, stream=True, **GREEDY):
        for c in chunk.choices:
            assert c.logprobs is not None
            assert c.logprobs.text_offset == [
                len("".join(tokens + c.logprobs.tokens[:i])) for i in range(len(c.logprobs.tokens))
            ]
            text += c.text
            tokens += c.logprobs.tokens
            values += c.logprobs.token_logprobs
            offsets += c.logprobs.text_offset
    whole = done.choices[1]
    assert whole.logprobs is not None
    assert text == whole.text == "".join(tokens)
    assert (tokens, offsets) == (whole.logprobs.tokens, whole.logprobs.text_offset)
    # The non-streamed prompts ran batched together: float rounding differs slightly from a batch of one.
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-4)
    spec = require_spec()
    with httpx.Client(base_url=gateway.url, headers=gateway.headers, timeout=300) as client:
        checked = 0
        for stream in (False, True):
            body = {"model": model, "prompt": prompts[0], "logprobs": 0, "stream": stream, **GREEDY}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            ctype = response.headers.get("content-type", "")
            checked += check_answer(spec, "/v1/completions", 200, ctype, response.content)
    assert checked > 2


def test_completions_top_logprobs(sdk: openai.OpenAI, gateway: GatewayTarget) -> None:
    local_only(gateway, "logprobs > 0 needs the CPU reference engine's top-k extension")
    done = sdk.completions.create(model=_model(sdk), prompt="Once upon a time", logprobs=5, **GREEDY)
    (choice,) = done.choices
    _check_legacy(choice.logprobs, choice.text, top=5)
    assert choice.logprobs is not None and choice.logprobs.top_logprobs
    for value, best in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, strict=True):
        assert max(best.values()) == pytest.approx(value)  # greedy: the sampled token is the likeliest
        assert len(best) == 5 or "" in best or "\ufffd" in best  # string collisions only
    with pytest.raises(openai.BadRequestError) as err:  # legacy range: 0..5
        sdk.completions.create(model=_model(sdk), prompt="x", logprobs=6, max_tokens=1)
    assert err.value.param == "logprobs"  # type: ignore[attr-defined]


def test_no_logprobs_unless_asked(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(model=_model(sdk), messages=ASK, **GREEDY)
    assert r.choices[0].logprobs is None
    # The CPU reference engine keeps no prefix cache: it reuses nothing, and says so.
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens == 0


def test_logit_bias_bans_and_forces(sdk: openai.OpenAI, tokenizer: Any, greedy_logprobs: Any) -> None:
    model = _model(sdk)
    first = greedy_logprobs
    top = first.choices[0].logprobs.content[0]
    top_id = tokenizer.token_to_id(bytes(top.bytes).decode().replace(" ", "\u2581"))
    assert top_id is not None
    banned = sdk.chat.completions.create(
        model=model, messages=ASK, logprobs=True, logit_bias={str(top_id): -100}, **GREEDY
    )
    assert banned.choices[0].logprobs.content[0].bytes != top.bytes
    # +100 forces a byte-fallback token: each token is one raw byte, the content its (invalid) UTF-8.
    byte_id = tokenizer.token_to_id("<0xE4>")
    forced = sdk.chat.completions.create(
        model=model,
        messages=ASK,
        logprobs=True,
        logit_bias={str(byte_id): 100},
        temperature=0,
        max_tokens=3,
    )
    entries = forced.choices[0].logprobs.content
    assert [e.bytes for e in entries] == [[0xE4]] * 3
    _check_entries(entries, forced.choices[0].message.content or "")


def test_logit_bias_out_of_range(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=_model(sdk), messages=ASK, logit_bias={"262144": 5}, **GREEDY)
    assert err.value.body["param"] == "logit_bias"


def test_regex_response_format(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(
        model=_model(sdk),
        messages=[{"role": "user", "content": "Give me a phone number."}],
        response_format={"type": "regex", "regex": "[0-9]{3}-[0-9]{4}"},  # type: ignore[arg-type,misc]
        temperature=0,
        max_tokens=20,
    )
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", r.choices[0].message.content or ""), r.choices[0].message.content


def test_grammar_response_format(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(
        model=_model(sdk),
        messages=[{"role": "user", "content": "Is the sea salty? Answer yes or no."}],
        response_format={"type": "grammar", "grammar": 'root ::= "yes" | "no"'},  # type: ignore[arg-type,misc]
        temperature=0,
        max_tokens=10,
    )
    assert r.choices[0].message.content in ("yes", "no")


def test_bad_patterns_are_400(sdk: openai.OpenAI) -> None:
    for fmt, param in (
        ({"type": "regex", "regex": "(ab"}, "response_format.regex"),
        ({"type": "grammar", "grammar": "root ::= nothing"}, "response_format.grammar"),
    ):
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(model=_model(sdk), messages=ASK, response_format=fmt, **GREEDY)  # type: ignore[arg-type]
        assert err.value.body["param"] == param


def test_tracing_from_otel_variables(gateway: GatewayTarget, tmp_path: Path) -> None:
    """A gateway started with OTEL_TRACES_EXPORTER=console traces a request under the caller's traceparent."""
    triton = local_only(gateway, "starts its own gateway process in front of the local Triton")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    log = tmp_path / "gateway.log"
    env = gateway_env(triton, free_port(), OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="100")
    with run_gateway(env, log) as url, httpx.Client(base_url=url, timeout=300) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": gateway.model, "messages": ASK, "max_tokens": 3, "stream": True},
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        assert response.status_code == 200 and "[DONE]" in response.text
        deadline = time.monotonic() + 30
        while '"name": "chat.completion"' not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    text = log.read_text()
    for name in (
        "chat.completion",
        "validate",
        "render_prompt",
        "triton.preprocessing",
        "triton.engine_stream",
    ):
        assert f'"name": "{name}"' in text, name
    assert f"0x{trace_id}" in text and '"name": "first_token"' in text
