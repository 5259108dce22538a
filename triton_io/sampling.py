"""The engine's per-request sampling inputs as one value (pure Python: the Triton models and the CPU engine
both use it, inside and outside Triton)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """`temperature`, `runtime_top_k`, `runtime_top_p`, the three penalties and `seed`, with TensorRT-LLM's
    defaults (top-k 0 and top-p 0 disable both)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1 or (self.top_k <= 0 and self.top_p <= 0.0)
