"""Errors (gateway/errors.py): Triton failures as HTTP answers."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.errors import triton_api_error
from gateway.triton.errors import TritonError
from gateway.triton.tensors import InputSpec, ModelSpec, build_inputs
from tests.fixtures.asgi import gateway_client as _client
from tests.fixtures.backends import MODEL, USER, Scripted


async def test_triton_queue_full_is_429() -> None:
    full = Scripted(lambda i, v: [TritonError("overloaded", "the inference server's queue is full")])
    client, _ = _client(full)
    async with client:
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
    assert r.status_code == 429 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_queue_full_messages_are_classified() -> None:
    from gateway.triton.errors import queue_full as _queue_full

    assert _queue_full("Exceeds maximum queue size") is not None
    assert _queue_full("in ensemble 'ensemble', Exceeds maximum queue size").kind == "overloaded"  # type: ignore[union-attr]
    assert _queue_full("failed to connect") is None


def test_missing_essential_input_is_400() -> None:
    spec = ModelSpec(
        {n: InputSpec(n, t, False) for n, t in (("text_input", "BYTES"), ("max_tokens", "INT32"))}, 1
    )
    assert len(build_inputs(spec, "p", {"max_tokens": 4, "top_k": 1})) == 2  # plain extras are dropped
    with pytest.raises(TritonError) as info:
        build_inputs(spec, "p", {"max_tokens": 4, "images": np.array([[b"x"]], dtype=object)})
    error = triton_api_error(info.value)
    assert error.status == 400 and "images" in error.message
