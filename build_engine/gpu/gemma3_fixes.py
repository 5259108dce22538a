"""Gemma 3 fidelity fixes for the TensorRT-LLM engine flow, applied through trtllm-build's model-class hook.

1. RoPE: linear ×8 scaling on the global layers only (below).
2. q/k-norm epsilon: upstream builds Gemma's q/k RMSNorm with the attention default 1e-5; HF uses the
   model's `rms_norm_eps` (1e-6). `set_qk_norm_eps` sets it on every layer before the network is built
   (`RmsNorm.forward` reads `eps` then).

RoPE in detail:

Gemma 3 27B rotates global (full-attention) layers with base 1e6 and positions scaled by 1/8 (HF
`rope_scaling: {linear, factor 8}`), sliding-window layers with base 1e4 and no scaling. The engine-flow
Gemma gets this wrong twice: `GemmaConfig.from_hugging_face` reads `rotary_scaling` (HF's key is
`rope_scaling`) so no scaling reaches the engine at all, and when `rotary_scaling` *is* set,
`Attention.create_attention_const_params` builds the local (`rope_local_base_freq`) cos/sin table with the
same scale and every local `Attention` passes the same `rotary_embedding_scale(_type)` to `gpt_attention`.

The fix uses trtllm-build's own extension point instead of a fork: `--model_cls_file <this file>
--model_cls_name Gemma3FidelityFixesForCausalLM` makes `build_model` instantiate this subclass of
`GemmaForCausalLM` (loaded with `SourceFileLoader`, hence no imports from our package here). Our checkpoint
config sets `rotary_scaling` = linear ×8, so upstream builds the correct global table and global-layer
plugin arguments; after construction this class

  * replaces the model-level local buffers (`rotary_inv_freq_local`,
    `embed_positions_for_gpt_attention_local`) with unscaled base-`rope_local_base_freq` tables, and
  * sets `rotary_embedding_scale_type = none`, `rotary_embedding_scale = 1` on every `is_local` attention,

so each layer's plugin gets a table and scalar arguments that agree with HF. It verifies both tables
against a NumPy reference before the network is built. The GPU fidelity check (`verify`, prompt > 1024
tokens) covers the runtime side.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MODEL_CLS_NAME = "Gemma3FidelityFixesForCausalLM"


def hf_inv_freq(base: float, dim: int, linear_factor: float | None = None) -> np.ndarray:
    """HF's inverse frequencies (`_compute_default_rope_parameters` / linear: divided by the factor)."""
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if linear_factor:
        inv = inv / linear_factor
    return inv.astype(np.float32)


def hf_cos_sin(
    base: float, dim: int, positions: np.ndarray, linear_factor: float | None = None
) -> np.ndarray:
    """[len(positions), dim] with (cos, sin) interleaved per frequency, the attention plugin's layout.

    Angles are float32 products like HF's (`inv_freq.float() @ positions.float()`) and the plugin table's.
    """
    angles = np.outer(positions.astype(np.float32), hf_inv_freq(base, dim, linear_factor)).astype(np.float64)
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1).reshape(len(positions), dim).astype(np.float32)


def check_table(
    name: str, inv_freq: np.ndarray, cos_sin: np.ndarray, base: float, dim: int, factor: float | None
) -> None:
    """Compare a built table with the HF reference (incl. far positions), or raise AssertionError.

    The table's angles (atan2 of its sin/cos) must match position × HF's inverse frequency up to float32
    rounding (~1e-7 × position); a wrong base or scale is off by O(1) radian already at position 1.
    """
    want = hf_inv_freq(base, dim, factor).astype(np.float64)
    got = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=0):
        raise AssertionError(f"{name}: inverse frequencies differ from HF (base {base}, factor {factor})")
    table = np.asarray(cos_sin, dtype=np.float64).reshape(-1, dim // 2, 2)
    probe = np.array([1, 2, 1023, 1024, 4097, table.shape[0] - 1])
    probe = probe[probe < table.shape[0]]
    angles = np.arctan2(table[probe, :, 1], table[probe, :, 0])
    diff = np.angle(np.exp(1j * (angles - np.outer(probe, want))))  # wrapped to (-pi, pi]
    tol = 1e-6 * probe[:, None] + 1e-4
    if np.any(np.abs(diff) > tol):
        raise AssertionError(f"{name}: cos/sin table differs from HF (base {base}, factor {factor})")


try:  # only inside NVIDIA's TensorRT-LLM container
    from tensorrt_llm.functional import RopeEmbeddingUtils, RotaryScalingType
    from tensorrt_llm.models.gemma.model import GemmaForCausalLM

    _HAVE_TRTLLM = True
except ImportError:  # CPU machines, CI: the helpers above stay importable
    _HAVE_TRTLLM = False


def apply_global_only_rope_scaling(model: Any) -> dict[str, int]:
    """Make local layers unscaled on a constructed GemmaForCausalLM whose config has linear rotary_scaling."""
    if not _HAVE_TRTLLM:
        raise RuntimeError("tensorrt_llm is not importable: run this inside the TensorRT-LLM container")
    cfg = model.config
    scaling = getattr(cfg, "rotary_scaling", None) or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind != "linear":
        raise ValueError(f"expected linear rotary_scaling in the checkpoint config, got {scaling!r}")
    factor = float(scaling["factor"])
    local_base = getattr(cfg, "rope_local_base_freq", None)
    if local_base is None or not hasattr(model, "rotary_inv_freq_local"):
        raise ValueError("not a Gemma 3 config: no rope_local_base_freq / local rotary tables")
    dim = int(getattr(cfg, "rotary_dim", cfg.head_size))
    max_pos = int(cfg.max_position_embeddings)
    none = RotaryScalingType.from_string("none")

    inv_local, cos_sin_local = RopeEmbeddingUtils.create_sinusoidal_positions_for_attention_plugin(
        max_pos, dim, float(local_base), 1.0, none
    )
    model.rotary_inv_freq_local.value = np.asarray(inv_local, dtype=np.float32)
    model.embed_positions_for_gpt_attention_local.value = np.asarray(cos_sin_local, dtype=np.float32)

    linear = RotaryScalingType.from_string("linear")
    counts = {"local": 0, "global": 0}
    for layer in model.transformer.layers:
        attn = layer.attention
        if attn.is_local:
            attn.rotary_embedding_scale_type = none
            attn.rotary_embedding_scale = 1.0
            counts["local"] += 1
        else:
            if attn.rotary_embedding_scale_type != linear or not math.isclose(
                attn.rotary_embedding_scale, factor
            ):
                raise AssertionError("a global layer lost its linear rope scaling")
            counts["global"] += 1

    check_table(
        "global",
        model.rotary_inv_freq.raw_value,
        model.embed_positions_for_gpt_attention.raw_value,
        float(cfg.rotary_base),
        dim,
        factor,
    )
    check_table(
        "local",
        model.rotary_inv_freq_local.raw_value,
        model.embed_positions_for_gpt_attention_local.raw_value,
        float(local_base),
        dim,
        None,
    )
    print(
        f"[gemma3 rope] global layers: base {cfg.rotary_base:g}, linear x{factor:g} ({counts['global']}); "
        f"local layers: base {local_base:g}, unscaled ({counts['local']})",
        flush=True,
    )
    return counts


def set_qk_norm_eps(model: Any, eps: float) -> int:
    """Give every layer's q/k RMSNorm HF's epsilon; returns how many norms were set.

    Raises if a layer has no q/k norm (then this is not a Gemma 3 network and the fix would be silently
    wrong), or if `eps` is not a small positive number.
    """
    if not 0 < eps < 1e-3:
        raise ValueError(f"implausible RMSNorm epsilon {eps!r}")
    count = 0
    for i, layer in enumerate(model.transformer.layers):
        attn = layer.attention
        for name in ("q_layernorm", "k_layernorm"):
            norm = getattr(attn, name, None)
            if norm is None or not hasattr(norm, "eps"):
                raise AssertionError(f"layer {i}: attention has no {name} with an eps (not Gemma 3?)")
            norm.eps = float(eps)
            count += 1
    return count


def apply_fidelity_fixes(model: Any) -> None:
    counts = apply_global_only_rope_scaling(model)
    eps = float(model.config.norm_epsilon)
    n = set_qk_norm_eps(model, eps)
    print(f"[gemma3 fixes] q/k norm eps {eps:g} on {n} norms; rope {counts}", flush=True)


if _HAVE_TRTLLM:

    class Gemma3FidelityFixesForCausalLM(GemmaForCausalLM):
        """GemmaForCausalLM with HF's Gemma 3 RoPE and q/k-norm epsilon (see module docstring)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            apply_fidelity_fixes(self)
