"""OpenAI's `logit_bias` (token id -> bias) as TensorRT-LLM's `embedding_bias`: one FP32 per vocab row.

Pure numpy: the `preprocessing` model builds the dense vector (it knows the engine's vocab width), the CPU
reference engine adds it to its logits as TensorRT-LLM's sampling layers do.
"""

from __future__ import annotations

import numpy as np


class EmbeddingBiasError(ValueError):
    """Ids and weights that do not describe a bias."""


def dense_embedding_bias(ids: np.ndarray, weights: np.ndarray, vocab_size: int) -> np.ndarray:
    """A float32 `[vocab_size]` vector: `weights[i]` at row `ids[i]`, zero elsewhere (a later id wins)."""
    ids, weights = ids.reshape(-1).astype(np.int64), weights.reshape(-1).astype(np.float32)
    if ids.size != weights.size:
        raise EmbeddingBiasError(f"{ids.size} embedding bias ids but {weights.size} weights")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise EmbeddingBiasError(f"embedding bias ids must be in [0, {vocab_size})")
    bias = np.zeros(vocab_size, dtype=np.float32)
    bias[ids] = weights
    return bias
