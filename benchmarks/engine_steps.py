"""The reference engine's model forwards alone: decode steps at 1 and 8 rows, plain against packed layers,
for every thread count from 1 to the available cores. Prints one JSON document.

Run in its own process (`python -m benchmarks.engine_steps`) while no Triton is running, so it measures
the model alone: which thread count the deployment should use, and what packing the linear layers
(`cpu_engine/packed_linear.py`) buys once several requests share a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--context", type=int, default=128, help="cached tokens per row")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    from cpu_engine.engine import available_cores, load_model

    cores = available_cores()
    rows = [int(r) for r in args.rows.split(",")]
    results: list[dict[str, Any]] = []
    for layout in ("plain", "packed"):
        model = load_model(args.model_dir, threads=cores, pack=layout == "packed")
        for threads in range(1, cores + 1):
            torch.set_num_threads(threads)
            for n in rows:
                ms = _decode_ms(model, n, args.context, args.steps)
                results.append({"layout": layout, "threads": threads, "rows": n, "ms_per_step": ms})
                print(f"{layout} threads={threads} rows={n}: {ms} ms/step", file=sys.stderr, flush=True)
        del model
    json.dump({"cores": cores, "context": args.context, "steps": args.steps, "runs": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
