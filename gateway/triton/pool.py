"""Several Triton servers behind one `GenerationBackend`: spread, retry before the first token, readiness.

Targets (`TRITON_GRPC_URL`): one `host:port`, a comma-separated list of them, or `dns:///name:port`. A DNS
name is resolved here, every `resolve_interval_s`, into one channel per address (a Kubernetes headless
Service lists its ready pods), rather than handed to gRPC's own `round_robin` balancer: with a channel per
backend the gateway knows which backend served a stream, so it can retry a failed start on *another*
backend, label metrics by backend and answer readiness per backend.

Each request goes to the ready backend with the fewest streams in flight (ties rotate). A backend that
fails before the first response (unreachable, refused, model not loaded, draining: `ErrorKind.UNAVAILABLE`)
is marked down and the request moves to the next one, unseen by the client; once a response was passed on,
a failure ends the stream as with one backend. Down backends are probed again every `resolve_interval_s`.

Any other failure before the first response is the caller's to handle; a resend of the same `request_id`
goes back to the backend that failed it (the LoRA cache-miss resend carries the weights *that* replica
lacked: sent elsewhere, the replica would keep missing).

Hot path: per token the pool adds one generator hop and a bool store; the bookkeeping is per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.triton.client import GenerationBackend
from gateway.triton.errors import ErrorKind, TritonError
from gateway.triton.tensors import ModelSpec, TritonResponse

log = logging.getLogger("gateway.triton")

DNS_SCHEME = "dns:///"


class BackendMetrics(Protocol):
    """What the pool reports (gateway.metrics implements it; labels are bounded by the caller)."""

    def backend_started(self, backend: str) -> None: ...

    def backend_retried(self, backend: str) -> None: ...

    def backend_in_flight(self, backend: str, delta: int) -> None: ...

    def backend_ready(self, backend: str, ready: bool) -> None: ...


@dataclass(frozen=True)
class Targets:
    """Parsed `TRITON_GRPC_URL`: fixed addresses, or a DNS name to resolve periodically."""

    addresses: tuple[str, ...] = ()
    dns_host: str | None = None
    dns_port: int = 8001

    @classmethod
    def parse(cls, url: str, default_port: int = 8001) -> Targets:
        url = url.strip()
        if url.startswith(DNS_SCHEME):
            host, _, port = url[len(DNS_SCHEME) :].rpartition(":")
            if not host:
                host, port = port, ""
            return cls(dns_host=host, dns_port=int(port) if port else default_port)
        addresses = tuple(a.strip() for a in url.split(",") if a.strip())
        if not addresses:
            raise ValueError("TRITON_GRPC_URL names no address")
        return cls(addresses=addresses)

    def __str__(self) -> str:
        return f"{DNS_SCHEME}{self.dns_host}:{self.dns_port}" if self.dns_host else ",".join(self.addresses)


async def resolve(host: str, port: int) -> list[str]:
    """`host` → sorted `ip:port` strings (IPv6 bracketed), every address family the resolver returns."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = {f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos}
    return sorted(out)


@dataclass(eq=False)
class _Member:
    address: str
    client: GenerationBackend
    label: str
    ready: bool = True  # optimistic: a new backend gets traffic, its first failure marks it down
    in_flight: int = 0


class NoBackendError(TritonError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.UNAVAILABLE, message)


class BackendPool:
    """A `GenerationBackend` over one or more Triton servers (see the module doc)."""

    def __init__(
        self,
        targets: Targets,
        client_factory: Callable[[str], GenerationBackend],
        metrics: BackendMetrics | None = None,
        resolve_interval_s: float = 5.0,
        max_labels: int = 32,
    ) -> None:
        self.targets = targets
        self.url = str(targets)
        self._factory = client_factory
        self._metrics = metrics
        self.resolve_interval_s = resolve_interval_s
        self._max_labels = max_labels
        self._labels: dict[str, str] = {}
        self._members: dict[str, _Member] = {}
        self._rotation = itertools.count()
        self._refresher: asyncio.Task[None] | None = None
        self._refreshed = asyncio.Event()
        self._closing: list[_Member] = []
        self._resend_to: OrderedDict[str, _Member] = OrderedDict()  # request_id → backend, bounded
        for address in targets.addresses:
            self._add(address)

    # --- membership ----------------------------------------------------------------------------
    def _label(self, address: str) -> str:
        # Bounded label set: addresses come and go with pods; past `max_labels` they share one label.
        label = self._labels.get(address)
        if label is None:
            label = address if len(self._labels) < self._max_labels else "other"
            self._labels[address] = label
        return label

    def _add(self, address: str) -> None:
        member = _Member(address, self._factory(address), self._label(address))
        self._members[address] = member
        self._report_ready(member)

    def _report_ready(self, member: _Member) -> None:
        if self._metrics is not None:
            self._metrics.backend_ready(member.label, member.ready)

    def _set_ready(self, member: _Member, ready: bool) -> None:
        if member.ready != ready:
            log.warning("Triton backend %s is %s", member.address, "ready" if ready else "down")
        member.ready = ready
        self._report_ready(member)

    @property
    def addresses(self) -> list[str]:
        return list(self._members)

    async def _resolve(self) -> None:
        if self.targets.dns_host is None:
            return
        try:
            found = await resolve(self.targets.dns_host, self.targets.dns_port)
        except OSError as exc:
            log.warning("cannot resolve %s: %s (keeping %d backends)", self.url, exc, len(self._members))
            return
        for address in found:
            if address not in self._members:
                log.info("Triton backend %s added (%s)", address, self.url)
                self._add(address)
        for address in [a for a in self._members if a not in found]:
            member = self._members.pop(address)
            log.info("Triton backend %s removed (%s)", address, self.url)
            if self._metrics is not None:
                self._metrics.backend_ready(member.label, False)
            # Its streams may still be running; its channel is closed once they have ended.
            self._closing.append(member)
        await self._close_idle()

    async def _close_idle(self) -> None:
        idle = [m for m in self._closing if m.in_flight == 0]
        self._closing = [m for m in self._closing if m.in_flight > 0]
        for member in idle:
            with contextlib.suppress(Exception):
                await member.client.close()

    async def refresh(self) -> None:
        """Re-resolve the DNS target and probe every backend (the periodic task; readiness calls it too)."""
        await self._resolve()
        members = list(self._members.values())
        results = await asyncio.gather(*(m.client.ready() for m in members))
        for member, (ok, _) in zip(members, results, strict=True):
            self._set_ready(member, ok)
        self._refreshed.set()

    def _ensure_refresher(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a probe round must never end the loop
                log.exception("refreshing the Triton backends failed")
            await asyncio.sleep(self.resolve_interval_s)

    async def _members_known(self) -> None:
        self._ensure_refresher()
        if not self._members:  # a DNS target before its first resolution
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._refreshed.wait(), self.resolve_interval_s)

    # --- GenerationBackend -----------------------------------------------------------------------
    async def ready(self) -> tuple[bool, str]:
        """Ready while at least one backend is; probes all of them (and re-resolves a DNS target)."""
        self._ensure_refresher()
        await self.refresh()
        up = [m.address for m in self._members.values() if m.ready]
        total = len(self._members)
        if up:
            return True, f"{len(up)}/{total} Triton backends ready"
        return False, f"no Triton backend of {self.url} is ready (0/{total})"

    async def model_spec(self) -> ModelSpec:
        """The spec of a ready backend (every replica serves the same repository)."""
        await self._members_known()
        last: TritonError | None = None
        for member in self._ordered():
            try:
                return await member.client.model_spec()
            except TritonError as exc:
                if exc.kind != ErrorKind.UNAVAILABLE:
                    raise
                self._set_ready(member, False)
                last = exc
        raise last or NoBackendError(f"no Triton backend of {self.url} is ready")

    def _ordered(self, request_id: str | None = None) -> list[_Member]:
        """Ready backends by fewest streams in flight, ties rotating; down ones last (a last resort).
        A resend goes first to the backend that failed the request."""
        members = list(self._members.values())
        if len(members) > 1:
            shift = next(self._rotation) % len(members)
            members = members[shift:] + members[:shift]
            members.sort(key=lambda m: (not m.ready, m.in_flight))
        if self._resend_to and request_id is not None:
            previous = self._resend_to.pop(request_id, None)
            if previous is not None and previous in members and previous.ready:
                members.remove(previous)
                members.insert(0, previous)
        return members

    def _remember_failure(self, request_id: str, member: _Member) -> None:
        self._resend_to[request_id] = member
        if len(self._resend_to) > 1024:  # requests that were not resent
            self._resend_to.popitem(last=False)

    async def generate(
        self, prompt: str, values: Mapping[str, Any], request_id: str
    ) -> AsyncGenerator[TritonResponse, None]:
        await self._members_known()
        last: TritonError | None = None
        for member in self._ordered(request_id):
            started = False
            member.in_flight += 1
            metrics = self._metrics
            if metrics is not None:
                metrics.backend_in_flight(member.label, 1)
                metrics.backend_started(member.label)
            try:
                async with contextlib.aclosing(member.client.generate(prompt, values, request_id)) as stream:
                    async for response in stream:
                        started = True
                        yield response
                return
            except TritonError as exc:
                if started:
                    raise
                if exc.kind != ErrorKind.UNAVAILABLE:
                    self._remember_failure(request_id, member)
                    raise
                self._set_ready(member, False)
                if metrics is not None:
                    metrics.backend_retried(member.label)
                log.warning("Triton backend %s failed before the first token (%s)", member.address, exc)
                last = exc
            finally:
                member.in_flight -= 1
                if metrics is not None:
                    metrics.backend_in_flight(member.label, -1)
        raise last or NoBackendError(f"no Triton backend of {self.url} is known yet")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        members = [*self._members.values(), *self._closing]
        self._members.clear()
        self._closing = []
        for member in members:
            with contextlib.suppress(Exception):
                await member.client.close()
