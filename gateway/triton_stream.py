"""One shared `tritonclient.grpc.aio` client: readiness, the ensemble's input spec, and streamed generation.

Each generation is its own bidirectional `ModelStreamInfer` call carrying one request. The request side
stays open until the final response arrives (Triton sends `triton_final_response`; empty final responses
are enabled so the end is always marked), and closing the generator cancels the RPC — Triton then
cancels the request and the engine stops generating.
"""

from __future__ import annotations

import array
import asyncio
import dataclasses
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, model_config_pb2
from tritonclient.grpc import aio as grpcclient
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, triton_to_np_dtype

log = logging.getLogger("gateway.triton")

# Datatypes per docs/architecture.md, used only if the deployed config cannot be read.
CONTRACT_DTYPES: dict[str, str] = {
    "text_input": "BYTES",
    "max_tokens": "INT32",
    "stream": "BOOL",
    "temperature": "FP32",
    "top_p": "FP32",
    "top_k": "INT32",
    "seed": "UINT64",
    "presence_penalty": "FP32",
    "frequency_penalty": "FP32",
    "repetition_penalty": "FP32",
    "stop_words": "BYTES",
    "bad_words": "BYTES",
    "return_num_input_tokens": "BOOL",
    "return_num_output_tokens": "BOOL",
}
REQUIRED_INPUTS = ("text_input", "max_tokens")
LIST_INPUTS = frozenset({"stop_words", "bad_words"})
# Inputs that change what a request means: if the deployed ensemble lacks one, dropping it would silently
# serve a different request (no image, base model instead of the adapter, unconstrained JSON).
ESSENTIAL_INPUTS = frozenset({"images", "lora_task_id", "lora_weights", "lora_config"}) | frozenset(
    {"guided_decoding_guide_type", "guided_decoding_guide"}
)


class TritonError(Exception):
    """A Triton failure, classified so the HTTP layer can answer 503/504/500."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "unavailable" | "timeout" | "overloaded" | "unsupported" | "engine"
        self.message = message


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str  # Triton wire datatype: "FP32", "BYTES", ...
    optional: bool


@dataclass(frozen=True)
class ModelSpec:
    inputs: Mapping[str, InputSpec]
    max_batch_size: int
    outputs: frozenset[str] = frozenset()  # declared output names (empty: unknown, ask for all)

    def accepts(self, name: str) -> bool:
        return name in self.inputs


@dataclass(frozen=True)
class TritonResponse:
    text: bytes  # exact UTF-8 bytes of this response's tokens (a character may be split across responses)
    num_input_tokens: int | None
    num_output_tokens: int | None
    final: bool


class GenerationBackend(Protocol):
    """What the chat layer needs from Triton (a fake implements it in unit tests)."""

    url: str

    async def ready(self) -> tuple[bool, str]: ...

    async def model_spec(self) -> ModelSpec: ...

    def generate(
        self, prompt: str, values: Mapping[str, Any], request_id: str
    ) -> AsyncIterator[TritonResponse]: ...

    async def close(self) -> None: ...


def _wire_dtype(data_type: int) -> str:
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


# Outputs the gateway reads; a stream asks for just these (of those the model declares), so Triton sends and
# the client parses nothing else per token.
TEXT_OUTPUTS = ("text_output", "num_input_tokens", "num_output_tokens")
ID_OUTPUTS = ("output_ids", "num_input_tokens", "num_output_tokens")
_INT_TYPECODES = {"INT32": "i", "INT64": "q", "UINT32": "I", "UINT64": "Q"}


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
        if name == "output_ids":
            if detokenizer is not None:
                text = detokenizer.token_bytes(_ints(raw, output.datatype))  # beam width 1
        elif name == "text_output":
            text = b"".join(deserialize_bytes_tensor(raw))
        elif name == "num_input_tokens" and raw:
            num_input = _ints(raw, output.datatype)[0]
        elif name == "num_output_tokens" and raw:
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
) -> dict[str, tuple[np.ndarray, str]]:
    """The request's ensemble-level tensors: name -> (array, wire datatype); undeclared inputs left out."""
    wanted: dict[str, Any] = {
        "text_input": prompt,
        "stream": True,  # the ensemble is decoupled: always stream over gRPC, even for non-streamed replies
        "exclude_input_in_output": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
        **values,
    }
    missing = [name for name in REQUIRED_INPUTS if name not in spec.inputs]
    if missing:
        raise TritonError("engine", f"the Triton model lacks required inputs {missing}")
    batch = [1] if spec.max_batch_size > 0 else []
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    for name, value in wanted.items():
        input_spec = spec.inputs.get(name)
        if input_spec is None:
            if name in ESSENTIAL_INPUTS:
                raise TritonError("unsupported", f"this deployment's Triton model has no `{name}` input")
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


def infer_inputs(arrays: Mapping[str, tuple[np.ndarray, str]]) -> list[InferInput]:
    inputs = []
    for name, (data, dtype) in arrays.items():
        tensor = InferInput(name, list(data.shape), dtype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def build_inputs(spec: ModelSpec, prompt: str, values: Mapping[str, Any]) -> list[InferInput]:
    """Tensors for one request; inputs the deployed ensemble does not declare are left out."""
    return infer_inputs(build_arrays(spec, prompt, values))


@dataclass(frozen=True)
class Step:
    model: str
    inputs: Mapping[str, str]  # the step model's input -> ensemble tensor
    outputs: Mapping[str, str]  # the step model's output -> ensemble tensor


@dataclass(frozen=True)
class EnginePlan:
    """The ensemble's steps up to its decoupled engine, read from the deployed ensemble config.

    The gateway runs them itself (the pre-steps unary, then a stream straight to the engine) instead of
    streaming through the ensemble: Triton 2.51 does not pass a cancelled ensemble request on to its
    composing models, so a client that goes away would leave the engine generating; a direct engine
    stream is cancelled at the engine. Token ids are detokenized here with the same code as the
    `postprocessing` model (gemma3_core.detokenize), which also saves that per-token hop.
    """

    pre: tuple[Step, ...]
    engine: Step
    engine_outputs: frozenset[str] = frozenset()  # what the engine model declares (empty: unknown)


def engine_plan(ensemble: Any, decoupled: Mapping[str, bool]) -> EnginePlan | None:
    """None unless the ensemble is pre-steps -> a decoupled step producing `output_ids` -> post-steps."""
    if ensemble.platform != "ensemble":
        return None
    steps = [
        Step(s.model_name, dict(s.input_map), dict(s.output_map)) for s in ensemble.ensemble_scheduling.step
    ]
    engines = [i for i, st in enumerate(steps) if decoupled.get(st.model)]
    if len(engines) != 1 or "output_ids" not in steps[engines[0]].outputs:
        return None
    pre = tuple(steps[: engines[0]])
    if any(decoupled.get(st.model) for st in pre):
        return None
    return EnginePlan(pre=pre, engine=steps[engines[0]])


def _queue_full(message: str) -> TritonError | None:
    # Triton's queue policy (max_queue_size) rejects with "Exceeds maximum queue size" under status
    # UNAVAILABLE; it is back-pressure, not an outage, so it becomes a 429 like the gateway's own limit.
    lowered = message.lower()
    if "maximum queue size" in lowered or "queue full" in lowered or "queue is full" in lowered:
        return TritonError("overloaded", "the inference server's queue is full")
    return None


def _rpc_error(exc: grpc.aio.AioRpcError, url: str) -> TritonError:
    code = exc.code()
    overloaded = _queue_full(str(exc.details() or ""))
    if overloaded is not None:
        return overloaded
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TritonError("timeout", "the request exceeded the gateway's timeout")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return TritonError("unavailable", f"Triton at {url} is unreachable ({code.name.lower()})")
    return TritonError("engine", f"Triton error {code.name}: {exc.details()}")


def _server_error(exc: InferenceServerException, url: str) -> TritonError:
    status = str(exc.status() or "")
    message = str(exc.message() or exc)
    overloaded = _queue_full(message)
    if overloaded is not None:
        return overloaded
    if any(s in status for s in ("UNAVAILABLE", "DEADLINE", "NOT_FOUND")):
        return TritonError("unavailable", f"Triton at {url} is unreachable or the model is not loaded")
    if "unknown model" in message.lower() or "is not ready" in message.lower():
        return TritonError("unavailable", f"Triton at {url}: the model is not ready ({message[:200]})")
    return TritonError("engine", f"Triton error: {message}")


class TritonStreamClient:
    def __init__(
        self,
        url: str,
        model: str,
        probe_timeout_s: float = 3.0,
        request_timeout_s: float = 600.0,
        detokenizer_loader: Callable[[], Any] | None = None,
    ):
        self.url = url
        self.model = model
        self.probe_timeout_s = probe_timeout_s
        self.request_timeout_s = request_timeout_s
        # With a detokenizer the gateway runs the ensemble's steps itself (see EnginePlan).
        self._detokenizer_loader = detokenizer_loader
        self._detokenizer: Any = None
        self._plan: EnginePlan | None = None
        self._spec: ModelSpec | None = None
        self._spec_lock = asyncio.Lock()
        keepalive = grpcclient.KeepAliveOptions()
        self._client = grpcclient.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
                # gRPC backs off up to 120 s between reconnects by default; cap it so the gateway
                # notices a restarted Triton within a couple of seconds.
                ("grpc.initial_reconnect_backoff_ms", 500),
                ("grpc.min_reconnect_backoff_ms", 500),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )

    async def close(self) -> None:
        await self._client.close()

    async def ready(self) -> tuple[bool, str]:
        """(ready, reason): Triton answers and the ensemble is ready. Refreshes the cached spec on success."""
        try:
            live = await self._client.is_server_ready(client_timeout=self.probe_timeout_s)
            if not live:
                return False, f"Triton at {self.url} is not ready"
            if not await self._client.is_model_ready(self.model, client_timeout=self.probe_timeout_s):
                self._spec = None
                return False, f"Triton model '{self.model}' is not ready"
            if self._spec is None:
                await self.model_spec()
            return True, "ready"
        except Exception as exc:  # a probe answers, it never raises
            self._spec = None
            return False, f"Triton at {self.url} is unreachable: {exc}"

    async def model_spec(self) -> ModelSpec:
        """The ensemble's declared inputs, read once per Triton (re)start."""
        if self._spec is not None:
            return self._spec
        async with self._spec_lock:
            if self._spec is None:
                try:
                    response = await self._client.get_model_config(
                        self.model, client_timeout=self.probe_timeout_s
                    )
                except InferenceServerException as exc:
                    raise _server_error(exc, self.url) from None
                config = response.config
                inputs = {
                    i.name: InputSpec(i.name, _wire_dtype(i.data_type), bool(i.optional))
                    for i in config.input
                }
                self._plan = await self._engine_plan(config)
                self._spec = ModelSpec(
                    inputs=inputs,
                    max_batch_size=int(config.max_batch_size),
                    outputs=frozenset(o.name for o in config.output),
                )
                log.info("Triton model %s inputs: %s", self.model, ", ".join(sorted(inputs)))
            return self._spec

    async def _engine_plan(self, config: Any) -> EnginePlan | None:
        if self._detokenizer_loader is None or config.platform != "ensemble":
            return None
        decoupled: dict[str, bool] = {}
        outputs: dict[str, frozenset[str]] = {}
        try:
            for step in config.ensemble_scheduling.step:
                response = await self._client.get_model_config(
                    step.model_name, client_timeout=self.probe_timeout_s
                )
                decoupled[step.model_name] = bool(response.config.model_transaction_policy.decoupled)
                outputs[step.model_name] = frozenset(o.name for o in response.config.output)
        except InferenceServerException as exc:
            raise _server_error(exc, self.url) from None
        plan = engine_plan(config, decoupled)
        if plan is not None:
            plan = dataclasses.replace(plan, engine_outputs=outputs[plan.engine.model])
        if plan is not None and self._detokenizer is None:
            self._detokenizer = await asyncio.to_thread(self._detokenizer_loader)
        log.info(
            "Triton model %s: %s",
            self.model,
            f"steps {[st.model for st in plan.pre]} then a direct stream to {plan.engine.model}"
            if plan
            else "streamed as one model",
        )
        return plan

    def forget_spec(self) -> None:
        self._spec = None
        self._plan = None

    async def generate(
        self, prompt: str, values: Mapping[str, Any], request_id: str
    ) -> AsyncIterator[TritonResponse]:
        """Stream one request's responses; the last one yielded has `final=True`.

        Use with `contextlib.aclosing`: closing the generator early cancels the Triton request.
        """
        spec = await self.model_spec()
        plan, detokenizer = self._plan, self._detokenizer
        if plan is None:
            model, inputs = self.model, build_inputs(spec, prompt, values)
            outputs = requested_outputs(TEXT_OUTPUTS, spec.outputs)
        else:
            model, inputs = (
                plan.engine.model,
                await self._run_pre_steps(plan, spec, prompt, values, request_id),
            )
            outputs = requested_outputs(ID_OUTPUTS, plan.engine_outputs)
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": model,
                "inputs": inputs,
                "outputs": outputs,
                "request_id": request_id,
                "parameters": {"triton_enable_empty_final_response": True},
            }
            # Keep our side of the stream open: a half-closed stream could end before the last response.
            await finished.wait()

        stream = self._client.stream_infer(requests(), stream_timeout=self.request_timeout_s)
        complete = False  # Triton sent the final response: nothing left to cancel
        try:
            async for result, error in stream:
                if error is not None:
                    raise _server_error(error, self.url)
                response = parse_result(result, detokenizer)
                complete = response.final
                yield response
                if complete:
                    return
            raise TritonError("engine", "Triton closed the stream before the final response")
        except grpc.aio.AioRpcError as exc:
            err = _rpc_error(exc, self.url)
            if err.kind == "unavailable":
                self._spec = None  # Triton may come back with another config
            raise err from None
        finally:
            # Ending our request side closes a completed stream cleanly. Cancelling is for a request still
            # running (Triton then cancels it); on a completed one it would cost a CANCELLED round and a
            # traceback that grpc formats for its debug log whatever the log level (≈4 % of a burst's CPU).
            finished.set()
            if not complete:
                stream.cancel()

    async def _run_pre_steps(
        self, plan: EnginePlan, spec: ModelSpec, prompt: str, values: Mapping[str, Any], request_id: str
    ) -> list[InferInput]:
        """Run the ensemble's steps before the engine (unary) and return the engine's inputs."""
        tensors = build_arrays(spec, prompt, values)
        for step in plan.pre:
            given = {name: tensors[t] for name, t in step.inputs.items() if t in tensors}
            try:
                result = await self._client.infer(
                    step.model,
                    infer_inputs(given),
                    request_id=request_id,
                    client_timeout=self.request_timeout_s,
                )
            except InferenceServerException as exc:
                raise _server_error(exc, self.url) from None
            except grpc.aio.AioRpcError as exc:
                raise _rpc_error(exc, self.url) from None
            for name, t in step.outputs.items():
                out = result.get_output(name)
                if out is not None:  # optional outputs (the image prompt table) may be absent
                    tensors[t] = (result.as_numpy(name), out.datatype)
        return infer_inputs({name: tensors[t] for name, t in plan.engine.inputs.items() if t in tensors})
