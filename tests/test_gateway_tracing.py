"""OpenTelemetry tracing (gateway/tracing.py) with the SDK's in-memory exporter: the spans of a chat
completion, the caller's `traceparent` as their parent, the context Triton gets, and off by default."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import tracing
from tests.fixtures.asgi import gateway_client
from tests.fixtures.backends import MODEL, Scripted, words

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
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
    assert root.parent is not None and f"{root.parent.span_id:016x}" == "b7ad6b7169203331"
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
