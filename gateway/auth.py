"""Bearer API keys: several keys (`GATEWAY_API_KEYS`, plus the single `GATEWAY_API_KEY`), compared in
constant time; /v1/* always, /health/* and /metrics when their setting says so. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import Request

from gateway.errors import AUTHENTICATION, APIError
from gateway.settings import GatewaySettings


def _digest(key: str) -> bytes:
    # Comparing fixed-size digests makes the time independent of the keys' lengths as well.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyChecker:
    def __init__(self, settings: GatewaySettings) -> None:
        keys = [*settings.api_keys, *([settings.api_key] if settings.api_key else [])]
        self._digests = [_digest(k) for k in dict.fromkeys(keys) if k]

    def valid(self, token: str) -> bool:
        given = _digest(token)
        ok = False
        for digest in self._digests:  # no early exit: which key matched must not show in the timing
            ok |= hmac.compare_digest(given, digest)
        return ok

    def check(self, request: Request) -> None:
        """Raise the OpenAI-shaped 401 unless the request carries a valid `Authorization: Bearer` key."""
        if not self._digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.valid(token.strip()):
            raise APIError(
                401,
                "Incorrect or missing API key",
                type=AUTHENTICATION,
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
