"""GPU converter on a synthetic tiny Gemma 3 checkpoint written by compressed-tensors itself.

The checkpoint mimics ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g: the 2025 (transformers 4.50) layout —
`language_model.model.*` language-model keys, `vision_tower.vision_model.*` vision keys, tied embeddings (no
lm_head tensor), a sparse `text_config` with `rope_scaling: linear 8` — and int4 symmetric group-128
`pack-quantized` weights produced by the compressed-tensors library (random weights, RTN scales). Every
converted weight must dequantize exactly to what compressed-tensors decompresses, TP shards must reassemble
to the tp=1 tensors, and the TensorRT-LLM config must carry the Gemma 3 27B facts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch
from torch import nn

from build_engine.gpu import checkpoint as ckpt
from build_engine.gpu import convert
from build_engine.gpu.checkpoint import UnsupportedCheckpoint
from gemma3_core import constants as C

VOCAB = C.GEMMA3_27B.vocab_size  # 262208: the real vocabulary, so the config assertion means something
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS, GROUP = 256, 2, 2, 128, 512, 2, 128
PREFIX = "language_model.model."
PROJ = {
    "q_proj": ("self_attn", HEADS * HEAD_DIM, HIDDEN),
    "k_proj": ("self_attn", KV_HEADS * HEAD_DIM, HIDDEN),
    "v_proj": ("self_attn", KV_HEADS * HEAD_DIM, HIDDEN),
    "o_proj": ("self_attn", HIDDEN, HEADS * HEAD_DIM),
    "gate_proj": ("mlp", INTER, HIDDEN),
    "up_proj": ("mlp", INTER, HIDDEN),
    "down_proj": ("mlp", HIDDEN, INTER),
}


class Norm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for name, (parent, out_f, in_f) in PROJ.items():
            getattr(self, parent).add_module(name, nn.Linear(in_f, out_f, bias=False))
        self.self_attn.q_norm = Norm(HEAD_DIM)
        self.self_attn.k_norm = Norm(HEAD_DIM)
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            self.add_module(n, Norm(HIDDEN))


class TinyGemma3(nn.Module):
    """Module names exactly as the 2025 checkpoint's tensor names (transformers 4.50 layout)."""

    def __init__(self) -> None:
        super().__init__()
        lm = nn.Module()
        lm.model = nn.Module()
        lm.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        lm.model.layers = nn.ModuleList([Block() for _ in range(LAYERS)])
        lm.model.norm = Norm(HIDDEN)
        self.language_model = lm
        vt = nn.Module()
        vt.vision_model = nn.Module()
        vt.vision_model.proj = nn.Linear(256, 256, bias=False)  # must stay unquantized (ignore list)
        self.vision_tower = vt
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.mm_soft_emb_norm = Norm(256)


def config_2025() -> dict:
    """config.json as transformers 4.50 saves a Gemma3ForConditionalGeneration: sparse text_config."""
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": C.BOI_ID,
        "eoi_token_index": C.EOI_ID,
        "eos_token_id": list(C.DEFAULT_STOP_IDS),
        "image_token_index": C.IMAGE_SOFT_TOKEN_ID,
        "initializer_range": 0.02,
        "mm_tokens_per_image": C.MM_TOKENS_PER_IMAGE,
        "model_type": "gemma3",
        "text_config": {
            "head_dim": HEAD_DIM,
            "hidden_size": HIDDEN,
            "intermediate_size": INTER,
            "model_type": "gemma3_text",
            "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS,
            "num_key_value_heads": KV_HEADS,
            "query_pre_attn_scalar": C.GEMMA3_27B.query_pre_attn_scalar,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": C.GEMMA3_27B.sliding_window,
        },
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.0.dev0",
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 896,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "vision_use_head": False,
        },
    }


def _quantize(model: nn.Module) -> object:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    qcfg = QuantizationConfig(
        config_groups={
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(
                    num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP
                ),
            )
        },
        ignore=["re:.*vision_tower.*", "re:.*multi_modal_projector.*"],
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, qcfg)
    for m in model.modules():  # RTN "calibration" in place of GPTQ: the format is what matters here
        if (
            hasattr(m, "quantization_scheme")
            and m.quantization_scheme is not None
            and hasattr(m, "weight_scale")
        ):
            a = m.quantization_scheme.weights
            g = m.weight.data.float().reshape(m.weight.shape[0], -1, a.group_size)
            s, _zp = calculate_qparams(g.amin(-1), g.amax(-1), a)
            m.weight_scale.data = s.to(m.weight_scale.dtype)
    comp = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    comp.compress_model(model)
    return comp


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(checkpoint dir, reference dense weights as compressed-tensors decompresses them)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gemma3-gptq-tiny")
    model = TinyGemma3().to(torch.bfloat16)
    comp = _quantize(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert f"{PREFIX}layers.0.self_attn.q_proj.weight_packed" in state
    assert "vision_tower.vision_model.proj.weight" in state  # vision stays dense
    half = len(state) // 2
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in shards.items():
        safetensors_torch.save_file({k: state[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config_2025()))
    comp.update_config(str(out))  # the library writes quantization_config itself
    decompressed = copy.deepcopy(model)
    comp.decompress_model(decompressed)
    ref = {k: v for k, v in decompressed.state_dict().items() if k.endswith(".weight")}
    return out, ref


@pytest.fixture(scope="module")
def converted(synthetic: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    src, _ = synthetic
    root = tmp_path_factory.mktemp("trtllm-ckpt")
    return {
        tp: convert.convert(src, root / f"tp{tp}", tp_size=tp, progress=lambda _m: None)[0].parent
        for tp in (1, 2)
    }


def _load(d: Path, rank: int) -> dict[str, torch.Tensor]:
    return safetensors_torch.load_file(str(d / f"rank{rank}.safetensors"))


def _deq(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return convert.dequantize_awq(t[f"{name}.weight"], t[f"{name}.weights_scaling_factor"], GROUP)


# --- int4 layout -----------------------------------------------------------------------------------
def test_pack_unpack_roundtrip_and_nibble_order() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (64, 40), generator=g, dtype=torch.int8)
    raw = convert.pack_awq_int4(q)
    assert raw.dtype == torch.int8 and raw.shape == (32, 40)
    assert torch.equal(convert.unpack_awq_int4(raw), q)
    # trtllm-build transposes the raw weight to [K, N/2]: byte (k, j) holds rows 2j (low) and 2j+1 (high).
    b = raw.T.contiguous().view(torch.uint8).to(torch.int16)
    lo, hi = b & 0xF, b >> 4
    assert torch.equal(torch.where(lo > 7, lo - 16, lo), q[0::2].T.to(torch.int16))
    assert torch.equal(torch.where(hi > 7, hi - 16, hi), q[1::2].T.to(torch.int16))


def test_unpack_compressed_matches_library(synthetic: tuple[Path, dict]) -> None:
    try:  # the module moved between compressed-tensors releases
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    except ImportError:
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import unpack_from_int32

    src, _ = synthetic
    reader = convert.TensorReader(src)
    packed = reader.get(f"{PREFIX}layers.0.mlp.down_proj.weight_packed")
    ours = convert.unpack_compressed_int4(packed, INTER)
    theirs = unpack_from_int32(packed, 4, torch.Size([HIDDEN, INTER]))
    reader.close()
    assert torch.equal(ours.to(torch.int32), theirs.to(torch.int32))
    assert int(ours.min()) >= -8 and int(ours.max()) <= 7


# --- inspect ---------------------------------------------------------------------------------------
def test_inspect_reads_the_2025_layout(synthetic: tuple[Path, dict]) -> None:
    src, _ = synthetic
    info = ckpt.inspect_checkpoint(src)
    assert info.lm_prefix == PREFIX
    assert info.quant.group_size == GROUP and info.quant.num_bits == 4 and info.quant.symmetric
    a = info.text
    # sparse text_config: everything else comes from the Gemma3TextConfig defaults
    assert (a.vocab_size, a.rope_theta, a.rope_local_base_freq, a.sliding_window_pattern) == (
        VOCAB,
        1e6,
        1e4,
        6,
    )
    assert a.rope_linear_factor == 8.0 and info.rope_scaling_type == "linear"
    assert info.tie_word_embeddings and info.has_vision


def test_27b_facts_match_constants() -> None:
    info, _ = ckpt.inspect_config(
        {
            **_real_like_config(),
            "text_config": {
                "head_dim": 128,
                "hidden_size": 5376,
                "intermediate_size": 21504,
                "model_type": "gemma3_text",
                "num_attention_heads": 32,
                "num_hidden_layers": 62,
                "num_key_value_heads": 16,
                "query_pre_attn_scalar": 168,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024,
            },
        }
    )
    assert info.text == C.GEMMA3_27B


def _real_like_config() -> dict:
    cfg = config_2025()
    # What llm-compressor ~0.4/compressed-tensors 0.9 wrote: explicit defaults, act-order null.
    cfg["quantization_config"] = {
        "config_groups": {
            "group_0": {
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": {
                    "actorder": None,
                    "block_structure": None,
                    "dynamic": False,
                    "group_size": 128,
                    "num_bits": 4,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "strategy": "group",
                    "symmetric": True,
                    "type": "int",
                },
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ["language_model.lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }
    return cfg


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("weights", "symmetric"), False, "asymmetric"),
        (("weights", "actorder"), "group", "act-order"),
        (("weights", "num_bits"), 8, "num_bits 8"),
        (("weights", "group_size"), 32, "group_size 32"),
        (("weights", "strategy"), "channel", "strategy"),
        (("input_activations",), {"num_bits": 8}, "weight-only"),
        (("format",), "naive-quantized", "format"),
    ],
)
def test_inspect_rejects_unsupported_schemes(path: tuple[str, ...], value: object, message: str) -> None:
    cfg = _real_like_config()
    node = cfg["quantization_config"]["config_groups"]["group_0"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if path == ("format",):
        cfg["quantization_config"]["format"] = value
    with pytest.raises(UnsupportedCheckpoint, match=message):
        ckpt.inspect_config(cfg)


def test_inspect_accepts_weight_actorder_and_rejects_other_methods() -> None:
    cfg = _real_like_config()
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "weight"
    assert ckpt.inspect_config(cfg)[0].quant.actorder == "weight"
    cfg["quantization_config"]["quant_method"] = "gptq"
    with pytest.raises(UnsupportedCheckpoint, match="compressed-tensors"):
        ckpt.inspect_config(cfg)


def test_inspect_rejects_g_idx_and_ignored_decoder_layers() -> None:
    names = [f"{PREFIX}embed_tokens.weight", f"{PREFIX}layers.0.self_attn.q_proj.weight_g_idx"]
    with pytest.raises(UnsupportedCheckpoint, match="g_idx"):
        ckpt.check_tensors(names, PREFIX, 1)
    quant = ckpt.parse_quantization(_real_like_config())
    bad = ckpt.QuantScheme(**{**quant.__dict__, "ignore": (*quant.ignore, "re:.*mlp.down_proj$")})
    with pytest.raises(UnsupportedCheckpoint, match="ignore list"):
        ckpt.check_ignore_list(bad, PREFIX, 2)
    ckpt.check_ignore_list(quant, PREFIX, 2)  # vision / lm_head ignores are fine


def test_tp4_is_refused_for_27b() -> None:
    info, _ = ckpt.inspect_config(
        {
            **_real_like_config(),
            "text_config": {
                "head_dim": 128,
                "hidden_size": 5376,
                "intermediate_size": 21504,
                "num_attention_heads": 32,
                "num_hidden_layers": 62,
                "num_key_value_heads": 16,
                "query_pre_attn_scalar": 168,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                "sliding_window": 1024,
            },
        }
    )
    convert.check_tp(info, 1)
    convert.check_tp(info, 2)
    with pytest.raises(UnsupportedCheckpoint, match="divisible"):
        convert.check_tp(info, 4)  # 5376 is not a multiple of max(64, 128) * 4


# --- conversion ------------------------------------------------------------------------------------
def test_config_fields(converted: dict[int, Path]) -> None:
    cfg = json.loads((converted[1] / "config.json").read_text())
    assert cfg["architecture"] == "Gemma3ForCausalLM"
    assert cfg["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert cfg["quantization"]["group_size"] == GROUP
    assert cfg["quantization"]["has_zero_point"] is False and cfg["quantization"]["pre_quant_scale"] is True
    assert cfg["rotary_scaling"] == {"type": "linear", "factor": 8.0}
    assert cfg["rotary_base"] == 1e6 and cfg["rope_local_base_freq"] == 1e4
    assert cfg["sliding_window"] == 1024
    assert cfg["_sliding_window_pattern"] == cfg["sliding_window_pattern"] == 6
    assert cfg["vocab_size"] == VOCAB == 262208
    assert cfg["query_pre_attn_scalar"] == C.GEMMA3_27B.query_pre_attn_scalar
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["dtype"] == "bfloat16"
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    cfg2 = json.loads((converted[2] / "config.json").read_text())
    assert cfg2["mapping"]["tp_size"] == 2 and cfg2["use_parallel_embedding"] is True


def test_tensor_names_shapes_dtypes(converted: dict[int, Path]) -> None:
    t = _load(converted[1], 0)
    qkv = "transformer.layers.0.attention.qkv"
    n_qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    assert t[f"{qkv}.weight"].dtype == torch.int8 and tuple(t[f"{qkv}.weight"].shape) == (n_qkv // 2, HIDDEN)
    assert t[f"{qkv}.weights_scaling_factor"].dtype == torch.bfloat16
    assert tuple(t[f"{qkv}.weights_scaling_factor"].shape) == (n_qkv, HIDDEN // GROUP)
    assert torch.equal(t[f"{qkv}.prequant_scaling_factor"], torch.ones(HIDDEN, dtype=torch.bfloat16))
    assert tuple(t["transformer.layers.0.mlp.proj.weight"].shape) == (HIDDEN // 2, INTER)
    assert tuple(t["transformer.vocab_embedding.weight"].shape) == (VOCAB, HIDDEN)
    assert torch.equal(t["lm_head.weight"], t["transformer.vocab_embedding.weight"])
    expected = (
        {
            f"transformer.layers.{i}.{n}"
            for i in range(LAYERS)
            for lin in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
            for n in (f"{lin}.weight", f"{lin}.weights_scaling_factor", f"{lin}.prequant_scaling_factor")
        }
        | {
            f"transformer.layers.{i}.{n}.weight"
            for i in range(LAYERS)
            for n in (
                "input_layernorm",
                "post_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
                "attention.q_layernorm",
                "attention.k_layernorm",
            )
        }
        | {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    )
    assert set(t) == expected


def test_every_weight_dequantizes_exactly_to_compressed_tensors(
    synthetic: tuple[Path, dict], converted: dict[int, Path]
) -> None:
    _, ref = synthetic
    t = _load(converted[1], 0)
    for i in range(LAYERS):
        src, dst = f"{PREFIX}layers.{i}", f"transformer.layers.{i}"
        r = {p: ref[f"{src}.{parent}.{p}.weight"] for p, (parent, _o, _i) in PROJ.items()}
        pairs = {
            "attention.qkv": torch.cat([r["q_proj"], r["k_proj"], r["v_proj"]]),
            "attention.dense": r["o_proj"],
            "mlp.fc": r["gate_proj"],  # the activated branch
            "mlp.gate": r["up_proj"],
            "mlp.proj": r["down_proj"],
        }
        for name, want in pairs.items():
            got = _deq(t, f"{dst}.{name}")
            assert torch.equal(got.to(torch.bfloat16), want.to(torch.bfloat16)), f"{dst}.{name}"
        # Gemma's RMSNorm is x * (1 + w): the converter folds the +1 in.
        w = ref[f"{src}.input_layernorm.weight"].float() + 1
        assert torch.equal(t[f"{dst}.input_layernorm.weight"], w.to(torch.bfloat16))
        qn = ref[f"{src}.self_attn.q_norm.weight"].float() + 1
        assert torch.equal(t[f"{dst}.attention.q_layernorm.weight"], qn.to(torch.bfloat16))
    assert torch.equal(t["transformer.vocab_embedding.weight"], ref[f"{PREFIX}embed_tokens.weight"])


def test_tp_shards_reassemble(converted: dict[int, Path]) -> None:
    full = _load(converted[1], 0)
    shards = [_load(converted[2], r) for r in range(2)]
    q, kv = HEADS * HEAD_DIM // 2, KV_HEADS * HEAD_DIM // 2  # per-rank rows
    for i in range(LAYERS):
        dst = f"transformer.layers.{i}"
        per_rank = [_deq(s, f"{dst}.attention.qkv") for s in shards]
        parts = [torch.split(x, [q, kv, kv]) for x in per_rank]
        qkv = torch.cat([torch.cat([p[j] for p in parts]) for j in range(3)])
        assert torch.equal(qkv, _deq(full, f"{dst}.attention.qkv"))
        for name in ("mlp.fc", "mlp.gate"):  # column-parallel
            assert torch.equal(
                torch.cat([_deq(s, f"{dst}.{name}") for s in shards]), _deq(full, f"{dst}.{name}")
            )
        for name in ("attention.dense", "mlp.proj"):  # row-parallel: whole scale groups per rank
            assert torch.equal(
                torch.cat([_deq(s, f"{dst}.{name}") for s in shards], 1), _deq(full, f"{dst}.{name}")
            )
            assert (
                shards[0][f"{dst}.{name}.prequant_scaling_factor"].shape[0] * 2
                == full[f"{dst}.{name}.prequant_scaling_factor"].shape[0]
            )
        assert torch.equal(shards[1][f"{dst}.post_layernorm.weight"], full[f"{dst}.post_layernorm.weight"])
    for name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
        assert torch.equal(torch.cat([s[name] for s in shards]), full[name])


def test_conversion_refuses_unknown_dtype(synthetic: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        convert.convert(synthetic[0], tmp_path / "x", dtype="int8")


def test_conversion_refuses_float16_naming_the_reason(synthetic: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"overflows in float16.*bfloat16 only.*sm80"):
        convert.convert(synthetic[0], tmp_path / "x", dtype="float16")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


# --- zero points left in a symmetric checkpoint -------------------------------------------------------
def _with_zero_points(src: Path, dst: Path, zero_points: dict[str, torch.Tensor]) -> Path:
    """A copy of the synthetic checkpoint plus one extra shard holding `zero_points` (older writers)."""
    import shutil

    shutil.copytree(src, dst)
    safetensors_torch.save_file(zero_points, str(dst / "model-zp.safetensors"), metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(zero_points, "model-zp.safetensors"))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def _zp_shapes(module: str) -> tuple[int, int]:
    _blk, n, k = PROJ[module]
    return n, k // GROUP


def test_all_zero_zero_points_of_a_symmetric_scheme_are_accepted(
    synthetic: tuple[Path, dict], converted: dict[int, Path], tmp_path: Path
) -> None:
    q = f"{PREFIX}layers.0.self_attn.q_proj.weight_zero_point"
    down = f"{PREFIX}layers.1.mlp.down_proj.weight_zero_point"
    n_q, g_q = _zp_shapes("q_proj")
    n_d, g_d = _zp_shapes("down_proj")
    packed_zero = torch.full((-(-n_d // 8), g_d), 0x88888888 - 2**32, dtype=torch.int32)  # eight 0+8 nibbles
    src = _with_zero_points(
        synthetic[0], tmp_path / "ckpt", {q: torch.zeros(n_q, g_q, dtype=torch.int8), down: packed_zero}
    )
    ckpt.inspect_checkpoint(src)
    out = convert.convert(src, tmp_path / "out", progress=lambda _m: None)[0].parent
    got, want = _load(out, 0), _load(converted[1], 0)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("packed", [False, True])
def test_nonzero_zero_points_are_refused_naming_the_tensor(
    synthetic: tuple[Path, dict], tmp_path: Path, packed: bool
) -> None:
    name = f"{PREFIX}layers.1.self_attn.v_proj.weight_zero_point"
    n, g = _zp_shapes("v_proj")
    if packed:
        zp = torch.full((-(-n // 8), g), 0x88888888 - 2**32, dtype=torch.int32)
        zp[0, 0] = 0  # raw zeros in packed form decode to -8
    else:
        zp = torch.zeros(n, g, dtype=torch.int8)
        zp[3, 0] = 1
    src = _with_zero_points(synthetic[0], tmp_path / "ckpt", {name: zp})
    ckpt.inspect_checkpoint(src)  # names alone are fine for a symmetric scheme ...
    with pytest.raises(UnsupportedCheckpoint, match=f"{name}: non-zero zero points"):
        convert.convert(src, tmp_path / "out", progress=lambda _m: None)  # ... the values are not
    with pytest.raises(UnsupportedCheckpoint, match="fits neither"):
        ckpt.check_zero_point(name, torch.zeros(n + 1, g), (n, g))


# --- memory: the converter streams --------------------------------------------------------------------
def test_converter_releases_each_piece_before_converting_the_next(
    synthetic: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every tensor of a piece is garbage once the next piece is converted: peak RAM is one piece."""
    import gc
    import weakref

    real = convert.iter_convert
    alive_at_step: list[int] = []

    def spy(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        refs: list[weakref.ref] = []
        for what, pieces in real(*args, **kwargs):
            gc.collect()
            alive_at_step.append(sum(r() is not None for r in refs))
            refs = [weakref.ref(t) for piece in pieces for t in piece.values()]
            yield what, pieces
            del pieces

    monkeypatch.setattr(convert, "iter_convert", spy)
    convert.convert(synthetic[0], tmp_path / "out", tp_size=2, progress=lambda _m: None)
    assert len(alive_at_step) == 2 + LAYERS and alive_at_step[1:] == [0] * (len(alive_at_step) - 1)


def test_streaming_writer_matches_safetensors(tmp_path: Path) -> None:
    from build_engine.gpu.safetensors_stream import SafetensorsWriter

    tensors = {
        "b": torch.randn(3, 5).to(torch.bfloat16),
        "a": torch.arange(10, dtype=torch.int8).reshape(2, 5),
        "s": torch.tensor(7, dtype=torch.int32),
        "e": torch.zeros(0, 4),
        "t": torch.randn(4, 6).t(),  # non-contiguous
    }
    with SafetensorsWriter(tmp_path / "x.safetensors", {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.add(k, v)
    loaded = safetensors_torch.load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    assert list(tmp_path.iterdir()) == [tmp_path / "x.safetensors"]  # the side file is gone
