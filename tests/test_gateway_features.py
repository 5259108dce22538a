"""Images, tools and LoRA wiring of the gateway against a scripted Triton stand-in (no Triton needed).

What reaches the engine (`images`, guided decoding, `lora_task_id`/`lora_weights`), how outputs are shaped
(tool calls, streamed call deltas) and the LoRA cache-miss retry; the e2e files run the same paths for real.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from gateway.app import create_app
from gateway.errors import triton_api_error
from gateway.lora_registry import stable_task_id
from gateway.settings import GatewaySettings
from gateway.triton_stream import InputSpec, ModelSpec, TritonError, TritonResponse, build_inputs
from gemma3_core.images import DEFAULT_MAX_PIXELS, ImageError, probe_image
from gemma3_core.lora import cache_miss_message
from tests.gateway_fakes import AlwaysReadyBackend

MODEL = "gemma-test"
USER = [{"role": "user", "content": "hi"}]
END = TritonResponse(b"", 5, 0, True)


class Engine(AlwaysReadyBackend):
    """Answers every request with `text`; with `lora_cache`, behaves like TensorRT-LLM's PEFT cache."""

    url = "scripted:0"

    def __init__(
        self, text: str = "ok", lora_cache: set[int] | None = None, error: str | None = None
    ) -> None:
        self.text = text
        self.lora_cache = lora_cache
        self.error = error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def generate(self, prompt: str, values: Any, request_id: str) -> AsyncIterator[TritonResponse]:
        self.calls.append((prompt, dict(values)))
        if self.error is not None:
            raise TritonError("engine", self.error)
        if self.lora_cache is not None and "lora_task_id" in values:
            task = int(values["lora_task_id"].reshape(-1)[0])
            if "lora_weights" in values:
                self.lora_cache.add(task)
            elif task not in self.lora_cache:
                raise TritonError("engine", f"Triton error: {cache_miss_message(task)}")
        for i in range(0, len(self.text), 4):  # small pieces: streaming parsers see split text
            yield TritonResponse(self.text[i : i + 4].encode(), 5, 1, False)
        yield END


def client(engine: Engine, **settings: Any) -> httpx.AsyncClient:
    app = create_app(GatewaySettings(model_id=MODEL, model_aliases=[], **settings), backend=engine)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30)


def sse(text: str) -> list[dict[str, Any]]:
    blocks = [b.removeprefix("data: ") for b in text.split("\n\n") if b.strip()]
    assert blocks[-1] == "[DONE]"
    return [json.loads(b) for b in blocks[:-1]]


# --- LoRA ------------------------------------------------------------------------------------------
@pytest.fixture
def adapters_dir(tmp_path: Path) -> Path:
    from safetensors.numpy import save_file

    root = tmp_path / "adapters"
    for name in ("ad1", "ad2"):
        d = root / name
        d.mkdir(parents=True)
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        prefix = "base_model.model.model.layers.0.self_attn.q_proj"
        save_file(
            {
                f"{prefix}.lora_A.weight": np.ones((2, 64), np.float32),
                f"{prefix}.lora_B.weight": np.ones((128, 2), np.float32),
            },
            str(d / "adapter_model.safetensors"),
        )
    return root


async def test_lora_models_and_unknown_adapter(adapters_dir: Path) -> None:
    async with client(Engine(), lora_dir=adapters_dir) as c:
        cards = (await c.get("/v1/models")).json()["data"]
        assert [m["id"] for m in cards] == [MODEL, "ad1", "ad2"]
        assert all(m["parent"] == MODEL and m["root"] == MODEL for m in cards[1:])
        assert (await c.get("/v1/models/ad2")).json()["parent"] == MODEL
        for model in ("nope", f"{MODEL}:nope"):
            response = await c.post("/v1/chat/completions", json={"model": model, "messages": USER})
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "model_not_found"


async def test_lora_weights_sent_once_and_resent_after_cache_miss(adapters_dir: Path) -> None:
    cache: set[int] = set()
    engine = Engine(text="adapted", lora_cache=cache)
    async with client(engine, lora_dir=adapters_dir) as c:

        async def ask(model: str) -> dict[str, Any]:
            response = await c.post("/v1/chat/completions", json={"model": model, "messages": USER})
            assert response.status_code == 200, response.text
            return response.json()

        assert (await ask("ad1"))["model"] == "ad1"
        assert "lora_weights" in engine.calls[-1][1]  # first use carries the weights
        assert int(engine.calls[-1][1]["lora_task_id"][0, 0]) == stable_task_id("ad1")
        await ask(f"{MODEL}:ad1")
        assert "lora_weights" not in engine.calls[-1][1]  # cached by the engine: the id alone
        await ask(MODEL)
        assert "lora_task_id" not in engine.calls[-1][1]  # the base model: no LoRA inputs

        cache.clear()  # the engine forgets (eviction, restart)
        calls = len(engine.calls)
        body = await ask("ad1")
        assert body["choices"][0]["message"]["content"] == "adapted"
        retry = engine.calls[calls:]
        assert len(retry) == 2 and "lora_weights" not in retry[0][1] and "lora_weights" in retry[1][1]
        weights, config = retry[1][1]["lora_weights"], retry[1][1]["lora_config"]
        assert weights.dtype == np.float16 and weights.ndim == 3 and config.shape[0] == 1


async def test_lora_other_errors_are_not_retried(adapters_dir: Path) -> None:
    engine = Engine(error="Triton error: something else broke")
    async with client(engine, lora_dir=adapters_dir) as c:
        response = await c.post("/v1/chat/completions", json={"model": "ad2", "messages": USER})
    assert response.status_code == 500
    assert len(engine.calls) == 1


async def test_lora_bf16_engine_gets_float32_weights(adapters_dir: Path) -> None:
    class Bf16Engine(Engine):
        async def model_spec(self) -> ModelSpec:
            return ModelSpec({"lora_weights": InputSpec("lora_weights", "BF16", True)}, 1)

    engine = Bf16Engine()
    async with client(engine, lora_dir=adapters_dir) as c:
        response = await c.post("/v1/chat/completions", json={"model": "ad1", "messages": USER})
    assert response.status_code == 200, response.text
    # tritonclient serializes BF16 from float32 (build_inputs casts to the declared type's numpy dtype).
    assert engine.calls[0][1]["lora_weights"].dtype == np.float32


def test_missing_essential_input_is_400() -> None:
    spec = ModelSpec(
        {n: InputSpec(n, t, False) for n, t in (("text_input", "BYTES"), ("max_tokens", "INT32"))}, 1
    )
    assert len(build_inputs(spec, "p", {"max_tokens": 4, "top_k": 1})) == 2  # plain extras are dropped
    with pytest.raises(TritonError) as info:
        build_inputs(spec, "p", {"max_tokens": 4, "images": np.array([[b"x"]], dtype=object)})
    error = triton_api_error(info.value)
    assert error.status == 400 and "images" in error.message


# --- tools -----------------------------------------------------------------------------------------
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'


async def test_tool_call_non_streaming_and_guide() -> None:
    engine = Engine(text=CALL_TEXT)
    async with client(engine) as c:
        body = {"model": MODEL, "messages": USER, "tools": [TOOL], "tool_choice": "required"}
        response = await c.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    prompt, values = engine.calls[0]
    assert "get_weather" in prompt  # the tool prompt was rendered
    assert values["guided_decoding_guide_type"] == "json_schema"
    guide = json.loads(values["guided_decoding_guide"])
    assert guide["type"] == "array" and guide["minItems"] == 1 and guide["maxItems"] == 1


async def test_tool_call_streaming_deltas() -> None:
    engine = Engine(text="Sure. " + CALL_TEXT)
    async with client(engine) as c:
        body = {"model": MODEL, "messages": USER, "tools": [TOOL], "stream": True}
        response = await c.post("/v1/chat/completions", json=body)
    chunks = sse(response.text)
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Sure."  # no call text in content
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function" and calls[0]["id"]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
    finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert [f for f in finishes if f] == ["tool_calls"]
    assert "guided_decoding_guide" not in engine.calls[0][1]  # "auto": free text, parsed


async def test_forced_list_cut_off_by_max_tokens_stays_tool_calls() -> None:
    paris = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text = f"[{paris}, {paris}, {paris}, " + '{"name": "get_weather", "arguments": {"city": "Ro'
    engine = Engine(text=text)
    body = {"model": MODEL, "messages": USER, "tools": [TOOL], "tool_choice": "required", "max_tokens": 2}
    async with client(engine, max_tool_calls=3) as c:
        plain = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        streamed = sse((await c.post("/v1/chat/completions", json={**body, "stream": True})).text)
    assert plain["finish_reason"] == "length"
    assert plain["message"]["content"] is None and plain["message"]["refusal"] is None
    (call,) = plain["message"]["tool_calls"]  # the duplicates are dropped, the cut-off call too
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert json.loads(engine.calls[0][1]["guided_decoding_guide"])["maxItems"] == 3  # GATEWAY_MAX_TOOL_CALLS
    deltas = [ch["choices"][0] for ch in streamed if ch["choices"]]
    assert not any(d["delta"].get("content") for d in deltas)
    arguments = [tc["function"]["arguments"] for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert (
        "".join(arguments) == '{"city": "Paris"}{"city": "Ro'
    )  # streamed as generated; the cut-off call shows
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["length"]


async def test_parallel_tool_calls_false_under_auto_keeps_the_first_call() -> None:
    two = (
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {}}]'
    )
    engine = Engine(text=two)
    body = {"model": MODEL, "messages": USER, "tools": [TOOL], "parallel_tool_calls": False}
    async with client(engine) as c:
        plain = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        streamed = sse((await c.post("/v1/chat/completions", json={**body, "stream": True})).text)
        both = (await c.post("/v1/chat/completions", json={**body, "parallel_tool_calls": True})).json()
    assert [tc["function"]["arguments"] for tc in plain["message"]["tool_calls"]] == ['{"city": "Paris"}']
    ids = {
        tc.get("id")
        for ch in streamed
        if ch["choices"]
        for tc in ch["choices"][0]["delta"].get("tool_calls", [])
    }
    assert len(ids - {None}) == 1
    assert len(both["choices"][0]["message"]["tool_calls"]) == 2
    assert "guided_decoding_guide" not in engine.calls[0][1]


async def test_tool_choice_none_and_response_format() -> None:
    engine = Engine(text=CALL_TEXT)
    async with client(engine) as c:
        body = {"model": MODEL, "messages": USER, "tools": [TOOL], "tool_choice": "none"}
        plain = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        assert plain["message"]["content"] == CALL_TEXT and plain["finish_reason"] == "stop"
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        await c.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "response_format": fmt})
        assert json.loads(engine.calls[-1][1]["guided_decoding_guide"]) == schema
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
        response = await c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": USER, "response_format": bad}
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "response_format.json_schema.schema"


async def test_tool_results_rendered() -> None:
    engine = Engine()
    messages = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    async with client(engine) as c:
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 200, response.text
    assert "```tool_output\nsunny\n```" in engine.calls[0][0]


# --- images ----------------------------------------------------------------------------------------
def png(color: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def image_message(*urls: str) -> list[dict[str, Any]]:
    parts = [
        {"type": "text", "text": "What?"},
        *({"type": "image_url", "image_url": {"url": u}} for u in urls),
    ]
    return [{"role": "user", "content": parts}]


async def test_images_sent_in_order() -> None:
    first, second = png(), png((200, 0, 0))
    urls = [f"data:image/png;base64,{base64.b64encode(d).decode()}" for d in (first, second)]
    engine = Engine()
    async with client(engine) as c:
        response = await c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": image_message(*urls)}
        )
    assert response.status_code == 200, response.text
    prompt, values = engine.calls[0]
    assert prompt.count("<start_of_image>") == 2
    images = values["images"]
    assert images.shape == (1, 2) and images.dtype == object
    assert images[0, 0] == first and images[0, 1] == second


async def test_images_errors() -> None:
    async with client(Engine(), images_max_per_request=1) as c:
        url = f"data:image/png;base64,{base64.b64encode(png()).decode()}"
        response = await c.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": image_message(url, url)}
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_images"
        bad = "data:image/png;base64," + base64.b64encode(b"nope").decode()
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": image_message(bad)})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "messages[0].content[1].image_url.url"
    async with client(Engine(), images_enabled=False) as c:
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": image_message(url)})
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_content"


async def test_image_above_the_preprocessing_pixel_limit_is_a_400() -> None:
    """The gateway refuses what preprocessing would (a 400 naming the part): no such image reaches Triton."""
    side = math.isqrt(DEFAULT_MAX_PIXELS) + 1
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # a few KB: one bit per pixel, all zero
    with pytest.raises(ImageError, match="too large"):
        probe_image(buf.getvalue())  # what preprocessing checks (with its default, the same limit)
    url = f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
    engine = Engine()
    async with client(engine) as c:
        response = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": image_message(url)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "image_too_large" and error["param"] == "messages[0].content[1].image_url.url"
    assert engine.calls == []
    with pytest.raises(ValidationError):  # the gateway may not accept more than preprocessing does
        GatewaySettings(images_max_pixels=DEFAULT_MAX_PIXELS + 1)


def test_images_allow_list_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_IMAGES_ALLOW_LIST", "127.0.0.1, 10.0.0.0/8,*.corp.example")
    from gateway.images import policy_from_settings

    policy = policy_from_settings(GatewaySettings())
    assert policy.allow_list == ("127.0.0.1", "10.0.0.0/8", "*.corp.example")
    assert policy.host_allowed("img.corp.example")
