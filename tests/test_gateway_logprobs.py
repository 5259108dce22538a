"""Log probs in the gateway: what each deployment can return (from its rendered configs), the 400s, and
how a choice's `logprobs.content` stays in step with its content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import APIError
from gateway.generation import MIN_LOG_PROB, ChoiceLogProbs
from gateway.settings import GatewaySettings
from gateway.triton.tensors import ModelSpec, TokenLogProb, TritonResponse, engine_outputs_for
from gateway.validation import DeploymentFeatures, parse_chat_request
from tests.fixtures.asgi import gateway_client
from tests.fixtures.backends import MODEL, Scripted
from tests.fixtures.repository import render_target
from triton_io.contract import Engine, Ensemble
from triton_io.embedding_bias import EmbeddingBiasError, dense_embedding_bias

ASK = [{"role": "user", "content": "hi"}]


def _engine_spec(target: str, tmp_path: Path) -> ModelSpec:
    (engine,) = [m for m in render_target(target, tmp_path) if m.name == "tensorrt_llm"]
    return ModelSpec(
        inputs={}, max_batch_size=8, engine_outputs=frozenset(o.name for o in engine.config.output)
    )


@pytest.mark.parametrize(
    ("target", "log_probs", "top"),
    [("cpu", True, True), ("gpu", True, False), ("cpu-fast-double", True, True)],
)
def test_what_each_deployment_returns(target: str, log_probs: bool, top: bool, tmp_path: Path) -> None:
    spec = _engine_spec(target, tmp_path)
    assert (spec.log_probs, spec.top_log_probs) == (log_probs, top)


def _parse(features: DeploymentFeatures, **fields: object) -> object:
    raw = json.dumps({"messages": ASK, **fields}).encode()
    return parse_chat_request(raw, GatewaySettings(), features=features)


def test_gpu_refuses_top_logprobs_naming_it() -> None:
    gpu = DeploymentFeatures(log_probs=True, top_log_probs=False)
    _parse(gpu, logprobs=True, top_logprobs=0)
    with pytest.raises(APIError) as err:
        _parse(gpu, logprobs=True, top_logprobs=2)
    assert err.value.status == 400 and err.value.param == "top_logprobs"
    assert "top_logprobs" in err.value.message


def test_log_prob_outputs_only_when_asked() -> None:
    plain = engine_outputs_for({Ensemble.MAX_TOKENS: 4})
    assert Engine.OUTPUT_LOG_PROBS not in plain and Engine.TOP_LOG_PROBS not in plain
    asked = engine_outputs_for({Ensemble.RETURN_LOG_PROBS: True})
    assert {Engine.OUTPUT_LOG_PROBS, Engine.TOP_LOG_PROB_IDS, Engine.TOP_LOG_PROBS} <= set(asked)


def _tok(data: bytes, value: float = -0.5) -> TokenLogProb:
    return TokenLogProb(data, value, ((data, value), (b"x", float("-inf"))))


def test_split_character_belongs_to_the_token_completing_it() -> None:
    lp = ChoiceLogProbs(top=2)
    euro = "€".encode()  # three byte-fallback tokens
    lp.add([_tok(b"a"), _tok(euro[:1]), _tok(euro[1:2])], final=False)
    first = lp.release(1, final=False)
    lp.add([_tok(euro[2:])], final=True)
    rest = lp.release(2, final=True)
    entries = first + rest
    assert "".join(e["token"] for e in entries) == "a€"
    assert [e["bytes"] for e in entries] == [[0x61], [0xE2], [0x82], [0xAC]]
    assert entries[0]["top_logprobs"][1]["logprob"] == MIN_LOG_PROB  # JSON has no -Infinity


def test_entries_wait_for_held_text_and_stop_at_a_stop_string() -> None:
    lp = ChoiceLogProbs(top=0)
    lp.add([_tok(b"Hi"), _tok(b" th"), _tok(b"ere"), _tok(b" END"), _tok(b" more")], final=False)
    # The stop matcher released "Hi th" so far ("ere END..." may start the stop string).
    assert [e["token"] for e in lp.release(5, final=False)] == ["Hi", " th"]
    # Stopped at " END": the content is "Hi there"; tokens past it are not part of it.
    assert [e["token"] for e in lp.release(8, final=True)] == ["ere"]
    assert "".join(e["token"] for e in lp.released) == "Hi there"


def test_dense_embedding_bias() -> None:
    bias = dense_embedding_bias(np.array([3, 1]), np.array([-100.0, 2.5]), 5)
    assert bias.dtype == np.float32 and bias.tolist() == [0.0, 2.5, 0.0, -100.0, 0.0]
    with pytest.raises(EmbeddingBiasError):
        dense_embedding_bias(np.array([5]), np.array([1.0]), 5)
    with pytest.raises(EmbeddingBiasError):
        dense_embedding_bias(np.array([1, 2]), np.array([1.0]), 5)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_rendered_ensemble_feeds_the_engine(target: str, tmp_path: Path) -> None:
    """Both targets: logit bias via preprocessing, log probs and perf metrics asked of the engine."""
    (ensemble,) = [m for m in render_target(target, tmp_path) if m.name == "ensemble"]
    steps = {s.model_name: s for s in ensemble.config.ensemble_scheduling.step}
    engine, pre = steps["tensorrt_llm"], steps["preprocessing"]
    assert engine.input_map[Engine.EMBEDDING_BIAS] == pre.output_map["EMBEDDING_BIAS"]
    assert engine.input_map[Engine.RETURN_LOG_PROBS] == Ensemble.RETURN_LOG_PROBS
    assert engine.input_map[Engine.RETURN_PERF_METRICS] == Ensemble.RETURN_PERF_METRICS
    assert pre.input_map["EMBEDDING_BIAS_IDS"] == Ensemble.EMBEDDING_BIAS_IDS


@pytest.mark.parametrize(("blocks", "cached"), [(0, 0), (1, 32), (3, 40)])
async def test_cached_tokens_are_reused_blocks_times_block_size(blocks: int, cached: int) -> None:
    reply = [
        TritonResponse(b"hi", 40, 1, False, reused_blocks=blocks),
        TritonResponse(b"", 40, 0, True),
    ]
    client, _ = gateway_client(Scripted(lambda index, values: reply), kv_cache_tokens_per_block=32)
    async with client:
        response = await client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4}
        )
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == 40
    assert usage["prompt_tokens_details"] == {"cached_tokens": cached}  # at most the prompt
