"""Gateway settings, read from environment variables (documented in docs/gateway.md).

Most variables are `GATEWAY_*`; the Triton address also honours the `TRITON_GRPC_URL` / `TRITON_GRPC_PORT`
names the rest of the project (Makefile, Triton launch scripts) already uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from gateway.reliability_settings import ReliabilitySettings
from gemma3_core import constants as C


# Admission, limits, auth and log settings come from ReliabilitySettings (gateway/reliability_settings.py).
class GatewaySettings(ReliabilitySettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", populate_by_name=True)

    # --- HTTP server ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "info"
    api_key: str | None = Field(
        default=None, description="if set, /v1/* requires `Authorization: Bearer <key>`"
    )

    # --- Triton --------------------------------------------------------------------------------
    triton_grpc_url: str | None = Field(
        default=None, validation_alias=AliasChoices("TRITON_GRPC_URL", "GATEWAY_TRITON_GRPC_URL")
    )
    triton_grpc_port: int = Field(default=8001, validation_alias=AliasChoices("TRITON_GRPC_PORT"))
    triton_model: str = "ensemble"
    triton_probe_timeout_s: float = Field(default=3.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0, description="wall-clock limit of one completion")
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    # --- served model --------------------------------------------------------------------------
    model_id: str = C.MODEL_CARD_ID
    # Extra names accepted in `model` and listed by /v1/models (comma-separated or a JSON list).
    model_aliases: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [C.MODEL_CARD_SLUG])
    tokenizer_dir: Path | None = None
    max_model_len: int = Field(default=131072, ge=1)
    default_max_tokens: int = Field(default=4096, ge=1)
    max_n: int = Field(default=8, ge=1)

    # Sampling defaults when the request leaves a field out (Gemma 3's generation_config.json:
    # top_k 64, top_p 0.95; OpenAI's temperature 1.0). Greedy requests ignore them.
    default_temperature: float = Field(default=1.0, ge=0, le=2)
    default_top_p: float = Field(default=0.95, gt=0, le=1)
    default_top_k: int = Field(default=64, ge=0)

    # --- images (gateway/images.py) ------------------------------------------------------------
    images_enabled: bool = True
    images_max_per_request: int = Field(default=16, ge=1)
    images_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    images_max_pixels: int = Field(default=40_000_000, ge=1)  # decoded width*height (decompression bombs)
    images_connect_timeout_s: float = Field(default=5.0, gt=0)
    images_read_timeout_s: float = Field(default=10.0, gt=0)
    images_fetch_timeout_s: float = Field(default=30.0, gt=0)  # whole fetch of one image, redirects included
    # Hosts / IPs / CIDRs that may be fetched although they resolve to private addresses (SSRF allow-list).
    images_allow_list: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # --- LoRA adapters (gateway/lora.py) ------------------------------------------------------
    lora_dir: Path | None = None  # one PEFT adapter per subdirectory; its name is a model id

    @field_validator("model_aliases", "images_allow_list", mode="before")
    @classmethod
    def _split_aliases(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [a.strip() for a in text.split(",") if a.strip()]
        return value

    @model_validator(mode="after")
    def _default_url(self) -> GatewaySettings:
        if not self.triton_grpc_url:
            self.triton_grpc_url = f"localhost:{self.triton_grpc_port}"
        return self

    @property
    def grpc_url(self) -> str:
        assert self.triton_grpc_url is not None  # filled by _default_url
        return self.triton_grpc_url

    @property
    def served_model_ids(self) -> list[str]:
        """The deployment id first, then the aliases (deduplicated, order kept)."""
        return list(dict.fromkeys([self.model_id, *self.model_aliases]))
