"""Scale-out on one machine: three real tritonservers (the FAST ENGINE TEST DOUBLE, paced) behind two real
gateway processes (`python -m gateway`, one of them with two workers), all on loopback.

Spread over the replicas (their own request counters), a replica SIGKILLed under load (streams on it end
with an error event and `[DONE]`; requests without a token yet move to another replica; readiness stays
200), the replica restarted and used again, and a LoRA adapter served by a replica that never saw it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from build_engine.cpu import CpuArtifacts, cache_root
from stack import gateway_process
from stack.triton_launcher import free_port
from tests.fixtures.double import DoubleTriton, metric_sum, run_doubles

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "gemma-3-270m"
INTERVAL_US = 10_000  # 10 ms per token
ENGINE = "tensorrt_llm"


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DoubleTriton]]:
    with run_doubles(tmp_path_factory.mktemp("scale"), 3, INTERVAL_US) as servers:
        yield servers


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("adapters") / "ad1"
    d.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": np.ones((2, 640), np.float32),
            f"{prefix}.lora_B.weight": np.ones((1024, 2), np.float32),
        },
        str(d / "adapter_model.safetensors"),
    )
    return d.parent


@dataclass
class Gateways:
    urls: list[str]
    logs: list[Path]


@pytest.fixture(scope="module")
def gateways(
    replicas: list[DoubleTriton], adapters_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateways]:
    art = CpuArtifacts(cache_root())
    logs_dir = tmp_path_factory.mktemp("gateway-logs")
    targets = ",".join(r.ports.grpc_url for r in replicas)
    import contextlib

    with contextlib.ExitStack() as stack:
        urls, logs = [], []
        for i, workers in enumerate((1, 2)):
            env = gateway_process.gateway_env(
                grpc_url=targets,
                port=free_port(),
                tokenizer_dir=art.tokenizer_dir,
                model_id=MODEL,
                max_model_len=512,
                GATEWAY_WORKERS=str(workers),
                GATEWAY_LORA_DIR=str(adapters_dir),
                GATEWAY_IMAGES_ENABLED="false",
                GATEWAY_LOG_FORMAT="text",
                GATEWAY_TRITON_RESOLVE_INTERVAL_S="1",
                GATEWAY_MAX_CONCURRENT_REQUESTS="64",
            )
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            log = logs_dir / f"gateway{i}.log"
            url, _ = stack.enter_context(gateway_process.running(env, log, timeout=120))
            urls.append(url)
            logs.append(log)
        yield Gateways(urls, logs)


def engine_successes(replica: DoubleTriton) -> float:
    text = httpx.get(replica.ports.metrics_url, timeout=5).text
    return metric_sum(text, "nv_inference_request_success", model=ENGINE)


@dataclass
class Stream:
    status: int = 0
    content: str = ""
    first_at: float | None = None
    errors: list[Any] = field(default_factory=list)
    done: bool = False
    finish: str | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)


async def stream_chat(
    client: httpx.AsyncClient, url: str, max_tokens: int, model: str = MODEL, out: Stream | None = None
) -> Stream:
    out = out or Stream()
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        out.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            return out
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                out.done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                out.errors.append(event["error"])
                continue
            for choice in event.get("choices", []):
                text = choice["delta"].get("content") or ""
                if text and out.first_at is None:
                    out.first_at = time.monotonic()
                    out.started.set()
                out.content += text
                out.finish = choice.get("finish_reason") or out.finish
    return out


async def test_streams_spread_over_replicas(replicas: list[DoubleTriton], gateways: Gateways) -> None:
    before = [engine_successes(r) for r in replicas]
    async with httpx.AsyncClient(timeout=60) as client:
        jobs = [stream_chat(client, gateways.urls[i % 2], 20) for i in range(18)]
        results = await asyncio.gather(*jobs)
    assert all(r.status == 200 and r.done and r.finish == "length" and not r.errors for r in results)
    served = [engine_successes(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) == 18, served
    assert min(served) >= 3, served  # least-loaded choice: each replica takes a fair share
    # The two-worker gateway's counters are summed over its workers (prometheus multiprocess mode).
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{gateways.urls[1]}/metrics")).text
    assert metric_sum(text, "gateway_http_requests_total", route="/v1/chat/completions") == 9
    assert metric_sum(text, "gateway_backend_streams_total") == 9
    for r in replicas:
        assert metric_sum(text, "gateway_backend_ready", backend=r.ports.grpc_url) == 1


async def test_replica_killed_under_load_then_restarted(
    replicas: list[DoubleTriton], gateways: Gateways
) -> None:
    victim = replicas[0]
    readiness: list[int] = []
    stop_polling = asyncio.Event()

    async def poll_ready(client: httpx.AsyncClient) -> None:
        while not stop_polling.is_set():
            for url in gateways.urls:
                readiness.append((await client.get(f"{url}/health/ready")).status_code)
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(timeout=60) as client:
        poller = asyncio.create_task(poll_ready(client))
        watched = [Stream() for _ in range(12)]
        early = [
            asyncio.create_task(stream_chat(client, gateways.urls[i % 2], 400, out=s))
            for i, s in enumerate(watched)
        ]
        # Kill once every early stream is streaming (4 s of tokens each at 10 ms).
        await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in watched)), 30)
        killed_at = time.monotonic()
        victim.kill()
        late = [asyncio.create_task(stream_chat(client, gateways.urls[i % 2], 20)) for i in range(12)]
        early_results = await asyncio.gather(*early)
        late_results = await asyncio.gather(*late)
        stop_polling.set()
        await poller

        broken = [r for r in early_results if r.errors]
        summary = [
            (r.status, r.finish, len(r.content), r.first_at and round(r.first_at - killed_at, 2), r.errors)
            for r in early_results
        ]
        assert broken, f"no stream was on the killed replica: {summary}"
        for r in early_results:
            assert r.status == 200 and r.done
            if r.errors:  # cut mid-stream: an error event after some text, then [DONE]
                assert r.content and r.finish is None, summary
            else:
                assert r.finish == "length"
        # Nothing that had not streamed a token fails: the gateways moved those to live replicas.
        assert all(r.status == 200 and r.done and not r.errors and r.finish == "length" for r in late_results)
        assert readiness and set(readiness) == {200}, readiness

        # (c) restart: the replica takes traffic again within seconds.
        victim.start()
        restarted = time.monotonic()
        baseline = engine_successes(victim)
        while engine_successes(victim) == baseline:
            assert time.monotonic() - restarted < 15, "the restarted replica got no traffic"
            batch = [stream_chat(client, gateways.urls[i % 2], 5) for i in range(6)]
            assert all(r.status == 200 and not r.errors for r in await asyncio.gather(*batch))
            await asyncio.sleep(0.2)


async def test_lora_on_a_replica_that_never_saw_the_adapter(
    replicas: list[DoubleTriton], gateways: Gateways
) -> None:
    """The one-worker gateway sends the weights with its first LoRA request, to one replica; its next
    requests rotate over the others, which have never seen the adapter (no gateway used it before, and one
    of them was just restarted): they answer the id alone with TensorRT-LLM's cache-miss error, and the
    gateway resends to that same replica with the weights. Then the other gateway's workers do the same."""
    before = [engine_successes(r) for r in replicas]
    async with httpx.AsyncClient(timeout=60) as client:
        for url in gateways.urls:
            for _ in range(6):  # sequential: the least-loaded choice rotates over the replicas
                r = await stream_chat(client, url, 5, model="ad1")
                assert r.status == 200 and r.done and not r.errors and r.finish == "length", r
    served = [engine_successes(r) - b for r, b in zip(replicas, before, strict=True)]
    assert all(s >= 1 for s in served), served
    resends = gateways.logs[0].read_text().count("not cached by the engine; resending")
    assert resends >= 1, "no LoRA request reached a replica without the adapter"
