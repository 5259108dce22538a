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
    # What the engine model declares when the gateway streams it directly (empty: no engine plan).
    engine_outputs: frozenset[str] = frozenset()

    @property
    def log_probs(self) -> bool:
        """The deployment can return the sampled tokens' log probs."""
        return Engine.OUTPUT_LOG_PROBS in self.engine_outputs

    @property
    def top_log_probs(self) -> bool:
        """... and the most likely alternatives (this stack's extension of the engine contract)."""
        return {Engine.TOP_LOG_PROB_IDS, Engine.TOP_LOG_PROBS} <= self.engine_outputs


@dataclass(frozen=True, slots=True)
class TokenLogProb:
    """One generated token with its log prob and, if the engine sent them, the most likely alternatives."""

    token: bytes
    log_prob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TritonResponse:
    text: bytes  # exact UTF-8 bytes of this response's tokens (a character may be split across responses)
    num_input_tokens: int | None
    num_output_tokens: int | None
    final: bool
    log_probs: tuple[TokenLogProb, ...] | None = None  # only for requests with return_log_probs
    reused_blocks: int | None = None  # prompt KV-cache blocks the engine reused (with return_perf_metrics)


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
_REUSED_BLOCKS = Engine.KV_CACHE_REUSED_BLOCKS
_LOG_PROB_OUTPUTS = frozenset({Engine.OUTPUT_LOG_PROBS, Engine.TOP_LOG_PROB_IDS, Engine.TOP_LOG_PROBS})
# Asked for only by requests that want log probs: the per-token path of the others stays as it was.
LOG_PROB_OUTPUTS = (Engine.OUTPUT_LOG_PROBS, Engine.TOP_LOG_PROB_IDS, Engine.TOP_LOG_PROBS)


def engine_outputs_for(values: Mapping[str, Any]) -> tuple[str, ...]:
    """The engine outputs one request needs: ids and counts, reuse stats, log probs if it asks for them."""
    wanted = (*ID_OUTPUTS, Engine.KV_CACHE_REUSED_BLOCKS)
    return (*wanted, *LOG_PROB_OUTPUTS) if values.get(Ensemble.RETURN_LOG_PROBS) else wanted


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
    num_input = num_output = reused = None
    ids: Sequence[int] = ()
    log_prob_raw: dict[str, tuple[bytes, Any]] = {}
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        name = output.name
        if name == _OUTPUT_IDS:
            if detokenizer is not None:
                ids = _ints(raw, output.datatype)  # beam width 1
                text = detokenizer.token_bytes(ids)
        elif name == _TEXT_OUTPUT:
            text = b"".join(deserialize_bytes_tensor(raw))
        elif name == _NUM_INPUT_TOKENS and raw:
            num_input = _ints(raw, output.datatype)[0]
        elif name == _NUM_OUTPUT_TOKENS and raw:
            num_output = _ints(raw, output.datatype)[0]
        elif name == _REUSED_BLOCKS and raw:
            reused = _ints(raw, output.datatype)[0]
        elif name in _LOG_PROB_OUTPUTS:
            log_prob_raw[name] = (raw, output)
    params = response.parameters
    final = "triton_final_response" in params and params["triton_final_response"].bool_param
    log_probs = _token_log_probs(ids, log_prob_raw, detokenizer) if log_prob_raw else None
    return TritonResponse(
        text=text,
        num_input_tokens=num_input,
        num_output_tokens=num_output,
        final=final,
        log_probs=log_probs,
        reused_blocks=reused,
    )


def _floats(raw: bytes) -> array.array[float]:
    values = array.array("f")
    values.frombytes(raw)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def _token_log_probs(
    ids: Sequence[int], outputs: Mapping[str, tuple[bytes, Any]], detokenizer: Any
) -> tuple[TokenLogProb, ...]:
    """The log probs of this response's tokens (the last len(ids) values: an echoed prompt comes first)."""
    if detokenizer is None or Engine.OUTPUT_LOG_PROBS not in outputs:
        return ()
    values = _floats(outputs[Engine.OUTPUT_LOG_PROBS][0])
    values = values[len(values) - len(ids) :] if ids else values[:0]
    top_ids = top_values = None
    k = 0
    if Engine.TOP_LOG_PROB_IDS in outputs and Engine.TOP_LOG_PROBS in outputs:
        raw_ids, spec = outputs[Engine.TOP_LOG_PROB_IDS]
        top_ids = _ints(raw_ids, spec.datatype)
        top_values = _floats(outputs[Engine.TOP_LOG_PROBS][0])
        k = int(spec.shape[-1]) if spec.shape else 0
    table = detokenizer.token_bytes
    tokens = []
    for i, (token, value) in enumerate(zip(ids, values, strict=True)):
        top: tuple[tuple[bytes, float], ...] = ()
        if top_ids is not None and top_values is not None and k:
            row = range(i * k, (i + 1) * k)
            top = tuple((table((top_ids[j],)), top_values[j]) for j in row)
        tokens.append(TokenLogProb(table((token,)), value, top))
    return tuple(tokens)


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
