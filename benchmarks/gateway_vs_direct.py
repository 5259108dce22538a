"""Streamed tokens/s and TTFT through the gateway vs. directly against the Triton ensemble (gRPC stream).

Same prompts, same greedy settings and max_tokens on both paths, at concurrency 1 and 8 (configurable);
prints one row per (path, concurrency) and the gateway/direct ratios. Not a test: run it by hand against a
running stack, e.g.

    python benchmarks/gateway_vs_direct.py --gateway-url http://127.0.0.1:8080 \
        --triton-grpc-url 127.0.0.1:8001

The direct path uses the gateway's own `TritonStreamClient` (one gRPC `ModelStreamInfer` per request, text
rendered with the same chat template), so the difference is the HTTP/JSON/SSE layer and the orchestration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.triton.client import TritonStreamClient
from gemma3_core.chat_template import render_chat

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about a lighthouse.",
    "List five uses of a paperclip.",
    "Summarise the plot of a heist movie you invent.",
    "Describe how a bicycle gear works.",
    "Give three tips for learning a new language.",
    "What makes bread rise? Answer briefly.",
    "Invent a name and a motto for a coffee shop.",
]


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    total_s: float


@dataclass
class Row:
    path: str
    concurrency: int
    requests: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    tokens_per_s: float  # all completion tokens of the run / wall time of the run
    per_request_tokens_per_s: float  # mean decode rate after the first token


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def via_gateway(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {
        "model": model,
        "messages": _messages(prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if ttft is None and choice["delta"].get("content"):
                    ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    return Sample(ttft if ttft is not None else total, tokens, total)


async def direct(triton: TritonStreamClient, prompt: str, max_tokens: int) -> Sample:
    values = {"max_tokens": max_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 1, "seed": 0}
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with contextlib.aclosing(
        triton.generate(render_chat(_messages(prompt)), values, "bench")
    ) as stream:
        async for response in stream:
            tokens += response.num_output_tokens or 0
            if ttft is None and response.text:
                ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    return Sample(ttft if ttft is not None else total, tokens, total)


def _row(path: str, concurrency: int, samples: list[Sample], wall: float) -> Row:
    ttfts = sorted(s.ttft_s for s in samples)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    decode = [
        (s.tokens - 1) / (s.total_s - s.ttft_s) for s in samples if s.tokens > 1 and s.total_s > s.ttft_s
    ]
    return Row(
        path=path,
        concurrency=concurrency,
        requests=len(samples),
        ttft_p50_ms=statistics.median(ttfts) * 1000,
        ttft_p95_ms=p95 * 1000,
        tokens_per_s=sum(s.tokens for s in samples) / wall,
        per_request_tokens_per_s=statistics.mean(decode) if decode else 0.0,
    )


async def run_level(
    label: str, make_one: Callable[[str], Awaitable[Sample]], concurrency: int, n_requests: int
) -> Row:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Sample:
        async with sem:
            return await make_one(PROMPTS[i % len(PROMPTS)])

    start = time.perf_counter()
    samples = await asyncio.gather(*(one(i) for i in range(n_requests)))
    return _row(label, concurrency, list(samples), time.perf_counter() - start)


async def main(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(
        base_url=args.gateway_url, headers=headers, timeout=600, limits=limits
    ) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        triton = TritonStreamClient(args.triton_grpc_url, args.triton_model, request_timeout_s=600)
        try:
            ready, reason = await triton.ready()
            if not ready:
                print(f"Triton not ready: {reason}", file=sys.stderr)
                return 1
            # Warm both paths (first requests pay model/tokenizer warm-up).
            await via_gateway(client, model, PROMPTS[0], 4)
            await direct(triton, PROMPTS[0], 4)
            rows: list[Row] = []
            for concurrency in args.concurrency:
                n_requests = max(args.requests, concurrency)
                rows.append(
                    await run_level(
                        "direct", lambda p: direct(triton, p, args.max_tokens), concurrency, n_requests
                    )
                )
                rows.append(
                    await run_level(
                        "gateway",
                        lambda p: via_gateway(client, model, p, args.max_tokens),
                        concurrency,
                        n_requests,
                    )
                )
        finally:
            await triton.close()

    print(f"model={model} max_tokens={args.max_tokens} (greedy)")
    widths = (8, 4, 4, 12, 12, 9, 10)
    header = ("path", "conc", "reqs", "TTFT p50 ms", "TTFT p95 ms", "tok/s", "tok/s/req")
    print(
        " ".join(
            h.ljust(w) if k == 0 else h.rjust(w) for k, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    for r in rows:
        print(
            f"{r.path:8} {r.concurrency:>4} {r.requests:>4} {r.ttft_p50_ms:>12.1f} {r.ttft_p95_ms:>12.1f} "
            f"{r.tokens_per_s:>9.1f} {r.per_request_tokens_per_s:>10.1f}"
        )
    print()
    for concurrency in args.concurrency:
        d = next(r for r in rows if r.path == "direct" and r.concurrency == concurrency)
        g = next(r for r in rows if r.path == "gateway" and r.concurrency == concurrency)
        tps = g.tokens_per_s / d.tokens_per_s if d.tokens_per_s else float("nan")
        ttft = g.ttft_p50_ms / d.ttft_p50_ms if d.ttft_p50_ms else float("nan")
        print(f"concurrency {concurrency}: gateway/direct tokens/s = {tps:.3f}, TTFT p50 = {ttft:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateway-url", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default="")
    p.add_argument("--model", default="", help="model id sent to the gateway (default: first of /v1/models)")
    p.add_argument("--triton-grpc-url", default="127.0.0.1:8001")
    p.add_argument("--triton-model", default="ensemble")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--requests", type=int, default=8, help="requests per concurrency level (at least its value)"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", default="", help="also write the rows here (e.g. docs/benchmarks/gateway.json)")
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
