"""The GPU `tensorrt_llm` model's parameters, as the CPU reference engine honours them (or why not).

A client must get the same answer from both targets, so every parameter the GPU config sets is listed
here once: either the reference engine's config carries it too and the engine reads it
(`HONOURED_PARAMETERS`), or it only means something to TensorRT-LLM's C++ backend
(`GPU_ONLY_PARAMETERS`, with the reason). A test checks both rendered configs against these lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# key -> (what the reference engine does with it, whether its value must equal the GPU config's)
HONOURED_PARAMETERS: dict[str, tuple[str, bool]] = {
    "exclude_input_in_output": ("default for requests that do not send the input of that name", True),
    "max_beam_width": ("beam width 1 only: requests asking for beams are refused", True),
    "tokenizer_dir": ("the vocabulary xgrammar compiles guides against", False),
}

GPU_ONLY_PARAMETERS: dict[str, str] = {
    "FORCE_CPU_ONLY_INPUT_TENSORS": "where the C++ backend places input tensors (host memory only here)",
    "gpt_model_type": "the reference engine always batches in flight (one decode forward over all requests)",
    "gpt_model_path": "the TensorRT engine directory; the CPU engine loads the HF checkpoint (hf_model_dir)",
    "max_attention_window_size": "the CPU model's sliding window comes from its own HF config",
    "batch_scheduler_policy": "KV-cache admission of the paged GPU cache; the CPU cache grows per request",
    "kv_cache_free_gpu_mem_fraction": "GPU memory sizing",
    "kv_cache_onboard_blocks": "GPU/host KV block offloading",
    "enable_kv_cache_reuse": "prefix reuse of paged KV blocks; the CPU engine recomputes every prompt",
    "enable_chunked_context": "the reference engine always chunks long prompts (prefill_chunk_tokens)",
    "normalize_log_probs": "the reference engine always returns normalized log probs (a log-softmax)",
    "decoding_mode": "the reference engine's sampler is always top-k/top-p (greedy when both are unset)",
    "multi_block_mode": "a CUDA attention kernel option",
    "enable_context_fmha_fp32_acc": "a CUDA attention kernel option",
    "cancellation_check_period_ms": "the reference engine checks cancellation at every step",
    "stats_check_period_ms": "executor statistics of the C++ backend",
    "iter_stats_max_iterations": "executor statistics of the C++ backend",
    "request_stats_max_iterations": "executor statistics of the C++ backend",
    "lora_cache_optimal_adapter_size": "GPU LoRA cache page sizing",
    "lora_cache_max_adapter_size": "GPU LoRA cache page sizing",
    "lora_cache_gpu_memory_fraction": "GPU LoRA cache sizing",
    "lora_cache_host_memory_bytes": "host LoRA cache sizing of the C++ backend (the CPU engine keeps an LRU)",
    "executor_worker_path": "the C++ backend's orchestrator worker binary",
    "guided_decoding_backend": "the CPU engine always uses xgrammar, the backend the GPU config names",
    "xgrammar_tokenizer_info_path": "the C++ backend's vocabulary file; the CPU engine reads tokenizer_dir",
}


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class EngineParameters:
    """The deployment defaults the reference engine reads from its Triton model config."""

    exclude_input_in_output: bool = False
    max_beam_width: int = 1

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> EngineParameters:
        params = config.get("parameters", {})

        def value(key: str, default: str) -> str:
            v = params.get(key, {}).get("string_value")
            return default if v in (None, "") else str(v)

        return cls(
            exclude_input_in_output=_flag(value("exclude_input_in_output", "false")),
            max_beam_width=int(value("max_beam_width", "1")),
        )
