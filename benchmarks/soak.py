"""Reliability load and soak run of the gateway: admission under a burst, stream integrity, RSS growth.

    python benchmarks/soak.py --engine double            # FAST ENGINE TEST DOUBLE (not a model)
    python benchmarks/soak.py --engine real --clients 8 --rounds 1 --requests 0 --max-concurrent 4 \
        --max-queued 2 --max-tokens 16                   # the CPU reference engine (Gemma 3 270M)

Starts tritonserver (render target `cpu-fast-double` or `cpu`) and `python -m gateway` on free loopback
ports, then
1. load: a solo greedy streaming request gives the reference text; `--rounds` bursts of `--clients`
   concurrent streaming requests follow. Every accepted stream must end with `[DONE]` and carry exactly the
   reference text; every other answer must be a 429 `rate_limit_exceeded`;
2. soak: `--requests` requests (streamed and not, alternating) at `--concurrency`; the gateway's RSS
   (/proc/<pid>/status VmRSS) is sampled after a warm-up and at the end.
Prints one JSON object with the figures (docs/reliability.md). Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def parse_sse(text: str) -> tuple[str, bool, list[Any]]:
    """(content, ended with [DONE], error payloads)."""
    content, done, errors = "", False, []
    for block in text.split("\n\n"):
        if not block.startswith("data: "):
            continue
        payload = block[6:]
        if payload == "[DONE]":
            done = True
            continue
        event = json.loads(payload)
        if "error" in event:
            errors.append(event["error"])
        for choice in event.get("choices", []):
            content += choice["delta"].get("content") or ""
    return content, done, errors


def body(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


async def one_stream(client: httpx.AsyncClient, req: dict[str, Any]) -> tuple[int, str, bool, str]:
    r = await client.post("/v1/chat/completions", json=req)
    if r.status_code != 200:
        return r.status_code, "", False, r.text
    content, done, errors = parse_sse(r.text)
    return 200, content, done and not errors, r.headers.get("retry-after", "")


async def load(url: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        status, reference, ok, _ = await one_stream(client, body(model, max_tokens, True))
        assert status == 200 and ok, "the solo reference request failed"
        out: dict[str, Any] = {"clients": clients, "rounds": rounds, "per_round": [], "failures": []}
        for r in range(rounds):
            started = time.monotonic()
            results = await asyncio.gather(
                *(one_stream(client, body(model, max_tokens, True)) for _ in range(clients))
            )
            statuses = Counter(res[0] for res in results)
            for status, content, done, info in results:
                if status == 200 and not (done and content == reference):
                    out["failures"].append(f"round {r}: accepted stream differs or lacks [DONE]")
                elif status == 429:
                    if '"rate_limit_exceeded"' not in info:
                        out["failures"].append(f"round {r}: 429 without rate_limit_exceeded")
                elif status != 200:
                    out["failures"].append(f"round {r}: status {status}: {info[:200]}")
            out["per_round"].append(
                {
                    "accepted": statuses[200],
                    "rejected_429": statuses[429],
                    "seconds": round(time.monotonic() - started, 2),
                }
            )
        out["reference_chars"] = len(reference)
        return out


async def soak(
    url: str, model: str, pid: int, requests: int, concurrency: int, max_tokens: int
) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    samples: list[tuple[int, float]] = []
    warmup = min(500, requests // 10)
    counter = iter(range(requests))
    bad: list[str] = []

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            stream = i % 2 == 0
            r = await client.post("/v1/chat/completions", json=body(model, max_tokens, stream))
            statuses[r.status_code] += 1
            if r.status_code == 200 and stream and not parse_sse(r.text)[1]:
                bad.append(f"request {i}: stream without [DONE]")
            if i == warmup or i % 1000 == 0:
                samples.append((i, rss_mib(pid)))

    started = time.monotonic()
    rss_start = rss_mib(pid)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    rss_end = rss_mib(pid)
    after_warmup = next((rss for i, rss in samples if i == warmup), rss_start)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "requests_per_s": round(requests / elapsed, 1) if elapsed else None,
        "statuses": dict(statuses),
        "rss_mib_start": round(rss_start, 1),
        "rss_mib_after_warmup": round(after_warmup, 1),
        "rss_mib_end": round(rss_end, 1),
        "rss_growth_after_warmup_mib": round(rss_end - after_warmup, 1),
        "failures": bad[:10],
    }


@contextlib.contextmanager
def stack(
    engine: str, work: Path, settings: dict[str, str], interval_us: int = 5000
) -> Iterator[tuple[str, int, str]]:
    """tritonserver + `python -m gateway`; yields (gateway URL, gateway pid, model id)."""
    from build_engine import fast_double
    from build_engine.cpu import CpuArtifacts, cache_root, prepare, repository_values
    from build_engine.render import render, values_for
    from stack import gateway_process
    from stack.gateway_process import gateway_env
    from stack.triton_launcher import TritonPorts, free_port, start

    art = prepare(cache_root()) if engine == "real" else CpuArtifacts(cache_root())
    values = repository_values(art, max_batch_size=64 if engine == "double" else 8, max_seq_len=1024)
    target = "cpu-fast-double" if engine == "double" else "cpu"
    if engine == "double":
        # Paced so that a burst's streams overlap (on 2 cores the client itself spreads a burst out).
        values |= fast_double.values(interval_us)
    repo = work / "model_repository"
    render(target, repo, values_for(target, values))
    ports = TritonPorts.free()
    triton = start(repo, ports=ports)
    try:
        triton.wait_ready(600)
        env = gateway_env(
            grpc_url=triton.grpc_url,
            port=free_port(),
            tokenizer_dir=art.tokenizer_dir,
            model_id="gemma-3-270m",
            max_model_len=1024,
            PYTHONPATH=str(REPO_ROOT),
            GATEWAY_LOG_LEVEL="warning",
            GATEWAY_IMAGES_ENABLED="false",
            **settings,
        )
        with gateway_process.running(env, work / "gateway.log") as (url, proc):
            yield url, proc.pid, "gemma-3-270m"
    finally:
        triton.stop()


@dataclass(frozen=True)
class SoakPlan:
    """One soak run: the engine behind the gateway, its admission limits, the bursts and the long soak."""

    engine: Literal["double", "real"] = "double"
    clients: int = 64
    rounds: int = 5
    max_concurrent: int = 24
    max_queued: int = 16
    max_tokens: int = 64
    token_interval_us: int = 5000  # the double's pace
    requests: int = 10_000
    concurrency: int = 16
    soak_max_tokens: int = 8


def run(plan: SoakPlan) -> dict[str, Any]:
    settings = {
        "GATEWAY_MAX_CONCURRENT_REQUESTS": str(plan.max_concurrent),
        "GATEWAY_MAX_QUEUED_REQUESTS": str(plan.max_queued),
        "GATEWAY_QUEUE_TIMEOUT_S": "300",
    }
    with (
        tempfile.TemporaryDirectory(prefix="soak-") as tmp,
        stack(plan.engine, Path(tmp), settings, plan.token_interval_us) as (url, pid, model),
    ):
        result: dict[str, Any] = {
            "engine": "FAST ENGINE TEST DOUBLE"
            if plan.engine == "double"
            else "CPU reference engine (Gemma 3 270M)",
            "max_concurrent": plan.max_concurrent,
            "max_queued": plan.max_queued,
            "max_tokens": plan.max_tokens,
        }
        if plan.rounds:
            result["load"] = asyncio.run(load(url, model, plan.clients, plan.rounds, plan.max_tokens))
        if plan.requests:
            result["soak"] = asyncio.run(
                soak(url, model, pid, plan.requests, plan.concurrency, plan.soak_max_tokens)
            )
        return result


def main(argv: list[str] | None = None) -> int:
    default = SoakPlan()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["double", "real"], default=default.engine)
    for field in dataclasses.fields(SoakPlan):
        if field.name != "engine":
            flag = "--" + field.name.replace("_", "-")
            p.add_argument(flag, type=int, default=getattr(default, field.name))
    result = run(SoakPlan(**vars(p.parse_args(argv))))
    print(json.dumps(result, indent=2))
    failures = result.get("load", {}).get("failures", []) + result.get("soak", {}).get("failures", [])
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
