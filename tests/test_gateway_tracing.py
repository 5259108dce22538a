"""OpenTelemetry tracing (gateway/tracing.py) with the SDK's in-memory exporter: the spans of a chat
completion, the caller's `traceparent` as their parent, the context Triton gets, and off by default; and
with OTEL_TRACES_EXPORTER=otlp, the same spans arriving at an OTLP/HTTP receiver (tests/fixtures/otlp.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import tracing
from tests.fixtures.asgi import gateway_client
from tests.fixtures.backends import MODEL, Scripted, words
from tests.fixtures.otlp import OTLPReceiver

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.configure(provider)
    yield memory
    tracing.disable()


@pytest.mark.parametrize("stream", [False, True])
async def test_spans_of_a_completion(exporter: InMemorySpanExporter, stream: bool) -> None:
    client, _ = gateway_client(Scripted(words("Hel", "lo")))
    async with client:
        response = await client.post(
            "/v1/chat/completions", json={**ASK, "stream": stream}, headers={"traceparent": TRACEPARENT}
        )
        assert response.status_code == 200
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) >= {"chat.completion", "validate", "render_prompt", "triton.engine_stream", "response"}
    root = spans["chat.completion"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID  # the caller's trace continues
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_SPAN_ID
    for name in ("validate", "render_prompt", "triton.engine_stream", "response"):
        assert spans[name].context.trace_id == root.context.trace_id
        assert spans[name].parent is not None and spans[name].parent.span_id == root.context.span_id, name
    assert [e.name for e in spans["triton.engine_stream"].events] == ["first_token"]
    assert root.end_time >= spans["response"].end_time


async def test_a_rejected_request_still_ends_its_span(exporter: InMemorySpanExporter) -> None:
    client, _ = gateway_client(Scripted(words("x")))
    async with client:
        response = await client.post("/v1/chat/completions", json={**ASK, "temperature": 9})
        assert response.status_code == 400
    names = [s.name for s in exporter.get_finished_spans()]
    assert "chat.completion" in names and "validate" in names and "triton.engine_stream" not in names


def test_triton_gets_the_trace_context(exporter: InMemorySpanExporter) -> None:
    with tracing.request_span({"traceparent": TRACEPARENT}) as root, tracing.span("triton.preprocessing"):
        headers = tracing.grpc_headers()
    tracing.end(root)
    assert headers is not None and headers["traceparent"].split("-")[1] == TRACE_ID


def test_off_by_default() -> None:
    assert not tracing.configure_from_env({})
    assert not tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.enabled() and tracing.grpc_headers() is None
    with tracing.span("validate") as span:
        assert span is None


def test_console_exporter_from_env() -> None:
    try:
        assert tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "console"})
        assert tracing.enabled()
    finally:
        tracing.disable()


# What this process's environment might set that would change where or whether the test's spans go.
UNSET = (
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
)


@pytest.mark.parametrize(
    ("stream", "service_name"), [(False, "gateway-under-test"), (True, None)], ids=["body", "stream"]
)
async def test_spans_reach_an_otlp_collector(
    monkeypatch: pytest.MonkeyPatch, stream: bool, service_name: str | None
) -> None:
    """The app turns tracing on from the standard variables alone, and the exporter's own handling of the
    endpoint, headers and service name gets the spans to the collector, traceparent continued."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    with OTLPReceiver() as collector:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=s3cret")
        if service_name:
            monkeypatch.setenv("OTEL_SERVICE_NAME", service_name)
        try:
            client, _ = gateway_client(Scripted(words("Hel", "lo")))  # create_app reads the variables
            assert tracing.enabled()
            async with client:
                response = await client.post(
                    "/v1/chat/completions",
                    json={**ASK, "stream": stream},
                    headers={"traceparent": TRACEPARENT},
                )
                assert response.status_code == 200
            assert tracing.flush()
        finally:
            tracing.disable()
    assert collector.rejected == []
    assert collector.exports, "the collector received nothing"
    for export in collector.exports:
        assert export.headers["x-collector-token"] == "s3cret"
    received = collector.spans()
    spans = {s.span.name: s for s in received}
    assert set(spans) >= {"chat.completion", "validate", "render_prompt", "triton.engine_stream", "response"}
    assert {s.trace_id for s in received} == {TRACE_ID}  # the caller's trace continues
    root = spans["chat.completion"].span
    assert root.parent_span_id.hex() == PARENT_SPAN_ID and root.kind == Span.SPAN_KIND_SERVER
    for name in ("validate", "render_prompt", "triton.engine_stream", "response"):
        assert spans[name].span.parent_span_id == root.span_id, name
    assert [e.name for e in spans["triton.engine_stream"].span.events] == ["first_token"]
    assert {s.resource["service.name"]["stringValue"] for s in received} == {service_name or "gemma3-gateway"}


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"])
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_protocols_not_installed_are_refused(
    caplog: pytest.LogCaptureFixture, variable: str, protocol: str
) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.tracing"):
        assert not tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "otlp", variable: protocol})
    assert not tracing.enabled()
    assert f"OTLP protocol {protocol!r} is not installed" in caplog.text
    try:
        assert tracing.configure_from_env({"OTEL_TRACES_EXPORTER": "otlp", variable: "http/json"})
    finally:
        tracing.disable()
