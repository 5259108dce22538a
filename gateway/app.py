"""The FastAPI application: routes, lifecycle and OpenAPI document.

Data flow of `POST /v1/chat/completions`: raw body → validation (jsonschema) → prompt (gemma3_core template)
→ Triton streams (gateway/triton) → JSON body or SSE (chat, sse). `/v1/completions` (completions.py) and
`/v1/responses` (responses_api.py) differ only in their prompt and response shape; they share the rest.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from gateway import tracing
from gateway.auth import KeyChecker
from gateway.chat import ChatService
from gateway.completions import handle_completion
from gateway.errors import ERROR_RESPONSES, APIError, install_error_handlers, model_card, model_not_found
from gateway.logs import AccessLogMiddleware
from gateway.lora import LoraService
from gateway.metrics import GatewayMetrics, RequestCounterMiddleware, worker_exited
from gateway.responses_api import handle_responses
from gateway.settings import GatewaySettings
from gateway.triton.client import GenerationBackend, TritonStreamClient
from gateway.triton.pool import BackendPool, Targets
from gateway.validation import CHAT_SCHEMA, COMPLETION_SCHEMA, RESPONSES_SCHEMA, load_schema

log = logging.getLogger("gateway")

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESPONSES_PATH = "/v1/responses"
ROUTES = (
    CHAT_PATH,
    COMPLETIONS_PATH,
    RESPONSES_PATH,
    "/v1/models",
    "/health/live",
    "/health/ready",
    "/metrics",
    "/docs",
    "/openapi.json",
)


class GatewayState:
    """Per-app resources; created lazily so the app also works without lifespan events (ASGI test clients)."""

    def __init__(
        self, settings: GatewaySettings, backend: GenerationBackend | None, tokenizer: Any | None = None
    ) -> None:
        self.settings = settings
        self._backend = backend
        self._tokenizer = tokenizer
        self._byte_detokenizer: Any = None
        self.metrics = GatewayMetrics(settings.model_id)
        self.started = int(time.time())
        self._chat: ChatService | None = None
        self.lora = LoraService.from_settings(settings)  # None without GATEWAY_LORA_DIR

    @property
    def backend(self) -> GenerationBackend:
        if self._backend is None:
            s = self.settings
            loader = self._detokenizer if self.has_tokenizer else None

            def client(address: str) -> GenerationBackend:
                return TritonStreamClient(
                    address,
                    s.triton_model,
                    s.triton_probe_timeout_s,
                    s.request_timeout_s,
                    detokenizer_loader=loader,
                )

            self._backend = BackendPool(
                Targets.parse(s.grpc_url, s.triton_grpc_port),
                client,
                self.metrics,
                s.triton_resolve_interval_s,
                s.triton_max_backend_labels,
            )
        return self._backend

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None or self.settings.tokenizer_dir is not None

    def _detokenizer(self) -> Any:
        # One table for every backend's client (built once, read-only afterwards).
        if self._byte_detokenizer is None:
            from gemma3_core.detokenize import ByteDetokenizer

            self._byte_detokenizer = ByteDetokenizer(self.tokenizer())
        return self._byte_detokenizer

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from gemma3_core.tokenizer import load_tokenizer

            assert self.settings.tokenizer_dir is not None
            self._tokenizer = load_tokenizer(self.settings.tokenizer_dir)
        return self._tokenizer

    @property
    def chat(self) -> ChatService:
        if self._chat is None:
            loader = self.tokenizer if self.has_tokenizer else None
            self._chat = ChatService(self.settings, self.backend, self.metrics, loader, lora=self.lora)
        return self._chat

    async def aclose(self) -> None:
        await self.backend.close()
        if self._chat is not None:
            await self._chat.aclose()  # the image fetcher's HTTP client


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, read once with a size cap (413 beyond it)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"Request body exceeds {limit} bytes", code="request_too_large")
    size = 0
    chunks: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body exceeds {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# Request body component → the schema file the gateway validates that endpoint with.
REQUEST_SCHEMAS = {
    "ChatCompletionRequest": CHAT_SCHEMA,
    "CompletionRequest": COMPLETION_SCHEMA,
    "ResponsesRequest": RESPONSES_SCHEMA,
}


def _openapi_with_request_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request schemas (the same files the gateway validates with)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    all_schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for component, name in REQUEST_SCHEMAS.items():
        schema = copy.deepcopy(load_schema(name))
        all_schemas.update(schema.pop("components", {}).get("schemas", {}))
        schema.pop("$schema", None)
        all_schemas[component] = schema
    app.openapi_schema = doc
    return doc


def _body(component: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{component}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def create_app(
    settings: GatewaySettings | None = None,
    backend: GenerationBackend | None = None,
    tokenizer: Any | None = None,
) -> FastAPI:
    """The gateway app; `backend` and `tokenizer` replace Triton and GATEWAY_TOKENIZER_DIR in tests."""
    settings = settings or GatewaySettings()
    state = GatewayState(settings, backend, tokenizer)
    if not tracing.enabled():
        tracing.configure_from_env()  # off unless OTEL_TRACES_EXPORTER names an exporter

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.has_tokenizer:
            state.tokenizer()  # a wrong GATEWAY_TOKENIZER_DIR should stop the start, not the first request
        ready, reason = await state.backend.ready()
        log.info("gateway for %s → Triton %s (%s)", settings.model_id, settings.grpc_url, reason)
        if not ready:
            log.warning("Triton not ready yet: %s (the gateway keeps retrying per request)", reason)
        try:
            yield
        finally:
            await state.aclose()
            worker_exited(os.getpid())

    app = FastAPI(
        title="Gemma 3 OpenAI-compatible gateway",
        version="0.1.0",
        description="OpenAI Chat Completions, Completions and Responses in front of Triton + TensorRT-LLM "
        "serving Gemma 3.",
        lifespan=lifespan,
    )
    app.state.gateway = state
    install_error_handlers(app)
    app.add_middleware(RequestCounterMiddleware, metrics=state.metrics, routes=ROUTES)
    app.add_middleware(AccessLogMiddleware)  # outermost: request id + access log for every response
    app.openapi = lambda: _openapi_with_request_schema(app)  # type: ignore[method-assign]

    keys = KeyChecker(settings)

    async def require_api_key(request: Request) -> None:
        keys.check(request)

    auth = [Depends(require_api_key)]
    health_auth = auth if settings.auth_health else []
    metrics_auth = auth if settings.auth_metrics else []

    @app.post(
        CHAT_PATH,
        dependencies=auth,
        responses={
            200: {
                "description": "a `chat.completion` object, or an SSE stream of `chat.completion.chunk`s",
                "content": {"text/event-stream": {}},
            },
            **ERROR_RESPONSES,
        },
        openapi_extra=_body("ChatCompletionRequest"),
        summary="Create a chat completion",
    )
    async def chat_completions(request: Request) -> Response:
        raw = await _read_body(request, settings.max_request_bytes)
        return await state.chat.handle(raw, request)

    @app.post(
        COMPLETIONS_PATH,
        dependencies=auth,
        responses={
            200: {
                "description": "a `text_completion` object, or an SSE stream of them",
                "content": {"text/event-stream": {}},
            },
            **ERROR_RESPONSES,
        },
        openapi_extra=_body("CompletionRequest"),
        summary="Create a completion (legacy: raw prompt, no chat template)",
    )
    async def completions(request: Request) -> Response:
        raw = await _read_body(request, settings.max_request_bytes)
        return await handle_completion(state.chat, raw, request)

    @app.post(
        RESPONSES_PATH,
        dependencies=auth,
        responses={
            200: {
                "description": "a `response` object, or an SSE stream of Responses events",
                "content": {"text/event-stream": {}},
            },
            **ERROR_RESPONSES,
        },
        openapi_extra=_body("ResponsesRequest"),
        summary="Create a model response (stateless Responses API)",
    )
    async def responses(request: Request) -> Response:
        raw = await _read_body(request, settings.max_request_bytes)
        return await handle_responses(state.chat, raw, request)

    @app.get("/v1/models", dependencies=auth, summary="List the served model ids")
    async def list_models() -> dict[str, Any]:
        adapters = state.lora.model_cards(state.started) if state.lora is not None else []
        return {
            "object": "list",
            "data": [model_card(m, state.started) for m in settings.served_model_ids] + adapters,
        }

    @app.get(
        "/v1/models/{model_id:path}", dependencies=auth, responses=ERROR_RESPONSES, summary="Retrieve a model"
    )
    async def get_model(model_id: str) -> dict[str, Any]:
        if state.lora is not None:
            card = next((c for c in state.lora.model_cards(state.started) if c["id"] == model_id), None)
            if card is not None:
                return card
        if model_id not in settings.served_model_ids:
            raise model_not_found(model_id)
        return model_card(model_id, state.started)

    @app.get("/health/live", dependencies=health_auth, summary="The gateway process is up")
    async def live() -> dict[str, str]:
        return {"status": "live"}

    @app.get("/health/ready", dependencies=health_auth, summary="Triton and the ensemble are ready")
    async def ready() -> JSONResponse:
        ok, reason = await state.backend.ready()
        body = {"status": "ready" if ok else "unavailable", "triton": settings.grpc_url, "reason": reason}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=metrics_auth, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def create_worker_app() -> FastAPI:
    """The app of one worker process of `python -m gateway` (settings and logging from the environment)."""
    from gateway.logs import configure_logging

    settings = GatewaySettings()
    configure_logging(settings.log_level, settings.log_format)
    # `access_log=False` only silences uvicorn's access logger in the supervisor process; a spawned worker
    # gets a fresh one (AccessLogMiddleware writes the access log, with request ids).
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    return create_app(settings)
