"""The concurrent Triton streams of one request (n choices per prompt), as one queue of typed events.

Each choice runs as its own task with its own Triton stream, UTF-8 decoder and stop matcher; the tasks put
events on one queue, so choices interleave in the order their text arrives. Closing a `Generation`
cancels the tasks, which closes their Triton streams (the engine stops generating), books the request's
metrics and calls `on_close` (the admission permit's release) exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.errors import SERVER_ERROR, TIMEOUT, APIError, triton_api_error
from gateway.metrics import GatewayMetrics
from gateway.prepare import ChatContext
from gateway.stop_strings import StopMatcher
from gateway.triton.client import GenerationBackend
from gateway.triton.errors import TritonError
from gemma3_core.detokenize import IncrementalText

log = logging.getLogger("gateway.chat")

TokenCounter = Callable[[str], Awaitable[int]]
WHOLE_REQUEST = -1  # the choice index of a failure that ends every choice (the request deadline)


@dataclass(frozen=True, slots=True)
class Delta:
    index: int
    text: str


@dataclass(frozen=True, slots=True)
class Finish:
    index: int
    reason: str  # "stop" | "length" (tools may turn it into "tool_calls" when the response is shaped)


@dataclass(frozen=True, slots=True)
class Failure:
    index: int  # WHOLE_REQUEST when not about one choice
    error: APIError


Event = Delta | Finish | Failure


@dataclass
class Choice:
    index: int
    stops: StopMatcher
    decoder: IncrementalText = field(default_factory=IncrementalText)
    parts: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    tokens_reported: bool = False
    finish_reason: str | None = None
    last_delta_at: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _deadline_error() -> APIError:
    return APIError(504, "The request exceeded the gateway's timeout", type=TIMEOUT, code="timeout")


class Generation:
    """The n concurrent Triton streams of one chat completion."""

    def __init__(
        self,
        backend: GenerationBackend,
        ctx: ChatContext,
        metrics: GatewayMetrics,
        timeout_s: float,
        count_tokens: TokenCounter | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.backend = backend
        self.ctx = ctx
        self.metrics = metrics
        self.count_tokens = count_tokens
        self.on_close = on_close
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.choices = [Choice(i, StopMatcher(ctx.sampling.stop)) for i in range(ctx.choice_count)]
        self.prompt_tokens: dict[int, int] = {}  # prompt index -> Triton's count (counted once per prompt)
        self.unfinished = len(self.choices)
        self.done = False  # the stream/reply ran to its end (all choices finished, or an error was reported)
        self._closed = False
        self._tasks = [asyncio.create_task(self._run(choice)) for choice in self.choices]
        # The deadline is one timer that queues a failure, not a `wait_for` (a task) per event.
        self._deadline_timer = asyncio.get_running_loop().call_later(timeout_s, self._deadline_passed)
        metrics.in_flight.labels(metrics.model).inc()

    # --- producing ---------------------------------------------------------------------------
    def _deadline_passed(self) -> None:
        # Reported like any other failure: a 504, or an error event mid-stream.
        self.queue.put_nowait(Failure(WHOLE_REQUEST, _deadline_error()))

    def _emit(self, choice: Choice, text: str) -> None:
        now = time.monotonic()
        if choice.last_delta_at is None:
            self.metrics.model_ttft.observe(now - self.ctx.arrival)
        else:
            self.metrics.model_itl.observe(now - choice.last_delta_at)
        choice.last_delta_at = now
        choice.parts.append(text)
        self.queue.put_nowait(Delta(choice.index, text))

    async def _run(self, choice: Choice) -> None:
        values = {**self.ctx.sampling.triton_inputs(choice.index), **self.ctx.extra_inputs}
        request_id = f"{self.ctx.request_id or self.ctx.id}-{choice.index}"
        try:
            prompt_index = self.ctx.prompt_index(choice.index)
            stream = self.backend.generate(self.ctx.prompt_of(choice.index), values, request_id)
            async with contextlib.aclosing(stream):
                async for response in stream:
                    if response.num_input_tokens is not None:
                        self.prompt_tokens.setdefault(prompt_index, response.num_input_tokens)
                    if response.num_output_tokens is not None:
                        choice.tokens_reported = True
                        choice.completion_tokens += response.num_output_tokens
                    decoded = choice.decoder.feed(response.text)
                    if response.final:
                        decoded += choice.decoder.flush()
                    text = choice.stops.feed(decoded)
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
            self.queue.put_nowait(Finish(choice.index, choice.finish_reason))
        except asyncio.CancelledError:
            raise
        except TritonError as exc:
            self.queue.put_nowait(Failure(choice.index, triton_api_error(exc)))
        except APIError as exc:
            self.queue.put_nowait(Failure(choice.index, exc))
        except Exception:
            log.exception("choice %d of %s failed", choice.index, self.ctx.id)
            error = APIError(500, "Internal server error", type=SERVER_ERROR, code="internal_error")
            self.queue.put_nowait(Failure(choice.index, error))

    # --- consuming ---------------------------------------------------------------------------
    async def next_event(self) -> Event:
        return self._account(await self.queue.get())

    def ready_event(self) -> Event | None:
        """The next event if one is already queued (the stream sends everything queued in one write)."""
        return None if self.queue.empty() else self._account(self.queue.get_nowait())

    def _account(self, event: Event) -> Event:
        if isinstance(event, Finish):
            self.unfinished -= 1
            self.metrics.finished.labels(self.metrics.model, event.reason).inc()
        return event

    def usage(self) -> dict[str, int]:
        prompts = max(1, len(self.ctx.prompts))
        reported = len(self.prompt_tokens) == prompts
        prompt = sum(self.prompt_tokens.values()) if reported else (self.ctx.prompt_tokens or 0)
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
