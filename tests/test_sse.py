"""SSE chunks (gateway/sse.py): the chunk shapes and usage only with include_usage."""

from __future__ import annotations

import json

from gateway.sse import DONE, ChunkFactory, encode_event


def test_sse_chunks() -> None:
    factory = ChunkFactory("chatcmpl-1", 123, "m", include_usage=False)
    role = factory.role(0)
    assert role.startswith(b"data: ") and role.endswith(b"\n\n")
    chunk = json.loads(role[len(b"data: ") :])
    assert chunk == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 123,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    content = json.loads(factory.content(1, "é\n")[6:])
    assert content["choices"][0]["delta"] == {"content": "é\n"} and content["choices"][0]["index"] == 1
    finish = json.loads(factory.finish(0, "length")[6:])
    assert finish["choices"][0]["finish_reason"] == "length" and finish["choices"][0]["delta"] == {}
    assert DONE == b"data: [DONE]\n\n"
    assert "é".encode() in factory.content(0, "é")  # UTF-8 on the wire, not \u escapes


def test_sse_usage_only_with_include_usage() -> None:
    factory = ChunkFactory("c", 1, "m", include_usage=True)
    assert json.loads(factory.content(0, "x")[6:])["usage"] is None
    usage = json.loads(factory.usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})[6:])
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    assert encode_event({"error": {"message": "x"}}) == b'data: {"error":{"message":"x"}}\n\n'
