"""PEFT → TensorRT-LLM LoRA conversion, its inverse, the torch hooks and the gateway registry.

Fast tests build a tiny random Gemma 3 (head_dim * heads != hidden, like the real models, so o_proj's
input width is exercised) and a PEFT adapter on it with random non-zero A/B. The `slow` test runs the same
check on a real checkpoint when GEMMA_HF_DIR points at one (e.g. the 270M HF conversion).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers

import build_engine.lora_convert as LC
import gateway.lora_registry as R
from cpu_engine.lora_hooks import LoraHooks
from gemma3_core import lora as L

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden=64, inter=128, layers=2, heads=4, kv=2, head_dim=32)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=300,
        hidden_size=TINY["hidden"],
        intermediate_size=TINY["inter"],
        num_hidden_layers=TINY["layers"],
        num_attention_heads=TINY["heads"],
        num_key_value_heads=TINY["kv"],
        head_dim=TINY["head_dim"],
        sliding_window=8,
        max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"],
    )
    return transformers.Gemma3ForCausalLM(cfg).eval()


def make_adapter(base: torch.nn.Module, out: Path, seed: int, **lora_kwargs) -> torch.nn.Module:
    """A PEFT adapter with random A and B (PEFT zero-inits B, which would make every check vacuous)."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0)
    kwargs.update(lora_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.save_pretrained(out)
    return pm.eval()


def peft_modules(pm: torch.nn.Module) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray, float]]:
    found = {}
    for path, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            name = path.rsplit(".", 1)[-1]
            layer = int(path.split(".layers.")[1].split(".")[0])
            found[(name, layer)] = (
                mod.lora_A["default"].weight.detach().numpy().copy(),
                mod.lora_B["default"].weight.detach().numpy().copy(),
                float(mod.scaling["default"]),
            )
    return found


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def adapters(
    base: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        # rank/alpha patterns: per-module scaling must follow PEFT, not the global alpha / r.
        "alpha": (
            root / "alpha",
            make_adapter(base, root / "alpha", 1, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
        ),
        "beta": (
            root / "beta",
            make_adapter(
                base,
                root / "beta",
                2,
                r=8,
                lora_alpha=4,
                use_rslora=True,
                target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            ),
        ),
    }


def tiny_dims() -> dict[str, tuple[int, int]]:
    return L.module_dims(TINY["hidden"], TINY["inter"], TINY["heads"], TINY["kv"], TINY["head_dim"])


# --- loading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["alpha", "beta"])
def test_load_matches_peft(adapters, which: str) -> None:
    path, pm = adapters[which]
    ad = L.load_peft_adapter(path)
    expected = peft_modules(pm)
    assert set(ad.weights) == set(expected)
    for key, (a, b, scale) in expected.items():
        got = ad.weights[key]
        np.testing.assert_array_equal(got.a, a)
        np.testing.assert_array_equal(got.b, b)
        assert got.scale == pytest.approx(scale), key
    ad.validate_dims(tiny_dims(), TINY["layers"])


def test_rank_and_alpha_patterns(adapters) -> None:
    ad = L.load_peft_adapter(adapters["alpha"][0])
    assert ad.weights[("down_proj", 0)].rank == 2
    assert ad.weights[("down_proj", 0)].scale == pytest.approx(8 / 2)
    assert ad.weights[("q_proj", 1)].scale == pytest.approx(3 / 4)
    assert ad.weights[("k_proj", 1)].scale == pytest.approx(8 / 4)
    beta = L.load_peft_adapter(adapters["beta"][0])
    assert beta.weights[("v_proj", 0)].scale == pytest.approx(4 / np.sqrt(8))  # rsLoRA


def test_read_safetensors_matches_library(adapters, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ref = {"x": torch.randn(3, 5), "h": torch.randn(4).half(), "b": torch.randn(2, 2).bfloat16()}
    save_file(ref, tmp_path / "t.safetensors")
    got = L.read_safetensors(tmp_path / "t.safetensors")
    for k, v in ref.items():
        np.testing.assert_array_equal(got[k], v.float().numpy() if k == "b" else v.numpy())


def _write_adapter(d: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, **cfg}))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


VISION_KEY = (
    "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
)
OK_PAIR = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((128, 2), np.float32),
}


@pytest.mark.parametrize(
    ("cfg", "extra", "match"),
    [
        ({"use_dora": True}, {}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
        ({"bias": "lora_only"}, {}, "bias"),
        ({"peft_type": "IA3"}, {}, "IA3"),
        (
            {},
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(
                    128, np.float32
                )
            },
            "DoRA",
        ),
        (
            {},
            {VISION_KEY: np.ones((2, 8), np.float32)},
            "vision",
        ),
        ({}, {"base_model.model.model.layers.0.mlp.fc1.lora_A.weight": np.ones((2, 8), np.float32)}, "fc1"),
        ({}, {"base_model.model.lm_head.lora_A.weight": np.ones((2, 8), np.float32)}, "unsupported tensor"),
        (
            {},
            {"base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight": np.ones((2, 64), np.float32)},
            "lora_A only",
        ),
    ],
)
def test_refuses_unsupported(tmp_path: Path, cfg: dict, extra: dict, match: str) -> None:
    d = _write_adapter(tmp_path / "a", cfg, {**OK_PAIR, **extra})
    with pytest.raises(L.LoraError, match=match):
        L.load_peft_adapter(d)


def test_multimodal_prefixes(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration adapters name the text layers differently; both spellings load."""
    for i, prefix in enumerate(
        ["base_model.model.model.language_model.", "base_model.model.language_model.model."]
    ):
        tensors = {k.replace("base_model.model.model.", prefix): v for k, v in OK_PAIR.items()}
        ad = L.load_peft_adapter(_write_adapter(tmp_path / str(i), {}, tensors))
        assert list(ad.weights) == [("q_proj", 0)]


# --- TensorRT-LLM layout --------------------------------------------------------------------------
def test_layout(adapters) -> None:
    ad = L.load_peft_adapter(adapters["alpha"][0])
    weights, config = L.to_trtllm_tensors(ad)
    dims = tiny_dims()
    assert weights.dtype == np.float16 and config.dtype == np.int32
    assert config.shape == (TINY["layers"] * 7, 3) and weights.shape[0] == config.shape[0]
    # Module ids from LoraModule::ModuleType; Gemma's gate_proj is the activated `fc` = mlp_h_to_4h.
    assert L.HF_MODULE_IDS == {
        "q_proj": 1,
        "k_proj": 2,
        "v_proj": 3,
        "o_proj": 4,
        "gate_proj": 5,
        "down_proj": 6,
        "up_proj": 7,
    }
    lengths = []
    for row, (module_id, layer, r) in enumerate(config.tolist()):
        name = L.MODULE_ID_TO_HF[module_id]
        m = ad.weights[(name, layer)]
        assert r == m.rank
        in_dim, out_dim = dims[name]
        n_in, n_out = r * in_dim, r * out_dim
        # in = lora_A [r, in] row-major, then out = scale * lora_B [out, r] row-major, then zero padding.
        np.testing.assert_array_equal(weights[row, :n_in], m.a.ravel().astype(np.float16))
        np.testing.assert_array_equal(
            weights[row, n_in : n_in + n_out], (m.b * np.float32(m.scale)).ravel().astype(np.float16)
        )
        assert not weights[row, n_in + n_out :].any()
        lengths.append(n_in + n_out)
    assert weights.shape[1] == max(lengths)
    # Rows ordered by (layer, module id).
    order = [(layer, module_id) for module_id, layer, _ in config.tolist()]
    assert order == sorted(order)


@pytest.mark.parametrize("which", ["alpha", "beta"])
def test_round_trip(adapters, which: str) -> None:
    ad = L.load_peft_adapter(adapters[which][0])
    weights, config = L.to_trtllm_tensors(ad, np.float32)
    back = L.from_trtllm_tensors(*L.with_batch_dim(weights, config), tiny_dims(), num_layers=TINY["layers"])
    assert set(back) == set(ad.weights)
    for key, m in ad.weights.items():
        np.testing.assert_array_equal(back[key].a, m.a)
        np.testing.assert_allclose(back[key].b, m.b * np.float32(m.scale), rtol=1e-6)
        assert back[key].scale == 1.0


def test_dense_in_width_layout(adapters) -> None:
    """Runtimes that size attn_dense hidden→hidden: o_proj's `in` gets r*width slots, A flat then zeros."""
    ad = L.load_peft_adapter(adapters["alpha"][0])
    q_dim = TINY["heads"] * TINY["head_dim"]
    weights, config = L.to_trtllm_tensors(ad, np.float32, dense_in_width=q_dim + 16)
    row = next(i for i, c in enumerate(config.tolist()) if c[0] == 4 and c[1] == 0)
    r = int(config[row, 2])
    np.testing.assert_array_equal(weights[row, : r * q_dim], ad.weights[("o_proj", 0)].a.ravel())
    assert not weights[row, r * q_dim : r * (q_dim + 16)].any()
    back = L.from_trtllm_tensors(weights, config, tiny_dims(), dense_in_width=q_dim + 16)
    np.testing.assert_array_equal(back[("o_proj", 0)].b, ad.weights[("o_proj", 0)].b * np.float32(2.0))
    with pytest.raises(L.LoraError, match="cannot serve o_proj"):
        L.to_trtllm_tensors(ad, dense_in_width=TINY["hidden"])  # hidden 64 < q width 128


def test_from_trtllm_validation() -> None:
    dims = tiny_dims()
    w = np.zeros((1, 10), np.float16)
    with pytest.raises(L.LoraError, match="too few values"):
        L.from_trtllm_tensors(w, np.array([[1, 0, 4]], np.int32), dims)
    with pytest.raises(L.LoraError, match="not enabled"):
        L.from_trtllm_tensors(w, np.array([[0, 0, 1]], np.int32), dims)
    with pytest.raises(L.LoraError, match="range"):
        L.from_trtllm_tensors(np.zeros((1, 10_000)), np.array([[1, 5, 1]], np.int32), dims, num_layers=2)
    with pytest.raises(L.LoraError, match="batch"):
        L.from_trtllm_tensors(np.zeros((2, 1, 10)), np.zeros((2, 1, 3), np.int32), dims)
    with pytest.raises(L.LoraError, match="DoRA"):
        L.from_trtllm_tensors(np.zeros((1, 10_000)), np.array([[1, 0, 1, 1]], np.int32), dims)


# --- torch hooks ------------------------------------------------------------------------------------
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def merged(adapters) -> dict[str, torch.nn.Module]:
    return {k: copy.deepcopy(pm).merge_and_unload().eval() for k, (_, pm) in adapters.items()}


def test_hooks_equal_merged_model(base, adapters, merged) -> None:
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(3))
    ref_base = _logits(base, ids)
    hooks = LoraHooks(base)
    try:
        for i, name in enumerate(["alpha", "beta"]):
            w, c = L.to_trtllm_tensors(L.load_peft_adapter(adapters[name][0]), np.float32)
            lora = hooks.resolve(100 + i, *L.with_batch_dim(w, c))
            with hooks.apply(lora):
                got = _logits(base, ids)
            want = _logits(merged[name], ids)
            assert (want - ref_base).abs().max() > 0.05  # the adapter really changes the output
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # Outside apply() the hooks are inert: base output is bit-identical.
        assert torch.equal(_logits(base, ids), ref_base)
    finally:
        hooks.remove()
    assert torch.equal(_logits(base, ids), ref_base)


def test_hooks_fp16_tensors_close_to_merged(base, adapters, merged) -> None:
    """What Triton actually carries (FP16 lora_weights) stays close to the fp32 merged model."""
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(4))
    hooks = LoraHooks(base)
    try:
        lora = hooks.resolve(5, *L.to_trtllm_tensors(L.load_peft_adapter(adapters["alpha"][0])))
        with hooks.apply(lora):
            got = _logits(base, ids)
        torch.testing.assert_close(got, _logits(merged["alpha"], ids), atol=5e-3, rtol=5e-3)
    finally:
        hooks.remove()


def test_hooks_interleaved_no_bleed(base, adapters, merged) -> None:
    """Two tasks alternating step by step (as the engine interleaves requests) never mix."""
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    want = {k: _logits(m, ids) for k, m in merged.items()}
    want_base = _logits(base, ids)
    hooks = LoraHooks(base)
    try:
        tensors = {
            k: L.to_trtllm_tensors(L.load_peft_adapter(p), np.float32) for k, (p, _) in adapters.items()
        }
        tid = {"alpha": 11, "beta": 22}
        for k in tensors:
            hooks.resolve(tid[k], *tensors[k])
        for step in ["alpha", "beta", None, "beta", "alpha", "alpha", None]:
            lora = hooks.resolve(tid[step]) if step else None  # cached: no weights needed
            with hooks.apply(lora):
                got = _logits(base, ids)
            torch.testing.assert_close(got, want[step] if step else want_base, atol=1e-4, rtol=1e-4)
    finally:
        hooks.remove()


def test_hooks_thread_isolation(base, adapters, merged) -> None:
    """apply() is per context: a concurrent thread running the base model is not affected."""
    import threading

    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(6))
    want_base = _logits(base, ids)
    hooks = LoraHooks(base)
    try:
        lora = hooks.resolve(1, *L.to_trtllm_tensors(L.load_peft_adapter(adapters["beta"][0]), np.float32))
        seen: list[torch.Tensor] = []
        with hooks.apply(lora):
            t = threading.Thread(target=lambda: seen.append(_logits(base, ids)))
            t.start()
            t.join()
        assert torch.equal(seen[0], want_base)
    finally:
        hooks.remove()


def test_hooks_cache_miss_and_eviction(base, adapters) -> None:
    hooks = LoraHooks(base, capacity=1)
    try:
        with pytest.raises(L.LoraTaskNotCachedError) as e:
            hooks.resolve(42)
        assert str(e.value) == "LoRA task 42 not found in cache. Please send LoRA weights with request"
        assert L.is_cache_miss_error(str(e.value))
        w, c = L.to_trtllm_tensors(L.load_peft_adapter(adapters["alpha"][0]))
        hooks.resolve(1, w, c)
        assert 1 in hooks
        hooks.resolve(2, w, c)  # capacity 1 → task 1 evicted, like a full PEFT cache
        assert 1 not in hooks and 2 in hooks
        with pytest.raises(L.LoraTaskNotCachedError):
            hooks.resolve(1)
    finally:
        hooks.remove()


def test_is_cache_miss_error() -> None:
    trt = (
        "[TensorRT-LLM][ERROR] Assertion failed: LoRA task 9223372036854775 not found in cache. "
        "Please send LoRA weights with request (peftCacheManager.cpp:123)"
    )
    assert L.is_cache_miss_error(trt)
    assert L.is_cache_miss_error(L.cache_miss_message(3))
    assert not L.is_cache_miss_error("Cache is full. There are no done tasks to evict")
    assert not L.is_cache_miss_error("")


# --- the gateway's registry (gateway/lora_registry.py) -------------------------------------------------
@pytest.fixture()
def adapters_dir(adapters, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "loras"
    root.mkdir()
    for name, (path, _) in adapters.items():
        shutil.copytree(path, root / name)
    (root / "not-an-adapter").mkdir()
    return root


def test_registry_ids_and_resolution(adapters_dir: Path) -> None:
    reg = R.LoraRegistry(adapters_dir)
    assert sorted(e.name for e in reg.entries) == ["alpha", "beta"]
    assert (
        reg.get("alpha").task_id
        == R.stable_task_id("alpha")
        == R.LoraRegistry(adapters_dir).get("alpha").task_id
    )
    assert 0 < reg.get("beta").task_id < 2**63 and reg.get("alpha").task_id != reg.get("beta").task_id
    assert reg.get("beta").rank == 8
    base_ids = {"gemma-3-270m"}
    assert reg.resolve("alpha", base_ids).name == "alpha"
    assert reg.resolve("gemma-3-270m:beta", base_ids).name == "beta"
    assert reg.resolve("gemma-3-270m", base_ids) is None
    for bad in ("gemma-3-270m:nope", "nope", "other:alpha"):
        with pytest.raises(R.UnknownAdapterError):
            reg.resolve(bad, base_ids)
    (adapters_dir / "adapters.json").write_text(json.dumps({"alpha": 7, "beta": {"task_id": 8}}))
    pinned = R.LoraRegistry(adapters_dir)
    assert (pinned.get("alpha").task_id, pinned.get("beta").task_id) == (7, 8)
    (adapters_dir / "adapters.json").write_text(json.dumps({"alpha": 7, "beta": 7}))
    with pytest.raises(L.LoraError, match="share task id"):
        R.LoraRegistry(adapters_dir)


def test_registry_send_state_and_cache(adapters_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    reg = R.LoraRegistry(adapters_dir, cache_dir=cache)
    first = reg.request_inputs("alpha")
    assert first["lora_task_id"].dtype == np.uint64 and first["lora_task_id"].shape == (1, 1)
    assert first["lora_weights"].dtype == np.float16 and first["lora_weights"].ndim == 3
    assert first["lora_config"].dtype == np.int32 and first["lora_config"].shape[0] == 1
    assert first["lora_config"].shape[2] == 3
    assert set(reg.request_inputs("alpha")) == {"lora_task_id"}  # cached in the engine now
    assert not reg.needs_weights("alpha") and reg.needs_weights("beta")
    reg.invalidate("alpha")  # engine answered "LoRA task … not found in cache"
    assert "lora_weights" in reg.request_inputs("alpha")
    reg.invalidate_all()
    assert reg.needs_weights("alpha")
    assert set(reg.request_inputs("alpha", force_weights=True)) == {
        "lora_task_id",
        "lora_weights",
        "lora_config",
    }
    # The disk cache is reused by a fresh registry (gateway restart) and matches a direct conversion.
    files = sorted(cache.rglob("*.npy"))
    assert len(files) == 2
    w, c = R.LoraRegistry(adapters_dir, cache_dir=cache).tensors("alpha")
    np.testing.assert_array_equal(w, first["lora_weights"])
    np.testing.assert_array_equal(c, first["lora_config"])
    with pytest.raises(R.UnknownAdapterError):
        reg.request_inputs("missing")


def test_registry_limits(adapters_dir: Path) -> None:
    with pytest.raises(L.LoraError, match="max_lora_rank"):
        R.LoraRegistry(adapters_dir, max_rank=4)
    lenient = R.LoraRegistry(adapters_dir, max_rank=4, strict=False)
    assert [e.name for e in lenient.entries] == ["alpha"]
    only_attn = R.LoraRegistry(adapters_dir, allowed_modules=["attn_q", "attn_k", "attn_v", "attn_dense"])
    with pytest.raises(L.LoraError, match="not enabled"):
        only_attn.tensors("alpha")


# --- build helpers ----------------------------------------------------------------------------------
def test_convert_adapter_files(adapters, tmp_path: Path) -> None:
    wp, cp = LC.convert_adapter(adapters["beta"][0], tmp_path / "out")
    assert (wp.name, cp.name) == ("model.lora_weights.npy", "model.lora_config.npy")
    w, c = np.load(wp), np.load(cp)
    ref_w, ref_c = L.to_trtllm_tensors(L.load_peft_adapter(adapters["beta"][0]))
    np.testing.assert_array_equal(w[0], ref_w)
    np.testing.assert_array_equal(c[0], ref_c)
    assert w.shape[0] == 1 and c.shape[0] == 1 and c.dtype == np.int32 and w.dtype == np.float16
    assert LC.main([str(adapters["alpha"][0]), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "model.lora_config.npy").is_file()


def test_convert_checks_base_dims(adapters, tmp_path: Path) -> None:
    from gemma3_core.constants import GEMMA3_270M

    with pytest.raises(L.LoraError, match="another checkpoint"):
        LC.convert_adapter(adapters["alpha"][0], tmp_path / "x", arch=GEMMA3_270M)


def test_build_flags() -> None:
    assert LC.trtllm_build_lora_flags(["q_proj", "v_proj", "o_proj"], 16) == [
        "--lora_plugin",
        "auto",
        "--lora_target_modules",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_dense",
        "--max_lora_rank",
        "16",
    ]
    assert LC.trtllm_build_lora_flags(["all-linear"], 8)[3:10] == [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_dense",
        "mlp_h_to_4h",
        "mlp_4h_to_h",
        "mlp_gate",
    ]
    assert LC.trtllm_build_lora_flags(["model.layers.0.mlp.up_proj"], 8)[3] == "mlp_gate"
    with pytest.raises(L.LoraError):
        LC.trtllm_build_lora_flags(["lm_head"], 8)
    params = LC.triton_lora_cache_params(64)
    assert params["lora_cache_max_adapter_size"] == "64" and params["lora_cache_optimal_adapter_size"] == "8"


# --- real checkpoint --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.optional(reason="needs a real Gemma 3 checkpoint: set GEMMA_HF_DIR")
def test_real_checkpoint_greedy_equals_peft_merged(tmp_path: Path) -> None:
    hf_dir = os.environ.get("GEMMA_HF_DIR")
    if not hf_dir:
        pytest.skip("set GEMMA_HF_DIR to a Gemma 3 HF checkpoint directory")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    pm = make_adapter(model, tmp_path / "a", seed=7, r=8, lora_alpha=16)
    for p in pm.parameters():  # small-but-visible perturbation on a real model
        if p.requires_grad:
            p.data.mul_(0.25)
    pm.save_pretrained(tmp_path / "a")
    merged_model = copy.deepcopy(pm).merge_and_unload().eval()
    cfg = model.config
    dims = L.module_dims(
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    )
    adapter = L.load_peft_adapter(tmp_path / "a")
    adapter.validate_dims(dims, cfg.num_hidden_layers)
    ids = torch.tensor([[2, 105, 2364, 107, 3048, 659, 496, 6355, 1003, 236761, 106, 107, 105, 4368, 107]])

    def greedy(m: torch.nn.Module) -> list[int]:
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
        return out[0, ids.shape[1] :].tolist()

    base_tokens = greedy(model)
    hooks = LoraHooks(model)
    try:
        lora = hooks.resolve(1, *L.with_batch_dim(*L.to_trtllm_tensors(adapter)))  # FP16, as over Triton
        with hooks.apply(lora):
            lora_tokens = greedy(model)
    finally:
        hooks.remove()
    assert lora_tokens == greedy(merged_model)
    assert greedy(model) == base_tokens
    assert lora_tokens != base_tokens, "adapter too weak to test anything"
