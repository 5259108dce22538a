"""PEFT adapter → `model.lora_weights.npy` / `model.lora_config.npy`, and the trtllm-build LoRA flags.

The .npy pair has the per-request batch dim ([1, rows, len] / [1, rows, 3]) like TensorRT-LLM's
`hf_lora_convert.py` output, so it can be sent to Triton as is (Triton OpenAI frontend `multi_lora.json`
directories and tensorrtllm_backend `lora_prefetch_dir/<task_id>/` use these file names).

    python -m build_engine.lora_convert SRC_ADAPTER_DIR OUT_DIR [--dtype float16] [--dense-in-width N]
    python -m build_engine.lora_convert --flags q_proj v_proj o_proj --max-lora-rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from gemma3_core.constants import TextArch
from gemma3_core.lora import (
    load_peft_adapter,
    module_dims_from_arch,
    save_npy_pair,
    to_trtllm_tensors,
    trtllm_target_modules,
    with_batch_dim,
)

_DTYPES = {"float16": np.float16, "float32": np.float32}


def convert_adapter(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    dense_in_width: int | None = None,
    arch: TextArch | None = None,
) -> tuple[Path, Path]:
    """Convert one PEFT adapter directory; returns the (weights, config) .npy paths.

    `dtype` must equal the engine's dtype (TensorRT-LLM rejects other lora_weights dtypes); bfloat16 has no
    numpy dtype, so bf16 engines need the Triton input declared accordingly (not handled here).
    `arch`, when given, checks the adapter fits the base model. `dense_in_width`: see docs/lora.md.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    adapter = load_peft_adapter(src_dir)
    if arch is not None:
        adapter.validate_dims(module_dims_from_arch(arch), arch.num_layers)
    weights, config = with_batch_dim(
        *to_trtllm_tensors(adapter, _DTYPES[dtype], dense_in_width=dense_in_width)
    )
    return save_npy_pair(out_dir, weights, config)


def trtllm_build_lora_flags(
    hf_target_modules: Iterable[str], max_lora_rank: int, *, plugin_dtype: str = "auto"
) -> list[str]:
    """trtllm-build arguments enabling the LoRA plugin for these HF projection names (or "all-linear")."""
    if max_lora_rank <= 0:
        raise ValueError("max_lora_rank must be positive")
    modules = trtllm_target_modules(hf_target_modules)
    if not modules:
        raise ValueError("no LoRA target modules given")
    return [
        "--lora_plugin",
        plugin_dtype,
        "--lora_target_modules",
        *modules,
        "--max_lora_rank",
        str(max_lora_rank),
    ]


def triton_lora_cache_params(
    max_lora_rank: int,
    *,
    optimal_adapter_size: int = 8,
    gpu_memory_fraction: float = 0.05,
    host_memory_bytes: int = 1 << 30,
    prefetch_dir: str = "",
) -> dict[str, str]:
    """`tensorrt_llm` model config.pbtxt parameters for the PEFT cache (tensorrtllm_backend names).

    The max adapter size must cover the engine's max_lora_rank, otherwise large adapters cannot be cached.
    """
    params = {
        "lora_cache_optimal_adapter_size": str(min(optimal_adapter_size, max_lora_rank)),
        "lora_cache_max_adapter_size": str(max_lora_rank),
        "lora_cache_gpu_memory_fraction": str(gpu_memory_fraction),
        "lora_cache_host_memory_bytes": str(host_memory_bytes),
    }
    if prefetch_dir:
        params["lora_prefetch_dir"] = prefetch_dir
    return params


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m build_engine.lora_convert", description=__doc__.split("\n")[0]
    )
    p.add_argument("src", nargs="?", help="PEFT adapter directory")
    p.add_argument("out", nargs="?", help="output directory for model.lora_{weights,config}.npy")
    p.add_argument("--dtype", default="float16", choices=sorted(_DTYPES))
    p.add_argument(
        "--dense-in-width",
        type=int,
        default=None,
        help="reserve this many input columns for o_proj rows (runtimes sizing attn_dense hidden→hidden)",
    )
    p.add_argument(
        "--flags", nargs="+", metavar="MODULE", help="print trtllm-build LoRA flags for these modules"
    )
    p.add_argument("--max-lora-rank", type=int, default=64)
    args = p.parse_args(argv)
    if args.flags:
        print(" ".join(trtllm_build_lora_flags(args.flags, args.max_lora_rank)))
        return 0
    if not args.src or not args.out:
        p.error("SRC and OUT are required unless --flags is given")
    w, c = convert_adapter(args.src, args.out, dtype=args.dtype, dense_in_width=args.dense_in_width)
    print(json.dumps({"lora_weights": str(w), "lora_config": str(c)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
