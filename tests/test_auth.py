"""API keys (gateway/auth.py): several keys, protected probes, keys from the environment."""

from __future__ import annotations

import logging

import pytest

from gateway.settings import GatewaySettings
from tests.fixtures.asgi import gateway_client as _client
from tests.fixtures.backends import MODEL, USER, Scripted
from tests.fixtures.backends import ticks as _ticks


async def test_several_api_keys_and_protected_probes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = {"api_key": "legacy-key", "api_keys": ["key-one", "key-two"], "auth_metrics": True}
    client, _ = _client(Scripted(_ticks(1)), **settings)
    body = {"model": MODEL, "messages": USER}
    async with client:
        for key in ("legacy-key", "key-one", "key-two"):
            ok = await client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200
        for headers in (
            {},
            {"Authorization": "Bearer key-three"},
            {"Authorization": "Basic key-one"},
            {"Authorization": "Bearer key-on"},
            {"Authorization": "Bearer key-one-"},
        ):
            denied = await client.get("/v1/models", headers=headers)
            assert denied.status_code == 401
            assert denied.json()["error"] == {
                "message": "Incorrect or missing API key",
                "type": "authentication_error",
                "param": None,
                "code": "invalid_api_key",
            }
        assert (await client.get("/health/live")).status_code == 200  # probes open by default
        assert (await client.get("/metrics")).status_code == 401  # ... metrics protected by setting
        assert (await client.get("/metrics", headers={"Authorization": "Bearer key-two"})).status_code == 200
    assert not any(k in caplog.text for k in ("legacy-key", "key-one", "key-two", "key-three"))


async def test_protected_health() -> None:
    client, _ = _client(Scripted(_ticks(1)), api_keys=["k"], auth_health=True)
    async with client:
        assert (await client.get("/health/live")).status_code == 401
        assert (await client.get("/health/ready", headers={"Authorization": "Bearer k"})).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


def test_api_keys_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "a, b,,c")
    assert GatewaySettings().api_keys == ["a", "b", "c"]
    monkeypatch.setenv("GATEWAY_API_KEYS", '["x,y", "z"]')
    assert GatewaySettings().api_keys == ["x,y", "z"]
