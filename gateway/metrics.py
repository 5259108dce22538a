"""Prometheus metrics of the gateway (one registry per app, so tests can build several apps).

Names follow vLLM/TRT-LLM conventions with a `gateway_` prefix so they sit next to Triton's `nv_*` metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
