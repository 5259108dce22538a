"""OpenTelemetry tracing of chat completions: off unless the standard OTEL_* variables turn it on.

Spans: `chat.completion` (the request; its parent is the caller's W3C `traceparent`), `validate`,
`render_prompt`, `triton.preprocessing` (the unary pre-steps), `triton.engine_stream` (one per choice, with
a `first_token` event) and `response` (shaping the body or streaming the chunks). The trace context goes on
to Triton as gRPC metadata (`traceparent`), so Triton's own OpenTelemetry spans (`--trace-config
mode=opentelemetry`) join the same trace.

On when `OTEL_TRACES_EXPORTER` names an exporter (`console`, or `otlp` when
opentelemetry-exporter-otlp is installed) and `OTEL_SDK_DISABLED` is not true; the SDK reads the rest
(`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_ENDPOINT`, sampler…). Off, every helper here is a no-op that
imports nothing and allocates nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("gateway.tracing")

_tracer: Any = None  # an opentelemetry Tracer once configured; None = tracing off


def enabled() -> bool:
    return _tracer is not None


def configure(provider: Any) -> None:
    """Trace with `provider` (an SDK TracerProvider; tests pass one with an in-memory exporter)."""
    global _tracer
    _tracer = provider.get_tracer("gateway")


def disable() -> None:
    global _tracer
    _tracer = None


def configure_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on if the OTEL_* variables ask for it; True when on."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter in ("", "none") or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "gemma3-gateway"}))
    for name in (e.strip() for e in exporter.split(",")):
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                log.error("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp installed")
                continue
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            log.error("unknown OTEL_TRACES_EXPORTER %r (console, otlp)", name)
    configure(provider)
    return True


@contextlib.contextmanager
def request_span(headers: Mapping[str, str]) -> Iterator[Any]:
    """The request's span, a child of the caller's `traceparent` if it sent one (None when off)."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(carrier=dict(headers))
    with _tracer.start_as_current_span(
        "chat.completion", context=parent, kind=trace.SpanKind.SERVER, end_on_exit=False
    ) as span:
        yield span


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one (None when off)."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def start_span(name: str) -> Any:
    """A child span the caller ends (for work that outlives a `with` block: a streamed response)."""
    return None if _tracer is None else _tracer.start_span(name)


def end(span_: Any) -> None:
    if span_ is not None:
        span_.end()


def event(span_: Any, name: str) -> None:
    if span_ is not None:
        span_.add_event(name)


def grpc_headers() -> dict[str, str] | None:
    """The current trace context as gRPC metadata for Triton (None when off)."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier or None
