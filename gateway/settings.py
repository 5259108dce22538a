"""Gateway settings, read from environment variables (documented in docs/gateway.md).

Most variables are `GATEWAY_*`; the Triton address also honours the `TRITON_GRPC_URL` / `TRITON_GRPC_PORT`
names the rest of the project (Makefile, Triton launch scripts) already uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gemma3_core import constants as C
from gemma3_core.images import DEFAULT_MAX_PIXELS
from gemma3_core.tool_prompt import DEFAULT_MAX_CALLS


def _csv_or_json_list(value: object) -> object:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


# A list variable: comma-separated (`a,b`) or a JSON list (`["a", "b"]`); empty means none.
StrList = Annotated[list[str], NoDecode, BeforeValidator(_csv_or_json_list)]


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", populate_by_name=True)

    # --- HTTP server ---------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="larger bodies get a 413")
    # Worker processes (`python -m gateway`); more than one turns on prometheus_client's multiprocess
    # mode and splits the admission limits between the workers (worker_admission).
    workers: int = Field(default=1, ge=1, le=64)
    # uvicorn's supervisor kills a worker that misses a ping for this long; its default (5 s) kills workers
    # that are loading the tokenizer on a busy machine.
    worker_healthcheck_timeout_s: int = Field(default=60, ge=1)

    # --- auth: `api_key` and `api_keys` are all accepted -----------------------------------------
    api_key: str | None = Field(
        default=None, description="if set, /v1/* requires `Authorization: Bearer <key>`"
    )
    api_keys: StrList = Field(default_factory=list, description="accepted bearer keys")
    auth_health: bool = Field(default=False, description="also require a key on /health/*")
    auth_metrics: bool = Field(default=False, description="also require a key on /metrics")

    # --- logs ----------------------------------------------------------------------------------
    log_level: str = "info"
    log_format: str = Field(default="json", pattern="^(json|text)$")
    log_prompts: bool = Field(default=False, description="debug: log rendered prompts (contain user data)")

    # --- Triton --------------------------------------------------------------------------------
    # `host:port`, several `host:port,host:port`, or `dns:///name:port` (every address the name resolves
    # to, re-resolved every `triton_resolve_interval_s`): gateway/triton/pool.py.
    triton_grpc_url: str | None = Field(
        default=None, validation_alias=AliasChoices("TRITON_GRPC_URL", "GATEWAY_TRITON_GRPC_URL")
    )
    triton_resolve_interval_s: float = Field(
        default=2.0, gt=0, description="how often a DNS target is re-resolved and down backends re-probed"
    )
    triton_max_backend_labels: int = Field(
        default=32, ge=1, description="distinct `backend` metric labels; further backends share `other`"
    )
    triton_grpc_port: int = Field(default=8001, validation_alias=AliasChoices("TRITON_GRPC_PORT"))
    triton_model: str = "ensemble"
    triton_probe_timeout_s: float = Field(default=3.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0, description="wall-clock limit of one completion")

    # --- admission: bounded concurrency and a bounded wait queue, 429 beyond them --------------
    max_concurrent_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=128, ge=0)
    queue_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for a slot before 429")
    retry_after_s: int = Field(default=1, ge=0)

    # --- served model --------------------------------------------------------------------------
    model_id: str = C.MODEL_CARD_ID
    # Extra names accepted in `model` and listed by /v1/models (comma-separated or a JSON list).
    model_aliases: StrList = Field(default_factory=lambda: [C.MODEL_CARD_SLUG])
    tokenizer_dir: Path | None = None
    max_model_len: int = Field(default=131072, ge=1)
    default_max_tokens: int = Field(default=4096, ge=1)
    max_n: int = Field(default=8, ge=1)
    # Calls a forced tool_choice ("required") may make in one reply; enforced by the guided grammar.
    max_tool_calls: int = Field(default=DEFAULT_MAX_CALLS, ge=1, le=128)

    # --- request limits (gateway/limits.py; 400s) ----------------------------------------------
    max_messages: int = Field(default=1024, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1, description="unset: the context length")
    max_completion_tokens: int = Field(default=32768, ge=1, description="largest accepted max_tokens")

    # Sampling defaults when the request leaves a field out (Gemma 3's generation_config.json:
    # top_k 64, top_p 0.95; OpenAI's temperature 1.0). Greedy requests ignore them.
    default_temperature: float = Field(default=1.0, ge=0, le=2)
    default_top_p: float = Field(default=0.95, gt=0, le=1)
    default_top_k: int = Field(default=64, ge=0)
    # Tokens per KV-cache block of the engine (TensorRT-LLM's default; the GPU build keeps it): reused
    # blocks times this is `usage.prompt_tokens_details.cached_tokens`.
    kv_cache_tokens_per_block: int = Field(default=32, ge=1)

    # --- images (gateway/images.py; the fetch policy is built from these) ------------------------
    images_enabled: bool = True
    images_max_per_request: int = Field(default=16, ge=1)
    images_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    # Decoded width*height (decompression bombs). Preprocessing refuses larger images, so the gateway
    # may not allow more than it does: a too-large image must be a 400 here, not an engine error.
    images_max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, le=DEFAULT_MAX_PIXELS)
    images_connect_timeout_s: float = Field(default=5.0, gt=0)
    images_read_timeout_s: float = Field(default=10.0, gt=0)
    images_fetch_timeout_s: float = Field(default=30.0, gt=0)  # whole fetch of one image, redirects included
    # Hosts / IPs / CIDRs that may be fetched although they resolve to private addresses (SSRF allow-list).
    images_allow_list: StrList = Field(default_factory=list)

    # --- LoRA adapters (gateway/lora.py) ------------------------------------------------------
    lora_dir: Path | None = None  # one PEFT adapter per subdirectory; its name is a model id

    @model_validator(mode="after")
    def _default_url(self) -> GatewaySettings:
        if not self.triton_grpc_url:
            self.triton_grpc_url = f"localhost:{self.triton_grpc_port}"
        return self

    @property
    def grpc_url(self) -> str:
        assert self.triton_grpc_url is not None  # filled by _default_url
        return self.triton_grpc_url

    def worker_admission(self) -> tuple[int, int]:
        """(concurrent, queued) one worker admits: its share of the gateway's limits, rounded up so the
        workers together admit at least the configured limit (at most `workers - 1` more)."""
        w = self.workers
        return -(-self.max_concurrent_requests // w), -(-self.max_queued_requests // w)

    @property
    def served_model_ids(self) -> list[str]:
        """The deployment id first, then the aliases (deduplicated, order kept)."""
        return list(dict.fromkeys([self.model_id, *self.model_aliases]))
