"""LoRA adapters in the gateway (gateway/lora.py) against a scripted Triton stand-in: model ids, what reaches
the engine (lora_task_id, weights once), the cache-miss resend (LoraBackend), BF16 engines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.lora_registry import stable_task_id
from gateway.triton.tensors import InputSpec, ModelSpec
from tests.fixtures.asgi import engine_client as client
from tests.fixtures.backends import MODEL, USER, Engine


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


async def test_lora_adapter_works_on_every_replica(adapters_dir: Path) -> None:
    """Three replicas, each with its own adapter cache: the weights go out once, and each replica that
    never saw them answers with a cache miss that the resend (through the pool) repairs."""
    from gateway.triton.pool import BackendPool, Targets

    replicas = {f"r{i}:1": Engine(text="adapted", lora_cache=set()) for i in range(3)}
    pool = BackendPool(Targets(addresses=tuple(replicas)), replicas.__getitem__, None, 60.0)
    async with client(pool, lora_dir=adapters_dir) as c:
        for _ in range(6):
            response = await c.post("/v1/chat/completions", json={"model": "ad1", "messages": USER})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "adapted"
    task = stable_task_id("ad1")
    for engine in replicas.values():
        assert engine.lora_cache == {task}  # every replica got the weights and served the adapter
        assert any("lora_weights" in values for _, values in engine.calls)
