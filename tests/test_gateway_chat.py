"""Chat orchestration against a scripted Triton stand-in: SSE wire format, n choices, UTF-8, stop strings,
errors, timeouts and client disconnects (the last through a real uvicorn server)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from gateway.triton.errors import TritonError
from gateway.triton.tensors import TritonResponse
from gemma3_core.chat_template import render_chat
from tests.fixtures.asgi import asgi_client
from tests.fixtures.backends import (
    END,
    MODEL,
    PROMPT_TOKENS,
    USER,
    Script,
    Scripted,
    endless_script,
    tok,
    words,
)
from tests.fixtures.sse import parse as sse_events


def make_client(backend: Scripted, **settings: Any) -> httpx.AsyncClient:
    return asgi_client(create_app(GatewaySettings(model_id=MODEL, **settings), backend=backend))


def check_stream(events: list[Any], n: int, include_usage: bool) -> dict[int, str]:
    """Assert the OpenAI streaming contract; return the text per choice index."""
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    if include_usage:
        usage_chunk = chunks.pop()
        assert usage_chunk["choices"] == []
        assert set(usage_chunk["usage"]) == {
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "prompt_tokens_details",
        }
        assert all(c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    texts: dict[int, str] = {}
    finishes: dict[int, int] = dict.fromkeys(range(n), 0)
    for c in chunks:
        assert len(c["choices"]) == 1
        choice = c["choices"][0]
        i = choice["index"]
        if i not in texts:
            assert choice["delta"] == {"role": "assistant", "content": ""}, (
                "first chunk per choice carries the role"
            )
            texts[i] = ""
            continue
        assert finishes[i] == 0, "no chunk after a choice's finish_reason"
        if choice["finish_reason"] is not None:
            assert choice["finish_reason"] in ("stop", "length")
            finishes[i] += 1
        else:
            texts[i] += choice["delta"]["content"]
    assert sorted(texts) == list(range(n))
    assert all(count == 1 for count in finishes.values()), finishes
    return texts


async def chat(client: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, **fields})


async def test_non_streaming() -> None:
    backend = Scripted(words("Hello", ",", " world"))
    async with make_client(backend) as client:
        response = await chat(client, max_tokens=10)
    assert response.status_code == 200
    body = response.json()
    assert (
        body["object"] == "chat.completion" and body["model"] == MODEL and body["id"].startswith("chatcmpl-")
    )
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, world", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 3,
        "total_tokens": PROMPT_TOKENS + 3,
        "prompt_tokens_details": {"cached_tokens": 0},  # the fake backend reports no KV reuse
    }
    prompt, values, _ = backend.calls[0]
    assert prompt == render_chat(USER)
    assert values["max_tokens"] == 10


async def test_length_when_max_tokens_reached() -> None:
    async with make_client(Scripted(words("a", "b"))) as client:
        body = (await chat(client, max_tokens=2)).json()
    assert body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streaming_wire_format(include_usage: bool) -> None:
    backend = Scripted(lambda i, v: [tok(f"c{i}-a"), tok(f" c{i}-b"), END])
    async with make_client(backend) as client:
        fields: dict[str, Any] = {"stream": True, "n": 3, "max_tokens": 50}
        if include_usage:
            fields["stream_options"] = {"include_usage": True}
        response = await chat(client, **fields)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    texts = check_stream(events, n=3, include_usage=include_usage)
    assert texts == {i: f"c{i}-a c{i}-b" for i in range(3)}
    if include_usage:
        assert events[-2]["usage"] == {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": 6,
            "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 0},
        }


async def test_choices_interleave_in_arrival_order() -> None:
    backend = Scripted(
        lambda i, v: [tok(f"{i}") for _ in range(4)] + [END], delay=lambda i: 0.05 if i == 0 else 0.01
    )
    async with make_client(backend) as client:
        events = sse_events((await chat(client, stream=True, n=2)).text)
    texts = check_stream(events, n=2, include_usage=False)
    assert texts == {0: "0000", 1: "1111"}
    order = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["delta"].get("content")]
    assert order.index(0) > order.index(1), "the fast choice must not wait for the slow one"


async def test_seeds_and_sampling_reach_triton() -> None:
    backend = Scripted(words("x"))
    async with make_client(backend) as client:
        await chat(client, n=2, seed=5, temperature=0.3, stop=["\n"])
    values = sorted((c[2], c[1]) for c in backend.calls)
    assert [v["seed"] for _, v in values] == [5, 6]
    assert all(v["temperature"] == pytest.approx(0.3) and v["stop_words"] == ["\n"] for _, v in values)


async def test_utf8_split_across_responses() -> None:
    pieces = [b"caf", b"\xc3", b"\xa9 \xe2\x82", b"\xac \xf0\x9f", b"\x98", b"\x80"]
    script: Script = lambda i, v: [*(tok(p) for p in pieces), END]  # noqa: E731
    async with make_client(Scripted(script)) as client:
        plain = (await chat(client)).json()["choices"][0]["message"]["content"]
        events = sse_events((await chat(client, stream=True)).text)
    assert plain == "café € 😀"
    assert check_stream(events, 1, False) == {0: "café € 😀"}
    # No chunk carries a replacement character for a split character.
    assert all("\ufffd" not in json.dumps(e, ensure_ascii=False) for e in events)


async def test_truncated_utf8_at_end_is_replaced_not_dropped() -> None:
    async with make_client(Scripted(lambda i, v: [tok(b"ok\xe2\x82"), END])) as client:
        content = (await chat(client)).json()["choices"][0]["message"]["content"]
    assert content == "ok\ufffd"


async def test_stop_string_trimmed_and_generation_cancelled() -> None:
    def endless(i: int, v: dict[str, Any]) -> Iterable[TritonResponse]:
        yield from (tok(p) for p in ["The", " E", "N", "D", " is", " near"])
        yield from (tok(" more") for _ in itertools.count())

    backend = Scripted(endless, delay=0.001)
    async with make_client(backend) as client:
        body = (await chat(client, stop=["END"])).json()
        events = sse_events((await chat(client, stream=True, stop="END")).text)
    assert body["choices"][0]["message"]["content"] == "The "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert check_stream(events, 1, False) == {0: "The "}
    assert all("E" not in (e["choices"][0]["delta"].get("content") or "") for e in events[:-1])
    await asyncio.sleep(0.05)
    assert len(backend.closed) == 2 and not backend.completed, "the endless streams must be cancelled"


async def test_triton_errors_before_the_first_token_are_http_errors() -> None:
    unavailable = Scripted(lambda i, v: [TritonError("unavailable", "Triton at x:1 is unreachable")])
    async with make_client(unavailable) as client:
        for stream in (False, True):
            response = await chat(client, stream=stream)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "triton_unavailable"
    broken = Scripted(lambda i, v: [TritonError("engine", "boom")])
    async with make_client(broken) as client:
        response = await chat(client)
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "Inference failed: boom",
        "type": "server_error",
        "param": None,
        "code": "inference_error",
    }


async def test_error_mid_stream() -> None:
    backend = Scripted(lambda i, v: [tok("partial"), TritonError("engine", "engine died")])
    async with make_client(backend) as client:
        events = sse_events((await chat(client, stream=True)).text)
    assert events[-1] == "[DONE]"
    assert events[-2] == {
        "error": {
            "message": "Inference failed: engine died",
            "type": "server_error",
            "param": None,
            "code": "inference_error",
        }
    }
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])


async def test_request_timeout() -> None:
    endless: Script = lambda i, v: (tok("x") for _ in itertools.count())  # noqa: E731
    backend = Scripted(endless, delay=0.05)
    async with make_client(backend, request_timeout_s=0.5) as client:
        response = await chat(client)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        events = sse_events((await chat(client, stream=True)).text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
    await asyncio.sleep(0.1)
    assert len(backend.closed) == 2


async def test_streamed_equals_non_streamed() -> None:
    backend = Scripted(lambda i, v: [tok(f"s{v['seed']}"), tok(" ü\n"), END])
    async with make_client(backend) as client:
        plain = (await chat(client, n=2, seed=3)).json()
        events = sse_events((await chat(client, n=2, seed=3, stream=True)).text)
    streamed = check_stream(events, 2, False)
    assert {c["index"]: c["message"]["content"] for c in plain["choices"]} == streamed


# --- client disconnects, through a real HTTP server -------------------------------------------------------
class Served:
    def __init__(self, backend: Scripted) -> None:
        self.app = create_app(GatewaySettings(model_id=MODEL), backend=backend)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> str:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task


async def _wait_closed(backend: Scripted, count: int) -> None:
    for _ in range(200):
        if len(backend.closed) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"Triton streams still open: closed={backend.closed}")


@pytest.mark.parametrize("n", [1, 2])
async def test_disconnect_mid_stream_cancels_triton(n: int) -> None:
    backend = Scripted(endless_script, delay=0.01)
    async with Served(backend) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        body = {"model": MODEL, "messages": USER, "stream": True, "n": n}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            received = 0
            async for _ in response.aiter_lines():
                received += 1
                if received > 6:
                    break
        await _wait_closed(backend, n)
        assert not backend.completed
        metrics = (await client.get("/metrics")).text
        assert f'gateway_requests_in_flight{{model="{MODEL}"}} 0.0' in metrics
        assert f'gateway_client_disconnects_total{{model="{MODEL}"}} 1.0' in metrics


async def test_disconnect_while_waiting_for_a_non_streamed_reply() -> None:
    backend = Scripted(endless_script, delay=0.01)
    async with Served(backend) as url:
        async with httpx.AsyncClient(base_url=url, timeout=0.5) as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
        await _wait_closed(backend, 1)


async def test_openai_sdk_parses_our_responses() -> None:
    """The official SDK (streaming, non-streaming, errors) against the gateway over real HTTP."""
    import openai

    backend = Scripted(lambda i, v: [tok(f"choice {i}"), tok(" done"), END])
    async with Served(backend) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        completion = await client.chat.completions.create(model=MODEL, messages=USER, n=2, max_tokens=10)  # type: ignore[arg-type]
        assert [c.message.content for c in completion.choices] == ["choice 0 done", "choice 1 done"]
        assert completion.usage is not None and completion.usage.completion_tokens == 4
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "choice 0 done"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == PROMPT_TOKENS + 2
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=MODEL, messages=USER, temperature=9)  # type: ignore[arg-type]
        assert info.value.param == "temperature"  # type: ignore[attr-defined]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=USER)  # type: ignore[arg-type]
        models = await client.models.list()
        assert models.data[0].id == MODEL
        await client.close()


class Burst(Scripted):
    """Produces its whole script without yielding to the event loop: every token is queued at once."""

    async def generate(self, prompt: str, values: Any, request_id: str) -> AsyncIterator[TritonResponse]:
        self.calls.append((prompt, dict(values), request_id))
        for item in self.script(0, dict(values)):
            yield item


async def test_queued_tokens_leave_in_one_write_with_the_same_events() -> None:
    """Under load the SSE stream sends everything already queued as one body message (one socket write);
    the events inside are exactly the per-token chunks a client would otherwise get one by one."""
    pieces = [f"t{i} " for i in range(20)]
    app = create_app(GatewaySettings(model_id=MODEL), backend=Burst(words(*pieces)))
    body = json.dumps({"model": MODEL, "messages": USER, "stream": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("gw", 80),
    }
    messages: list[dict[str, Any]] = []
    inbox = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if inbox:
            return inbox.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
    writes = [m["body"] for m in messages[1:] if m["type"] == "http.response.body" and m.get("body")]
    events = sse_events(b"".join(writes).decode())
    assert check_stream(events, 1, False) == {0: "".join(pieces)}
    content_chunks = [e for e in events[:-1] if e["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == len(pieces)  # one chunk per token, never merged deltas
    assert len(writes) < len(pieces) // 2, f"{len(writes)} writes for {len(pieces)} queued tokens"
