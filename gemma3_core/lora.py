"""Hugging Face PEFT LoRA adapters → TensorRT-LLM `lora_weights` / `lora_config`, and back (the layout).

One place for the LoRA layout shared by the build (`build_engine.lora_convert`), the gateway's adapter
registry (`gateway/lora_registry.py`) and the CPU reference engine (`from_trtllm_tensors`; its torch hooks
are `cpu_engine.lora_hooks`). The layout facts and where they were confirmed in TensorRT-LLM are in
docs/lora.md.

Layout (TensorRT-LLM C++ runtime, `LoraCache::copyToPages` / `loraUtils.cpp`):
  * `lora_config` row = `[module_id, layer_idx, adapter_size]` (INT32; a 4th `is_dora` column is accepted
    by newer runtimes, we never emit it),
  * `lora_weights` row = `in.ravel() ++ out.ravel()` zero-padded to the longest row, where `in` = PEFT
    `lora_A.weight` `[r, in_dim]` and `out` = PEFT `lora_B.weight * scaling` `[out_dim, r]` (the PEFT
    scaling `alpha/r` or `alpha/sqrt(r)` is folded into `out`; the runtime applies no extra scale),
  * request tensors carry a leading batch dim of 1: `[1, rows, len]` and `[1, rows, 3]`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gemma3_core.constants import TextArch

log = logging.getLogger(__name__)

# --- TensorRT-LLM module vocabulary ---------------------------------------------------------------
# `LoraModule::ModuleType` (cpp/include/tensorrt_llm/runtime/loraModule.h) == `LoraManager.LORA_MODULE_IDS`.
TRTLLM_MODULE_IDS: dict[str, int] = {
    "attn_qkv": 0,
    "attn_q": 1,
    "attn_k": 2,
    "attn_v": 3,
    "attn_dense": 4,
    "mlp_h_to_4h": 5,
    "mlp_4h_to_h": 6,
    "mlp_gate": 7,
    "cross_attn_qkv": 8,
    "cross_attn_q": 9,
    "cross_attn_k": 10,
    "cross_attn_v": 11,
    "cross_attn_dense": 12,
    "moe_h_to_4h": 13,
    "moe_4h_to_h": 14,
    "moe_gate": 15,
    "moe_router": 16,
    "mlp_router": 17,
    "mlp_gate_up": 18,
}

# HF Gemma 3 projection → TensorRT-LLM LoRA slot. The Gemma converter loads `gate_proj` into the GatedMLP's
# `fc` (the activated branch, LoRA slot mlp_h_to_4h) and `up_proj` into its `gate` (slot mlp_gate); the
# names look swapped but this is what `hf_lora_convert.py` and `get_default_trtllm_modules_to_hf_modules`
# use too.
HF_TO_TRTLLM: dict[str, str] = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h",
    "up_proj": "mlp_gate",
    "down_proj": "mlp_4h_to_h",
}
HF_MODULE_IDS: dict[str, int] = {hf: TRTLLM_MODULE_IDS[t] for hf, t in HF_TO_TRTLLM.items()}
MODULE_ID_TO_HF: dict[int, str] = {i: hf for hf, i in HF_MODULE_IDS.items()}
TRTLLM_TO_HF: dict[str, str] = {t: hf for hf, t in HF_TO_TRTLLM.items()}
# Which decoder-layer submodule holds each projection (HF Gemma 3 module tree).
HF_PARENT: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
HF_MODULE_ORDER: tuple[str, ...] = tuple(sorted(HF_MODULE_IDS, key=HF_MODULE_IDS.__getitem__))

CONFIG_ROW_SIZE = 3
CONFIG_ROW_SIZE_WITH_DORA = 4  # newer runtimes: [module_id, layer_idx, adapter_size, is_dora]

_CACHE_MISS_RE = re.compile(r"LoRA task \d+ not found in cache\. Please send LoRA weights with request")


def cache_miss_message(task_id: int) -> str:
    """The exact text TensorRT-LLM's PeftCacheManager raises (the CPU reference engine raises it too)."""
    return f"LoRA task {task_id} not found in cache. Please send LoRA weights with request"


def is_cache_miss_error(message: str) -> bool:
    """True when an engine error means "resend this request with lora_weights + lora_config"."""
    return bool(_CACHE_MISS_RE.search(message or ""))


class LoraError(ValueError):
    """An adapter or a LoRA tensor pair that cannot be served (message is safe to show to the client)."""


class LoraTaskNotCachedError(LoraError):
    """Raised by the CPU reference engine when a task id arrives without weights and is not cached."""

    def __init__(self, task_id: int) -> None:
        super().__init__(cache_miss_message(task_id))
        self.task_id = task_id


# --- dimensions -----------------------------------------------------------------------------------
def module_dims(
    hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> dict[str, tuple[int, int]]:
    """HF projection name → (in_dim, out_dim) of its Linear (Gemma 3: q width ≠ hidden in general)."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    return {
        "q_proj": (hidden_size, q),
        "k_proj": (hidden_size, kv),
        "v_proj": (hidden_size, kv),
        "o_proj": (q, hidden_size),
        "gate_proj": (hidden_size, intermediate_size),
        "up_proj": (hidden_size, intermediate_size),
        "down_proj": (intermediate_size, hidden_size),
    }


def module_dims_from_arch(arch: TextArch) -> dict[str, tuple[int, int]]:
    return module_dims(
        arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads, arch.head_dim
    )


# --- reading PEFT adapters ------------------------------------------------------------------------
_ST_DTYPES: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",  # widened to float32 below
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, npt.NDArray[Any]]:
    """Read a .safetensors file with numpy only (the gateway image has no torch); BF16 → float32.

    Format: u64-LE header size, JSON header {name: {dtype, shape, data_offsets}}, raw little-endian data.
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or header_len > 100 * 2**20:
            raise LoraError(f"{path}: not a safetensors file")
        header = json.loads(f.read(header_len))
        data = f.read()
    out: dict[str, npt.NDArray[Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        st_dtype = info["dtype"]
        if st_dtype not in _ST_DTYPES:
            raise LoraError(f"{path}: tensor {name} has unsupported dtype {st_dtype}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=np.dtype(_ST_DTYPES[st_dtype]))
        if st_dtype == "BF16":
            # bfloat16 is the top half of a float32.
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.reshape(info["shape"]).copy()
    return out


@dataclass(frozen=True)
class LoraMatrices:
    """One adapted projection of one layer: delta(x) = scale * (x @ a.T) @ b.T."""

    a: npt.NDArray[np.float32]  # [r, in_dim] (PEFT lora_A.weight)
    b: npt.NDArray[np.float32]  # [out_dim, r] (PEFT lora_B.weight, unscaled)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class PeftAdapter:
    """A parsed PEFT LoRA adapter restricted to what the TensorRT-LLM engine can apply."""

    path: Path | None
    config: dict[str, Any]
    weights: dict[tuple[str, int], LoraMatrices] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        """HF projection names present, in TensorRT-LLM module-id order."""
        present = {m for m, _ in self.weights}
        return [m for m in HF_MODULE_ORDER if m in present]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self.weights})

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.weights.values()), default=0)

    def validate_dims(self, dims: Mapping[str, tuple[int, int]], num_layers: int | None = None) -> None:
        """Raise LoraError when a matrix does not fit the base model (wrong base checkpoint)."""
        for (name, layer), w in self.weights.items():
            in_dim, out_dim = dims[name]
            if w.a.shape[1] != in_dim or w.b.shape[0] != out_dim:
                raise LoraError(
                    f"adapter layer {layer} {name}: A {tuple(w.a.shape)} / B {tuple(w.b.shape)} do not fit "
                    f"the base model ({in_dim} → {out_dim}); was it trained on another checkpoint?"
                )
            if num_layers is not None and not 0 <= layer < num_layers:
                raise LoraError(f"adapter has layer {layer}, the base model has {num_layers} layers")


# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (Gemma3ForCausalLM) and the multimodal
# spellings ...model.language_model.layers.3... (transformers >= 4.52) / ...language_model.model.layers.3...
_KEY_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<parent>[A-Za-z_]+)\.(?P<module>[A-Za-z_0-9]+)"
    r"\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_UNSUPPORTED_CONFIG: tuple[tuple[str, str], ...] = (
    ("use_dora", "DoRA (use_dora) is not supported by this serving stack"),
    ("lora_bias", "LoRA bias (lora_bias) is not supported by TensorRT-LLM's LoRA plugin"),
    ("layer_replication", "layer_replication is not supported"),
    ("use_qalora", "QA-LoRA is not supported"),
    ("trainable_token_indices", "trainable_token_indices (token-embedding training) is not supported"),
    ("target_parameters", "target_parameters (LoRA on raw parameters) is not supported"),
    (
        "modules_to_save",
        "modules_to_save (fully trained extra modules) is not supported: the engine keeps "
        "the base weights; merge them into a new checkpoint instead",
    ),
)


def _pattern_value(patterns: Mapping[str, Any], module_path: str) -> Any | None:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path suffix (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return None


def _check_config(cfg: Mapping[str, Any], where: str) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraError(f"{where}: peft_type {peft_type} is not supported (only LORA)")
    for key, why in _UNSUPPORTED_CONFIG:
        if cfg.get(key):
            raise LoraError(f"{where}: {why}")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise LoraError(
            f"{where}: bias={bias!r} is not supported (TensorRT-LLM LoRA has no bias); use 'none'"
        )
    if not cfg.get("r"):
        raise LoraError(f"{where}: adapter_config.json has no rank `r`")


def _parse_weights(
    cfg: Mapping[str, Any], tensors: Mapping[str, npt.NDArray[Any]], where: str
) -> PeftAdapter:
    alpha = float(cfg.get("lora_alpha", cfg["r"]))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    pairs: dict[tuple[str, int], dict[str, npt.NDArray[Any]]] = {}
    paths: dict[tuple[str, int], str] = {}
    for key, arr in tensors.items():
        if "lora_magnitude_vector" in key:
            raise LoraError(f"{where}: DoRA weights ({key}) are not supported")
        if "lora_embedding_" in key:
            raise LoraError(f"{where}: LoRA on embeddings ({key}) is not supported")
        m = _KEY_RE.match(key)
        if m is None:
            raise LoraError(
                f"{where}: unsupported tensor {key} (only lora_A/lora_B of decoder-layer projections)"
            )
        prefix = m["prefix"]
        if "vision" in prefix or "multi_modal_projector" in prefix:
            raise LoraError(f"{where}: LoRA on the vision tower ({key}) is not supported by the engine")
        module, parent = m["module"], m["parent"]
        if module not in HF_TO_TRTLLM or HF_PARENT[module] != parent:
            raise LoraError(
                f"{where}: LoRA on {parent}.{module} is not supported; supported: "
                + ", ".join(f"{HF_PARENT[n]}.{n}" for n in HF_MODULE_ORDER)
            )
        if arr.ndim != 2:
            raise LoraError(f"{where}: {key} has shape {arr.shape}, expected a matrix")
        k = (module, int(m["layer"]))
        pairs.setdefault(k, {})[m["ab"]] = arr
        # PEFT matches rank/alpha patterns against the module path inside the base model.
        base = prefix[len("base_model.model.") :] if prefix.startswith("base_model.model.") else prefix
        paths[k] = f"{base}layers.{k[1]}.{parent}.{module}"

    adapter = PeftAdapter(path=None, config=dict(cfg))
    for k, ab in sorted(pairs.items(), key=lambda kv: (kv[0][1], HF_MODULE_IDS[kv[0][0]])):
        if set(ab) != {"A", "B"}:
            raise LoraError(f"{where}: layer {k[1]} {k[0]} has lora_{''.join(ab)} only")
        a, b = ab["A"].astype(np.float32), ab["B"].astype(np.float32)
        r = a.shape[0]
        if r == 0 or b.shape[1] != r:
            raise LoraError(f"{where}: layer {k[1]} {k[0]}: A {a.shape} and B {b.shape} disagree on the rank")
        expected_r = _pattern_value(rank_pattern, paths[k]) or cfg["r"]
        if int(expected_r) != r:
            raise LoraError(
                f"{where}: layer {k[1]} {k[0]} has rank {r}, adapter_config.json says {expected_r}"
            )
        mod_alpha = float(_pattern_value(alpha_pattern, paths[k]) or alpha)
        # PEFT LoraLayer.update_layer: scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
        scale = mod_alpha / math.sqrt(r) if rslora else mod_alpha / r
        adapter.weights[k] = LoraMatrices(a=a, b=b, scale=scale)
    if not adapter.weights:
        raise LoraError(f"{where}: no LoRA weights found")
    return adapter


def load_peft_adapter(path: str | os.PathLike[str]) -> PeftAdapter:
    """Read `adapter_config.json` + `adapter_model.safetensors` (or `.bin` refused) from a PEFT directory."""
    d = Path(path)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoraError(f"{d}: no adapter_config.json")
    cfg = json.loads(cfg_path.read_text())
    _check_config(cfg, str(d))
    st = d / "adapter_model.safetensors"
    if not st.is_file():
        if (d / "adapter_model.bin").is_file():
            raise LoraError(f"{d}: adapter_model.bin (pickle) is not loaded; re-save with safe_serialization")
        raise LoraError(f"{d}: no adapter_model.safetensors")
    adapter = _parse_weights(cfg, read_safetensors(st), str(d))
    adapter.path = d
    return adapter


# --- TensorRT-LLM tensors -------------------------------------------------------------------------
def _in_region(name: str, rank: int, in_dim: int, dense_in_width: int | None) -> int:
    """Elements reserved for `in` in a row. `dense_in_width` emulates runtimes whose attn_dense module is
    sized hidden→hidden (see docs/lora.md, "attn_dense input width"): A is written flat, then zero-filled."""
    if name == "o_proj" and dense_in_width is not None:
        if dense_in_width < in_dim:
            raise LoraError(
                f"o_proj LoRA needs {in_dim} input columns but the runtime reserves {dense_in_width}: "
                "this engine cannot serve o_proj adapters; retrain without o_proj"
            )
        return rank * dense_in_width
    return rank * in_dim


def to_trtllm_tensors(
    adapter: PeftAdapter, dtype: Any = np.float16, *, dense_in_width: int | None = None
) -> tuple[npt.NDArray[Any], npt.NDArray[np.int32]]:
    """→ (`lora_weights` [rows, max_len] of `dtype`, `lora_config` int32 [rows, 3]); no batch dim.

    Rows are ordered by (layer, module id); the PEFT scaling is folded into `out` in float32 before the cast.
    """
    rows: list[npt.NDArray[np.float32]] = []
    cfg_rows: list[tuple[int, int, int]] = []
    for (name, layer), w in sorted(
        adapter.weights.items(), key=lambda kv: (kv[0][1], HF_MODULE_IDS[kv[0][0]])
    ):
        r, in_dim = w.a.shape
        in_part = np.zeros(_in_region(name, r, in_dim, dense_in_width), dtype=np.float32)
        in_part[: r * in_dim] = w.a.ravel()
        out_part = (w.b.astype(np.float32) * np.float32(w.scale)).ravel()
        rows.append(np.concatenate([in_part, out_part]))
        cfg_rows.append((HF_MODULE_IDS[name], layer, r))
    width = max(len(r) for r in rows)
    weights = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        weights[i, : len(row)] = row
    with np.errstate(over="ignore"):
        cast = weights.astype(dtype)
    if not np.all(np.isfinite(cast)):
        raise LoraError(f"LoRA weights overflow {np.dtype(dtype).name} after folding the scaling")
    return cast, np.asarray(cfg_rows, dtype=np.int32).reshape(-1, CONFIG_ROW_SIZE)


def with_batch_dim(
    weights: npt.NDArray[Any], config: npt.NDArray[Any]
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """[rows, len] / [rows, 3] → the per-request [1, rows, len] / [1, rows, 3] TensorRT-LLM expects."""
    return (weights[None] if weights.ndim == 2 else weights), (config[None] if config.ndim == 2 else config)


def from_trtllm_tensors(
    weights: npt.NDArray[Any],
    config: npt.NDArray[Any],
    dims: Mapping[str, tuple[int, int]],
    *,
    dense_in_width: int | None = None,
    num_layers: int | None = None,
) -> dict[tuple[str, int], LoraMatrices]:
    """Decode request tensors (2-D, or 3-D with batch 1) into per-(HF module, layer) matrices.

    `dims` gives each projection's true (in_dim, out_dim) (`module_dims_from_arch`); the PEFT scaling is
    already inside `b`, so every returned `scale` is 1.0. Validation mirrors `loraValidateRequestTensors`.
    """
    w, c = np.asarray(weights), np.asarray(config)
    if w.ndim == 3 or c.ndim == 3:
        if w.ndim != 3 or c.ndim != 3 or w.shape[0] != 1 or c.shape[0] != 1:
            raise LoraError("Expected batch dimension to be 1 for each lora request")
        w, c = w[0], c[0]
    if w.ndim != 2 or c.ndim != 2:
        raise LoraError("lora_weights must be [rows, len] and lora_config [rows, 3]")
    if c.shape[1] not in (CONFIG_ROW_SIZE, CONFIG_ROW_SIZE_WITH_DORA):
        raise LoraError(f"Expected dim2 of lora_config to be 3 or 4, got {c.shape[1]}")
    if c.shape[0] != w.shape[0]:
        raise LoraError("Expected dim1 lora_weights and lora_config to have the same size")
    out: dict[tuple[str, int], LoraMatrices] = {}
    for row in range(c.shape[0]):
        module_id, layer, r = (int(v) for v in c[row, :3])
        if c.shape[1] == CONFIG_ROW_SIZE_WITH_DORA and int(c[row, 3]):
            raise LoraError("DoRA rows (is_dora=1) are not supported")
        name = MODULE_ID_TO_HF.get(module_id)
        if name is None or name not in dims:
            raise LoraError(f"lora module id {module_id} not enabled for this model")
        if r <= 0:
            raise LoraError("Expected adapterSize to be > 0")
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            raise LoraError("Expected layerId to be in the range [0, numModelLayers)")
        in_dim, out_dim = dims[name]
        in_len = _in_region(name, r, in_dim, dense_in_width)
        if in_len + r * out_dim > w.shape[1]:
            raise LoraError(f"lora_weights has too few values for {HF_TO_TRTLLM[name]}")
        if (name, layer) in out:
            raise LoraError(f"lora_config repeats {HF_TO_TRTLLM[name]} of layer {layer}")
        flat = w[row].astype(np.float32)
        a = flat[: r * in_dim].reshape(r, in_dim)
        b = flat[in_len : in_len + r * out_dim].reshape(out_dim, r)
        out[(name, layer)] = LoraMatrices(a=a, b=b, scale=1.0)
    return out


def _hf_names(modules: Iterable[str]) -> set[str]:
    return {TRTLLM_TO_HF.get(m, m) for m in modules}


def save_npy_pair(
    out_dir: str | os.PathLike[str], weights: npt.NDArray[Any], config: npt.NDArray[Any]
) -> tuple[Path, Path]:
    """Write `model.lora_weights.npy` / `model.lora_config.npy` atomically (names the Triton tools use)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, arr in (("model.lora_weights.npy", weights), ("model.lora_config.npy", config)):
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, d / stem)
        paths.append(d / stem)
    return paths[0], paths[1]


def trtllm_target_modules(hf_modules: Iterable[str]) -> list[str]:
    """HF names (or TensorRT-LLM names, or "all-linear") → TensorRT-LLM module names in id order.

    q/k/v are completed to all three when any is present, as trtllm-build does (`missing_qkv_modules`).
    """
    names: set[str] = set()
    for m in hf_modules:
        short = m.rsplit(".", 1)[-1]
        if short == "all-linear":
            names.update(HF_TO_TRTLLM.values())
        elif short in HF_TO_TRTLLM:
            names.add(HF_TO_TRTLLM[short])
        elif short in TRTLLM_MODULE_IDS and short in HF_TO_TRTLLM.values():
            names.add(short)
        else:
            raise LoraError(f"unsupported LoRA target module {m!r}; supported: {', '.join(HF_MODULE_ORDER)}")
    if names & {"attn_q", "attn_k", "attn_v"}:
        names |= {"attn_q", "attn_k", "attn_v"}
    return sorted(names, key=TRTLLM_MODULE_IDS.__getitem__)
