"""`POST /v1/completions` against a scripted engine (tests/fixtures/backends.py), through the official openai
SDK; every answer is also checked against OpenAI's openapi.yaml where the shared copy exists."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fixtures.backends import TextEngine
from tests.fixtures.openai_spec import AsyncValidatingTransport, require_spec

MODEL = "gemma-test"


def sdk(engine: TextEngine, **settings: Any) -> openai.AsyncOpenAI:
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
        ({"logprobs": 2}, "logprobs"),
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
