"""A `Generation`'s events shaped as OpenAI answers: one `chat.completion` body, or an SSE stream of chunks.

With tools, choice text goes through the tool-call parser: non-streamed text becomes `message.tool_calls`,
streamed deltas a streaming parser's deltas, so call text never reaches `content`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import sse
from gateway.generation import Choice, Delta, Event, Failure, Finish, Generation
from gateway.tools import ToolReader


async def wait_all(generation: Generation, first: Event | None = None) -> None:
    """Wait until every choice finished (their text is in `generation.choices`); a failure raises."""
    event = first
    while generation.unfinished:
        if event is None:
            event = await generation.next_event()
        if isinstance(event, Failure):
            raise event.error
        event = None


async def collect(generation: Generation, first: Event | None = None) -> dict[str, Any]:
    """Wait for all choices and build the non-streamed `chat.completion` body."""
    await wait_all(generation, first)
    ctx, choices = generation.ctx, generation.choices
    shaped = [ctx.tools.message(c.text, c.finish_reason) for c in choices]

    def logprobs(c: Choice) -> dict[str, Any] | None:
        return None if c.log_probs is None else {"content": c.log_probs.released, "refusal": None}

    return {
        "id": ctx.id,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.request.model,
        "choices": [
            {"index": c.index, "message": message, "logprobs": logprobs(c), "finish_reason": finish_reason}
            for c, (message, finish_reason) in zip(choices, shaped, strict=True)
        ],
        "usage": generation.usage(),
    }


class StreamWriter(Protocol):
    """Turns a generation's events into one endpoint's SSE bytes (chat chunks, completions, Responses)."""

    def start(self, out: list[bytes]) -> None: ...

    def encode(self, event: Event, out: list[bytes]) -> bool:
        """Append the SSE bytes of one event; True when the stream ends with it."""
        ...

    def end(self, out: list[bytes]) -> None: ...


class ChatChunkWriter:
    """Appends the `chat.completion.chunk`s of each event; one per stream."""

    def __init__(self, generation: Generation) -> None:
        ctx = generation.ctx
        self.generation = generation
        self.factory = sse.ChunkFactory(ctx.id, ctx.created, ctx.request.model, ctx.request.include_usage)
        self.tools = ctx.tools
        self.parsers: dict[int, ToolReader | None] = {
            c.index: ctx.tools.new_parser() for c in generation.choices
        }

    def start(self, out: list[bytes]) -> None:
        out.extend(self.factory.role(choice.index) for choice in self.generation.choices)

    def encode(self, event: Event, out: list[bytes]) -> bool:
        factory = self.factory
        if isinstance(event, Delta):
            parser = self.parsers.get(event.index)
            if event.logprobs is not None:  # requests with logprobs only: the chunk carries them
                deltas = parser.feed(event.text) if parser is not None else [{"content": event.text}]
                out.append(factory.delta(event.index, _merge(deltas), {"content": event.logprobs}))
            elif parser is None:
                out.append(factory.content(event.index, event.text))
            else:
                out.extend(factory.delta(event.index, delta) for delta in parser.feed(event.text))
            return False
        if isinstance(event, Finish):
            reason = event.reason
            parser = self.parsers.get(event.index)
            if parser is not None:
                out.extend(factory.delta(event.index, delta) for delta in parser.finish())
                reason = self.tools.finish_reason(parser, reason)
            out.append(factory.finish(event.index, reason))
            return not self.generation.unfinished
        out.append(sse.error_event(event.error.body()))
        return True

    def end(self, out: list[bytes]) -> None:
        if not self.generation.unfinished and self.factory.include_usage:
            out.append(self.factory.usage(self.generation.usage()))
        out.append(sse.DONE)


def _merge(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """Several parser deltas as one (a chunk carries the logprobs of its text once)."""
    if len(deltas) == 1:
        return deltas[0]
    merged: dict[str, Any] = {}
    for delta in deltas:
        for key, value in delta.items():
            if key == "content" and isinstance(value, str):
                merged["content"] = (merged.get("content") or "") + value
            elif key == "tool_calls":
                merged.setdefault("tool_calls", []).extend(value)
            else:
                merged[key] = value
    return merged


async def stream(generation: Generation, first: Event, writer: StreamWriter) -> AsyncIterator[bytes]:
    """The SSE bytes of a generation whose first event was `first`; closes the generation at the end."""
    try:
        out: list[bytes] = []
        writer.start(out)
        event = first
        while not writer.encode(event, out):
            queued = generation.ready_event()
            if queued is not None:
                event = queued
                continue
            yield b"".join(out)  # everything already queued leaves as one write (one syscall)
            out.clear()
            event = await generation.next_event()
        writer.end(out)
        generation.done = True
        yield b"".join(out)
    finally:
        generation.close()


class GenerationStreamingResponse(StreamingResponse):
    """Closes the generation however the response ends (done, client gone, server shutdown)."""

    def __init__(self, generation: Generation, first: Event, writer: StreamWriter | None = None) -> None:
        super().__init__(
            stream(generation, first, writer or ChatChunkWriter(generation)),
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
