"""The reference engine's model forwards alone: decode steps at 1 and 8 rows for each kind of linear
layer (plain float32, packed float32, packed float16 weights), for every thread count from 1 to the
available cores; and what float16 weights cost in fidelity against float32. Prints one JSON document.

Run in its own process (`python -m benchmarks.engine_steps`) while no Triton is running, so it measures
the model alone: which thread count the deployment should use, what packing the linear layers
(`cpu_engine/packed_linear.py`) buys once several requests share a step, and what halving the weights'
bytes buys a memory-bound step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _decode_ms(model: Any, rows: int, context: int, steps: int) -> float:
    """Median milliseconds of one decode forward over `rows` rows, each with `context` cached tokens."""
    import torch
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(1000, 100_000, (rows, context), generator=gen)
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return round(statistics.median(times[1:]) * 1e3, 2)


# (layout name, load_model's weight_dtype, pack): `plain` is stock transformers in float32; the engine
# serves the last one. float16's fidelity is the served layers' against `plain`.
LAYOUTS = (("plain", "float32", False), ("packed", "float32", True), ("packed-f16", "float16", True))
REFERENCE, SERVED = LAYOUTS[0][0], LAYOUTS[-1][0]


def _fidelity(reference: Any, model: Any, ids: list[int], window: int) -> dict[str, Any]:
    """`model` against `reference` on the same text, teacher-forced in windows of `window` tokens: how
    often their most likely next tokens agree, and the mean KL divergence of their next-token
    distributions (reference || model)."""
    import torch

    agree = total = 0
    kl_sum = 0.0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window]])
            ref = torch.log_softmax(reference(input_ids=chunk).logits[0].double(), -1)
            got = torch.log_softmax(model(input_ids=chunk).logits[0].double(), -1)
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            total += ref.shape[0]
            kl_sum += float((ref.exp() * (ref - got)).sum())
    return {"positions": total, "top1_agreement": round(agree / total, 5), "mean_kl": kl_sum / total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tokenizer-dir", help="default: the model directory")
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--context", type=int, default=128, help="cached tokens per row")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--fidelity-text", default=str(DOCS / "architecture.md"), help="text float16 weights are judged on"
    )
    parser.add_argument("--fidelity-tokens", type=int, default=2048)
    args = parser.parse_args(argv)

    import torch

    from cpu_engine.engine import available_cores, load_model
    from gemma3_core.tokenizer import encode, load_tokenizer

    cores = available_cores()
    rows = [int(r) for r in args.rows.split(",")]
    results: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}  # the models the fidelity check compares, once their steps are measured
    for layout, weight_dtype, pack in LAYOUTS:
        model = load_model(args.model_dir, threads=cores, weight_dtype=weight_dtype, pack=pack)
        for threads in range(1, cores + 1):
            torch.set_num_threads(threads)
            for n in rows:
                ms = _decode_ms(model, n, args.context, args.steps)
                results.append({"layout": layout, "threads": threads, "rows": n, "ms_per_step": ms})
                print(f"{layout} threads={threads} rows={n}: {ms} ms/step", file=sys.stderr, flush=True)
        if layout in (REFERENCE, SERVED):
            kept[layout] = model
        del model
    torch.set_num_threads(cores)
    text = Path(args.fidelity_text).read_text(encoding="utf-8")
    ids = encode(load_tokenizer(args.tokenizer_dir or args.model_dir), text)[: args.fidelity_tokens]
    fidelity = _fidelity(kept[REFERENCE], kept[SERVED], ids, window=512)
    fidelity["text"] = Path(args.fidelity_text).name
    print(f"float16 weights against float32: {fidelity}", file=sys.stderr, flush=True)
    report = {"cores": cores, "context": args.context, "steps": args.steps, "runs": results}
    json.dump(report | {"fidelity_float16": fidelity}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
