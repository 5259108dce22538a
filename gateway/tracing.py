"""OpenTelemetry tracing of chat completions: off unless the standard OTEL_* variables turn it on.

Spans: `chat.completion` (the request; its parent is the caller's W3C `traceparent`), `validate`,
`render_prompt`, `triton.preprocessing` (the unary pre-steps), `triton.engine_stream` (one per choice, with
a `first_token` event) and `response` (shaping the body or streaming the chunks). The trace context goes on
to Triton as gRPC metadata (`traceparent`), so Triton's own OpenTelemetry spans (`--trace-config
mode=opentelemetry`) join the same trace.

On when `OTEL_TRACES_EXPORTER` names exporters (`otlp`, `console`, comma-separated) and `OTEL_SDK_DISABLED`
is not true. `otlp` is OTLP over HTTP with the JSON encoding (`http/json`, what collectors accept on
`/v1/traces` beside protobuf): the protobuf exporters need a protobuf release that tritonclient does not
accept, so `OTEL_EXPORTER_OTLP_PROTOCOL` (or `_TRACES_PROTOCOL`) `http/protobuf` or `grpc` is refused with
an error in the log rather than silently changed. The SDK and the exporter read the rest themselves
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `_HEADERS`, `_TIMEOUT`, `_COMPRESSION`, `OTEL_SERVICE_NAME`,
`OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`…). Off, every helper here is a no-op that imports nothing and allocates
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger("gateway.tracing")

_tracer: Any = None  # an opentelemetry Tracer once configured; None = tracing off
_provider: Any = None  # the SDK TracerProvider that made it


def enabled() -> bool:
    return _tracer is not None


def configure(provider: Any) -> None:
    """Trace with `provider` (an SDK TracerProvider; tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("gateway")


def disable() -> None:
    """Stop tracing; the provider exports what it still holds and closes its exporters."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def flush(timeout_millis: int = 30_000) -> bool:
    """Export the finished spans now (a batch processor otherwise waits for a full batch or its delay)."""
    return _provider is None or bool(_provider.force_flush(timeout_millis))


def configure_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on if the OTEL_* variables ask for it; True when on.

    `environ` chooses the exporters; the SDK and the exporter read their own settings from `os.environ`."""
    names = environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if names in ("", "none") or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [e for e in (_exporter(n.strip(), environ) for n in names.split(",")) if e is not None]
    if not exporters:
        return False  # each refusal is logged; spans nobody exports would only cost time
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # Neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES named the service.
        resource = resource.merge(Resource({SERVICE_NAME: "gemma3-gateway"}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    configure(provider)
    return True


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    """The span exporter `OTEL_TRACES_EXPORTER` names (None, logged, for one this gateway cannot run)."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        log.error("unknown OTEL_TRACES_EXPORTER %r (otlp, console, none)", name)
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    )
    if protocol.strip().lower() not in ("", "http/json"):
        log.error("OTLP protocol %r is not installed: the gateway exports OTLP as http/json", protocol)
        return None
    from opentelemetry.exporter.otlp.json.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


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
