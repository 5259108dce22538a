"""Admission control (gateway/admission.py): bounded concurrency and queue, 429 when saturated, and slots
that every way a request can end gives back (errors, disconnects through a real uvicorn server)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import uvicorn

from gateway.admission import AdmissionController
from gateway.app import create_app
from gateway.errors import APIError
from gateway.settings import GatewaySettings
from gateway.triton.errors import TritonError
from tests.fixtures.asgi import admission as _admission
from tests.fixtures.asgi import gateway_client as _client
from tests.fixtures.backends import MODEL, USER, Scripted, endless_script, tok
from tests.fixtures.backends import ticks as _ticks
from tests.fixtures.sse import parse as sse_events


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
