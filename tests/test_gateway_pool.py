"""gateway/triton/pool.py: several Triton backends behind one GenerationBackend (scripted backends here;
tests/test_scale_e2e.py runs three real tritonservers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.triton.errors import ErrorKind, TritonError
from gateway.triton.pool import BackendPool, Targets
from gateway.triton.tensors import TritonResponse
from tests.fixtures.asgi import gateway_client
from tests.fixtures.backends import USER, AlwaysReadyBackend, Scripted, ticks, tok


class Down(AlwaysReadyBackend):
    """Refuses every stream before its first response, as an unreachable or draining Triton does."""

    def __init__(self, address: str) -> None:
        self.url = address
        self.calls = 0
        self.is_ready = False

    async def ready(self) -> tuple[bool, str]:
        return self.is_ready, "probe"

    async def generate(self, prompt: str, values: Any, request_id: str) -> AsyncIterator[TritonResponse]:
        self.calls += 1
        for response in ():  # an async generator that fails before its first response
            yield response
        raise TritonError(ErrorKind.UNAVAILABLE, f"Triton at {self.url} is unreachable (unavailable)")


def pool_of(backends: dict[str, Any], metrics: GatewayMetrics | None = None) -> BackendPool:
    return BackendPool(Targets(addresses=tuple(backends)), backends.__getitem__, metrics, 60.0)


async def drain(pool: BackendPool, rid: str) -> list[TritonResponse]:
    async with contextlib.aclosing(pool.generate("p", {}, rid)) as stream:
        return [r async for r in stream]


def test_targets_parse() -> None:
    assert Targets.parse("a:1").addresses == ("a:1",)
    assert Targets.parse(" a:1, b:2 ").addresses == ("a:1", "b:2")
    dns = Targets.parse("dns:///triton-grpc.ns.svc.cluster.local:8001")
    assert (dns.dns_host, dns.dns_port, dns.addresses) == ("triton-grpc.ns.svc.cluster.local", 8001, ())
    assert Targets.parse("dns:///triton", 9001).dns_port == 9001
    assert str(dns) == "dns:///triton-grpc.ns.svc.cluster.local:8001"
    with pytest.raises(ValueError):
        Targets.parse(" , ")


async def test_streams_spread_over_backends_by_load() -> None:
    backends = {f"b{i}:1": Scripted(ticks(5), delay=0.01) for i in range(3)}
    pool = pool_of(backends)
    await asyncio.gather(*(drain(pool, f"r{i}-0") for i in range(9)))
    assert [len(b.calls) for b in backends.values()] == [3, 3, 3]
    await pool.close()


async def test_failure_before_first_token_moves_to_another_backend() -> None:
    metrics = GatewayMetrics("m")
    good = Scripted(ticks(3))
    backends: dict[str, Any] = {"down:1": Down("down:1"), "good:1": good}
    pool = pool_of(backends, metrics)
    for i in range(4):
        out = await drain(pool, f"r{i}-0")
        assert out[-1].final and len(out) == 4
    # Tried once, marked down, then only used as a last resort.
    assert backends["down:1"].calls == 1 and len(good.calls) == 4
    text = metrics.render().decode()
    assert 'gateway_backend_retries_total{backend="down:1"} 1.0' in text
    assert 'gateway_backend_ready{backend="down:1"} 0.0' in text
    assert 'gateway_backend_ready{backend="good:1"} 1.0' in text
    assert 'gateway_backend_streams_in_flight{backend="good:1"} 0.0' in text
    # Every backend down: the last error, an UNAVAILABLE the HTTP layer answers with 503.
    only_down = pool_of({"x:1": Down("x:1"), "y:1": Down("y:1")})
    with pytest.raises(TritonError) as err:
        await drain(only_down, "r-0")
    assert err.value.kind == ErrorKind.UNAVAILABLE
    await pool.close()


async def test_failure_after_first_token_is_not_retried() -> None:
    broken = TritonError(ErrorKind.UNAVAILABLE, "Triton at a:1 is unreachable (unavailable)")
    first = Scripted(lambda i, v: [tok("a "), broken])
    second = Scripted(ticks(2))
    pool = pool_of({"a:1": first, "b:1": second})
    got: list[TritonResponse] = []
    with pytest.raises(TritonError):
        async with contextlib.aclosing(pool.generate("p", {}, "r-0")) as stream:
            async for r in stream:
                got.append(r)
    assert len(got) == 1 and second.calls == []  # the client saw text: a resend would repeat it
    await pool.close()


async def test_ready_while_one_backend_is() -> None:
    a, b = Down("a:1"), Down("b:1")
    pool = pool_of({"a:1": a, "b:1": b})
    ok, reason = await pool.ready()
    assert not ok and "0/2" in reason
    b.is_ready = True
    ok, reason = await pool.ready()
    assert ok and "1/2" in reason
    await pool.close()


async def test_dns_target_resolves_each_address() -> None:
    made: list[str] = []

    def factory(address: str) -> Scripted:
        made.append(address)
        return Scripted(ticks(1))

    pool = BackendPool(Targets.parse("dns:///localhost:8001"), factory, None, 60.0)
    ok, _ = await pool.ready()
    assert ok and made and all(a.endswith(":8001") for a in made)
    assert "127.0.0.1:8001" in made or "[::1]:8001" in made
    await pool.close()


async def test_gateway_over_a_pool_retries_invisibly() -> None:
    good = Scripted(ticks(2))
    pool = pool_of({"down:1": Down("down:1"), "good:1": good})
    client, _ = gateway_client(pool)
    async with client as c:
        for _ in range(2):
            r = await c.post("/v1/chat/completions", json={"model": "gemma-test", "messages": USER})
            assert r.status_code == 200, r.text
        assert (await c.get("/health/ready")).status_code == 200
    assert len(good.calls) == 2


def test_worker_admission_split() -> None:
    s = GatewaySettings(workers=3, max_concurrent_requests=64, max_queued_requests=128)
    assert s.worker_admission() == (22, 43)
    assert GatewaySettings(workers=1, max_concurrent_requests=5).worker_admission()[0] == 5
    assert GatewaySettings(workers=8, max_concurrent_requests=4).worker_admission()[0] == 1
