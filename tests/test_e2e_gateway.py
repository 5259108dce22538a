"""End to end: the real gateway in front of the real Triton (CPU stack), or any deployment via E2E_BASE_URL.

Clients: the official `openai` SDK (streaming and not), raw httpx for the SSE wire format and error bodies,
and `curl` for the model card's examples as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from stack.triton_launcher import free_port
from tests.fixtures.gateway import (
    CARD_MULTIMODAL,
    NEEDS_CURL,
    GatewayTarget,
    gateway_env,
    run_gateway,
)
from tests.fixtures.remote import local_only
from tests.fixtures.sse import parse

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ASK = [{"role": "user", "content": "Write three short sentences about the sea."}]
CARD_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name the european capitals"},
]


def stream_texts(events: list[Any], n: int = 1, include_usage: bool = False) -> dict[int, str]:
    """Check the streaming contract (see the unit tests) and return each choice's text."""
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        chunks = chunks[:-1]
    assert all(len(c["choices"]) == 1 for c in chunks)
    texts: dict[int, str] = {}
    finishes = dict.fromkeys(range(n), 0)
    for c in chunks:
        choice = c["choices"][0]
        if choice["index"] not in texts:
            assert choice["delta"] == {"role": "assistant", "content": ""}
            texts[choice["index"]] = ""
        elif choice["finish_reason"] is not None:
            assert choice["finish_reason"] in ("stop", "length")
            finishes[choice["index"]] += 1
        else:
            texts[choice["index"]] += choice["delta"]["content"]
    assert sorted(texts) == list(range(n)) and all(v == 1 for v in finishes.values()), finishes
    return texts


# --- discovery and health --------------------------------------------------------------------------------
def test_models_and_health(gateway: GatewayTarget, http: httpx.Client, sdk: openai.OpenAI) -> None:
    assert gateway.model in [m.id for m in sdk.models.list().data]
    assert http.get("/health/live").status_code == 200
    assert http.get("/health/ready").json()["status"] == "ready"
    assert "gateway_time_to_first_token_seconds" in http.get("/metrics").text


# --- OpenAI SDK --------------------------------------------------------------------------------------------
def test_sdk_non_streaming(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(model=gateway.model, messages=ASK, max_tokens=16, temperature=0)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == gateway.model
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_sdk_streaming_with_usage(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=gateway.model,
        messages=ASK,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and len(finishes) == 1
    assert chunks[-1].usage.completion_tokens <= 12


def test_streamed_equals_non_streamed(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": gateway.model, "messages": ASK, "max_tokens": 24, "temperature": 0}
    plain = sdk.chat.completions.create(**kwargs)
    chunks = list(sdk.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason
    ]


def test_n_choices_seeded(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {
        "model": gateway.model,
        "messages": ASK,
        "max_tokens": 12,
        "n": 2,
        "seed": 1234,
        "temperature": 1.0,
    }
    first = sdk.chat.completions.create(**kwargs)
    again = sdk.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage is not None and 0 < first.usage.completion_tokens <= 2 * 12


def test_n_choices_stream_interleaved(gateway: GatewayTarget, http: httpx.Client) -> None:
    body = {
        "model": gateway.model,
        "messages": ASK,
        "max_tokens": 10,
        "n": 3,
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = parse(http.post("/v1/chat/completions", json=body).text, strict=False)
    texts = stream_texts(events, n=3, include_usage=True)
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] <= 30 and usage["prompt_tokens"] > 0
    plain = http.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert {c["index"]: c["message"]["content"] for c in plain["choices"]} == texts


def test_max_tokens_gives_length(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    completion = sdk.chat.completions.create(
        model=gateway.model,
        messages=[{"role": "user", "content": "Count from 1 to 100, separated by commas."}],
        max_tokens=3,
        temperature=0,
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_stop_sequence_is_trimmed(gateway: GatewayTarget, sdk: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": gateway.model, "messages": ASK, "max_tokens": 32, "temperature": 0}
    text = sdk.chat.completions.create(**kwargs).choices[0].message.content or ""
    words = re.findall(r"[A-Za-z]{4,}", text)
    assert len(words) >= 3, f"greedy output too short to pick a stop word: {text!r}"
    stop = words[2]
    expected = text[: text.index(stop)]
    stopped = sdk.chat.completions.create(stop=[stop], **kwargs)
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    chunks = list(sdk.chat.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


# --- raw HTTP: wire format, model card examples, errors ----------------------------------------------------
@NEEDS_CURL
def test_model_card_curl_example(gateway: GatewayTarget) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    # Exactly the card's first example, with the served model id (no max_tokens: the default applies).
    body = json.dumps({"stream": True, "model": gateway.model, "messages": CARD_MESSAGES})
    args = [
        curl,
        "-sS",
        "--max-time",
        "600",
        f"{gateway.url}/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
    ]
    if gateway.api_key:
        args[2:2] = ["-H", f"Authorization: Bearer {gateway.api_key}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=620).stdout
    assert stream_texts(parse(out, strict=False))[0]


def test_model_card_multimodal_example_is_not_a_server_error(
    gateway: GatewayTarget, http: httpx.Client
) -> None:
    body = {**CARD_MULTIMODAL, "model": gateway.model, "max_tokens": 8}
    response = http.post("/v1/chat/completions", json=body)
    # Images may be disabled (400) or the URL unreachable from this machine (4xx); never a 5xx.
    if response.status_code == 200:
        stream_texts(parse(response.text, strict=False))
    else:
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["param"].startswith("messages[1].content")


def test_sse_wire_format(gateway: GatewayTarget, http: httpx.Client) -> None:
    body = {"model": gateway.model, "messages": CARD_MESSAGES, "max_tokens": 8, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_bytes()).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = parse(raw, strict=False)
    stream_texts(events)
    assert all("usage" not in e for e in events[:-1])


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"temperature": 3}, 400, "temperature"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            400,
            "messages[1].role",
        ),
        ({"model": "no-such-model"}, 404, "model"),
        ({"n": 0}, 400, "n"),
        ({"stop": ["ok", ""]}, 400, "stop[1]"),
    ],
)
def test_error_bodies(
    gateway: GatewayTarget, http: httpx.Client, fields: dict[str, Any], status: int, param: str
) -> None:
    response = http.post("/v1/chat/completions", json={"model": gateway.model, "messages": ASK, **fields})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_malformed_json(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_prompt_longer_than_context(gateway: GatewayTarget, http: httpx.Client) -> None:
    triton = local_only(gateway, "reads the local Triton's metrics and engine process")
    words = " ".join(["sea"] * (int(triton.max_model_len) + 16))
    response = http.post(
        "/v1/chat/completions",
        json={"model": gateway.model, "messages": [{"role": "user", "content": words}]},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and str(triton.max_model_len) in error["message"]


# --- lifecycle ---------------------------------------------------------------------------------------------
def _metric_sum(text: str, name: str, model: str | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and (model is None or f'model="{model}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_disconnect_cancels_generation(gateway: GatewayTarget, http: httpx.Client) -> None:
    triton = local_only(gateway, "reads the local Triton's metrics and engine process")
    metrics_url = str(triton.metrics_url)
    body = {
        "model": gateway.model,
        "messages": ASK,
        "max_tokens": 2000,
        "stream": True,
        "temperature": 1.0,
        "seed": 3,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i >= 8:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    pending = executions = None
    while time.monotonic() < deadline:
        metrics = httpx.get(metrics_url, timeout=5).text
        pending = _metric_sum(metrics, "nv_inference_pending_request_count")
        executions = _metric_sum(metrics, "nv_inference_exec_count")
        time.sleep(1.0)
        later = _metric_sum(httpx.get(metrics_url, timeout=5).text, "nv_inference_exec_count")
        if pending == 0 and later == executions:
            break
    else:
        pytest.fail(
            f"Triton still busy after the disconnect: pending={pending}, exec_count moving from {executions}"
        )
    gateway_metrics = http.get("/metrics").text
    assert _metric_sum(gateway_metrics, "gateway_requests_in_flight") == 0
    # Triton's counters cannot see a decoupled Python engine still generating: watch its CPU time.
    from tests.fixtures.triton import engine_goes_idle

    assert engine_goes_idle(triton), "the engine kept generating after the client disconnected"


def test_greedy_matches_transformers(
    gateway: GatewayTarget, sdk: openai.OpenAI, request: pytest.FixtureRequest
) -> None:
    triton = local_only(gateway, "reads the local Triton's metrics and engine process")
    from gemma3_core.chat_template import render_chat
    from gemma3_core.detokenize import ByteDetokenizer
    from gemma3_core.tokenizer import encode, load_tokenizer
    from tests.hf_reference import hf_greedy

    max_tokens = 24
    completion = sdk.chat.completions.create(
        model=gateway.model, messages=CARD_MESSAGES, max_tokens=max_tokens, temperature=0
    )
    tok = load_tokenizer(triton.tokenizer_dir)
    ids = encode(tok, render_chat(CARD_MESSAGES))
    model = request.getfixturevalue("hf_model")  # tests/fixtures/triton.py: the weights the engine serves
    generated = hf_greedy(model, ids, max_tokens)  # stop tokens decode to no text
    expected = ByteDetokenizer(tok).token_bytes(generated).decode("utf-8", errors="replace")
    assert completion.choices[0].message.content == expected


class TcpProxy:
    """A TCP relay we can cut and restore, to play a Triton outage without touching the shared server."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self) -> None:
        async def start() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

        self._run(start())

    def cut(self) -> None:
        async def cut() -> None:
            if self.server is not None:
                self.server.close()
            for writer in list(self.writers):
                writer.close()
            self.writers.clear()

        self._run(cut())

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_triton_outage_and_recovery(gateway: GatewayTarget, tmp_path: Path) -> None:
    triton = local_only(gateway, "reads the local Triton's metrics and engine process")
    proxy = TcpProxy(str(triton.grpc_url))
    proxy.start()
    env = gateway_env(
        triton, free_port(), grpc_url=f"127.0.0.1:{proxy.port}", GATEWAY_REQUEST_TIMEOUT_S="120"
    )
    body = {"model": gateway.model, "messages": ASK, "max_tokens": 4, "temperature": 0}
    try:
        with (
            run_gateway(env, tmp_path / "gateway.log") as url,
            httpx.Client(base_url=url, timeout=60) as client,
        ):
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            proxy.cut()
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 503, response.text
            assert "unreachable" in response.json()["error"]["message"]
            assert client.get("/health/ready").status_code == 503
            proxy.start()
            deadline = time.monotonic() + 30
            while client.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "gateway did not recover after Triton came back"
                time.sleep(0.5)
            assert client.post("/v1/chat/completions", json=body).status_code == 200
    finally:
        proxy.close()
