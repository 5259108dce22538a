"""Prometheus metrics of the gateway (one registry per app, so tests can build several apps).

Names follow vLLM/TRT-LLM conventions with a `gateway_` prefix so they sit next to Triton's `nv_*` metrics.

With several worker processes (`GATEWAY_WORKERS`), prometheus_client's multiprocess mode is on
(`PROMETHEUS_MULTIPROC_DIR`, set by `python -m gateway` before the workers start): every worker writes its
values to files there and `/metrics`, answered by any one worker, sums them. Gauges say how they combine
across workers (`multiprocess_mode`); outside multiprocess mode that argument is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# TTFT spans a CPU reference model (seconds) and a GPU 27B (tens of ms); ITL is milliseconds to a second.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class GatewayMetrics:
    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.requests = Counter(
            "gateway_http_requests_total",
            "HTTP requests by route, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Request arrival to the first generated text of a choice",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Time between successive text deltas of a choice",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "gateway_e2e_request_latency_seconds",
            "Chat completion latency, arrival to last token",
            ["model"],
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens", "Prompt tokens processed", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens generated", ["model"], registry=self.registry
        )
        self.finished = Counter(
            "gateway_request_success",
            "Finished choices by finish_reason",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Chat completions being generated",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        # Per Triton backend (gateway/triton/pool.py); the label set is bounded there.
        self.backend_streams = Counter(
            "gateway_backend_streams",
            "Engine streams started per Triton backend (retries included)",
            ["backend"],
            registry=self.registry,
        )
        self.backend_retries = Counter(
            "gateway_backend_retries",
            "Streams that failed before their first token and moved to another backend",
            ["backend"],
            registry=self.registry,
        )
        self.backend_streams_in_flight = Gauge(
            "gateway_backend_streams_in_flight",
            "Engine streams in flight per Triton backend",
            ["backend"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.backend_up = Gauge(
            "gateway_backend_ready",
            "1 while the gateway considers the Triton backend ready",
            ["backend"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.disconnects = Counter(
            "gateway_client_disconnects",
            "Chat completions cancelled by a client disconnect",
            ["model"],
            registry=self.registry,
        )
        # Per-token series, bound once: `labels()` is a locked dict lookup, too dear to pay per token.
        self.model_ttft = self.ttft.labels(model)
        self.model_itl = self.itl.labels(model)

    # --- gateway.triton.pool.BackendMetrics (per request, not per token) ----------------------------
    def backend_started(self, backend: str) -> None:
        self.backend_streams.labels(backend).inc()

    def backend_retried(self, backend: str) -> None:
        self.backend_retries.labels(backend).inc()

    def backend_in_flight(self, backend: str, delta: int) -> None:
        self.backend_streams_in_flight.labels(backend).inc(delta)

    def backend_ready(self, backend: str, ready: bool) -> None:
        self.backend_up.labels(backend).set(1 if ready else 0)

    def render(self) -> bytes:
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # every worker's values, read from the shared directory
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def multiprocess_dir() -> str | None:
    """The multiprocess directory when prometheus_client runs in multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def worker_exited(pid: int) -> None:
    """Drop a finished worker's live gauges (its counters and histograms stay summed)."""
    if multiprocess_dir() is not None:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class RequestCounterMiddleware:
    """Counts HTTP responses by status (pure ASGI: BaseHTTPMiddleware would break disconnect detection)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, routes: Iterable[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = set(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        # Fixed label set: fuzzers and scanners must not create one time series per random path.
        route = (
            path
            if path in self.routes
            else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        )
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
