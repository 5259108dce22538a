"""Settings of the reliability layer (admission, limits, auth, logs); `GatewaySettings` inherits them.

Kept apart from gateway/settings.py so this layer can grow without touching the core settings; every
variable is `GATEWAY_*` and documented in docs/gateway.md.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ReliabilitySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", populate_by_name=True)

    # --- auth (the single `GATEWAY_API_KEY` lives in GatewaySettings; both sets of keys are accepted) -------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer keys, comma-separated or a JSON list"
    )
    auth_health: bool = Field(default=False, description="also require a key on /health/*")
    auth_metrics: bool = Field(default=False, description="also require a key on /metrics")

    # --- admission: bounded concurrency and a bounded wait queue, 429 beyond them ------------------------
    max_concurrent_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=128, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for a slot before 429")
    retry_after_s: int = Field(default=1, ge=0)

    # --- request limits (400 unless noted; the body size cap, 413, is `max_request_bytes`) ---------------
    max_messages: int = Field(default=1024, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="unset: the context length")
    max_completion_tokens: int = Field(default=32768, ge=1, description="largest accepted max_tokens")
    # The image count limit is `images_max_per_request` (GatewaySettings, enforced by the image fetcher).

    # --- logs ---------------------------------------------------------------------------------------------
    log_format: str = Field(default="json", pattern="^(json|text)$")
    log_prompts: bool = Field(default=False, description="debug: log rendered prompts (contain user data)")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [k.strip() for k in text.split(",") if k.strip()]
        return value
