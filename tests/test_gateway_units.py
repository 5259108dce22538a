"""Pure units of the gateway: sampling policies, Triton tensors and responses, stop strings, SSE."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from gateway.sampling import UINT64_MOD, resolve_sampling
from gateway.settings import GatewaySettings
from gateway.sse import DONE, ChunkFactory, encode_event
from gateway.stop_strings import StopMatcher
from gateway.triton.errors import TritonError
from gateway.triton.tensors import (
    ID_OUTPUTS,
    InputSpec,
    ModelSpec,
    build_inputs,
    parse_result,
    requested_outputs,
)
from gateway.validation import ChatRequest

SETTINGS = GatewaySettings(model_id="m", default_temperature=1.0, default_top_p=0.95, default_top_k=64)


def request(**fields: Any) -> ChatRequest:
    return ChatRequest(body={}, model="m", messages=[{"role": "user", "content": "hi"}], **fields)


# --- sampling --------------------------------------------------------------------------------------------
def test_defaults_come_from_settings() -> None:
    params = resolve_sampling(request(), SETTINGS, max_tokens=16)
    assert (params.temperature, params.top_p, params.top_k, params.greedy) == (1.0, 0.95, 64, False)
    values = params.triton_inputs(0)
    assert values["max_tokens"] == 16
    assert "presence_penalty" not in values and "stop_words" not in values
    assert 0 <= values["seed"] < UINT64_MOD


@pytest.mark.parametrize(
    "fields", [{"temperature": 0.0}, {"temperature": 1e-7}, {"top_p": 0.0}, {"top_k": 1, "temperature": 0.8}]
)
def test_greedy_policy(fields: dict[str, Any]) -> None:
    params = resolve_sampling(request(**fields), SETTINGS, max_tokens=8)
    assert params.greedy
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 1)


def test_explicit_values_and_top_k_disable() -> None:
    params = resolve_sampling(
        request(
            temperature=0.7,
            top_p=0.5,
            top_k=-1,
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            repetition_penalty=1.1,
            stop=["END", "\n\n"],
        ),
        SETTINGS,
        max_tokens=32,
    )
    values = params.triton_inputs(0)
    assert values["temperature"] == 0.7 and values["top_p"] == 0.5 and values["top_k"] == 0
    assert values["presence_penalty"] == 0.5 and values["frequency_penalty"] == -1.0
    assert values["repetition_penalty"] == 1.1
    assert values["stop_words"] == ["END", "\n\n"]


def test_seeds_per_choice() -> None:
    seeded = resolve_sampling(request(seed=41, n=3), SETTINGS, max_tokens=4)
    assert [seeded.triton_inputs(i)["seed"] for i in range(3)] == [41, 42, 43]
    wrapped = resolve_sampling(request(seed=-1, n=2), SETTINGS, max_tokens=4)
    assert [wrapped.triton_inputs(i)["seed"] for i in range(2)] == [UINT64_MOD - 1, 0]
    unseeded = resolve_sampling(request(n=4), SETTINGS, max_tokens=4)
    assert len({unseeded.triton_inputs(i)["seed"] for i in range(4)}) == 4


# --- Triton tensors ------------------------------------------------------------------------------------
FULL_SPEC = ModelSpec(
    inputs={
        "text_input": InputSpec("text_input", "BYTES", False),
        "max_tokens": InputSpec("max_tokens", "INT32", False),
        "stream": InputSpec("stream", "BOOL", True),
        "temperature": InputSpec("temperature", "FP32", True),
        "top_k": InputSpec("top_k", "INT32", True),
        "seed": InputSpec("seed", "UINT64", True),
        "stop_words": InputSpec("stop_words", "BYTES", True),
        "return_num_output_tokens": InputSpec("return_num_output_tokens", "BOOL", True),
    },
    max_batch_size=8,
)


def _tensors(spec: ModelSpec, values: dict[str, Any]) -> dict[str, Any]:
    return {t.name(): t for t in build_inputs(spec, "<bos>hi", values)}


def test_build_inputs_follows_the_deployed_config() -> None:
    tensors = _tensors(
        FULL_SPEC,
        {
            "max_tokens": 5,
            "temperature": 0.5,
            "top_k": 3,
            "seed": UINT64_MOD - 1,
            "top_p": 0.9,
            "stop_words": ["a", "é"],
        },
    )
    # top_p and return_num_input_tokens are not declared by this ensemble: not sent.
    assert set(tensors) == {
        "text_input",
        "max_tokens",
        "stream",
        "temperature",
        "top_k",
        "seed",
        "stop_words",
        "return_num_output_tokens",
    }
    assert tensors["text_input"].shape() == [1, 1] and tensors["text_input"].datatype() == "BYTES"
    assert tensors["max_tokens"].datatype() == "INT32"
    assert tensors["seed"].datatype() == "UINT64"
    assert tensors["stop_words"].shape() == [1, 2]
    assert tensors["stream"].datatype() == "BOOL"


def test_build_inputs_without_batching() -> None:
    spec = ModelSpec(inputs=dict(FULL_SPEC.inputs), max_batch_size=0)
    tensors = _tensors(spec, {"max_tokens": 5, "stop_words": ["x", "y", "z"]})
    assert tensors["max_tokens"].shape() == [1]
    assert tensors["stop_words"].shape() == [3]


def test_build_inputs_requires_the_contract_inputs() -> None:
    spec = ModelSpec(inputs={"text_input": InputSpec("text_input", "BYTES", False)}, max_batch_size=1)
    with pytest.raises(TritonError):
        build_inputs(spec, "p", {"max_tokens": 1})


def _result(text: bytes | None, n_in: int | None, n_out: int | None, final: bool) -> InferResult:
    response = service_pb2.ModelInferResponse(model_name="ensemble")
    raw: list[bytes] = []

    def add(name: str, datatype: str, data: np.ndarray) -> None:
        out = response.outputs.add(name=name, datatype=datatype)
        out.shape.extend(data.shape)
        raw.append(serialize_byte_tensor(data).item() if datatype == "BYTES" else data.tobytes())

    if text is not None:
        add("text_output", "BYTES", np.array([[text]], dtype=np.object_))
    if n_in is not None:
        add("num_input_tokens", "INT32", np.array([[n_in]], dtype=np.int32))
    if n_out is not None:
        add("num_output_tokens", "INT32", np.array([[n_out]], dtype=np.int32))
    response.raw_output_contents.extend(raw)
    if final:
        response.parameters["triton_final_response"].bool_param = True
    return InferResult(response)


def test_parse_result() -> None:
    parsed = parse_result(_result(b"caf\xc3", 12, 2, False))
    assert (parsed.text, parsed.num_input_tokens, parsed.num_output_tokens, parsed.final) == (
        b"caf\xc3",
        12,
        2,
        False,
    )
    empty_final = parse_result(_result(None, None, None, True))
    assert (empty_final.text, empty_final.num_output_tokens, empty_final.final) == (b"", None, True)


class _Table:
    """A detokenizer over a tiny vocabulary (the real one is tested in test_gemma3_core)."""

    def token_bytes(self, ids: Any) -> bytes:
        return b"".join({7: b"caf", 8: b"\xc3", 9: b"\xa9"}[int(i)] for i in ids)


@pytest.mark.parametrize("datatype, dtype", [("INT32", np.int32), ("INT64", np.int64)])
def test_parse_result_reads_engine_ids_from_raw_tensors(datatype: str, dtype: Any) -> None:
    """The gateway's direct engine stream: `output_ids` [1, 1, n] read without numpy, any int width."""
    response = service_pb2.ModelInferResponse(model_name="tensorrt_llm")
    for name, data in (
        ("output_ids", np.array([[[7, 8, 9]]], dtype=dtype)),
        ("num_input_tokens", np.array([[12]], dtype=dtype)),
        ("num_output_tokens", np.array([[3]], dtype=dtype)),
    ):
        out = response.outputs.add(name=name, datatype=datatype)
        out.shape.extend(data.shape)
        response.raw_output_contents.append(data.tobytes())
    parsed = parse_result(InferResult(response), _Table())
    assert (parsed.text, parsed.num_input_tokens, parsed.num_output_tokens, parsed.final) == (
        "café".encode(),
        12,
        3,
        False,
    )


def test_requested_outputs_are_those_the_model_declares() -> None:
    declared = frozenset({"output_ids", "sequence_length", "num_output_tokens", "cum_log_probs"})
    names = [o.name() for o in requested_outputs(ID_OUTPUTS, declared) or []]
    assert names == ["output_ids", "num_output_tokens"]
    assert requested_outputs(ID_OUTPUTS, frozenset()) is None  # unknown config: ask for everything


# --- stop strings --------------------------------------------------------------------------------------
def test_stop_matcher_holds_back_partial_stops() -> None:
    m = StopMatcher(["END"])
    assert m.feed("Hello E") == "Hello "  # "E" might start "END"
    assert m.feed("N") == ""
    assert m.feed("Dgame") == ""
    assert m.stopped


def test_stop_matcher_releases_false_alarms_and_flushes() -> None:
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("EN") == ""
    assert m.feed("x") == "ENx"
    assert m.feed("a\n") == "a"
    assert m.flush() == "\n"
    assert not m.stopped


def test_stop_matcher_earliest_stop_wins() -> None:
    m = StopMatcher(["world", "o"])
    assert m.feed("hello world") == "hell"


def test_stop_matcher_without_stops_is_transparent() -> None:
    m = StopMatcher([])
    assert m.feed("abc") == "abc" and m.flush() == ""


# --- SSE -----------------------------------------------------------------------------------------------
def test_sse_chunks() -> None:
    factory = ChunkFactory("chatcmpl-1", 123, "m", include_usage=False)
    role = factory.role(0)
    assert role.startswith(b"data: ") and role.endswith(b"\n\n")
    chunk = json.loads(role[len(b"data: ") :])
    assert chunk == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 123,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    content = json.loads(factory.content(1, "é\n")[6:])
    assert content["choices"][0]["delta"] == {"content": "é\n"} and content["choices"][0]["index"] == 1
    finish = json.loads(factory.finish(0, "length")[6:])
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["delta"] == {}
    assert DONE == b"data: [DONE]\n\n"
    assert "é".encode() in factory.content(0, "é")  # UTF-8 on the wire, not \u escapes


def test_sse_usage_only_with_include_usage() -> None:
    factory = ChunkFactory("c", 1, "m", include_usage=True)
    assert json.loads(factory.content(0, "x")[6:])["usage"] is None
    usage = json.loads(factory.usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})[6:])
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    assert encode_event({"error": {"message": "x"}}) == b'data: {"error":{"message":"x"}}\n\n'
