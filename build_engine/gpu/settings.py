"""Pinned versions, engine profiles and the paths every GPU stage reads and writes.

One NGC tag for everything (build, serve, bench): engines are tied to the TensorRT-LLM/TensorRT version and
the GPU's SM, so the image that builds them must be the image that serves them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gemma3_core import constants as C

# --- the one pinned image -------------------------------------------------------------------------
# 26.07 ships TensorRT-LLM 1.2.1, TensorRT 10.14.1.48, CUDA 13.1, driver >= 590.44.01
# (triton-inference-server/server docs/introduction/compatibility.md).
TRITON_IMAGE_TAG = "26.07"
TRTLLM_VERSION = "1.2.1"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_IMAGE_TAG}-trtllm-python-py3"
SDK_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_IMAGE_TAG}-py3-sdk"
MIN_DRIVER = "590.44.01"

DEFAULT_WORK_DIR = Path("/engines")


@dataclass(frozen=True)
class EngineProfile:
    """Build-time limits (trtllm-build) plus the serving knobs that belong with them (config.pbtxt)."""

    name: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    # Tokens per engine step; with chunked context this is also the prefill chunk size.
    max_num_tokens: int
    max_images_per_request: int
    kv_cache_free_gpu_mem_fraction: float
    batch_scheduler_policy: str  # guaranteed_no_evict | max_utilization
    enable_chunked_context: bool = True
    enable_kv_cache_reuse: bool = True
    vision_max_batch_size: int = 8
    preprocessing_instance_count: int = 4
    postprocessing_instance_count: int = 4
    max_queue_delay_microseconds: int = 0
    max_queue_size: int = 0

    @property
    def max_prompt_embedding_table_size(self) -> int:
        # The runtime allows max_prompt_embedding_table_size / max_batch_size rows per request, so size it
        # for the most images one request may carry (256 soft tokens each).
        return self.max_batch_size * self.max_images_per_request * C.MM_TOKENS_PER_IMAGE

    def attention_window(self, arch: C.TextArch = C.GEMMA3_27B) -> list[int]:
        """Per-layer window list (one period; TensorRT-LLM repeats it over the 62 layers)."""
        return arch.attention_window_pattern(self.max_seq_len)

    def check(self) -> None:
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"profile {self.name}: max_input_len > max_seq_len")
        if self.max_seq_len > C.GEMMA3_27B.max_position_embeddings:
            raise ValueError(f"profile {self.name}: max_seq_len beyond the model's 128k positions")
        if self.batch_scheduler_policy not in ("guaranteed_no_evict", "max_utilization"):
            raise ValueError(f"profile {self.name}: unknown batch_scheduler_policy")
        if self.enable_chunked_context and self.max_num_tokens % 64:
            raise ValueError(f"profile {self.name}: max_num_tokens should be a multiple of 64 for chunking")


PROFILES: dict[str, EngineProfile] = {
    # Few concurrent users, the full 128k context, no eviction: predictable time-to-first-token.
    "latency": EngineProfile(
        name="latency",
        max_batch_size=8,
        max_input_len=126_976,
        max_seq_len=131_072,
        max_num_tokens=8192,
        max_images_per_request=8,
        kv_cache_free_gpu_mem_fraction=0.90,
        batch_scheduler_policy="guaranteed_no_evict",
    ),
    # Many short/medium conversations: bigger batch, 32k context; the scheduler may pause requests to
    # keep the GPU full.
    "throughput": EngineProfile(
        name="throughput",
        max_batch_size=64,
        max_input_len=30_720,
        max_seq_len=32_768,
        max_num_tokens=16_384,
        max_images_per_request=4,
        kv_cache_free_gpu_mem_fraction=0.92,
        batch_scheduler_policy="max_utilization",
        vision_max_batch_size=16,
        preprocessing_instance_count=8,
        postprocessing_instance_count=8,
    ),
}
for _p in PROFILES.values():
    _p.check()


# Gemma 3 is trained in bf16 and its activations overflow fp16 (inf/NaN in the residual stream), so the
# engine is bf16 only; the W4A16 kernels with bf16 activations need compute capability 8.0 (Ampere) or newer.
SUPPORTED_DTYPES = ("bfloat16",)
TRITON_DTYPES = {"bfloat16": "TYPE_BF16"}
MIN_COMPUTE_CAPABILITY = (8, 0)


class UnsupportedDtype(ValueError):
    pass


def check_dtype(dtype: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise UnsupportedDtype(
            f"dtype {dtype!r} is not supported: Gemma 3 overflows in float16, so the engine is built in "
            "bfloat16 only (needs an sm80+ GPU: A100, L40S, H100, H200, B200, ...)"
        )


@dataclass(frozen=True)
class BuildSettings:
    work_dir: Path = DEFAULT_WORK_DIR
    model_id: str = C.MODEL_CARD_ID
    revision: str | None = None
    profile: EngineProfile = PROFILES["latency"]
    tp_size: int = 1
    dtype: str = "bfloat16"
    lora_dirs: tuple[Path, ...] = ()
    max_lora_rank: int = 64
    guided_decoding: bool = True

    def __post_init__(self) -> None:
        check_dtype(self.dtype)

    @property
    def triton_dtype(self) -> str:
        """The engine dtype as Triton names it: prompt tables and LoRA weights must travel in it."""
        return TRITON_DTYPES[self.dtype]

    # --- layout of the work volume ----------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "hf" / self.model_id.replace("/", "--")

    @property
    def inspect_dir(self) -> Path:
        return self.work_dir / "inspect"

    @property
    def trtllm_checkpoint_dir(self) -> Path:
        return self.work_dir / "trtllm-checkpoint" / f"{self.dtype}-tp{self.tp_size}"

    @property
    def engine_dir(self) -> Path:
        suffix = "-lora" if self.lora_dirs else ""
        return self.work_dir / "engines" / f"{self.profile.name}-tp{self.tp_size}{suffix}"

    @property
    def vision_dir(self) -> Path:
        return self.work_dir / "vision" / f"bs{self.profile.vision_max_batch_size}"

    @property
    def tokenizer_info_dir(self) -> Path:
        return self.work_dir / "tokenizer-info"

    @property
    def repository_dir(self) -> Path:
        return self.work_dir / "model_repository" / f"{self.profile.name}-tp{self.tp_size}"

    @property
    def tokenizer_dir(self) -> Path:
        return self.checkpoint_dir

    def describe(self) -> dict[str, object]:
        """Everything a stage's output depends on, for stamps and logs."""
        return {
            "image": TRITON_IMAGE,
            "model_id": self.model_id,
            "revision": self.revision,
            "profile": dataclasses.asdict(self.profile),
            "tp_size": self.tp_size,
            "dtype": self.dtype,
            "lora_dirs": [str(p) for p in self.lora_dirs],
            "max_lora_rank": self.max_lora_rank,
            "guided_decoding": self.guided_decoding,
        }

    def to_json(self) -> str:
        return json.dumps(self.describe(), indent=2, sort_keys=True)


def _env_bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


# The variables `.env` (see .env.example) sets for the builder, with the default each takes when unset.
# .env.example lists exactly these with these values (a test checks it), so the two cannot drift.
ENV_DEFAULTS: dict[str, str] = {
    "TRITON_IMAGE_TAG": TRITON_IMAGE_TAG,
    "MODEL_ID": C.MODEL_CARD_ID,
    "MODEL_REVISION": "",
    "ENGINE_PROFILE": "latency",
    "TP_SIZE": "1",
    "LORA_DIRS": "",
    "MAX_LORA_RANK": "64",
    "GUIDED_DECODING": "1",
    "ENGINE_DTYPE": "bfloat16",
}


def settings_from_env(env: dict[str, str] | None = None, **overrides: object) -> BuildSettings:
    """Settings from the compose `.env` variables, with explicit CLI overrides winning."""
    given = dict(os.environ if env is None else env)
    env = {**ENV_DEFAULTS, **{k: v for k, v in given.items() if v != ""}}
    profile_name = str(overrides.pop("profile", None) or env["ENGINE_PROFILE"])
    if profile_name not in PROFILES:
        raise ValueError(f"unknown engine profile {profile_name!r}; choose one of {sorted(PROFILES)}")
    given_lora = overrides.pop("lora_dirs", None)
    if given_lora is None:
        lora = tuple(Path(p) for p in env["LORA_DIRS"].split(",") if p.strip())
    elif isinstance(given_lora, (list, tuple)):
        lora = tuple(Path(p) for p in given_lora)
    else:
        raise TypeError(f"lora_dirs must be a sequence of paths, got {given_lora!r}")
    values: dict[str, object] = {
        "work_dir": Path(env.get("ENGINE_WORK_DIR") or DEFAULT_WORK_DIR),
        "model_id": env["MODEL_ID"],
        "revision": env["MODEL_REVISION"] or None,
        "profile": PROFILES[profile_name],
        "tp_size": int(env["TP_SIZE"]),
        "lora_dirs": tuple(lora),
        "max_lora_rank": int(env["MAX_LORA_RANK"]),
        "guided_decoding": _env_bool(env["GUIDED_DECODING"], True),
        "dtype": env["ENGINE_DTYPE"],
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values["work_dir"], str):
        values["work_dir"] = Path(values["work_dir"])
    return BuildSettings(**values)  # type: ignore[arg-type]
