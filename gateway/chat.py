"""Chat completion orchestration: validated request → prompt → n Triton streams → one response or SSE stream.

Each choice runs as its own task with its own Triton stream, UTF-8 decoder and stop matcher; the tasks put
events on one queue, so choices interleave in the order their text arrives. Closing a `Generation`
cancels the tasks, which closes their Triton streams (the engine stops generating).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import limits, sse
from gateway.admission import AdmissionController, rate_limited
from gateway.errors import SERVER_ERROR, TIMEOUT, UNAVAILABLE, APIError, bad_request
from gateway.images import IMAGES_INPUT, ImageService, images_tensor
from gateway.logs import current_request_id
from gateway.lora import LoraService
from gateway.metrics import GatewayMetrics
from gateway.prompt import render_prompt
from gateway.sampling import SamplingParams, resolve_sampling
from gateway.settings import GatewaySettings
from gateway.stop_strings import StopMatcher
from gateway.tools import NO_TOOLS, ToolPlan, plan_tools
from gateway.triton_stream import GenerationBackend, TritonError, TritonResponse
from gateway.validation import ChatRequest, parse_chat_request
from gemma3_core.chat_template import expand_image_markers

log = logging.getLogger("gateway.chat")
T = TypeVar("T")

TokenCounter = Callable[[str], Awaitable[int]]


def triton_api_error(exc: TritonError) -> APIError:
    if exc.kind == "unavailable":
        return APIError(
            503, exc.message, type=UNAVAILABLE, code="triton_unavailable", headers={"Retry-After": "5"}
        )
    if exc.kind == "timeout":
        return APIError(504, exc.message, type=TIMEOUT, code="timeout")
    if exc.kind == "unsupported":  # the request needs an ensemble input this deployment lacks
        return bad_request(exc.message, None, "unsupported_parameter")
    if exc.kind == "overloaded":  # Triton's max_queue_size: the same back-pressure answer as admission's
        return rate_limited(f"Rate limit reached: {exc.message}. Please retry later.", 1)
    return APIError(500, f"Inference failed: {exc.message[:500]}", type=SERVER_ERROR, code="inference_error")


@dataclass
class ChatContext:
    request: ChatRequest
    prompt: str
    prompt_tokens: int | None  # gateway's own count (None without a tokenizer)
    sampling: SamplingParams
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.monotonic)
    request_id: str | None = None  # the HTTP request id (gateway/logs.py); Triton gets "<id>-<choice>"
    extra_inputs: dict[str, Any] = field(default_factory=dict)  # images, guided decoding (all choices)
    tools: ToolPlan = NO_TOOLS
    adapter: str | None = None  # LoRA adapter name


@dataclass
class _Choice:
    index: int
    stops: StopMatcher
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    tokens_reported: bool = False
    finish_reason: str | None = None
    last_delta_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


# Queue events: (kind, choice index, payload) with kind "delta" (str), "finish" (str), "error" (APIError)
# or "timeout" (the request deadline passed).
Event = tuple[str, int, Any]


class Generation:
    """The n concurrent Triton streams of one chat completion."""

    def __init__(
        self,
        backend: GenerationBackend,
        ctx: ChatContext,
        metrics: GatewayMetrics,
        timeout_s: float,
        count_tokens: TokenCounter | None = None,
        lora: LoraService | None = None,
    ) -> None:
        self.backend = backend
        self.lora = lora
        self.ctx = ctx
        self.metrics = metrics
        self.count_tokens = count_tokens
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.choices = [_Choice(i, StopMatcher(ctx.sampling.stop)) for i in range(ctx.request.n)]
        self.prompt_tokens: int | None = None
        self.unfinished = len(self.choices)
        self.done = False  # the stream/reply ran to its end (all choices finished, or an error was reported)
        self._closed = False
        self.on_close: Callable[[], None] | None = None  # releases the admission permit
        self._tasks = [asyncio.create_task(self._run(choice)) for choice in self.choices]
        # The deadline is one timer that queues a "timeout" event, not a `wait_for` (a task) per event.
        self._deadline_timer = asyncio.get_running_loop().call_later(
            timeout_s, self.queue.put_nowait, ("timeout", -1, None)
        )
        metrics.in_flight.labels(metrics.model).inc()

    # --- producing ---------------------------------------------------------------------------
    def _emit(self, choice: _Choice, text: str) -> None:
        now = time.monotonic()
        if choice.last_delta_at is None:
            self.metrics.model_ttft.observe(now - self.ctx.arrival)
        else:
            self.metrics.model_itl.observe(now - choice.last_delta_at)
        choice.last_delta_at = now
        choice.parts.append(text)
        self.queue.put_nowait(("delta", choice.index, text))

    def _open(self, values: dict[str, Any], request_id: str) -> AsyncIterator[TritonResponse]:
        if self.ctx.adapter is not None and self.lora is not None:
            return self.lora.generate(self.backend, self.ctx.adapter, self.ctx.prompt, values, request_id)
        return self.backend.generate(self.ctx.prompt, values, request_id)

    async def _run(self, choice: _Choice) -> None:
        values = {**self.ctx.sampling.triton_inputs(choice.index), **self.ctx.extra_inputs}
        request_id = f"{self.ctx.request_id or self.ctx.id}-{choice.index}"
        try:
            async with contextlib.aclosing(self._open(values, request_id)) as stream:
                async for response in stream:
                    if response.num_input_tokens is not None and self.prompt_tokens is None:
                        self.prompt_tokens = response.num_input_tokens
                    if response.num_output_tokens is not None:
                        choice.tokens_reported = True
                        choice.completion_tokens += response.num_output_tokens
                    text = choice.stops.feed(choice.decoder.decode(response.text, final=response.final))
                    if response.final:
                        text += choice.stops.flush()
                    if text:
                        self._emit(choice, text)
                    if choice.stops.stopped or response.final:
                        break  # leaving the `async with` cancels the Triton request if it is still running
            if not choice.tokens_reported and self.count_tokens is not None:
                choice.completion_tokens = await self.count_tokens(choice.text)
            hit_limit = choice.completion_tokens >= self.ctx.sampling.max_tokens
            choice.finish_reason = "length" if hit_limit and not choice.stops.stopped else "stop"
            self.queue.put_nowait(("finish", choice.index, choice.finish_reason))
        except asyncio.CancelledError:
            raise
        except TritonError as exc:
            self.queue.put_nowait(("error", choice.index, triton_api_error(exc)))
        except APIError as exc:
            self.queue.put_nowait(("error", choice.index, exc))
        except Exception:
            log.exception("choice %d of %s failed", choice.index, self.ctx.id)
            error = APIError(500, "Internal server error", type=SERVER_ERROR, code="internal_error")
            self.queue.put_nowait(("error", choice.index, error))

    # --- consuming ---------------------------------------------------------------------------
    async def next_event(self) -> Event:
        return self._account(await self.queue.get())

    def ready_event(self) -> Event | None:
        """The next event if one is already queued (the stream sends everything queued in one write)."""
        return None if self.queue.empty() else self._account(self.queue.get_nowait())

    def _account(self, event: Event) -> Event:
        if event[0] == "timeout":  # reported like any other failure: a 504, or an error event mid-stream
            error = APIError(504, "The request exceeded the gateway's timeout", type=TIMEOUT, code="timeout")
            return ("error", -1, error)
        if event[0] == "finish":
            self.unfinished -= 1
            self.metrics.finished.labels(self.metrics.model, event[2]).inc()
        return event

    def usage(self) -> dict[str, int]:
        prompt = self.prompt_tokens if self.prompt_tokens is not None else (self.ctx.prompt_tokens or 0)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def close(self) -> None:
        """Cancel what is still running and book the request's metrics (idempotent, synchronous)."""
        if self._closed:
            return
        self._closed = True
        self._deadline_timer.cancel()
        for task in self._tasks:
            if not task.done():
                task.cancel()
        m, model = self.metrics, self.metrics.model
        m.in_flight.labels(model).dec()
        usage = self.usage()
        m.prompt_tokens.labels(model).inc(usage["prompt_tokens"])
        m.completion_tokens.labels(model).inc(usage["completion_tokens"])
        m.e2e.labels(model).observe(time.monotonic() - self.ctx.arrival)
        if self.on_close is not None:
            self.on_close()

    async def collect(self, first: Event | None = None) -> dict[str, Any]:
        """Wait for all choices and build the non-streamed `chat.completion` body."""
        event = first
        while self.unfinished:
            if event is None:
                event = await self.next_event()
            if event[0] == "error":
                raise event[2]
            event = None
        shaped = [self.ctx.tools.message(c.text, c.finish_reason) for c in self.choices]
        return {
            "id": self.ctx.id,
            "object": "chat.completion",
            "created": self.ctx.created,
            "model": self.ctx.request.model,
            "choices": [
                {"index": c.index, "message": message, "logprobs": None, "finish_reason": finish_reason}
                for c, (message, finish_reason) in zip(self.choices, shaped, strict=True)
            ],
            "usage": self.usage(),
        }

    async def stream(self, first: Event) -> AsyncIterator[bytes]:
        factory = sse.ChunkFactory(
            self.ctx.id, self.ctx.created, self.ctx.request.model, self.ctx.request.include_usage
        )
        # With tools, text goes through a streaming call parser: call text never reaches `content`.
        parsers = {c.index: self.ctx.tools.new_parser() for c in self.choices}
        try:
            out = [factory.role(choice.index) for choice in self.choices]
            event = first
            while not self._encode(event, factory, parsers, out):
                queued = self.ready_event()
                if queued is not None:
                    event = queued
                    continue
                yield b"".join(out)  # everything already queued leaves as one write (one syscall)
                out.clear()
                event = await self.next_event()
            if not self.unfinished and factory.include_usage:
                out.append(factory.usage(self.usage()))
            self.done = True
            out.append(sse.DONE)
            yield b"".join(out)
        finally:
            self.close()

    def _encode(
        self, event: Event, factory: sse.ChunkFactory, parsers: dict[int, Any], out: list[bytes]
    ) -> bool:
        """Append the SSE chunks of one event; True when the stream ends with it."""
        kind, index, payload = event
        parser = parsers.get(index)
        if kind == "delta" and parser is None:
            out.append(factory.content(index, payload))
        elif kind == "delta":
            out.extend(factory.delta(index, delta) for delta in parser.feed(payload))
        elif kind == "finish":
            if parser is not None:
                out.extend(factory.delta(index, delta) for delta in parser.finish())
                payload = "tool_calls" if parser.has_tool_calls else payload
            out.append(factory.finish(index, payload))
            return not self.unfinished
        else:
            out.append(sse.error_event(payload.body()))
            return True
        return False


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


class GenerationStreamingResponse(StreamingResponse):
    """Closes the generation however the response ends (done, client gone, server shutdown)."""

    def __init__(self, generation: Generation, first: Event) -> None:
        super().__init__(
            generation.stream(first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.generation.done:
                self.generation.metrics.disconnects.labels(self.generation.metrics.model).inc()
            self.generation.close()


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
        self.admission = AdmissionController(
            settings.max_concurrent_requests,
            settings.max_queued_requests,
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
        """Validate, render and size the request; every failure is an `APIError` (4xx)."""
        request = parse_chat_request(raw, self.settings, self.lora.knows if self.lora else None)
        limits.check_request(request, self.settings)
        adapter = self.lora.resolve(request.model) if self.lora else None
        parallel = request.body.get("parallel_tool_calls")
        tools = plan_tools(request.tools, request.tool_choice, request.response_format, parallel)
        prompt = render_prompt(request.messages, self.images is not None, request.tools, request.tool_choice)
        # Rendered first so a malformed conversation costs no fetch; all images are fetched concurrently.
        images = await self.images.fetch(request.messages) if self.images is not None else []
        # Count what the engine will see: each marker expands to the full image sequence (256 soft tokens).
        prompt_tokens = await self._encode_len(expand_image_markers(prompt) if images else prompt)
        limits.check_prompt_tokens(prompt_tokens, self.settings)
        limit = self.settings.max_model_len
        if request.max_tokens is not None and request.max_tokens > limit:
            raise bad_request(
                f"{request.max_tokens_param} is {request.max_tokens}, above this model's context length of "
                f"{limit} tokens",
                request.max_tokens_param,
                "context_length_exceeded",
            )
        if prompt_tokens is None:
            max_tokens = request.max_tokens or self.settings.default_max_tokens
        else:
            if prompt_tokens >= limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, your messages "
                    f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                    "messages",
                    "context_length_exceeded",
                )
            if request.max_tokens is not None and prompt_tokens + request.max_tokens > limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{prompt_tokens + request.max_tokens} tokens ({prompt_tokens} in the messages, "
                    f"{request.max_tokens} in the completion). Please reduce the length of the messages "
                    "or completion.",
                    request.max_tokens_param,
                    "context_length_exceeded",
                )
            max_tokens = request.max_tokens or min(self.settings.default_max_tokens, limit - prompt_tokens)
        sampling = resolve_sampling(request, self.settings, max_tokens)
        extra: dict[str, Any] = tools.triton_inputs()
        if images:
            extra[IMAGES_INPUT] = images_tensor(images)
        return ChatContext(
            request=request,
            prompt=prompt,
            prompt_tokens=prompt_tokens,
            sampling=sampling,
            extra_inputs=extra,
            tools=tools,
            adapter=adapter.name if adapter is not None else None,
        )

    async def handle(self, http_request: Request) -> Response:
        raw = await http_request.body()
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
            self.backend, ctx, self.metrics, self.settings.request_timeout_s, count, lora=self.lora
        )
        generation.on_close = permit.release
        try:
            # Wait for the first event before answering, so a Triton outage is a real HTTP 503
            # rather than an error inside a 200 stream.
            first = await until_disconnect(http_request, generation.next_event())
            if first[0] == "error":
                raise first[2]
            if ctx.request.stream:
                return GenerationStreamingResponse(generation, first)
            body = await until_disconnect(http_request, generation.collect(first))
            generation.close()
            return JSONResponse(body)
        except ClientDisconnected:
            self.metrics.disconnects.labels(self.metrics.model).inc()
            generation.close()
            return Response(status_code=499)  # nobody reads it; keeps the access log honest
        except BaseException:
            generation.close()
            raise
