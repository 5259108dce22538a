"""llama.cpp on the same GGUF, in process: the CPU anchor our reference engine is compared with.

Runs in `.venv-bench` (llama-cpp-python is a benchmark tool, never a runtime dependency). Like llama.cpp's
server with its slots, the concurrent run decodes every active sequence in ONE `llama_decode` per step
(one llama_batch, one seq_id per stream); prompts are prefilled in one batch too. Greedy, fixed length
(end-of-turn ignored) so both engines produce the same number of tokens.

    .venv-bench/bin/python -m benchmarks.llama_cpp_anchor --gguf M.gguf --prompts-file P.json \
        --max-tokens 48 --threads 2 --streams 1,8

prints one JSON object: per stream count, aggregate tokens/s, TTFT p50 and the decode-only tokens/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _greedy(ctx: Any, llama_cpp: Any, index: int, n_vocab: int) -> int:
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(n_vocab,))
    return int(logits.argmax())


def run_streams(
    model_path: str, prompts: list[list[int]], max_tokens: int, threads: int, llama_cpp: Any, model: Any
) -> dict[str, float]:
    """Generate `max_tokens` for every prompt at once (one sequence per prompt); figures of the run."""
    n = len(prompts)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n * (max(len(p) for p in prompts) + max_tokens + 8)
    params.n_batch = max(512, sum(len(p) for p in prompts))
    params.n_ubatch = params.n_batch
    params.n_seq_max = n
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context for {model_path}")
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, n)
    try:

        def add(token: int, pos: int, seq: int, want_logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = want_logits
            batch.n_tokens = i + 1

        t0 = time.monotonic()
        batch.n_tokens = 0
        last_index = []
        for seq, ids in enumerate(prompts):
            for pos, tok in enumerate(ids):
                add(tok, pos, seq, pos == len(ids) - 1)
            last_index.append(batch.n_tokens - 1)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed on the prompts")
        tokens = [_greedy(ctx, llama_cpp, i, n_vocab) for i in last_index]
        first = time.monotonic() - t0
        generated = n
        positions = [len(p) for p in prompts]
        t_decode = time.monotonic()
        for _ in range(max_tokens - 1):
            batch.n_tokens = 0
            for seq in range(n):
                add(tokens[seq], positions[seq], seq, True)
                positions[seq] += 1
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed while decoding")
            tokens = [_greedy(ctx, llama_cpp, i, n_vocab) for i in range(n)]
            generated += n
        end = time.monotonic()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return {
        "streams": n,
        "tokens": generated,
        "tokens_per_s": round(generated / (end - t0), 2),
        "ttft_s": round(first, 3),
        "decode_tokens_per_s": round((generated - n) / max(end - t_decode, 1e-9), 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompts-file", required=True, help="JSON list of rendered chat prompts")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    import llama_cpp

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(args.gguf.encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {args.gguf}")
    vocab = llama_cpp.llama_model_get_vocab(model)
    texts = json.loads(Path(args.prompts_file).read_text(encoding="utf-8"))

    def tokenize(text: str) -> list[int]:
        raw = text.encode()
        buf = (llama_cpp.llama_token * (len(raw) + 8))()
        # add_special=False: the rendered prompt already starts with <bos>; parse_special=True reads it.
        k = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, True)
        if k < 0:
            raise RuntimeError("prompt too long for the token buffer")
        return list(buf[:k])

    ids = [tokenize(t) for t in texts]
    out: dict[str, Any] = {
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "threads": args.threads,
    }
    for streams in (int(s) for s in args.streams.split(",")):
        prompts = [ids[i % len(ids)] for i in range(streams)]
        runs = [
            run_streams(args.gguf, prompts, args.max_tokens, args.threads, llama_cpp, model)
            for _ in range(args.repeats)
        ]
        out[f"c{streams}"] = {
            "runs": runs,
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in runs),
            "ttft_s_median": statistics.median(r["ttft_s"] for r in runs),
        }
    llama_cpp.llama_model_free(model)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
