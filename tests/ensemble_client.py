"""A minimal tritonclient.grpc.aio streaming client for tests (independent of the gateway's own client)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import np_to_triton_dtype


def tensor(name: str, value: Any, dtype: Any = None) -> grpcclient.InferInput:
    arr = np.asarray(value, dtype=dtype)
    if arr.dtype.kind in "US":
        arr = np.vectorize(lambda s: s.encode("utf-8") if isinstance(s, str) else s, otypes=[object])(arr)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    t = grpcclient.InferInput(
        name, list(arr.shape), np_to_triton_dtype(arr.dtype) if arr.dtype != object else "BYTES"
    )
    t.set_data_from_numpy(arr)
    return t


@dataclass
class StreamResult:
    chunks: list[Any] = field(default_factory=list)  # per-response payload (bytes or id lists)
    num_input_tokens: int | None = None
    num_output_tokens: int = 0
    error: str | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def ids(self) -> list[int]:
        return [i for c in self.chunks for i in c]


async def stream(
    url: str,
    model: str,
    inputs: Sequence[grpcclient.InferInput],
    *,
    output: str = "text_output",
    timeout: float = 120.0,
    stop_after: int | None = None,
) -> StreamResult:
    """Send one request on a gRPC stream and collect responses until the final one (or `stop_after`)."""
    client = grpcclient.InferenceServerClient(url)
    result = StreamResult()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": model, "inputs": list(inputs), "enable_empty_final_response": True}

    async def run() -> None:
        responses = client.stream_infer(requests())
        try:
            async for res, err in responses:
                if err is not None:
                    result.error = str(err)
                    return
                arr = res.as_numpy(output)
                if arr is not None and arr.size:
                    result.chunks.append(
                        arr.reshape(-1)[0] if output == "text_output" else arr.reshape(-1).tolist()
                    )
                n_in, n_out = res.as_numpy("num_input_tokens"), res.as_numpy("num_output_tokens")
                if n_in is not None:
                    result.num_input_tokens = int(n_in.reshape(-1)[0])
                if n_out is not None:
                    result.num_output_tokens += int(n_out.reshape(-1)[0])
                if res.get_response().parameters["triton_final_response"].bool_param:
                    return
                if stop_after is not None and len(result.chunks) >= stop_after:
                    return  # leaving the stream cancels the request on the server
        finally:
            responses.cancel()

    try:
        await asyncio.wait_for(run(), timeout)
    finally:
        await client.close()
    return result


def ensemble_inputs(
    prompt: str, max_tokens: int, *, stream_: bool = True, **extra: Any
) -> list[grpcclient.InferInput]:
    dtypes = {
        "top_k": np.int32,
        "min_tokens": np.int32,
        "end_id": np.int32,
        "pad_id": np.int32,
        "top_p": np.float32,
        "temperature": np.float32,
        "repetition_penalty": np.float32,
        "presence_penalty": np.float32,
        "frequency_penalty": np.float32,
        "seed": np.uint64,
        "exclude_input_in_output": bool,
        "return_num_input_tokens": bool,
        "return_num_output_tokens": bool,
    }
    out = [
        tensor("text_input", [[prompt]]),
        tensor("max_tokens", [[max_tokens]], np.int32),
        tensor("stream", [[stream_]], bool),
    ]
    for name, value in extra.items():
        if name in ("stop_words", "bad_words", "images"):
            # object arrays: numpy's fixed-width bytes would strip trailing NULs from image files
            out.append(tensor(name, np.array([list(value)], dtype=object)))
        elif name.startswith("guided_decoding"):
            out.append(tensor(name, np.array([[value.encode()]], dtype=object)))
        else:
            out.append(tensor(name, [[value]], dtypes[name]))
    return out
