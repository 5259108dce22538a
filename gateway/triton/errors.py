"""Triton failures, classified so the HTTP layer can answer 429/503/504/500."""

from __future__ import annotations

import sys
from enum import Enum

import grpc
from tritonclient.utils import InferenceServerException

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - the images run 3.11+

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class ErrorKind(StrEnum):
    UNAVAILABLE = "unavailable"  # Triton unreachable, or the model not loaded
    TIMEOUT = "timeout"  # the gateway's request timeout
    OVERLOADED = "overloaded"  # Triton's queue is full
    UNSUPPORTED = "unsupported"  # the request needs an input this deployment lacks
    ENGINE = "engine"  # anything else the server reports


class TritonError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message


def queue_full(message: str) -> TritonError | None:
    # Triton's queue policy (max_queue_size) rejects with "Exceeds maximum queue size" under status
    # UNAVAILABLE; it is back-pressure, not an outage, so it becomes a 429 like the gateway's own limit.
    lowered = message.lower()
    if "maximum queue size" in lowered or "queue full" in lowered or "queue is full" in lowered:
        return TritonError(ErrorKind.OVERLOADED, "the inference server's queue is full")
    return None


def rpc_error(exc: grpc.aio.AioRpcError, url: str) -> TritonError:
    code = exc.code()
    overloaded = queue_full(str(exc.details() or ""))
    if overloaded is not None:
        return overloaded
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TritonError(ErrorKind.TIMEOUT, "the request exceeded the gateway's timeout")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return TritonError(ErrorKind.UNAVAILABLE, f"Triton at {url} is unreachable ({code.name.lower()})")
    return TritonError(ErrorKind.ENGINE, f"Triton error {code.name}: {exc.details()}")


def server_error(exc: InferenceServerException, url: str) -> TritonError:
    status = str(exc.status() or "")
    message = str(exc.message() or exc)
    overloaded = queue_full(message)
    if overloaded is not None:
        return overloaded
    if any(s in status for s in ("UNAVAILABLE", "DEADLINE", "NOT_FOUND")):
        return TritonError(
            ErrorKind.UNAVAILABLE, f"Triton at {url} is unreachable or the model is not loaded"
        )
    if "unknown model" in message.lower() or "is not ready" in message.lower():
        return TritonError(
            ErrorKind.UNAVAILABLE, f"Triton at {url}: the model is not ready ({message[:200]})"
        )
    return TritonError(ErrorKind.ENGINE, f"Triton error: {message}")
