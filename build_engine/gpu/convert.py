"""compressed-tensors GPTQ INT4 checkpoint → TensorRT-LLM checkpoint (config.json + rank{i}.safetensors).

Pure torch/safetensors: runs anywhere, no TensorRT-LLM needed. The language model becomes
`Gemma3ForCausalLM` with `quant_algo: W4A16_AWQ`, because the engine-flow Gemma accepts W4A16_AWQ but not
W4A16_GPTQ (`GemmaForCausalLM.assert_valid_quant_algo`). The checkpoint is symmetric (w = q·s, no zero
point, contiguous groups), which is exactly AWQ's dequantization with a unit pre-quant scale, so no
re-quantization happens: the int4 values and scales are copied bit for bit.

Raw AWQ tensors per quantized Linear, as `trtllm-build` expects them (confirmed in TensorRT-LLM source,
see docs/gpu.md "What was confirmed"): for a Linear with N outputs and K inputs (per rank),
  `<name>.weight`                   int8  [N/2, K]  two signed int4 per byte along N: low nibble = row 2j,
                                                     high nibble = row 2j+1 (two's complement);
  `<name>.weights_scaling_factor`   dtype [N, K/group]  (w = q · s);
  `<name>.prequant_scaling_factor`  dtype [K]           all ones.
At build time `preprocess_perlayer_weights` transposes the int8 weight to [K, N/2] and runs
`preprocess_weights_for_mixed_gemm` (row permutation + interleaving for the mixed-type GEMM), transposes
the scales to [K/group, N] and reshapes the pre-quant scale to [1, K]; we must not interleave ourselves.

Tensor-parallel sharding follows the upstream Gemma converter (`models/gemma/convert.py`): q/k/v split by
heads then concatenated per rank, `o_proj`/`down_proj` split along K (RowLinear), `gate_proj`→`mlp.fc`
and `up_proj`→`mlp.gate` split along N, embedding and lm_head split by vocabulary rows; RMSNorm weights
get +1 (Gemma's `x·(1+w)`) and are replicated.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from build_engine.gpu.checkpoint import (
    ATTENTION_PROJ,
    CheckpointInfo,
    UnsupportedCheckpoint,
    check_zero_point,
    checkpoint_fingerprint,
    inspect_checkpoint,
)
from build_engine.gpu.safetensors_stream import SafetensorsWriter
from build_engine.gpu.settings import check_dtype

# Bump when the output changes so stamps made by older code are rebuilt.
CONVERTER_VERSION = "1"
ARCHITECTURE = "Gemma3ForCausalLM"
QUANT_ALGO = "W4A16_AWQ"
# WeightOnlyGroupwiseQuantLinear pads in/out features to max(64, group) * tp_size (quantization/layers.py);
# a padded layer would not match our unpadded tensors, so such a tp_size is refused up front.
GROUPWISE_MIN_MULTIPLE = 64

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def log(msg: str) -> None:
    print(f"[build_engine convert] {msg}", file=sys.stderr, flush=True)


# --- int4 layouts -----------------------------------------------------------------------------------
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_compressed_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """compressed-tensors `pack-quantized` int32 [N, ceil(K/8)] → int8 [N, K] in [-8, 7].

    Eight 4-bit fields per int32 along the input dim, element j of each group of 8 in bits 4j..4j+3, stored
    with a +8 offset (unsigned 0..15).
    """
    if packed.dtype != torch.int32:
        raise UnsupportedCheckpoint(f"weight_packed dtype {packed.dtype}: expected int32")
    nib = (packed.unsqueeze(-1) >> _SHIFTS) & 0xF
    q = nib.reshape(packed.shape[0], -1)[:, :in_features]
    return (q - 8).to(torch.int8)


def pack_awq_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] → TensorRT-LLM raw AWQ int8 [N/2, K] (low nibble = even row)."""
    if q.shape[0] % 2:
        raise ValueError("output features must be even to pack int4 pairs")
    lo = q[0::2].to(torch.int16) & 0xF
    hi = q[1::2].to(torch.int16) & 0xF
    return ((hi << 4) | lo).to(torch.uint8).view(torch.int8).contiguous()


def unpack_awq_int4(raw: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_awq_int4`: int8 [N/2, K] → int8 [N, K] (sign-extended nibbles)."""
    b = raw.view(torch.uint8).to(torch.int16)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.empty((raw.shape[0] * 2, raw.shape[1]), dtype=torch.int8)
    out[0::2] = lo.to(torch.int8)
    out[1::2] = hi.to(torch.int8)
    return out


def dequantize_awq(raw: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """What the engine computes from our tensors: float32 [N, K] = q · s (pre-quant scale is 1)."""
    q = unpack_awq_int4(raw).float()
    n, k = q.shape
    return (q.reshape(n, k // group_size, group_size) * scale.float().unsqueeze(-1)).reshape(n, k)


# --- reading the source checkpoint -----------------------------------------------------------------
class TensorReader:
    """Lazy access to tensors across `*.safetensors` shards (keeps the files open, reads on demand)."""

    def __init__(self, checkpoint_dir: Path):
        from safetensors import safe_open

        self._stack = ExitStack()
        index = checkpoint_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {}
            for shard in sorted(checkpoint_dir.glob("*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    weight_map.update(dict.fromkeys(f.keys(), shard.name))
        self._where = weight_map
        self._open = {
            name: self._stack.enter_context(safe_open(str(checkpoint_dir / name), framework="pt"))
            for name in sorted(set(weight_map.values()))
        }

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UnsupportedCheckpoint(f"tensor {name} not in the checkpoint")
        return self._open[self._where[name]].get_tensor(name)

    def close(self) -> None:
        self._stack.close()


@dataclass
class QuantLinear:
    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # [N, K / group]


def read_quant_linear(reader: TensorReader, module: str, group_size: int) -> QuantLinear:
    packed = reader.get(f"{module}.weight_packed")
    scale = reader.get(f"{module}.weight_scale")
    n, k_groups = scale.shape
    k = k_groups * group_size
    if f"{module}.weight_shape" in reader:
        shape = [int(x) for x in reader.get(f"{module}.weight_shape").tolist()]
        if shape != [n, k]:
            raise UnsupportedCheckpoint(f"{module}: weight_shape {shape} vs scales {list(scale.shape)}")
    if packed.shape != (n, math.ceil(k / 8)):
        raise UnsupportedCheckpoint(f"{module}: weight_packed {tuple(packed.shape)} does not fit [{n}, {k}]")
    if f"{module}.weight_zero_point" in reader:
        check_zero_point(
            f"{module}.weight_zero_point", reader.get(f"{module}.weight_zero_point"), tuple(scale.shape)
        )
    return QuantLinear(unpack_compressed_int4(packed, k), scale)


# --- sharding ---------------------------------------------------------------------------------------
def _split(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    if t.shape[dim] % tp:
        raise UnsupportedCheckpoint(f"dimension {t.shape[dim]} not divisible by tp_size {tp}")
    return t.chunk(tp, dim=dim)[rank]


def check_tp(info: CheckpointInfo, tp: int) -> None:
    a, g = info.text, info.quant.group_size
    multiple = max(GROUPWISE_MIN_MULTIPLE, g) * tp
    dims = {
        "hidden_size": a.hidden_size,
        "q_proj out": a.num_heads * a.head_dim,
        "qkv out": (a.num_heads + 2 * a.num_kv_heads) * a.head_dim,
        "intermediate_size": a.intermediate_size,
    }
    bad = {k: v for k, v in dims.items() if v % multiple}
    if bad:
        raise UnsupportedCheckpoint(
            f"tp_size {tp}: TensorRT-LLM's groupwise int4 layers need every in/out dimension divisible by "
            f"max(64, group_size) x tp_size = {multiple}; {bad} are not (try a smaller tp_size)"
        )
    if a.num_heads % tp or a.num_kv_heads % tp:
        raise UnsupportedCheckpoint(
            f"tp_size {tp} must divide {a.num_heads} heads and {a.num_kv_heads} KV heads"
        )
    if a.vocab_size % tp:
        raise UnsupportedCheckpoint(f"tp_size {tp} must divide the vocabulary ({a.vocab_size})")


def _awq(prefix: str, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": pack_awq_int4(q),
        f"{prefix}.weights_scaling_factor": scale.to(dtype).contiguous(),
        f"{prefix}.prequant_scaling_factor": torch.ones(q.shape[1], dtype=dtype),
    }


def _norm(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Gemma's RMSNorm multiplies by (1 + w); TensorRT-LLM's RmsNorm by w (as the upstream converter does).
    return (t.float() + 1.0).to(dtype).contiguous()


def convert_layer(
    reader: TensorReader, info: CheckpointInfo, layer: int, tp: int, dtype: torch.dtype
) -> list[dict[str, torch.Tensor]]:
    """One decoder layer → per-rank tensor dicts."""
    a, g = info.text, info.quant.group_size
    src = f"{info.lm_prefix}layers.{layer}"
    dst = f"transformer.layers.{layer}"
    lin = {
        p: read_quant_linear(reader, f"{src}.{'self_attn' if p in ATTENTION_PROJ else 'mlp'}.{p}", g)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    expected = {
        "q_proj": (a.num_heads * a.head_dim, a.hidden_size),
        "k_proj": (a.num_kv_heads * a.head_dim, a.hidden_size),
        "v_proj": (a.num_kv_heads * a.head_dim, a.hidden_size),
        "o_proj": (a.hidden_size, a.num_heads * a.head_dim),
        "gate_proj": (a.intermediate_size, a.hidden_size),
        "up_proj": (a.intermediate_size, a.hidden_size),
        "down_proj": (a.hidden_size, a.intermediate_size),
    }
    for p, shape in expected.items():
        if tuple(lin[p].q.shape) != shape:
            raise UnsupportedCheckpoint(f"{src} {p}: shape {tuple(lin[p].q.shape)}, expected {shape}")
    norms = {
        "input_layernorm": "input_layernorm",
        "post_layernorm": "post_attention_layernorm",
        "pre_feedforward_layernorm": "pre_feedforward_layernorm",
        "post_feedforward_layernorm": "post_feedforward_layernorm",
        "attention.q_layernorm": "self_attn.q_norm",
        "attention.k_layernorm": "self_attn.k_norm",
    }
    shared = {f"{dst}.{d}.weight": _norm(reader.get(f"{src}.{s}.weight"), dtype) for d, s in norms.items()}
    ranks: list[dict[str, torch.Tensor]] = []
    for r in range(tp):
        out = dict(shared)
        # Column-parallel: rows (outputs) split; q, k, v each by heads, then concatenated per rank.
        qkv_q = torch.cat([_split(lin[p].q, tp, r, 0) for p in ("q_proj", "k_proj", "v_proj")])
        qkv_s = torch.cat([_split(lin[p].scale, tp, r, 0) for p in ("q_proj", "k_proj", "v_proj")])
        out.update(_awq(f"{dst}.attention.qkv", qkv_q, qkv_s, dtype))
        out.update(
            _awq(
                f"{dst}.mlp.fc",
                _split(lin["gate_proj"].q, tp, r, 0),
                _split(lin["gate_proj"].scale, tp, r, 0),
                dtype,
            )
        )
        out.update(
            _awq(
                f"{dst}.mlp.gate",
                _split(lin["up_proj"].q, tp, r, 0),
                _split(lin["up_proj"].scale, tp, r, 0),
                dtype,
            )
        )
        # Row-parallel: columns (inputs) split, and with them whole scale groups.
        out.update(
            _awq(
                f"{dst}.attention.dense",
                _split(lin["o_proj"].q, tp, r, 1),
                _split(lin["o_proj"].scale, tp, r, 1),
                dtype,
            )
        )
        out.update(
            _awq(
                f"{dst}.mlp.proj",
                _split(lin["down_proj"].q, tp, r, 1),
                _split(lin["down_proj"].scale, tp, r, 1),
                dtype,
            )
        )
        ranks.append(out)
    return ranks


def trtllm_config(info: CheckpointInfo, tp: int, dtype: str) -> dict[str, object]:
    """The TensorRT-LLM checkpoint `config.json` (`GemmaConfig` + `PretrainedConfig` fields)."""
    a = info.text
    rotary_scaling = (
        {"type": "linear", "factor": a.rope_linear_factor}
        if a.rope_linear_factor not in (None, 1.0)
        else None
    )
    return {
        "architecture": ARCHITECTURE,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": a.vocab_size,
        "hidden_size": a.hidden_size,
        "num_hidden_layers": a.num_layers,
        "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_kv_heads,
        "head_size": a.head_dim,
        "intermediate_size": a.intermediate_size,
        "max_position_embeddings": a.max_position_embeddings,
        # What upstream GemmaConfig.from_hugging_face yields for Gemma 3 (its config has no `hidden_act`);
        # TensorRT-LLM's `gelu` is the tanh approximation, i.e. HF's gelu_pytorch_tanh.
        "hidden_act": "gelu",
        "norm_epsilon": info.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": a.rope_theta,
        # Read by create_attention_const_params for the global table; gemma3_fixes.py (the model
        # class trtllm-build loads) keeps the local layers unscaled.
        "rotary_scaling": rotary_scaling,
        "rope_local_base_freq": a.rope_local_base_freq,
        "sliding_window": a.sliding_window,
        # Both spellings: TensorRT-LLM versions differ in the Gemma3ConfigGroup field name.
        "_sliding_window_pattern": a.sliding_window_pattern,
        "sliding_window_pattern": a.sliding_window_pattern,
        "query_pre_attn_scalar": a.query_pre_attn_scalar,
        "final_logit_softcapping": info.final_logit_softcapping,
        "attn_logit_softcapping": info.attn_logit_softcapping,
        "attn_bias": False,
        "mlp_bias": False,
        "use_parallel_embedding": tp > 1,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {
            "quant_algo": QUANT_ALGO,
            "kv_cache_quant_algo": None,
            "group_size": info.quant.group_size,
            "has_zero_point": False,
            "pre_quant_scale": True,
            "exclude_modules": ["*lm_head", "*vocab_embedding"],
        },
    }


def iter_convert(
    reader: TensorReader, info: CheckpointInfo, tp: int, dtype: str
) -> Iterator[tuple[str, list[dict[str, torch.Tensor]]]]:
    """Yield (what, per-rank tensors) piece by piece so callers can report progress."""
    tdtype = _TORCH_DTYPES[dtype]
    p = info.lm_prefix
    emb = reader.get(f"{p}embed_tokens.weight")
    if tuple(emb.shape) != (info.text.vocab_size, info.text.hidden_size):
        raise UnsupportedCheckpoint(f"embed_tokens {tuple(emb.shape)} vs vocab/hidden in config")
    emb = emb.to(tdtype)
    pieces = []
    for r in range(tp):
        rows = _split(emb, tp, r, 0).contiguous()
        # lm_head is written out even though it is tied: ColumnLinear lm_head is its own parameter
        # (the upstream converter does the same).
        piece = {"lm_head.weight": rows.clone()}
        piece["transformer.vocab_embedding.weight"] = rows if tp > 1 else emb
        pieces.append(piece)
    del emb, rows, piece  # the caller writes and drops each piece; keep no reference here either
    yield "embedding", pieces
    del pieces
    yield "final norm", [{"transformer.ln_f.weight": _norm(reader.get(f"{p}norm.weight"), tdtype)}] * tp
    for layer in range(info.text.num_layers):
        yield f"layer {layer + 1}/{info.text.num_layers}", convert_layer(reader, info, layer, tp, tdtype)


def convert(
    checkpoint_dir: Path,
    out_dir: Path,
    *,
    tp_size: int = 1,
    dtype: str = "bfloat16",
    info: CheckpointInfo | None = None,
    progress: Callable[[str], None] = log,
) -> list[Path]:
    """Write `out_dir/config.json` and `out_dir/rank{i}.safetensors`; returns the written files."""
    check_dtype(dtype)
    info = info or inspect_checkpoint(checkpoint_dir)
    check_tp(info, tp_size)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.monotonic()
    # One writer per rank: each piece goes to disk as soon as it is converted (peak RAM: one piece).
    meta = {"format": "pt", "converter": f"build_engine.gpu {CONVERTER_VERSION}"}
    writers = [SafetensorsWriter(tmp / f"rank{r}.safetensors", meta) for r in range(tp_size)]
    reader = TensorReader(checkpoint_dir)
    try:
        for what, pieces in iter_convert(reader, info, tp_size, dtype):
            for writer, piece in zip(writers, pieces, strict=True):
                for name, tensor in piece.items():
                    writer.add(name, tensor)
                del piece, tensor
            del pieces
            progress(f"{what} ({time.monotonic() - t0:.0f}s)")
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        reader.close()
    written = []
    for writer in writers:
        path = writer.close()
        written.append(out_dir / path.name)
        progress(f"wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB)")
    (tmp / "config.json").write_text(json.dumps(trtllm_config(info, tp_size, dtype), indent=2) + "\n")
    (tmp / "conversion.json").write_text(
        json.dumps(
            {
                "converter_version": CONVERTER_VERSION,
                "source": str(checkpoint_dir),
                "source_fingerprint": checkpoint_fingerprint(checkpoint_dir),
                "tp_size": tp_size,
                "dtype": dtype,
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return [out_dir / "config.json", *written]
