"""Scale-out figures on one machine: replicas behind one gateway, gateway workers, the gateway over the floor.

    python -m benchmarks.scale_out replicas   # 3 paced replicas vs 1 behind one gateway (target >= 2.7x)
    python -m benchmarks.scale_out workers    # W gateway workers vs 1, unpaced double (target >= 0.8 x W)
    python -m benchmarks.scale_out overhead   # gateway CPU per token minus benchmarks/grpc_floor.py's, paced

Each prints one JSON line per measurement. The load is this module's own streaming HTTP client (one asyncio
process, `--concurrency` streams, `--requests` in all); its CPU is not counted in the gateway's. The fast
engine double is native when a C++ compiler is there (as in `make bench`), else the Python one. A replica's
in-flight cap (`--replica-batch`) makes one replica the bottleneck for the replica ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stack import gateway_process, procstat
from stack.triton_launcher import TritonPorts, TritonProcess, free_port, start

MODEL = "gemma-3-270m"


def implementation() -> str:
    return "native" if shutil.which(os.environ.get("CXX", "g++")) else "python"


@contextlib.contextmanager
def replicas(
    work: Path, count: int, interval_us: int, batch: int, impl: str
) -> Iterator[list[TritonProcess]]:
    from build_engine import fast_double

    servers: list[TritonProcess] = []
    try:
        for i in range(count):
            repo = fast_double.render_repository(
                work / f"replica{i}" / "model_repository",
                interval_us,
                max_batch_size=batch,
                max_seq_len=2048,
                implementation=impl,
                first_token_delay_us=interval_us,
            )
            servers.append(start(repo, ports=TritonPorts.free()))
        for server in servers:
            server.wait_ready(300)
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def gateway(work: Path, targets: list[TritonProcess], workers: int) -> Iterator[tuple[str, int]]:
    from build_engine.cpu import CpuArtifacts, cache_root

    env = gateway_process.gateway_env(
        grpc_url=",".join(t.grpc_url for t in targets),
        port=free_port(),
        tokenizer_dir=CpuArtifacts(cache_root()).tokenizer_dir,
        model_id=MODEL,
        max_model_len=2048,
        GATEWAY_WORKERS=str(workers),
        GATEWAY_IMAGES_ENABLED="false",
        GATEWAY_LOG_LEVEL="warning",
        GATEWAY_MAX_CONCURRENT_REQUESTS="512",
        GATEWAY_MAX_QUEUED_REQUESTS="512",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with gateway_process.running(env, work / f"gateway-{workers}w-{len(targets)}r.log", timeout=180) as (
        url,
        proc,
    ):
        yield url, proc.pid


def gateway_cpu(pid: int) -> float:
    """The gateway's CPU seconds, its worker processes included."""
    return procstat.cpu_seconds(pid) + sum(procstat.cpu_seconds(c) for c in procstat.children(pid))


async def load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = failures = 0
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        for _ in counter:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    failures += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage"' in line:
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens += usage["completion_tokens"]

    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.monotonic() - t0
    return {
        "tokens": tokens,
        "failures": failures,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
    }


def measure(url: str, pid: int, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    asyncio.run(load(url, min(concurrency, 8), min(requests, 8), 8))  # warm: spec, plans, connections
    cpu0 = gateway_cpu(pid)
    out = asyncio.run(load(url, concurrency, requests, max_tokens))
    cpu = gateway_cpu(pid) - cpu0
    out["gateway_cpu_s"] = round(cpu, 3)
    out["gateway_cpu_us_per_token"] = round(cpu / max(out["tokens"], 1) * 1e6, 1)
    return out


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def cmd_replicas(args: argparse.Namespace, work: Path) -> None:
    impl = implementation()
    results = {}
    for n in (1, 3):
        with (
            replicas(work / f"r{n}", n, args.interval_us, args.replica_batch, impl) as servers,
            gateway(work, servers, 1) as (url, pid),
        ):
            results[n] = measure(url, pid, args.concurrency, args.requests, args.max_tokens)
        emit(phase="replicas", replicas=n, implementation=impl, interval_us=args.interval_us, **results[n])
    ratio = results[3]["tokens_per_s"] / results[1]["tokens_per_s"]
    emit(phase="replicas", ratio_3_over_1=round(ratio, 2), target=2.7)


def cmd_workers(args: argparse.Namespace, work: Path) -> None:
    impl = implementation()
    results = {}
    with replicas(work / "w", 1, 0, 64, impl) as servers:
        for w in (1, args.workers):
            with gateway(work, servers, w) as (url, pid):
                results[w] = measure(url, pid, args.concurrency, args.requests, args.max_tokens)
            emit(phase="workers", workers=w, implementation=impl, **results[w])
    ratio = results[args.workers]["tokens_per_s"] / results[1]["tokens_per_s"]
    emit(phase="workers", ratio=round(ratio, 2), target=round(0.8 * args.workers, 2), cores=os.cpu_count())


def cmd_overhead(args: argparse.Namespace, work: Path) -> None:
    from benchmarks.loads import engine_input_data

    impl = implementation()
    with replicas(work / "o", 1, args.interval_us, 64, impl) as servers:
        with gateway(work, servers, 1) as (url, pid):
            gw = measure(url, pid, 32, args.requests, args.max_tokens)
        data = work / "engine.input.json"
        data.write_text(json.dumps(engine_input_data([[2, 9259, 236764]], args.max_tokens)))
        floor_cmd = [sys.executable, "-m", "benchmarks.grpc_floor", "--url", servers[0].grpc_url]
        floor_cmd += ["--input-data", str(data), "--concurrency", "32", "--requests", str(args.requests)]
        floor = json.loads(subprocess.run(floor_cmd, check=True, capture_output=True, text=True).stdout)
    floor_us = floor["cpu_s"] / max(floor["tokens"], 1) * 1e6
    emit(
        phase="overhead",
        implementation=impl,
        gateway_cpu_us_per_token=gw["gateway_cpu_us_per_token"],
        floor_cpu_us_per_token=round(floor_us, 1),
        added_us_per_token=round(gw["gateway_cpu_us_per_token"] - floor_us, 1),
        goal_us=30,
        gateway_tokens=gw["tokens"],
        floor_tokens=floor["tokens"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("replicas", "workers", "overhead"))
    parser.add_argument("--interval-us", type=int, default=10_000)
    parser.add_argument("--replica-batch", type=int, default=8, help="in-flight cap per replica")
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--requests", type=int, default=72)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        {"replicas": cmd_replicas, "workers": cmd_workers, "overhead": cmd_overhead}[args.what](
            args, Path(tmp)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
