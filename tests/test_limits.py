"""Per-request limits (gateway/limits.py; the body cap in app.py) through the app."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fixtures.asgi import asgi_client
from tests.fixtures.asgi import gateway_client as _client
from tests.fixtures.backends import MODEL, USER, Scripted
from tests.fixtures.backends import ticks as _ticks


@pytest.mark.parametrize(
    ("settings", "body", "param", "code"),
    [
        ({"max_messages": 2}, {"messages": USER * 3}, "messages", "too_many_messages"),
        ({"max_completion_tokens": 100}, {"max_tokens": 101}, "max_tokens", "invalid_value"),
        ({"max_completion_tokens": 100}, {"max_completion_tokens": 500}, "max_completion_tokens", None),
    ],
)
async def test_request_limits(
    settings: dict[str, Any], body: dict[str, Any], param: str, code: str | None
) -> None:
    backend = Scripted(_ticks(1))
    client, _ = _client(backend, **settings)
    async with client:
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if code:
        assert r.json()["error"]["code"] == code
    assert not backend.calls


async def test_max_prompt_tokens() -> None:
    class CharTokenizer:  # one token per character
        def encode(self, text: str, add_special_tokens: bool = False) -> Any:
            return type("E", (), {"ids": list(range(len(text)))})()

    app = create_app(
        GatewaySettings(model_id=MODEL, max_prompt_tokens=80),
        backend=Scripted(_ticks(1)),
        tokenizer=CharTokenizer(),
    )
    async with asgi_client(app) as client:
        ok = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 1}
        )
        long = [{"role": "user", "content": "x" * 100}]
        too_long = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": long})
    assert ok.status_code == 200, ok.text
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


async def test_body_size_413() -> None:
    client, _ = _client(Scripted(_ticks(1)), max_request_bytes=2048)
    async with client:
        r = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 4096}]},
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
