"""`POST /v1/completions` against a scripted engine (tests/fixtures/backends.py), through the official openai
SDK; every answer is also checked against OpenAI's openapi.yaml where the shared copy exists."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.completions import legacy_logprobs
from gateway.settings import GatewaySettings
from tests.fixtures.backends import LogProbEngine, TextEngine
from tests.fixtures.openai_spec import AsyncValidatingTransport, require_spec

MODEL = "gemma-test"


def sdk(engine: TextEngine | LogProbEngine, **settings: Any) -> openai.AsyncOpenAI:
    app = create_app(GatewaySettings(model_id=MODEL, model_aliases=[], **settings), backend=engine)
    transport = AsyncValidatingTransport(httpx.ASGITransport(app=app))
    http = httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30)
    return openai.AsyncOpenAI(base_url="http://gw/v1", api_key="x", http_client=http, max_retries=0)


async def test_prompts_bos_n_and_usage() -> None:
    engine = TextEngine(lambda prompt: "A" if "one" in prompt else "B")
    client = sdk(engine)
    done = await client.completions.create(model=MODEL, prompt=["one", "<bos>two"], n=2, max_tokens=5, seed=3)
    assert [c.text for c in done.choices] == ["A", "A", "B", "B"]
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    # No chat template; <bos> added once (not twice); choice i gets seed + i.
    assert [p for p, _ in engine.calls] == ["<bos>one", "<bos>one", "<bos>two", "<bos>two"]
    assert [v["seed"] for _, v in engine.calls] == [3, 4, 5, 6]
    assert done.usage is not None and done.usage.prompt_tokens == 10 and done.usage.completion_tokens == 4


async def test_streaming_stop_and_length() -> None:
    client = sdk(TextEngine("Hello world. Bye"))
    stream = await client.completions.create(
        model=MODEL, prompt="x", stream=True, stop=["."], stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].usage is not None and not chunks[-1].choices
    short = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.choices[0].text == "Hello wo"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 2}, "logprobs"),  # this engine declares no log-prob outputs
        ({"best_of": 3}, "best_of"),
        ({"prompt": [1, 2, 3]}, "prompt"),  # token ids need the tokenizer (none here)
        ({"prompt": []}, "prompt"),
        ({"n": 5, "prompt": ["a", "b"]}, "prompt"),  # 10 choices > GATEWAY_MAX_N
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
async def test_rejected_with_a_clear_400(fields: dict[str, Any], param: str) -> None:
    client = sdk(TextEngine())
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(**{"model": MODEL, "prompt": "x", **fields})
    assert info.value.param == param  # type: ignore[attr-defined]


async def test_answers_match_openai_schema() -> None:
    spec = require_spec()
    app = create_app(GatewaySettings(model_id=MODEL, model_aliases=[]), backend=TextEngine("Hi there"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        body = (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).json()
    spec.check("CreateCompletionResponse", body)
    assert body["choices"][0]["finish_reason"] == "length"


def test_integral_floats_are_token_ids() -> None:
    """JSON Schema counts 1.0 as an integer, so such a prompt passes the schema and must parse as ids
    (found by the fuzz test: it used to be a 500)."""
    import json

    from gateway.validation import parse_completion_request

    settings = GatewaySettings(model_id=MODEL, model_aliases=[])
    raw = json.dumps({"model": MODEL, "prompt": [1.0, 2]}).encode()
    assert parse_completion_request(raw, settings, vocab_size=10).prompts == [[1, 2]]
    nested = json.dumps({"model": MODEL, "prompt": [[0.0], [3]]}).encode()
    assert parse_completion_request(nested, settings, vocab_size=10).prompts == [[0], [3]]


# --- logprobs ---------------------------------------------------------------------------------------
# "Hello €!" with the euro sign split over three byte-fallback tokens, then a stop string's worth more.
PIECES = [b"Hel", b"lo", b" \xe2", b"\x82", b"\xac", b"!", b" END", b" more"]


def _check_logprobs(text: str, lp: Any, top: int, start: int = 0) -> None:
    """Tokens join to the text, offsets walk it, each map holds the sampled token and the `top` best."""
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [start + len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.tokens)
    for token, value, best in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert best[token] == value  # the sampled token, always, under its `tokens` string
        assert len(best) == max(top, 1)  # LogProbEngine's sampled token is the most likely one


async def test_logprobs_non_streamed_with_prompts_and_n() -> None:
    engine = LogProbEngine(PIECES)
    client = sdk(engine)
    done = await client.completions.create(
        model=MODEL, prompt=["a", "b"], n=2, logprobs=3, stop=[" END"], max_tokens=16
    )
    assert len(done.choices) == 4
    for choice in done.choices:
        assert choice.text == "Hello €!"
        assert choice.logprobs is not None
        lp = choice.logprobs
        _check_logprobs(choice.text, lp, top=3)
        # A character split over byte-fallback tokens belongs to the token that completes it.
        assert lp.tokens == ["Hel", "lo", " ", "", "€", "!"]
        assert lp.token_logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6])
        assert list(lp.top_logprobs[0]) == ["Hel", "alt1", "alt2"]  # the 3 best, best first
        assert lp.top_logprobs[0]["alt2"] == pytest.approx(-2.1)
    assert all(v.get("return_log_probs") for _, v in engine.calls)


async def test_logprobs_zero_is_the_sampled_tokens_only() -> None:
    client = sdk(LogProbEngine(PIECES[:2], top=False))  # a deployment without top tokens can answer it
    done = await client.completions.create(model=MODEL, prompt="x", logprobs=0)
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens == ["Hel", "lo"]
    assert lp.top_logprobs == [{"Hel": pytest.approx(-0.1)}, {"lo": pytest.approx(-0.2)}]


async def test_logprobs_streamed_match_non_streamed() -> None:
    client = sdk(LogProbEngine(PIECES))
    whole = (await client.completions.create(model=MODEL, prompt="x", logprobs=2, stop=[" END"])).choices[0]
    stream = await client.completions.create(model=MODEL, prompt="x", logprobs=2, stop=[" END"], stream=True)
    text, tokens, values, offsets, tops, finals = "", [], [], [], [], []
    async for chunk in stream:
        (choice,) = chunk.choices
        assert choice.logprobs is not None  # every chunk, the finishing one included
        _check_logprobs("".join(choice.logprobs.tokens), choice.logprobs, top=2, start=len("".join(tokens)))
        text += choice.text
        tokens += choice.logprobs.tokens
        values += choice.logprobs.token_logprobs
        offsets += choice.logprobs.text_offset
        tops += choice.logprobs.top_logprobs
        if choice.finish_reason is not None:
            finals.append(choice.logprobs.tokens)
    assert whole.logprobs is not None
    assert text == whole.text == "".join(tokens)
    assert (tokens, values, offsets, tops) == (
        whole.logprobs.tokens,
        whole.logprobs.token_logprobs,
        whole.logprobs.text_offset,
        whole.logprobs.top_logprobs,
    )
    assert finals == [[]]


def test_top_logprobs_map_keeps_the_sampled_token_under_its_string() -> None:
    """Up to N + 1 keys: the N best and the sampled token (not among them here), which is keyed by its
    `tokens` string even when that is empty (a byte-fallback piece whose character is not complete)."""

    def entry(token: str, data: bytes, value: float, top: list[tuple[bytes, float]]) -> dict[str, Any]:
        alts = [{"token": b.decode("utf-8", "replace"), "logprob": v, "bytes": list(b)} for b, v in top]
        return {"token": token, "logprob": value, "bytes": list(data), "top_logprobs": alts}

    sampled_lower = entry("c", b"c", -3.0, [(b"a", -0.5), (b"b", -1.0)])
    partial = entry("", b"\xe2", -0.2, [(b"\xe2", -0.2), (b"\xe3", -2.0), (b"\xe4", -2.5)])
    out = legacy_logprobs([sampled_lower, partial], offset=4)
    assert out["top_logprobs"] == [{"a": -0.5, "b": -1.0, "c": -3.0}, {"": -0.2, "\ufffd": -2.0}]
    assert out["tokens"] == ["c", ""] and out["text_offset"] == [4, 5]
    assert out["token_logprobs"] == [-3.0, -0.2]


async def test_no_logprobs_unless_asked() -> None:
    engine = LogProbEngine(PIECES[:3])
    client = sdk(engine)
    done = await client.completions.create(model=MODEL, prompt="x")
    assert done.choices[0].logprobs is None
    async for chunk in await client.completions.create(model=MODEL, prompt="x", stream=True):
        assert chunk.choices[0].logprobs is None
    assert not any(v.get("return_log_probs") for _, v in engine.calls)


@pytest.mark.parametrize(
    ("engine", "fields"),
    [
        (LogProbEngine(PIECES, top=False), {"logprobs": 1}),  # GPU: sampled tokens only
        (LogProbEngine(PIECES, log_probs=False), {"logprobs": 0}),  # an ensemble streamed whole
        (LogProbEngine(PIECES), {"logprobs": 0, "echo": True}),  # no log probs for prompt tokens
    ],
)
async def test_logprobs_the_deployment_cannot_return_are_a_400(
    engine: LogProbEngine, fields: dict[str, Any]
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(engine).completions.create(model=MODEL, prompt="x", **fields)
    param = "echo" if "echo" in fields else "logprobs"
    assert info.value.param == param  # type: ignore[attr-defined]
    assert param in info.value.message
    assert not engine.calls
