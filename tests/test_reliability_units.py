"""Reliability layer without Triton: admission (429), limits, API keys, request ids and JSON logs.

Uses the scripted backend of tests/test_gateway_chat.py; disconnects go through a real uvicorn server.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.admission import AdmissionController
from gateway.app import create_app
from gateway.errors import APIError
from gateway.logs import JsonFormatter, RequestIdFilter
from gateway.settings import GatewaySettings
from gateway.triton.errors import TritonError
from tests.test_gateway_chat import END, MODEL, USER, Scripted, endless_script, sse_events, tok


def _client(backend: Scripted, **settings: Any) -> tuple[httpx.AsyncClient, Any]:
    app = create_app(GatewaySettings(model_id=MODEL, **settings), backend=backend)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30)
    return client, app


def _admission(app: Any) -> AdmissionController:
    return app.state.gateway.chat.admission


def _ticks(n: int) -> Any:
    return lambda i, v: [*(tok("t ") for _ in range(n)), END]


# --- AdmissionController ---------------------------------------------------------------------------------
async def test_admission_bounds_active_and_queue() -> None:
    ctl = AdmissionController(max_concurrent=2, max_queued=1, queue_timeout_s=5, retry_after_s=3)
    a, b = await ctl.acquire(), await ctl.acquire()
    waiter = asyncio.create_task(ctl.acquire())
    await asyncio.sleep(0)
    assert ctl.active == 2 and ctl.waiting == 1
    with pytest.raises(APIError) as err:
        await ctl.acquire()
    assert err.value.status == 429 and err.value.code == "rate_limit_exceeded"
    assert err.value.headers == {"Retry-After": "3"}
    a.release()
    a.release()  # idempotent: a second release must not free a second slot
    c = await asyncio.wait_for(waiter, 1)
    assert ctl.active == 2 and ctl.waiting == 0
    b.release()
    c.release()
    assert ctl.active == 0


async def test_admission_cancelled_and_timed_out_waiters_leave_the_queue() -> None:
    ctl = AdmissionController(max_concurrent=1, max_queued=4, queue_timeout_s=0.2)
    held = await ctl.acquire()
    cancelled = asyncio.create_task(ctl.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert ctl.waiting == 0
    with pytest.raises(APIError) as err:
        await ctl.acquire()  # waits queue_timeout_s, then 429
    assert err.value.status == 429 and ctl.waiting == 0
    held.release()
    assert ctl.active == 0


async def test_admission_weights_are_fifo() -> None:
    ctl = AdmissionController(max_concurrent=4, max_queued=4, queue_timeout_s=5)
    first = await ctl.acquire(3)
    big = asyncio.create_task(ctl.acquire(4))  # waits for all 4 slots
    await asyncio.sleep(0)
    small = asyncio.create_task(ctl.acquire(1))  # would fit now, but must not overtake `big`
    await asyncio.sleep(0.01)
    assert not big.done() and not small.done()
    first.release()
    (await big).release()
    (await small).release()
    assert ctl.active == 0


# --- 429 through the app -------------------------------------------------------------------------------
async def test_saturated_gateway_answers_429_and_frees_every_slot() -> None:
    backend = Scripted(_ticks(20), delay=0.01)
    client, app = _client(backend, max_concurrent_requests=2, max_queued_requests=1)
    body = {"model": MODEL, "messages": USER, "stream": True}
    async with client:
        replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(5)))
        statuses = sorted(r.status_code for r in replies)
        assert statuses == [200, 200, 200, 429, 429]
        for r in replies:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert sse_events(r.text)[-1] == "[DONE]"
        metrics = (await client.get("/metrics")).text
    assert _admission(app).active == 0 and _admission(app).waiting == 0
    assert 'gateway_admission_rejected_total{reason="queue_full"} 2.0' in metrics


async def test_n_choices_weigh_n_slots() -> None:
    client, app = _client(Scripted(_ticks(10), delay=0.01), max_concurrent_requests=2, max_queued_requests=0)
    async with client:
        a, b = await asyncio.gather(
            client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "n": 2}),
            client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER}),
        )
    assert sorted([a.status_code, b.status_code]) == [200, 429]
    assert _admission(app).active == 0


async def test_errors_release_slots() -> None:
    failing = Scripted(lambda i, v: [tok("a"), TritonError("engine", "boom")])
    client, app = _client(failing, max_concurrent_requests=1, max_queued_requests=0)
    async with client:
        for stream in (False, True, False):
            r = await client.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": stream}
            )
            assert r.status_code == (200 if stream else 500)
    assert _admission(app).active == 0


async def test_triton_queue_full_is_429() -> None:
    full = Scripted(lambda i, v: [TritonError("overloaded", "the inference server's queue is full")])
    client, _ = _client(full)
    async with client:
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
    assert r.status_code == 429 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_queue_full_messages_are_classified() -> None:
    from gateway.triton.errors import queue_full as _queue_full

    assert _queue_full("Exceeds maximum queue size") is not None
    assert _queue_full("in ensemble 'ensemble', Exceeds maximum queue size").kind == "overloaded"  # type: ignore[union-attr]
    assert _queue_full("failed to connect") is None


async def test_disconnects_release_slots_and_cancel_triton() -> None:
    backend = Scripted(endless_script, delay=0.01)
    app = create_app(
        GatewaySettings(model_id=MODEL, max_concurrent_requests=2, max_queued_requests=2), backend=backend
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    body = {"model": MODEL, "messages": USER, "stream": True}

    async def leave_early() -> None:
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            async for _ in response.aiter_lines():
                break

    async def leave_while_queued() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=0.3) as client:
            with pytest.raises(httpx.TimeoutException):  # non-streamed: no byte ever arrives
                await client.post("/v1/chat/completions", json={**body, "stream": False})

    try:
        for _ in range(3):
            await asyncio.gather(leave_early(), leave_early(), leave_while_queued(), leave_while_queued())
        for _ in range(200):
            if _admission(app).active == 0 and len(backend.closed) == len(backend.calls):
                break
            await asyncio.sleep(0.01)
        assert _admission(app).active == 0 and _admission(app).waiting == 0
        assert len(backend.closed) == len(backend.calls) and not backend.completed
    finally:
        server.should_exit = True
        await task


# --- limits ----------------------------------------------------------------------------------------------
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
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
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


# --- API keys --------------------------------------------------------------------------------------------
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


# --- request ids and logs --------------------------------------------------------------------------------
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


# --- a stalled image server ------------------------------------------------------------------------------
async def test_stalled_image_server_times_out_while_others_proceed() -> None:
    stalled: list[asyncio.StreamWriter] = []

    async def accept_and_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # read nothing, answer nothing: the connection just hangs

    server = await asyncio.start_server(accept_and_stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = Scripted(_ticks(3), delay=0.01)
    client, app = _client(
        backend, images_enabled=True, images_allow_list=["127.0.0.1"], images_fetch_timeout_s=1.0
    )
    image = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/cat.png"}}
    with_image = {"model": MODEL, "messages": [{"role": "user", "content": [image]}]}
    try:
        async with client:
            started = asyncio.get_running_loop().time()
            slow = asyncio.create_task(client.post("/v1/chat/completions", json=with_image))
            others = [
                await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
                for _ in range(5)
            ]
            others_done = asyncio.get_running_loop().time() - started
            r = await slow
            elapsed = asyncio.get_running_loop().time() - started
    finally:
        for writer in stalled:
            writer.close()
        server.close()
    assert all(o.status_code == 200 for o in others) and others_done < 1.0  # not blocked by the stall
    assert r.status_code in (400, 504), r.text
    assert r.json()["error"]["code"] == "image_timeout"
    assert 0.9 <= elapsed < 3.0, elapsed
    assert _admission(app).active == 0  # fetches happen before admission: a stall holds no engine slot
