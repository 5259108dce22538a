"""One request's tensors: the ensemble's declared inputs, building them, and reading streamed responses.

`parse_result` runs once per streamed token, so it reads raw tensors without numpy.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, model_config_pb2
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from gateway.triton.errors import ErrorKind, TritonError
from triton_io.contract import ESSENTIAL_INPUTS, LIST_INPUTS, REQUIRED_INPUTS, Engine, Ensemble


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str  # Triton wire datatype: "FP32", "BYTES", ...
    optional: bool


@dataclass(frozen=True)
class ModelSpec:
    """What the deployed ensemble declares (read from its config, so deployments may differ)."""

    inputs: Mapping[str, InputSpec]
    max_batch_size: int
    outputs: frozenset[str] = frozenset()  # declared output names (empty: unknown, ask for all)


@dataclass(frozen=True)
class TritonResponse:
    text: bytes  # exact UTF-8 bytes of this response's tokens (a character may be split across responses)
    num_input_tokens: int | None
    num_output_tokens: int | None
    final: bool


def wire_dtype(data_type: int) -> str:
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


# Outputs the gateway reads; a stream asks for just these (of those the model declares), so Triton sends and
# the client parses nothing else per token.
TEXT_OUTPUTS = (Ensemble.TEXT_OUTPUT, Ensemble.NUM_INPUT_TOKENS, Ensemble.NUM_OUTPUT_TOKENS)
ID_OUTPUTS = (Engine.OUTPUT_IDS, Engine.NUM_INPUT_TOKENS, Engine.NUM_OUTPUT_TOKENS)
_INT_TYPECODES = {"INT32": "i", "INT64": "q", "UINT32": "I", "UINT64": "Q"}
# Plain module names for the per-token loop (no class attribute lookups there).
_OUTPUT_IDS, _TEXT_OUTPUT = Engine.OUTPUT_IDS, Ensemble.TEXT_OUTPUT
_NUM_INPUT_TOKENS, _NUM_OUTPUT_TOKENS = Ensemble.NUM_INPUT_TOKENS, Ensemble.NUM_OUTPUT_TOKENS


def _ints(raw: bytes, datatype: str) -> Sequence[int]:
    """A raw little-endian integer tensor as ints, without numpy (this runs once per streamed token)."""
    values = array.array(_INT_TYPECODES[datatype])
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def parse_result(result: InferResult, detokenizer: Any = None) -> TritonResponse:
    """One streamed response, read from its raw tensors (Triton's gRPC always fills raw_output_contents)."""
    response = result.get_response()
    text = b""
    num_input = num_output = None
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        name = output.name
        if name == _OUTPUT_IDS:
            if detokenizer is not None:
                text = detokenizer.token_bytes(_ints(raw, output.datatype))  # beam width 1
        elif name == _TEXT_OUTPUT:
            text = b"".join(deserialize_bytes_tensor(raw))
        elif name == _NUM_INPUT_TOKENS and raw:
            num_input = _ints(raw, output.datatype)[0]
        elif name == _NUM_OUTPUT_TOKENS and raw:
            num_output = _ints(raw, output.datatype)[0]
    params = response.parameters
    final = "triton_final_response" in params and params["triton_final_response"].bool_param
    return TritonResponse(text=text, num_input_tokens=num_input, num_output_tokens=num_output, final=final)


def requested_outputs(wanted: Sequence[str], declared: frozenset[str]) -> list[InferRequestedOutput] | None:
    """The outputs to ask for: those wanted that the model declares (None, i.e. all, if unknown)."""
    if not declared:
        return None
    return [InferRequestedOutput(name) for name in wanted if name in declared]


def build_arrays(
    spec: ModelSpec, prompt: str, values: Mapping[str, Any]
) -> dict[str, tuple[npt.NDArray[Any], str]]:
    """The request's ensemble-level tensors: name -> (array, wire datatype); undeclared inputs left out."""
    wanted: dict[str, Any] = {
        Ensemble.TEXT_INPUT: prompt,
        # the ensemble is decoupled: always stream over gRPC, even for non-streamed replies
        Ensemble.STREAM: True,
        Ensemble.EXCLUDE_INPUT_IN_OUTPUT: True,
        Ensemble.RETURN_NUM_INPUT_TOKENS: True,
        Ensemble.RETURN_NUM_OUTPUT_TOKENS: True,
        **values,
    }
    missing = [name for name in REQUIRED_INPUTS if name not in spec.inputs]
    if missing:
        raise TritonError(ErrorKind.ENGINE, f"the Triton model lacks required inputs {missing}")
    batch = [1] if spec.max_batch_size > 0 else []
    arrays: dict[str, tuple[npt.NDArray[Any], str]] = {}
    for name, value in wanted.items():
        input_spec = spec.inputs.get(name)
        if input_spec is None:
            if name in ESSENTIAL_INPUTS:
                raise TritonError(
                    ErrorKind.UNSUPPORTED, f"this deployment's Triton model has no `{name}` input"
                )
            continue
        dtype = input_spec.datatype
        if isinstance(value, np.ndarray):
            # Pre-shaped tensors (images, LoRA weights) already carry their batch dim; bytes stay bytes.
            arrays[name] = (
                value if dtype == "BYTES" else value.astype(triton_to_np_dtype(dtype), copy=False),
                dtype,
            )
            continue
        items: Sequence[Any] = value if name in LIST_INPUTS else [value]
        if dtype == "BYTES":
            data = np.array([str(v).encode("utf-8") for v in items], dtype=np.object_)
        else:
            data = np.array(items, dtype=triton_to_np_dtype(dtype))
        arrays[name] = (data.reshape([*batch, len(items)]), dtype)
    return arrays


def infer_inputs(arrays: Mapping[str, tuple[npt.NDArray[Any], str]]) -> list[InferInput]:
    inputs = []
    for name, (data, dtype) in arrays.items():
        tensor = InferInput(name, list(data.shape), dtype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def build_inputs(spec: ModelSpec, prompt: str, values: Mapping[str, Any]) -> list[InferInput]:
    """Tensors for one request; inputs the deployed ensemble does not declare are left out."""
    return infer_inputs(build_arrays(spec, prompt, values))
