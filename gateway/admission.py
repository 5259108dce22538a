"""Admission control: at most `max_concurrent` generations at once, at most `max_queued` waiting, 429 beyond.

A request weighs its `n` (each choice is one engine request). Waiters are served first-come first-served;
a waiter that is cancelled (client gone) or waits longer than `queue_timeout_s` leaves the queue. The
permit is released exactly once, by `Generation.close()`, however the generation ends (finish, error,
disconnect), so slots cannot leak. Single event loop, no locks needed.

The limits are per process: with several workers each one admits its share of the gateway's limits
(`GatewaySettings.worker_admission`), and the kernel spreads connections over the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.errors import rate_limited


@dataclass(eq=False)
class Permit:
    controller: AdmissionController
    weight: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.controller._release(self.weight)


@dataclass(eq=False)
class _Waiter:
    weight: int
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AdmissionController:
    def __init__(
        self,
        max_concurrent: int,
        max_queued: int,
        queue_timeout_s: float,
        retry_after_s: int = 1,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.active = 0
        self._waiters: deque[_Waiter] = deque()
        self._active_gauge = Gauge(
            "gateway_admission_active",
            "Engine requests admitted (choices)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._waiting_gauge = Gauge(
            "gateway_admission_waiting",
            "Requests waiting for admission",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._rejected = Counter(
            "gateway_admission_rejected", "Requests answered 429", ["reason"], registry=registry
        )

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, weight: int) -> bool:
        return self.active + weight <= self.max_concurrent

    def _sync_gauges(self) -> None:
        self._active_gauge.set(self.active)
        self._waiting_gauge.set(len(self._waiters))

    async def acquire(self, weight: int = 1) -> Permit:
        """A permit for `weight` engine requests, or `APIError(429)` when the gateway is saturated."""
        # A request larger than the whole gateway still runs, alone.
        weight = max(1, min(weight, self.max_concurrent))
        if not self._waiters and self._fits(weight):
            self.active += weight
            self._sync_gauges()
            return Permit(self, weight)
        if len(self._waiters) >= self.max_queued:
            self._rejected.labels("queue_full").inc()
            raise rate_limited(
                f"The gateway is at capacity ({self.max_concurrent} concurrent generations, "
                f"{self.max_queued} queued). Please retry later.",
                self.retry_after_s,
            )
        waiter = _Waiter(weight)
        self._waiters.append(waiter)
        self._sync_gauges()
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout_s)
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted in the same tick we were cancelled/timed out: hand the slot back.
                self._release(weight)
            else:
                waiter.future.cancel()
                self._remove(waiter)
            if isinstance(exc, asyncio.TimeoutError):
                self._rejected.labels("queue_timeout").inc()
                raise rate_limited(
                    f"No generation slot became free within {time.monotonic() - started:.0f} s. "
                    "Please retry later.",
                    self.retry_after_s,
                ) from None
            raise
        return Permit(self, weight)

    def _remove(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        self._wake()

    def _release(self, weight: int) -> None:
        self.active -= weight
        self._wake()

    def _wake(self) -> None:
        # FIFO: the head waits until it fits, later (smaller) waiters do not overtake it.
        while self._waiters and self._fits(self._waiters[0].weight):
            waiter = self._waiters.popleft()
            if waiter.future.done():
                continue
            self.active += waiter.weight
            waiter.future.set_result(None)
        self._sync_gauges()
