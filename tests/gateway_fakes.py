"""Test doubles of the gateway's Triton backend (gateway.triton_stream.GenerationBackend), for unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.triton_stream import ModelSpec, TritonResponse


class AlwaysReadyBackend:
    """Ready, declares no optional inputs, closes cleanly; subclasses script `generate`."""

    url = "scripted:0"

    async def ready(self) -> tuple[bool, str]:
        return True, "ready"

    async def model_spec(self) -> ModelSpec:
        return ModelSpec({}, 1)

    async def close(self) -> None:
        pass


class TextEngine(AlwaysReadyBackend):
    """Answers each request with `reply(prompt)` in 4-character responses (one token each); records
    every (prompt, inputs) it was sent."""

    def __init__(self, reply: Callable[[str], str] | str = "ok", prompt_tokens: int = 5) -> None:
        self.reply = reply if callable(reply) else (lambda _prompt, text=reply: text)
        self.prompt_tokens = prompt_tokens
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def generate(self, prompt: str, values: Any, request_id: str) -> AsyncIterator[TritonResponse]:
        self.calls.append((prompt, dict(values)))
        text = self.reply(prompt)
        limit = int(values.get("max_tokens", 1 << 30))
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)][:limit]
        for piece in pieces:
            yield TritonResponse(piece.encode(), self.prompt_tokens, 1, False)
        yield TritonResponse(b"", self.prompt_tokens, 0, True)
