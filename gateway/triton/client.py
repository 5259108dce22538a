"""One shared `tritonclient.grpc.aio` client: readiness, the ensemble's input spec, and streamed generation.

Each generation is its own bidirectional `ModelStreamInfer` call carrying one request. The request side
stays open until the final response arrives (Triton sends `triton_final_response`; empty final responses
are enabled so the end is always marked), and closing the generator cancels the RPC — Triton then
cancels the request and the engine stops generating.

Two data paths: without an engine plan the ensemble is streamed and its `text_output` read; with one
(gateway.triton.plan) the pre-steps run unary, then the engine is streamed and its ids detokenized here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import grpc
from tritonclient.grpc import InferInput
from tritonclient.grpc import aio as grpcclient
from tritonclient.utils import InferenceServerException

from gateway import tracing
from gateway.triton.errors import ErrorKind, TritonError, rpc_error, server_error
from gateway.triton.plan import EnginePlan, engine_plan
from gateway.triton.tensors import (
    TEXT_OUTPUTS,
    InputSpec,
    ModelSpec,
    TritonResponse,
    build_arrays,
    build_inputs,
    engine_outputs_for,
    infer_inputs,
    parse_result,
    requested_outputs,
    wire_dtype,
)

log = logging.getLogger("gateway.triton")


class GenerationBackend(Protocol):
    """What the chat layer needs from Triton (a fake implements it in unit tests)."""

    url: str

    async def ready(self) -> tuple[bool, str]: ...

    async def model_spec(self) -> ModelSpec: ...

    def generate(
        self, prompt: str, values: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[TritonResponse, None]: ...

    async def close(self) -> None: ...


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
        # With a detokenizer the gateway runs the ensemble's steps itself (see gateway.triton.plan).
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
                    raise server_error(exc, self.url) from None
                config = response.config
                inputs = {
                    i.name: InputSpec(i.name, wire_dtype(i.data_type), bool(i.optional)) for i in config.input
                }
                self._plan = await self._engine_plan(config)
                self._spec = ModelSpec(
                    inputs=inputs,
                    max_batch_size=int(config.max_batch_size),
                    outputs=frozenset(o.name for o in config.output),
                    engine_outputs=self._plan.engine_outputs if self._plan else frozenset(),
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
            raise server_error(exc, self.url) from None
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

    async def generate(
        self, prompt: str, values: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[TritonResponse, None]:
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
            outputs = requested_outputs(engine_outputs_for(values), plan.engine_outputs)
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

        stream = self._client.stream_infer(
            requests(), stream_timeout=self.request_timeout_s, headers=tracing.grpc_headers()
        )
        complete = False  # Triton sent the final response: nothing left to cancel
        try:
            async for result, error in stream:
                if error is not None:
                    raise server_error(error, self.url)
                response = parse_result(result, detokenizer)
                complete = response.final
                yield response
                if complete:
                    return
            # A stream that ends without the final response lost its server (killed, restarted): the
            # same outage as a refused connection, so a backend pool may retry it if nothing was sent yet.
            raise TritonError(
                ErrorKind.UNAVAILABLE, f"Triton at {self.url} closed the stream before the final response"
            )
        except grpc.aio.AioRpcError as exc:
            err = rpc_error(exc, self.url)
            if err.kind == ErrorKind.UNAVAILABLE:
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
                with tracing.span("triton.preprocessing", model=step.model):
                    result = await self._client.infer(
                        step.model,
                        infer_inputs(given),
                        request_id=request_id,
                        client_timeout=self.request_timeout_s,
                        headers=tracing.grpc_headers(),
                    )
            except InferenceServerException as exc:
                raise server_error(exc, self.url) from None
            except grpc.aio.AioRpcError as exc:
                raise rpc_error(exc, self.url) from None
            for name, t in step.outputs.items():
                out = result.get_output(name)
                if out is not None:  # optional outputs (the image prompt table) may be absent
                    tensors[t] = (result.as_numpy(name), out.datatype)
        return infer_inputs({name: tensors[t] for name, t in plan.engine.inputs.items() if t in tensors})
