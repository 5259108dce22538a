"""`python -m build_engine <stage>` for the GPU target: one subcommand per stage, plus `all` and `verify`.

The lead's `build_engine/__main__.py` calls `add_gpu_commands(subparsers)`; each subcommand sets
`args.func(args) -> int`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from build_engine.gpu import pipeline
from build_engine.gpu.checkpoint import UnsupportedCheckpoint
from build_engine.gpu.settings import PROFILES, BuildSettings, UnsupportedDtype, settings_from_env

STAGE_HELP = {
    "download": "download the checkpoint from Hugging Face (HF_TOKEN for gated repos; resumable)",
    "inspect": "check config.json quantization_config + tensor names; fail fast on anything unsupported",
    "convert": "compressed-tensors GPTQ int4 → TensorRT-LLM W4A16_AWQ checkpoint (tensor-parallel shards)",
    "build": "trtllm-build the engine for the chosen profile (Gemma 3 global-only RoPE scaling)",
    "vision": "export SigLIP + projector to ONNX and build its TensorRT engine (dynamic image batch)",
    "tokenizer-info": "write the xgrammar tokenizer info for guided decoding",
    "repository": "render the GPU Triton model repository",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--work-dir", type=Path, default=None, help="artifact volume (env ENGINE_WORK_DIR, /engines)"
    )
    p.add_argument(
        "--profile", choices=sorted(PROFILES), default=None, help="engine profile (env ENGINE_PROFILE)"
    )
    p.add_argument("--tp-size", type=int, default=None, help="tensor-parallel GPUs (env TP_SIZE, 1)")
    p.add_argument("--model-id", default=None, help="Hugging Face repo id (env MODEL_ID)")
    p.add_argument("--revision", default=None, help="git revision of the repo (env MODEL_REVISION)")
    p.add_argument(
        "--lora-dir",
        type=Path,
        action="append",
        default=None,
        help="PEFT adapter dir to build the LoRA plugin for (repeatable; env LORA_DIRS)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="engine dtype (env ENGINE_DTYPE; only bfloat16)",
    )
    p.add_argument("--dry-run", action="store_true", help="print every command and file, run nothing")
    p.add_argument("--force", action="store_true", help="run even when the stage's stamp says up to date")


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    return settings_from_env(
        work_dir=args.work_dir,
        profile=args.profile,
        tp_size=args.tp_size,
        model_id=args.model_id,
        revision=args.revision,
        lora_dirs=tuple(args.lora_dir) if args.lora_dir else None,
        dtype=args.dtype,
    )


def _run_stages(names: list[str]):
    def func(args: argparse.Namespace) -> int:
        try:
            pipeline.run(names, settings_from_args(args), dry_run=args.dry_run, force=args.force)
        except UnsupportedCheckpoint as exc:
            pipeline.log(f"unsupported checkpoint: {exc}")
            return 2
        except UnsupportedDtype as exc:
            pipeline.log(str(exc))
            return 2
        return 0

    return func


def _verify(args: argparse.Namespace) -> int:
    from build_engine.gpu import verify

    s = settings_from_args(args)
    if args.dry_run:
        extra = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("max_new_tokens", "long_tokens")]
        pipeline.run_stage(pipeline.stage_verify(s, extra), dry_run=True)
        return 0
    return verify.run_verify(s, args)


def add_gpu_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, text in STAGE_HELP.items():
        p = subparsers.add_parser(name, help=f"[gpu] {text}", description=text)
        _common(p)
        p.set_defaults(func=_run_stages([name]))
    p = subparsers.add_parser("all", help="[gpu] every build stage in order: " + " → ".join(pipeline.ALL))
    _common(p)
    p.set_defaults(func=_run_stages(list(pipeline.ALL)))
    p = subparsers.add_parser("verify", help="[gpu] engine vs Hugging Face fidelity check (needs a GPU)")
    _common(p)
    from build_engine.gpu.verify import add_verify_arguments

    add_verify_arguments(p)
    p.set_defaults(func=_verify)
