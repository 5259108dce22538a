"""Calibration: the CPU floor of receiving a token stream in Python over gRPC, as the gateway does.

A bare client with the gateway's gRPC library and settings (`tritonclient.grpc.aio`, `gateway.grpc_env`, the
same requested outputs) and none of its work -- no HTTP, no SSE, no detokenization -- streams requests
straight from the engine model at a fixed concurrency, like perf_analyzer's concurrency mode. Its own CPU
time (gRPC's threads included) over the tokens received is what any Python consumer of Triton's
one-message-per-token stream pays before doing anything with a token.

    python -m benchmarks.grpc_floor --url 127.0.0.1:8001 --model tensorrt_llm \\
        --input-data engine.input.json --concurrency 32 --requests 64      # prints one JSON line

`--input-data` is a perf_analyzer input file (benchmarks/loads.engine_input_data).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from gateway import grpc_env


async def run(url: str, model: str, entries: list[dict[str, Any]], concurrency: int, requests: int) -> int:
    import numpy as np
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc import aio as grpcclient
    from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

    from gateway.triton.tensors import ID_OUTPUTS

    client = grpcclient.InferenceServerClient(url)
    config = (await client.get_model_config(model)).config
    dtypes = {
        i.name: triton_to_np_dtype(grpcclient.model_config_pb2.DataType.Name(i.data_type)[5:])
        for i in config.input
    }
    declared = {o.name for o in config.output}
    outputs = [InferRequestedOutput(n) for n in ID_OUTPUTS if n in declared]

    def inputs(entry: dict[str, Any]) -> list[InferInput]:
        tensors = []
        for name, value in entry.items():
            data = value["content"] if isinstance(value, dict) else value
            array = np.asarray(data, dtype=dtypes[name]).reshape(1, -1)  # batch of one
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    counter = itertools.count()
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while (n := next(counter)) < requests:
            finished = asyncio.Event()
            first = {
                "model_name": model,
                "inputs": inputs(entries[n % len(entries)]),
                "outputs": outputs,
                "request_id": f"floor-{n}",
                "parameters": {"triton_enable_empty_final_response": True},
            }

            async def request_stream(first: dict[str, Any] = first, done: asyncio.Event = finished) -> Any:
                yield first
                await done.wait()

            stream = client.stream_infer(request_stream())
            async for result, error in stream:
                if error is not None:
                    raise RuntimeError(str(error))
                response = result.get_response()
                for output in response.outputs:
                    if output.name == "output_ids":
                        tokens += output.shape[-1]
                if response.parameters["triton_final_response"].bool_param:
                    break
            finished.set()
            stream.cancel()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="tensorrt_llm")
    parser.add_argument("--input-data", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args(argv)
    grpc_env.apply()  # before grpc starts, as in the gateway
    entries = json.loads(args.input_data.read_text())["data"]
    try:  # the gateway's event loop: uvicorn takes uvloop when it is installed
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    cpu0, wall0 = time.process_time(), time.monotonic()
    tokens = runner(run(args.url, args.model, entries, args.concurrency, args.requests))
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    print(
        json.dumps(
            {"tokens": tokens, "cpu_s": round(cpu, 4), "wall_s": round(wall, 4), "requests": args.requests}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
