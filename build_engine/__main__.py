"""`python -m build_engine <stage>`: prepare models and render the Triton model repository.

CPU target (the embedded default):  `cpu` prepares the Gemma 3 270M checkpoint and renders the repository.
GPU target (inside NVIDIA's TensorRT-LLM container): see `build_engine/gpu/cli.py` and docs/gpu.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from build_engine.cpu import DEFAULT_MAX_SEQ_LEN
from build_engine.render import RenderError, render

DEFAULT_CPU_REPO = Path("build/model_repository/cpu")


def _cpu(args: argparse.Namespace) -> int:
    from build_engine.cpu import cache_root, prepare, repository_values

    art = prepare(Path(args.cache_dir) if args.cache_dir else cache_root(), dry_run=args.dry_run)
    values = repository_values(art, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len)
    written = render("cpu", Path(args.out), values, dry_run=args.dry_run)
    print(f"[build_engine cpu] model repository: {Path(args.out).resolve()} ({len(written)} models)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m build_engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="stage", required=True)
    cpu = sub.add_parser(
        "cpu", help="prepare Gemma 3 270M (GGUF -> HF, cached) and render the CPU repository"
    )
    cpu.add_argument(
        "--out", default=str(DEFAULT_CPU_REPO), help="rendered repository (default: %(default)s)"
    )
    cpu.add_argument(
        "--cache-dir", default=None, help="model cache (default: $GEMMA3_CACHE_DIR or ~/.cache/gemma3-triton)"
    )
    cpu.add_argument("--max-batch-size", type=int, default=8)
    cpu.add_argument("--max-seq-len", type=int, default=DEFAULT_MAX_SEQ_LEN)
    cpu.add_argument(
        "--dry-run", action="store_true", help="print the build plan and the rendered configs; write nothing"
    )
    cpu.set_defaults(func=_cpu)
    try:
        from build_engine.gpu.cli import add_gpu_commands
    except ImportError:  # the GPU stages are optional on a CPU-only checkout
        pass
    else:
        add_gpu_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
