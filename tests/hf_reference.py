"""Hugging Face transformers as the reference for greedy generation (same checkpoint the engine serves)."""

from __future__ import annotations

from typing import Any

from gemma3_core import constants as C


def hf_greedy(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens as the engine reports them: HF stops on <eos>/<end_of_turn> and includes the stop
    token; the engine (like TensorRT-LLM) emits <eos> (a stop word) but never end_id (<end_of_turn>)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(C.DEFAULT_STOP_IDS),
            pad_token_id=C.PAD_ID,
        )
    gen = [int(t) for t in out[0, len(ids) :]]
    return gen[:-1] if gen and gen[-1] == C.END_OF_TURN_ID else gen
