"""Request ids and logs (gateway/logs.py): ids in, out and to Triton; the JSON access log; prompt privacy."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway.logs import JsonFormatter, RequestIdFilter
from tests.fixtures.asgi import gateway_client as _client
from tests.fixtures.backends import MODEL, USER, Scripted
from tests.fixtures.backends import ticks as _ticks


async def test_request_id_in_out_and_sent_to_triton() -> None:
    backend = Scripted(_ticks(1))
    client, _ = _client(backend)
    async with client:
        given = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": USER, "n": 2},
            headers={"X-Request-Id": "trace-123"},
        )
        generated = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
        hostile = await client.get("/v1/models", headers={"X-Request-Id": "bad id;<script>" + "x" * 200})
        error = await client.post("/v1/chat/completions", content=b"{", headers={"X-Request-Id": "e-1"})
    assert given.headers["x-request-id"] == "trace-123"
    assert sorted(call[2] for call in backend.calls[:2]) == ["trace-123-0", "trace-123-1"]
    rid = generated.headers["x-request-id"]
    assert len(rid) == 32 and backend.calls[2][2] == f"{rid}-0"
    assert hostile.headers["x-request-id"] != "bad id" and len(hostile.headers["x-request-id"]) == 32
    assert error.status_code == 400 and error.headers["x-request-id"] == "e-1"


async def test_json_access_log_and_prompt_privacy(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    secret = "my-private-prompt-text"
    body = {"model": MODEL, "messages": [{"role": "user", "content": secret}]}
    for log_prompts in (False, True):
        caplog.clear()
        client, _ = _client(Scripted(_ticks(1)), log_prompts=log_prompts)
        async with client:
            r = await client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "rid-7"})
        assert r.status_code == 200
        access = [rec for rec in caplog.records if rec.name == "gateway.access"]
        assert len(access) == 1
        line = json.loads(JsonFormatter().format(access[0]))
        assert line["method"] == "POST" and line["path"] == "/v1/chat/completions" and line["status"] == 200
        assert line["request_id"] == "rid-7" and line["duration_ms"] >= 0 and "client" in line
        written = "\n".join(JsonFormatter().format(rec) for rec in caplog.records)
        assert (secret in written) is log_prompts


def test_json_formatter_adds_request_id_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.reliability.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed %s", "here")
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert line["msg"] == "failed here" and line["level"] == "error" and "ValueError: boom" in line["exc"]
    assert "request_id" not in line  # None outside a request: left out
