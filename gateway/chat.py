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

from gateway.admission import AdmissionController
from gateway.generation import Failure, Generation
from gateway.images import ImageService
from gateway.logs import current_request_id
from gateway.lora import LoraBackend, LoraService
from gateway.metrics import GatewayMetrics
from gateway.prepare import ChatContext, prepare
from gateway.responses import GenerationStreamingResponse, collect
from gateway.settings import GatewaySettings
from gateway.triton.client import GenerationBackend

log = logging.getLogger("gateway.chat")
T = TypeVar("T")


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

    async def prepare(self, raw: bytes) -> ChatContext:
        return await prepare(raw, self.settings, self._encode_len, self.images, self.lora)

    def _backend_for(self, ctx: ChatContext) -> GenerationBackend:
        if ctx.adapter is None or self.lora is None:
            return self.backend
        return LoraBackend(self.backend, self.lora, ctx.adapter)

    async def handle(self, raw: bytes, http_request: Request) -> Response:
        """Answer one chat completion whose body (`raw`) was already read; `http_request` is watched for a
        disconnect while waiting."""
        ctx = await self.prepare(raw)
        ctx.request_id = current_request_id()
        if self.settings.log_prompts:  # debug only: prompts carry user data
            log.info("prompt", extra={"prompt": ctx.prompt, "chat_id": ctx.id})
        try:  # validation first, so invalid requests never take (or wait for) a slot; 429 when saturated
            permit = await until_disconnect(http_request, self.admission.acquire(ctx.request.n))
        except ClientDisconnected:
            return Response(status_code=499)
        count = self._count_tokens if self._tokenizer_loader is not None else None
        generation = Generation(
            self._backend_for(ctx),
            ctx,
            self.metrics,
            self.settings.request_timeout_s,
            count,
            on_close=permit.release,
        )
        try:
            # Wait for the first event before answering, so a Triton outage is a real HTTP 503
            # rather than an error inside a 200 stream.
            first = await until_disconnect(http_request, generation.next_event())
            if isinstance(first, Failure):
                raise first.error
            if ctx.request.stream:
                return GenerationStreamingResponse(generation, first)
            body = await until_disconnect(http_request, collect(generation, first))
            generation.close()
            return JSONResponse(body)
        except ClientDisconnected:
            self.metrics.disconnects.labels(self.metrics.model).inc()
            generation.close()
            return Response(status_code=499)  # nobody reads it; keeps the access log honest
        except BaseException:
            generation.close()
            raise
