"""Triton tensors and responses (gateway/triton/tensors.py): inputs the deployed config declares, parsed
results (text or engine ids), requested outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from gateway.sampling import UINT64_MOD
from gateway.triton.errors import TritonError
from gateway.triton.tensors import (
    ID_OUTPUTS,
    InputSpec,
    ModelSpec,
    build_inputs,
    parse_result,
    requested_outputs,
)

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
