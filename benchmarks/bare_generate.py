"""The floor: `transformers` generate on the same checkpoint and prompts, greedy, one prompt at a time.

Run in its own process (`python -m benchmarks.bare_generate`) with the thread count the reference engine
uses, while no Triton is running, so it measures the model alone. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--prompts-file", required=True, help="JSON list of rendered prompts")
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from gemma3_core import constants as C
    from gemma3_core.tokenizer import encode, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(args.model_dir)
    with open(args.prompts_file) as f:
        prompts: list[str] = json.load(f)

    def one(prompt: str) -> tuple[int, float, float]:
        ids = torch.tensor([encode(tok, prompt)])
        first: list[float] = []

        class FirstToken:
            # generate() calls the streamer with the prompt first, then with each new token.
            calls = 0

            def put(self, _value: torch.Tensor) -> None:
                FirstToken.calls += 1
                if FirstToken.calls == 2:
                    first.append(time.perf_counter())

            def end(self) -> None:
                pass

        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_tokens,
                do_sample=False,
                eos_token_id=list(C.DEFAULT_STOP_IDS),
                pad_token_id=C.PAD_ID,
                streamer=FirstToken(),
            )
        total = time.perf_counter() - start
        new = out[0, ids.shape[1] :].tolist()
        # Counted like the engine: end_id (<eos>) is not output, a stop word (<end_of_turn>) is.
        n = len(new) - (1 if new and new[-1] == C.EOS_ID else 0)
        return n, total, (first[0] - start) if first else total

    for prompt in prompts[: args.warmup]:
        one(prompt)
    rows = []
    for prompt in prompts:
        n, total, ttft = one(prompt)
        rows.append({"tokens": n, "seconds": total, "ttft_s": ttft})
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    json.dump(
        {
            "requests": len(rows),
            "tokens": tokens,
            "wall_s": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
            "ttft_ms": [round(r["ttft_s"] * 1e3, 3) for r in rows],
            "per_request": rows,
            "threads": torch.get_num_threads(),
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
