"""Download the checkpoint and check, before anything expensive runs, that the converter supports it.

The converter handles exactly one quantization scheme: compressed-tensors `pack-quantized`, 4-bit signed
integers, symmetric (no zero point), group-wise along the input dimension with contiguous groups (no
act-order `g_idx`), weights only, on every linear layer of the language model and nothing else quantized
except what the converter keeps in bf16 anyway (vision tower, projector, lm_head). Anything else fails here
with a message saying what was found and what is supported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemma3_core import constants as C

# Files the build needs (weights, configs, tokenizer, processor); nothing else is downloaded.
DOWNLOAD_PATTERNS = (
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "*.txt",
)

SUPPORTED_FORMAT = "pack-quantized"
SUPPORTED_BITS = 4
SUPPORTED_GROUP_SIZES = (64, 128)
# compressed-tensors `ActivationOrdering`: "weight"/"static" only change the calibration order and keep
# contiguous groups (no g_idx is stored); "group"/"dynamic" (and legacy `true`) need a g_idx.
CONTIGUOUS_ACTORDER = (None, False, "weight", "static")

# The seven Linear layers of a Gemma 3 decoder block.
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LINEAR_PROJ = ATTENTION_PROJ + MLP_PROJ

# Gemma3TextConfig defaults (transformers 4.50, the release the 27B checkpoints were saved with):
# `save_pretrained` writes only values that differ from these, so absent keys take these values.
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "rope_scaling": None,
    "rope_local_base_freq": 10_000.0,
    "sliding_window_pattern": 6,
    "tie_word_embeddings": True,
}

# Weight-name prefixes of the language model, newest layouts last.
LM_PREFIXES = (
    "language_model.model.",  # Gemma3ForConditionalGeneration, transformers 4.50-4.51 (the 2025 checkpoints)
    "model.language_model.",  # transformers >= 4.52
    "model.",  # a text-only Gemma3ForCausalLM
)


class UnsupportedCheckpoint(ValueError):
    """The checkpoint is not something the GPU converter can turn into a correct engine."""


@dataclass(frozen=True)
class QuantScheme:
    format: str
    num_bits: int
    group_size: int
    symmetric: bool
    actorder: str | None
    ignore: tuple[str, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    architecture: str
    text: C.TextArch
    rope_scaling_type: str | None
    rms_norm_eps: float
    hidden_activation: str
    tie_word_embeddings: bool
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None
    quant: QuantScheme
    lm_prefix: str
    has_vision: bool
    torch_dtype: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["text"] = asdict(self.text)
        return data


# --- download ---------------------------------------------------------------------------------------
def download(
    model_id: str,
    target: Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    patterns: Iterable[str] = DOWNLOAD_PATTERNS,
) -> Path:
    """`huggingface_hub.snapshot_download` into `target`: resumes partial files, shows per-file progress."""
    from huggingface_hub import snapshot_download

    target.mkdir(parents=True, exist_ok=True)
    path = snapshot_download(
        repo_id=model_id,
        revision=revision,
        local_dir=str(target),
        token=token or os.environ.get("HF_TOKEN") or None,
        allow_patterns=list(patterns),
    )
    return Path(path)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_fingerprint(checkpoint_dir: Path) -> dict[str, str]:
    """Cheap identity of a downloaded checkpoint: hashes of its config and weight index, shard sizes."""
    out: dict[str, str] = {}
    for name in ("config.json", "model.safetensors.index.json"):
        p = checkpoint_dir / name
        if p.exists():
            out[name] = file_digest(p)
    for p in sorted(checkpoint_dir.glob("*.safetensors")):
        out[p.name] = str(p.stat().st_size)
    return out


# --- inspect ----------------------------------------------------------------------------------------
def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    text = dict(config.get("text_config") or {})
    if not text and config.get("model_type") == "gemma3_text":
        text = dict(config)
    merged = {**GEMMA3_TEXT_DEFAULTS, **text}
    # transformers >= 5 writes `rope_parameters` per layer type instead of rope_theta/rope_scaling.
    params = text.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention", {})
        merged["rope_theta"] = full.get("rope_theta", merged["rope_theta"])
        kind = full.get("rope_type", "default")
        merged["rope_scaling"] = (
            None if kind == "default" else {"rope_type": kind, "factor": full.get("factor")}
        )
        merged["rope_local_base_freq"] = local.get("rope_theta", merged["rope_local_base_freq"])
    if text.get("layer_types"):
        types = list(text["layer_types"])
        period = types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1
        merged["sliding_window_pattern"] = period
    return merged


def _rope(text: Mapping[str, Any]) -> tuple[str | None, float | None]:
    scaling = text.get("rope_scaling")
    if not scaling:
        return None, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("linear", "default"):
        raise UnsupportedCheckpoint(
            f"rope_scaling type {kind!r}: the engine build supports only linear scaling of the global layers"
        )
    if kind == "default":
        return None, None
    return "linear", float(scaling["factor"])


def parse_quantization(config: Mapping[str, Any]) -> QuantScheme:
    q = config.get("quantization_config")
    if not q:
        raise UnsupportedCheckpoint("config.json has no quantization_config: expected a GPTQ INT4 checkpoint")
    method = q.get("quant_method")
    if method != "compressed-tensors":
        raise UnsupportedCheckpoint(
            f"quant_method {method!r}: only compressed-tensors checkpoints are supported (AutoGPTQ/AWQ "
            "layouts are not)"
        )
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise UnsupportedCheckpoint(
            f"{len(groups)} config_groups: exactly one quantization scheme is supported"
        )
    (group,) = groups.values()
    fmt = group.get("format") or q.get("format")
    if fmt != SUPPORTED_FORMAT:
        raise UnsupportedCheckpoint(f"format {fmt!r}: only {SUPPORTED_FORMAT!r} is supported")
    targets = group.get("targets") or []
    if targets != ["Linear"]:
        raise UnsupportedCheckpoint(f"targets {targets}: only ['Linear'] is supported")
    if group.get("input_activations") or group.get("output_activations"):
        raise UnsupportedCheckpoint("activation quantization found: only weight-only (W4A16) is supported")
    w = group.get("weights") or {}
    problems = []
    if w.get("type", "int") != "int":
        problems.append(f"type {w.get('type')!r} (need 'int')")
    if w.get("num_bits") != SUPPORTED_BITS:
        problems.append(f"num_bits {w.get('num_bits')} (need {SUPPORTED_BITS})")
    if w.get("strategy") != "group":
        problems.append(f"strategy {w.get('strategy')!r} (need 'group')")
    if w.get("group_size") not in SUPPORTED_GROUP_SIZES:
        problems.append(f"group_size {w.get('group_size')} (need one of {SUPPORTED_GROUP_SIZES})")
    if w.get("symmetric") is not True:
        problems.append("asymmetric weights (need symmetric, no zero point)")
    if w.get("actorder") not in CONTIGUOUS_ACTORDER:
        problems.append(f"actorder {w.get('actorder')!r} (act-order g_idx is not supported)")
    if w.get("dynamic"):
        problems.append("dynamic weight quantization")
    if problems:
        raise UnsupportedCheckpoint("unsupported weight quantization: " + "; ".join(problems))
    if q.get("sparsity_config") and q["sparsity_config"].get("format") not in (None, "dense"):
        raise UnsupportedCheckpoint("sparsity compression is not supported")
    if q.get("kv_cache_scheme"):
        raise UnsupportedCheckpoint("kv_cache_scheme is set: quantized KV cache is not supported")
    return QuantScheme(
        format=fmt,
        num_bits=int(w["num_bits"]),
        group_size=int(w["group_size"]),
        symmetric=True,
        actorder=w.get("actorder"),
        ignore=tuple(q.get("ignore") or ()),
    )


def _matches_ignore(module: str, ignore: Iterable[str]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif module == pattern or module.endswith("." + pattern) or pattern == module.split(".")[-1]:
            return True
    return False


def check_ignore_list(quant: QuantScheme, prefix: str, num_layers: int) -> None:
    """No decoder Linear may be left unquantized: the engine applies W4A16 to all of them."""
    skipped = [
        f"{prefix}layers.{i}.{'self_attn' if p in ATTENTION_PROJ else 'mlp'}.{p}"
        for i in range(num_layers)
        for p in LINEAR_PROJ
        if _matches_ignore(
            f"{prefix}layers.{i}.{'self_attn' if p in ATTENTION_PROJ else 'mlp'}.{p}", quant.ignore
        )
    ]
    if skipped:
        raise UnsupportedCheckpoint(
            f"{len(skipped)} decoder linear layers are in the ignore list (e.g. {skipped[0]}): mixed "
            "precision inside the language model is not supported"
        )


def weight_names(checkpoint_dir: Path) -> list[str]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names: list[str] = []
    for shard in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            names.extend(f.keys())
    return names


def detect_prefix(names: Iterable[str]) -> str:
    names = set(names)
    for prefix in LM_PREFIXES:
        if f"{prefix}embed_tokens.weight" in names:
            return prefix
    raise UnsupportedCheckpoint(
        "no language-model embedding found (looked for "
        + ", ".join(p + "embed_tokens.weight" for p in LM_PREFIXES)
        + ")"
    )


def check_zero_point(name: str, zp: Any, scale_shape: tuple[int, ...]) -> None:
    """Accept a symmetric scheme's leftover zero point only if every value decodes to zero.

    Stored like the scale ([N, K/group], any dtype) it must be all 0; packed like the weights (int32,
    [ceil(N/8), K/group], eight 4-bit values stored +8) every nibble must be 8. Anything else is a real
    zero point, i.e. an asymmetric checkpoint, which the W4A16 engine cannot express.
    """
    import torch

    shape = tuple(zp.shape)
    if shape == tuple(scale_shape):
        ok = not bool(torch.any(zp != 0))
    elif (
        zp.dtype == torch.int32
        and len(scale_shape) == 2
        and shape == (-(-scale_shape[0] // 8), scale_shape[1])
    ):
        nibbles = torch.stack([(zp >> (4 * j)) & 0xF for j in range(8)])
        ok = bool(torch.all(nibbles == 8))
    else:
        raise UnsupportedCheckpoint(
            f"{name}: shape {shape} fits neither the scales {tuple(scale_shape)} nor packing"
        )
    if not ok:
        raise UnsupportedCheckpoint(
            f"{name}: non-zero zero points (asymmetric quantization) are not supported by the W4A16 engine"
        )


def check_tensors(names: Iterable[str], prefix: str, num_layers: int) -> None:
    names = set(names)
    if any(n.endswith(".weight_g_idx") for n in names):
        raise UnsupportedCheckpoint(
            "weight_g_idx tensors found: act-order (non-contiguous groups) is not supported"
        )
    # weight_zero_point tensors may remain in a symmetric checkpoint (older compressed-tensors wrote
    # all-zero ones); parse_quantization has already refused asymmetric schemes, and the converter checks
    # each one decodes to zero (check_zero_point).
    missing = [
        f"{prefix}layers.{i}.{blk}.{p}.{suffix}"
        for i in range(num_layers)
        for p in LINEAR_PROJ
        for blk in ("self_attn" if p in ATTENTION_PROJ else "mlp",)
        for suffix in ("weight_packed", "weight_scale")
        if f"{prefix}layers.{i}.{blk}.{p}.{suffix}" not in names
    ]
    if missing:
        raise UnsupportedCheckpoint(f"{len(missing)} quantized tensors missing, e.g. {missing[0]}")
    if f"{prefix}norm.weight" not in names:
        raise UnsupportedCheckpoint(f"{prefix}norm.weight missing")


def inspect_config(config: Mapping[str, Any]) -> tuple[CheckpointInfo, dict[str, Any]]:
    """Parse config.json (no tensors read). Returns the summary and the merged text config."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "?")
    if arch not in ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"):
        raise UnsupportedCheckpoint(f"architecture {arch!r}: only Gemma 3 checkpoints are supported")
    quant = parse_quantization(config)
    text = _text_config(config)
    kind, factor = _rope(text)
    pattern = int(text["sliding_window_pattern"])
    arch_facts = C.TextArch(
        hidden_size=int(text["hidden_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=int(text["num_attention_heads"]),
        num_kv_heads=int(text["num_key_value_heads"]),
        head_dim=int(text["head_dim"]),
        intermediate_size=int(text["intermediate_size"]),
        vocab_size=int(text["vocab_size"]),
        query_pre_attn_scalar=int(text["query_pre_attn_scalar"]),
        sliding_window=int(text["sliding_window"]),
        sliding_window_pattern=pattern,
        rope_theta=float(text["rope_theta"]),
        rope_local_base_freq=float(text["rope_local_base_freq"]),
        rope_linear_factor=factor,
        max_position_embeddings=int(text["max_position_embeddings"]),
    )
    if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedCheckpoint(
            f"hidden_activation {text['hidden_activation']!r}: expected gelu_pytorch_tanh"
        )
    if text.get("attention_bias"):
        raise UnsupportedCheckpoint("attention_bias=true is not a Gemma 3 checkpoint")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") or "bfloat16")
    info = CheckpointInfo(
        architecture=arch,
        text=arch_facts,
        rope_scaling_type=kind,
        rms_norm_eps=float(text["rms_norm_eps"]),
        hidden_activation=str(text["hidden_activation"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        final_logit_softcapping=text.get("final_logit_softcapping"),
        attn_logit_softcapping=text.get("attn_logit_softcapping"),
        quant=quant,
        lm_prefix="",
        has_vision=bool(config.get("vision_config")),
        torch_dtype=dtype.replace("torch.", ""),
    )
    return info, text


def inspect_checkpoint(checkpoint_dir: Path, *, expected: C.TextArch | None = None) -> CheckpointInfo:
    """config.json + tensor names → CheckpointInfo; raises UnsupportedCheckpoint on anything unsupported."""
    cfg_path = checkpoint_dir / "config.json"
    if not cfg_path.exists():
        raise UnsupportedCheckpoint(f"{cfg_path} not found (run the download stage first)")
    info, _ = inspect_config(json.loads(cfg_path.read_text()))
    names = weight_names(checkpoint_dir)
    prefix = detect_prefix(names)
    check_tensors(names, prefix, info.text.num_layers)
    check_ignore_list(info.quant, prefix, info.text.num_layers)
    if not info.tie_word_embeddings:
        raise UnsupportedCheckpoint("untied lm_head: the converter writes the (tied) embedding as lm_head")
    info = CheckpointInfo(**{**info.__dict__, "lm_prefix": prefix})
    if expected is not None:
        mismatches = {
            k: (getattr(info.text, k), v) for k, v in asdict(expected).items() if getattr(info.text, k) != v
        }
        if mismatches:
            detail = ", ".join(f"{k}: found {a!r}, expected {b!r}" for k, (a, b) in mismatches.items())
            raise UnsupportedCheckpoint(f"architecture differs from Gemma 3 27B facts: {detail}")
    return info


def expected_arch_for(model_id: str) -> C.TextArch | None:
    """The architecture facts to hold a known checkpoint to (None for anything else, e.g. test fixtures)."""
    return C.GEMMA3_27B if model_id == C.MODEL_CARD_ID else None
