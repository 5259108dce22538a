"""The gateway against a real `tritonserver` serving a tiny decoupled echo model named `ensemble`.

No language model is involved, so this checks the gRPC side on its own: tensors built from the deployed
config (the echo model declares no `top_p`/`top_k`: sending them would be rejected), streamed
`text_output` bytes that split UTF-8 characters, the final-response flag, cancellation reaching the
model (it records `is_cancelled()`), and recovery after Triton restarts.
Skipped where the pytriton-shipped tritonserver cannot run with this interpreter (stack/triton_launcher.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.fixtures.sse import parse

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """
name: "ensemble"
backend: "python"
max_batch_size: 8
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true },
  { name: "stop_words" data_type: TYPE_STRING dims: [ -1 ] optional: true },
  { name: "return_num_input_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "return_num_output_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "num_input_tokens" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "num_output_tokens" data_type: TYPE_INT32 dims: [ 1 ] }
]
instance_group [ { count: 4 kind: KIND_CPU } ]
"""

# Three bytes per response out of a text with 2-, 3- and 4-byte characters: splits characters on purpose.
MODEL = """
import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

PIECE = "Echo é€😀 ".encode()


class TritonPythonModel:
    def initialize(self, args):
        self.events = os.path.join(args["model_repository"], "events.log")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "max_tokens").as_numpy().reshape(-1)[0])
            prompt = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
            seed = pb_utils.get_input_tensor_by_name(request, "seed")
            data = PIECE * (n // 4 + 2)
            outcome = "finished"
            for i in range(n):
                if sender.is_cancelled():
                    outcome = "cancelled"
                    break
                time.sleep(0.02)
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("text_output", np.array([[data[3 * i: 3 * i + 3]]], dtype=np.object_)),
                    pb_utils.Tensor("num_input_tokens", np.array([[len(prompt)]], dtype=np.int32)),
                    pb_utils.Tensor("num_output_tokens", np.array([[1]], dtype=np.int32)),
                ]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            record = {"id": request.request_id(), "outcome": outcome,
                      "seed": None if seed is None else int(seed.as_numpy().reshape(-1)[0])}
            with open(self.events, "a") as f:
                f.write(json.dumps(record) + "\\n")
        return None
"""

PIECE = "Echo é€😀 ".encode()


class EchoTriton:
    def __init__(self, root: Path) -> None:
        self.repo = root / "repo"
        (self.repo / "ensemble" / "1").mkdir(parents=True)
        (self.repo / "ensemble" / "config.pbtxt").write_text(CONFIG)
        (self.repo / "ensemble" / "1" / "model.py").write_text(MODEL)
        self.workdir = root / "work"
        from stack import triton_launcher

        self.launcher = triton_launcher
        self.ports = triton_launcher.TritonPorts.free()
        self.process: Any = None

    def start(self) -> None:
        self.process = self.launcher.start(self.repo, ports=self.ports, workdir=self.workdir)
        self.process.wait_ready(180)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def events(self) -> list[dict[str, Any]]:
        path = self.repo / "ensemble" / "events.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoTriton]:
    server = EchoTriton(tmp_path_factory.mktemp("echo-triton"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def gateway(echo: EchoTriton) -> AsyncIterator[str]:
    app = create_app(GatewaySettings(model_id="echo", model_aliases=[], triton_grpc_url=echo.ports.grpc_url))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    await task


def expected_text(n_responses: int) -> str:
    return (PIECE * (n_responses // 4 + 2))[: 3 * n_responses].decode("utf-8", errors="replace")


async def test_completion_through_real_triton(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
        assert (await client.get("/health/ready")).status_code == 200
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "n": 2, "seed": 9}
        plain = (await client.post("/v1/chat/completions", json=body)).json()
        events = parse((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    assert [c["message"]["content"] for c in plain["choices"]] == [expected_text(12)] * 2
    assert [c["finish_reason"] for c in plain["choices"]] == ["length", "length"]
    assert plain["usage"]["completion_tokens"] == 24 and plain["usage"]["prompt_tokens"] > 0
    streamed: dict[int, str] = {}
    for event in events[:-1]:
        choice = event["choices"][0]
        streamed[choice["index"]] = streamed.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert streamed == {0: expected_text(12), 1: expected_text(12)}
    assert events[-1] == "[DONE]"


async def test_stop_string_cancels_the_model(gateway: str, echo: EchoTriton) -> None:
    before = len(echo.events())
    async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 400,
            "stop": ["😀"],
            "seed": 77,
        }
        reply = (await client.post("/v1/chat/completions", json=body)).json()
    assert reply["choices"][0]["message"]["content"] == "Echo é€"
    assert reply["choices"][0]["finish_reason"] == "stop"
    deadline = time.monotonic() + 10
    while len(echo.events()) <= before:
        assert time.monotonic() < deadline, "the model never finished the request"
        await asyncio.sleep(0.1)
    assert echo.events()[-1] == {"id": echo.events()[-1]["id"], "outcome": "cancelled", "seed": 77}


async def test_disconnect_cancels_the_model(gateway: str, echo: EchoTriton) -> None:
    before = len(echo.events())
    async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000, "stream": True, "n": 2}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = 0
            async for _ in response.aiter_lines():
                lines += 1
                if lines > 10:
                    break
    deadline = time.monotonic() + 10
    while len(echo.events()) < before + 2:
        assert time.monotonic() < deadline, "Triton kept generating after the client left"
        await asyncio.sleep(0.1)
    assert [e["outcome"] for e in echo.events()[before:]] == ["cancelled", "cancelled"]
    metrics = httpx.get(echo.ports.metrics_url).text
    pending = [ln for ln in metrics.splitlines() if ln.startswith("nv_inference_pending_request_count{")]
    assert pending and all(ln.endswith(" 0") for ln in pending), pending


async def test_outage_and_recovery(gateway: str, echo: EchoTriton) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
        echo.stop()
        for stream in (False, True):
            down = await client.post("/v1/chat/completions", json={**body, "stream": stream})
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "triton_unavailable"
        assert (await client.get("/health/ready")).status_code == 503
        await asyncio.to_thread(echo.start)
        deadline = time.monotonic() + 30
        while (await client.get("/health/ready")).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not recover after Triton came back"
            await asyncio.sleep(0.5)
        up = await client.post("/v1/chat/completions", json=body)
        assert up.status_code == 200 and up.json()["choices"][0]["message"]["content"] == expected_text(3)
