"""Chat completion orchestration: prepare → admission → generation → JSON body or SSE stream.

The steps live in their own modules: `prepare` (validation, limits, prompt, images, sampling),
`generation` (the n Triton streams as typed events), `responses` (JSON body and SSE shaping).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from gateway import tracing
from gateway.admission import AdmissionController
from gateway.generation import Event, Failure, Generation
from gateway.images import ImageService
from gateway.logs import current_request_id
from gateway.lora import LoraBackend, LoraService
from gateway.metrics import GatewayMetrics
from gateway.prepare import ChatContext, prepare
from gateway.responses import GenerationStreamingResponse, StreamWriter, collect
from gateway.settings import GatewaySettings
from gateway.triton.client import GenerationBackend
from gateway.triton.errors import TritonError
from gateway.validation import DeploymentFeatures

log = logging.getLogger("gateway.chat")
T = TypeVar("T")
BodyShaper = Callable[[Generation, Event], Awaitable[dict[str, Any]]]
WriterFactory = Callable[[Generation], StreamWriter]


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client goes away first (then it is cancelled)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        watcher.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientDisconnected


class ChatService:
    def __init__(
        self,
        settings: GatewaySettings,
        backend: GenerationBackend,
        metrics: GatewayMetrics,
        tokenizer_loader: Callable[[], Any] | None = None,
        lora: LoraService | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self._tokenizer_loader = tokenizer_loader
        concurrent, queued = settings.worker_admission()
        self.admission = AdmissionController(
            concurrent,
            queued,
            settings.queue_timeout_s,
            settings.retry_after_s,
            metrics.registry,
        )
        self.lora = lora
        self.images = ImageService(settings) if settings.images_enabled else None

    async def aclose(self) -> None:
        if self.images is not None:
            await self.images.aclose()

    async def _encode_len(self, text: str) -> int | None:
        if self._tokenizer_loader is None:
            return None
        from gemma3_core.tokenizer import encode

        tokenizer = self._tokenizer_loader()
        return len(await asyncio.to_thread(encode, tokenizer, text))

    async def _count_tokens(self, text: str) -> int:
        return (await self._encode_len(text)) or 0

    async def encode_len(self, text: str) -> int | None:
        """Tokens of `text` (None without a tokenizer)."""
        return await self._encode_len(text)

    def tokenizer(self) -> Any | None:
        return self._tokenizer_loader() if self._tokenizer_loader is not None else None

    async def prepare(self, raw: bytes) -> ChatContext:
        return await prepare(
            raw, self.settings, self._encode_len, self.images, self.lora, await self.features()
        )

    async def features(self) -> DeploymentFeatures | None:
        """What the engine can return, from the deployed configs (None while Triton is unreachable:
        the request then fails for that reason, not for a feature)."""
        try:
            spec = await self.backend.model_spec()
        except TritonError:
            return None
        if not spec.engine_outputs:  # the ensemble is streamed as one model: it returns text only
            return DeploymentFeatures(log_probs=False, top_log_probs=False)
        return DeploymentFeatures(log_probs=spec.log_probs, top_log_probs=spec.top_log_probs)

    def _backend_for(self, ctx: ChatContext) -> GenerationBackend:
        if ctx.adapter is None or self.lora is None:
            return self.backend
        return LoraBackend(self.backend, self.lora, ctx.adapter)

    async def handle(self, raw: bytes, http_request: Request) -> Response:
        """Answer one chat completion whose body (`raw`) was already read; `http_request` is watched for a
        disconnect while waiting."""

        async def answer(root: Any) -> Response:
            return await self.serve(await self.prepare(raw), http_request, collect, None, root)

        return await self.traced(http_request, answer)

    async def traced(self, http_request: Request, answer: Callable[[Any], Awaitable[Response]]) -> Response:
        """Run one endpoint's `answer` inside the request's trace span (a child of the caller's
        `traceparent`); a streamed answer ends the span when its stream closes."""
        with tracing.request_span(http_request.headers) as root:
            streaming = False
            try:
                response = await answer(root)
                streaming = isinstance(response, GenerationStreamingResponse)
                return response
            finally:
                if not streaming:
                    tracing.end(root)

    async def serve(
        self,
        ctx: ChatContext,
        http_request: Request,
        shape_body: BodyShaper,
        writer: WriterFactory | None,
        root: Any = None,
    ) -> Response:
        """Admission → generation → `shape_body`'s JSON, or SSE from `writer` (None: chat chunks).

        Every generating endpoint (chat, legacy completions, Responses) comes through here, so they share
        admission, deadlines, cancellation, metrics and tracing (`root`: the request's span)."""
        ctx.request_id = current_request_id()
        if self.settings.log_prompts:  # debug only: prompts carry user data
            log.info("prompt", extra={"prompt": ctx.prompt, "chat_id": ctx.id})
        try:  # validation first, so invalid requests never take (or wait for) a slot; 429 when saturated
            permit = await until_disconnect(http_request, self.admission.acquire(ctx.choice_count))
        except ClientDisconnected:
            return Response(status_code=499)
        count = self._count_tokens if self._tokenizer_loader is not None else None
        response_span = tracing.start_span("response")

        def on_close() -> None:
            permit.release()
            tracing.end(response_span)
            tracing.end(root)  # idempotent: a non-streamed answer ended it already

        generation = Generation(
            self._backend_for(ctx),
            ctx,
            self.metrics,
            self.settings.request_timeout_s,
            count,
            on_close=on_close,
            tokens_per_block=self.settings.kv_cache_tokens_per_block,
        )
        try:
            # Wait for the first event before answering, so a Triton outage is a real HTTP 503
            # rather than an error inside a 200 stream.
            first = await until_disconnect(http_request, generation.next_event())
            if isinstance(first, Failure):
                raise first.error
            if ctx.request.stream:
                return GenerationStreamingResponse(
                    generation, first, writer(generation) if writer is not None else None
                )
            body = await until_disconnect(http_request, shape_body(generation, first))
            generation.close()
            return JSONResponse(body)
        except ClientDisconnected:
            self.metrics.disconnects.labels(self.metrics.model).inc()
            generation.close()
            return Response(status_code=499)  # nobody reads it; keeps the access log honest
        except BaseException:
            generation.close()
            raise
