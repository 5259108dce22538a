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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway import tracing
from gateway.errors import SERVER_ERROR, TIMEOUT, APIError, triton_api_error
from gateway.metrics import GatewayMetrics
from gateway.prepare import ChatContext
from gateway.stop_strings import StopMatcher
from gateway.triton.client import GenerationBackend
from gateway.triton.errors import TritonError
from gateway.triton.tensors import TokenLogProb
from gemma3_core.detokenize import IncrementalText

log = logging.getLogger("gateway.chat")

TokenCounter = Callable[[str], Awaitable[int]]
WHOLE_REQUEST = -1  # the choice index of a failure that ends every choice (the request deadline)


@dataclass(frozen=True, slots=True)
class Delta:
    index: int
    text: str
    logprobs: list[dict[str, Any]] | None = None  # OpenAI `logprobs.content` entries of this text


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
    reused_blocks: int | None = None
    log_probs: ChoiceLogProbs | None = None  # requests with `logprobs` only

    @property
    def text(self) -> str:
        return "".join(self.parts)


# OpenAI's floor for a log prob (JSON has no -Infinity: tokens a grammar or a ban excluded).
MIN_LOG_PROB = -9999.0


def _bytes_entry(token: bytes, text: str, log_prob: float) -> dict[str, Any]:
    return {"token": text, "logprob": max(float(log_prob), MIN_LOG_PROB), "bytes": list(token)}


@dataclass
class ChoiceLogProbs:
    """One choice's `logprobs.content`, kept in step with its content.

    Each token's `token` is the text it adds to the content (decoded incrementally like the content, so
    a character split over byte-fallback tokens belongs to the token that completes it) and `bytes` its
    exact bytes: the tokens joined equal the content. Entries are released once the content holding
    their text is released (stop strings hold text back); tokens past a stop string are dropped.
    """

    top: int  # top_logprobs
    decoder: IncrementalText = field(default_factory=IncrementalText)
    held: list[dict[str, Any]] = field(default_factory=list)
    released: list[dict[str, Any]] = field(default_factory=list)
    released_chars: int = 0

    def add(self, tokens: Sequence[TokenLogProb], final: bool) -> None:
        for i, t in enumerate(tokens):
            text = self.decoder.feed(t.token)
            if final and i == len(tokens) - 1:
                text += self.decoder.flush()
            entry = _bytes_entry(t.token, text, t.log_prob)
            entry["top_logprobs"] = [
                _bytes_entry(b, b.decode("utf-8", "replace"), v) for b, v in t.top[: self.top]
            ]
            self.held.append(entry)
        if final and not tokens:
            tail = self.decoder.flush()
            if tail and self.held:
                self.held[-1]["token"] += tail

    def release(self, content_chars: int, *, final: bool) -> list[dict[str, Any]]:
        """Entries whose text is now within the first `content_chars` characters of the content."""
        out: list[dict[str, Any]] = []
        while self.held:
            entry = self.held[0]
            end = self.released_chars + len(entry["token"])
            if end > content_chars:
                if not final:
                    break
                room = content_chars - self.released_chars
                if room <= 0 and entry["token"]:
                    self.held.clear()  # generated past a stop string: not part of the content
                    break
                entry["token"] = entry["token"][: max(room, 0)]
                end = content_chars
            self.held.pop(0)
            self.released_chars = end
            out.append(entry)
        self.released += out
        return out


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
        tokens_per_block: int = 32,
    ) -> None:
        self.backend = backend
        self.ctx = ctx
        self.metrics = metrics
        self.count_tokens = count_tokens
        self.on_close = on_close
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.tokens_per_block = tokens_per_block
        self.choices = [Choice(i, StopMatcher(ctx.sampling.stop)) for i in range(ctx.choice_count)]
        if ctx.request.logprobs:
            for choice in self.choices:
                choice.log_probs = ChoiceLogProbs(ctx.request.top_logprobs)
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

    def _emit(self, choice: Choice, text: str, logprobs: list[dict[str, Any]] | None = None) -> None:
        now = time.monotonic()
        if choice.last_delta_at is None:
            self.metrics.model_ttft.observe(now - self.ctx.arrival)
        else:
            self.metrics.model_itl.observe(now - choice.last_delta_at)
        choice.last_delta_at = now
        choice.parts.append(text)
        self.queue.put_nowait(Delta(choice.index, text, logprobs))

    def _emit_with_log_probs(self, choice: Choice, lp: ChoiceLogProbs, text: str, final: bool) -> None:
        """The logprobs path: text goes out with the entries of the tokens it completes."""
        content_chars = sum(map(len, choice.parts)) + len(text)
        entries = lp.release(content_chars, final=final)
        if text or entries:
            self._emit(choice, text, entries)

    async def _run(self, choice: Choice) -> None:
        with tracing.span("triton.engine_stream", choice=choice.index) as span:
            await self._stream(choice, span)

    async def _stream(self, choice: Choice, span: Any) -> None:
        values = {**self.ctx.sampling.triton_inputs(choice.index), **self.ctx.extra_inputs}
        request_id = f"{self.ctx.request_id or self.ctx.id}-{choice.index}"
        first = span is not None
        try:
            prompt_index = self.ctx.prompt_index(choice.index)
            stream = self.backend.generate(self.ctx.prompt_of(choice.index), values, request_id)
            async with contextlib.aclosing(stream):
                async for response in stream:
                    if first and response.text:
                        first = False
                        tracing.event(span, "first_token")
                    if response.num_input_tokens is not None:
                        self.prompt_tokens.setdefault(prompt_index, response.num_input_tokens)
                    if response.num_output_tokens is not None:
                        choice.tokens_reported = True
                        choice.completion_tokens += response.num_output_tokens
                    if response.reused_blocks is not None and choice.reused_blocks is None:
                        choice.reused_blocks = response.reused_blocks
                    decoded = choice.decoder.feed(response.text)
                    if response.final:
                        decoded += choice.decoder.flush()
                    text = choice.stops.feed(decoded)
                    if response.final:
                        text += choice.stops.flush()
                    ends = choice.stops.stopped or response.final
                    lp = choice.log_probs
                    if lp is not None:
                        lp.add(response.log_probs or (), response.final)
                        self._emit_with_log_probs(choice, lp, text, ends)
                    elif text:
                        self._emit(choice, text)
                    if ends:
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

    def usage(self) -> dict[str, Any]:
        prompts = max(1, len(self.ctx.prompts))
        reported = len(self.prompt_tokens) == prompts
        prompt = sum(self.prompt_tokens.values()) if reported else (self.ctx.prompt_tokens or 0)
        completion = sum(c.completion_tokens for c in self.choices)
        # Each choice is its own engine request; the prompt is counted once, so is its reuse.
        reused = max((c.reused_blocks or 0 for c in self.choices), default=0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(reused * self.tokens_per_block, prompt)},
        }

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
