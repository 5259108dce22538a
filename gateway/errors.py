"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure returned.

Exception handlers turn FastAPI/Starlette's own errors (bad JSON, unknown route, wrong method) into the same
shape, and an unexpected exception into a 500 that carries no internals (they go to the log).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.triton.errors import TritonError

log = logging.getLogger("gateway")

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"
TIMEOUT = "timeout_error"
RATE_LIMIT = "rate_limit_error"  # OpenAI's type for 429s; code "rate_limit_exceeded"


class APIError(Exception):
    """An error the client sees as-is (status code + OpenAI error body)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, available: list[str] | None = None) -> APIError:
    """404 for an unknown `model`; `available` lists the served ids when the caller wants them named."""
    listed = f". Available: {', '.join(available)}" if available else ""
    return APIError(404, f"The model '{model}' does not exist{listed}", param="model", code="model_not_found")


def model_card(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    """One `/v1/models` entry; adapters name their base model as `parent` and `root`."""
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": "gateway"}
    if parent is not None:
        card.update(parent=parent, root=parent)
    return card


def rate_limited(message: str, retry_after_s: int) -> APIError:
    return APIError(
        429, message, type=RATE_LIMIT, code="rate_limit_exceeded", headers={"Retry-After": str(retry_after_s)}
    )


def triton_api_error(exc: TritonError) -> APIError:
    """Triton's failure classes as HTTP answers (kinds compared by value, so a string enum works too)."""
    kind = str(exc.kind)
    if kind == "unavailable":
        return APIError(
            503, exc.message, type=UNAVAILABLE, code="triton_unavailable", headers={"Retry-After": "5"}
        )
    if kind == "timeout":
        return APIError(504, exc.message, type=TIMEOUT, code="timeout")
    if kind == "unsupported":  # the request needs an ensemble input this deployment lacks
        return bad_request(exc.message, None, "unsupported_parameter")
    if kind == "overloaded":  # Triton's max_queue_size: the same back-pressure answer as admission's
        return rate_limited(f"Rate limit reached: {exc.message}. Please retry later.", 1)
    return APIError(500, f"Inference failed: {exc.message[:500]}", type=SERVER_ERROR, code="inference_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Documents the error body in the OpenAPI schema."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "the gateway or the engine queue is at capacity (`Retry-After`)"),
        (500, "internal error"),
        (503, "Triton unreachable or not ready"),
        (504, "request timed out"),
    ]
}


class ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: an error message may quote client input that is not valid UTF-8 text."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSONResponse(status_code=status, content=body, headers=headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _json(exc.status, exc.body(), exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    # Only reachable for routes with declared parameters; the chat body is validated by jsonschema.
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    message = str(first.get("msg", "invalid request"))
    return _json(400, error_body(message, INVALID_REQUEST, ".".join(loc) or None))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        body = error_body("Not found", NOT_FOUND, None, "not_found")
    elif status == 405:
        body = error_body("Method not allowed", INVALID_REQUEST, None, "method_not_allowed")
    else:
        kind = INVALID_REQUEST if status < 500 else SERVER_ERROR
        body = error_body(str(exc.detail), kind)
    return _json(status, body, getattr(exc, "headers", None))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _json(500, error_body("Internal server error", SERVER_ERROR, None, "internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
