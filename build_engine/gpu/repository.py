"""Template values for `render("gpu", ...)` and the xgrammar tokenizer info the C++ backend reads.

The GPU `tensorrt_llm` model is NVIDIA's C++ backend (`backend: "tensorrtllm"`); its `parameters` keys
are the ones `triton_backend/inflight_batcher_llm/src/model_{state,instance_state}.cc` read
(`UPSTREAM_PARAMETER_KEYS`, the key set of the upstream `tensorrt_llm/config.pbtxt`). The shared models
(preprocessing, vision_encoder, postprocessing, ensemble) get the same kind of values as the CPU target,
pointed at the GPU artifacts.
"""

from __future__ import annotations

from collections.abc import Iterable

from build_engine import render
from build_engine.gpu.settings import BuildSettings
from gemma3_core import constants as C

# Every `parameters` key of upstream triton_backend/all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt
# (TensorRT-LLM, stored commit 0c8de69), i.e. what the C++ backend knows how to read.
UPSTREAM_PARAMETER_KEYS = frozenset(
    {
        "max_beam_width",
        "FORCE_CPU_ONLY_INPUT_TENSORS",
        "gpt_model_type",
        "gpt_model_path",
        "encoder_model_path",
        "max_tokens_in_paged_kv_cache",
        "max_attention_window_size",
        "sink_token_length",
        "batch_scheduler_policy",
        "kv_cache_free_gpu_mem_fraction",
        "cross_kv_cache_fraction",
        "kv_cache_host_memory_bytes",
        "kv_cache_onboard_blocks",
        "enable_trt_overlap",
        "exclude_input_in_output",
        "cancellation_check_period_ms",
        "stats_check_period_ms",
        "iter_stats_max_iterations",
        "request_stats_max_iterations",
        "enable_kv_cache_reuse",
        "normalize_log_probs",
        "enable_chunked_context",
        "gpu_device_ids",
        "participant_ids",
        "num_nodes",
        "lora_cache_optimal_adapter_size",
        "lora_cache_max_adapter_size",
        "lora_cache_gpu_memory_fraction",
        "lora_cache_host_memory_bytes",
        "lora_prefetch_dir",
        "decoding_mode",
        "executor_worker_path",
        "lookahead_window_size",
        "lookahead_ngram_size",
        "lookahead_verification_set_size",
        "medusa_choices",
        "eagle_choices",
        "gpu_weights_percent",
        "enable_context_fmha_fp32_acc",
        "multi_block_mode",
        "cuda_graph_mode",
        "cuda_graph_cache_size",
        "speculative_decoding_fast_logits",
        "tokenizer_dir",
        "guided_decoding_backend",
        "xgrammar_tokenizer_info_path",
    }
)
# Read without a try/catch in model_instance_state.cc (getGuidedDecodingConfigFromParams,
# getBatchingTypeFromParams): the model fails to load when one is missing.
REQUIRED_PARAMETER_KEYS = frozenset(
    {
        "gpt_model_type",
        "gpt_model_path",
        "tokenizer_dir",
        "guided_decoding_backend",
        "xgrammar_tokenizer_info_path",
    }
)

XGRAMMAR_INFO_FILE = "xgrammar_tokenizer_info.json"


def _bool(v: bool) -> str:
    return "true" if v else "false"


def engine_dtype_values(s: BuildSettings) -> dict[str, str]:
    """Tensors that must carry the engine's dtype end to end."""
    return {
        # The runtime rejects a prompt table whose dtype differs from the engine's weights
        # ("Request embedding table data type doesn't match model weight data type").
        "prompt_embedding_table_data_type": s.triton_dtype,
        # LoRA weights too; the gateway reads the declared type from the ensemble config and sends that.
        "lora_weights_data_type": s.triton_dtype,
    }


def tensorrt_llm_values(s: BuildSettings) -> dict[str, str]:
    """Values of model_repository/tensorrt_llm/config.pbtxt (the GPU-only template)."""
    p = s.profile
    return {
        "triton_max_batch_size": str(p.max_batch_size),
        "max_queue_delay_microseconds": str(p.max_queue_delay_microseconds),
        "max_queue_size": str(p.max_queue_size),
        "engine_dir": str(s.engine_dir),
        # Per-layer windows: 5 sliding (1024) + 1 global; the backend parses the CSV into a vector and the
        # runtime repeats it over the 62 layers. Without it every layer would keep max_seq_len of KV.
        "max_attention_window_size": ",".join(str(w) for w in p.attention_window()),
        "kv_cache_free_gpu_mem_fraction": f"{p.kv_cache_free_gpu_mem_fraction:g}",
        "enable_kv_cache_reuse": _bool(p.enable_kv_cache_reuse),
        "enable_chunked_context": _bool(p.enable_chunked_context),
        "batch_scheduler_policy": p.batch_scheduler_policy,
        "tokenizer_dir": str(s.tokenizer_dir),
        "guided_decoding_backend": "xgrammar" if s.guided_decoding else "",
        "xgrammar_tokenizer_info_path": str(s.tokenizer_info_dir / XGRAMMAR_INFO_FILE)
        if s.guided_decoding
        else "",
        "lora_cache_max_adapter_size": str(s.max_lora_rank),
        "logits_datatype": "TYPE_FP32",
        **engine_dtype_values(s),
    }


def shared_values(s: BuildSettings) -> dict[str, str]:
    """Values the shared (CPU and GPU) templates may use, pointed at the GPU artifacts."""
    p = s.profile
    return {
        "triton_max_batch_size": str(p.max_batch_size),
        "tokenizer_dir": str(s.tokenizer_dir),
        "hf_model_dir": str(s.checkpoint_dir),
        "vision_encoder_dir": str(s.vision_dir),
        "vision_backend": "tensorrt",
        "max_seq_len": str(p.max_seq_len),
        # Token ids >= this address prompt-table (image) rows: the engine's vocab_size, not the tokenizer's.
        "engine_vocab_size": str(C.GEMMA3_27B.vocab_size),
        "preprocessing_instance_count": str(p.preprocessing_instance_count),
        "postprocessing_instance_count": str(p.postprocessing_instance_count),
        "vision_instance_count": "1",
        "engine_max_active_requests": str(p.max_batch_size),
        "max_queue_size": str(p.max_queue_size),
        "logits_datatype": "TYPE_FP32",
        **engine_dtype_values(s),
    }


def gpu_template_placeholders() -> set[str]:
    used: set[str] = set()
    for src, _dst in render.TARGET_MODELS["gpu"]:
        path = render.TEMPLATES_DIR / src / "config.pbtxt"
        if path.exists():
            used |= render.placeholders(path.read_text())
    return used - {"model_name"}


def repository_values(s: BuildSettings, *, used: Iterable[str] | None = None) -> dict[str, str]:
    """Full value dict for `render("gpu", ...)`.

    GPU-specific values are always present (our template uses each of them); shared values are passed when
    some GPU template uses them, since `render` rejects unused values and the reference-engine-only ones
    (e.g. `hf_model_dir`) have no GPU consumer. A shared placeholder we do not know stays missing, so
    `render` names it.
    """
    used = set(gpu_template_placeholders() if used is None else used)
    values = {k: v for k, v in shared_values(s).items() if k in used}
    values.update(tensorrt_llm_values(s))
    return values
