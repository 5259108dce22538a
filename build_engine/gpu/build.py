"""The `trtllm-build` command line for a profile (run inside the pinned TensorRT-LLM container).

Flags and why:
  * `--model_cls_file/--model_cls_name`: our `GemmaForCausalLM` subclass with the Gemma 3 RoPE fix
    (build_engine/gpu/gemma3_fixes.py); everything else is stock trtllm-build.
  * `--kv_cache_type paged`, `--remove_input_padding enable` (packed input), `--gpt_attention_plugin auto`,
    `--gemm_plugin auto`: the in-flight batching configuration the Triton C++ backend needs.
  * `--context_fmha enable --use_paged_context_fmha enable`: required for KV-cache reuse and for chunked
    context (the backend says so when `enable_chunked_context` is on).
  * `--max_num_tokens`: tokens per engine step = chunk size of chunked prefill.
  * `--max_prompt_embedding_table_size`: rows of image embeddings the engine accepts
    (max_batch_size × images/request × 256); the runtime allows table_size / max_batch_size per request.
  * `--lora_plugin auto` + `--lora_dir` + `--lora_target_modules` only when adapters are configured.
"""

from __future__ import annotations

from pathlib import Path

from build_engine.gpu.gemma3_fixes import MODEL_CLS_NAME
from build_engine.gpu.settings import BuildSettings

# HF Gemma 3 projections → TensorRT-LLM LoRA module names (see gemma3_core/lora.py HF_TO_TRTLLM).
LORA_TARGET_MODULES = ("attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h")

FIXES_MODULE = Path(__file__).resolve().with_name("gemma3_fixes.py")


def trtllm_build_command(s: BuildSettings, *, fixes_module: Path | None = None) -> list[str]:
    p = s.profile
    cmd = [
        "trtllm-build",
        f"--checkpoint_dir={s.trtllm_checkpoint_dir}",
        f"--output_dir={s.engine_dir}",
        f"--model_cls_file={fixes_module or FIXES_MODULE}",
        f"--model_cls_name={MODEL_CLS_NAME}",
        f"--max_batch_size={p.max_batch_size}",
        f"--max_input_len={p.max_input_len}",
        f"--max_seq_len={p.max_seq_len}",
        f"--max_num_tokens={p.max_num_tokens}",
        "--max_beam_width=1",
        f"--max_prompt_embedding_table_size={p.max_prompt_embedding_table_size}",
        "--kv_cache_type=paged",
        "--remove_input_padding=enable",
        "--gpt_attention_plugin=auto",
        "--gemm_plugin=auto",
        "--context_fmha=enable",
        "--use_paged_context_fmha=enable",
        "--workers=1",  # the custom model class is loaded in-process; spawned workers could not pickle it
        "--log_level=info",
    ]
    if s.lora_dirs:
        cmd += [
            "--lora_plugin=auto",
            "--lora_dir",
            *[str(d) for d in s.lora_dirs],
            f"--max_lora_rank={s.max_lora_rank}",
            "--lora_target_modules",
            *LORA_TARGET_MODULES,
        ]
    return cmd


def flag_value(cmd: list[str], flag: str) -> str | None:
    """`--flag=value` lookup for tests and logs."""
    for part in cmd:
        if part.startswith(flag + "="):
            return part.split("=", 1)[1]
    return None
