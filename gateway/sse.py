"""Server-sent events in the shape OpenAI clients parse: `data: <json>\\n\\n` chunks, then `data: [DONE]`.

Per choice: a first chunk `delta: {"role": "assistant", "content": ""}`, content deltas, one chunk with
`finish_reason`. With `stream_options.include_usage` every chunk carries `"usage": null` and a last chunk
with `choices: []` carries the totals (only then: naive clients crash on an empty `choices`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]\n\n"


def encode_event(payload: dict[str, Any]) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
        + b"\n\n"
    )


# Stands in for the delta text while the constant part of a content chunk is encoded once.
_TEXT_SLOT = "\x00text-slot\x00"


@dataclass(frozen=True)
class ChunkFactory:
    id: str
    created: int
    model: str
    include_usage: bool = False
    # index -> (bytes before, bytes after) the JSON string of a content delta; filled on first use.
    _content_frames: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False, compare=False)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def role(self, index: int) -> bytes:
        return encode_event(self._chunk([self._choice(index, {"role": "assistant", "content": ""})]))

    def content(self, index: int, text: str) -> bytes:
        """A content delta: the per-token path, so only the text is JSON-encoded (same bytes as `delta`)."""
        frame = self._content_frames.get(index)
        if frame is None:
            whole = encode_event(self._chunk([self._choice(index, {"content": _TEXT_SLOT})]))
            before, _, after = whole.partition(json.dumps(_TEXT_SLOT).encode())
            frame = self._content_frames[index] = (before, after)
        text_json = json.dumps(text, ensure_ascii=False).encode("utf-8", "replace")
        return frame[0] + text_json + frame[1]

    def delta(self, index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None = None) -> bytes:
        """Any delta (tool calls: `{"tool_calls": [...]}`), with the logprobs of its tokens if requested."""
        return encode_event(self._chunk([self._choice(index, delta, None, logprobs)]))

    def finish(self, index: int, reason: str) -> bytes:
        return encode_event(self._chunk([self._choice(index, {}, reason)]))

    def usage(self, usage: dict[str, Any]) -> bytes:
        chunk = self._chunk([])
        chunk["usage"] = usage
        return encode_event(chunk)


def error_event(body: dict[str, Any]) -> bytes:
    """A mid-stream failure: `data: {"error": {...}}` (the caller then sends `data: [DONE]`)."""
    return encode_event(body)
