"""gemma3_core.vision vs HF Gemma3ForConditionalGeneration, save/load, ONNX, √hidden compensation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from gemma3_core import vision as gv
from gemma3_core.constants import GEMMA3_27B, GEMMA3_270M

TEXT_HIDDEN = 40  # √40 is not representable in bf16: the scale-rounding assertions bite
IMAGE_TOKEN = 1000  # inside the tiny vocab so HF's embedding lookup stays in range


def tiny_config(dtype: str | None = None) -> Gemma3Config:
    cfg = Gemma3Config(
        text_config={
            "hidden_size": TEXT_HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "intermediate_size": 128,
            "vocab_size": 1024,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 56,
            "patch_size": 14,
            "vision_use_head": False,
        },
        mm_tokens_per_image=4,  # 4×4 patches pooled 2×2
        image_token_id=IMAGE_TOKEN,
        boi_token_index=998,
        eoi_token_index=999,
    )
    if dtype:
        cfg.text_config.dtype = dtype
    return cfg


@pytest.fixture(scope="module")
def hf_model() -> Gemma3ForConditionalGeneration:
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(tiny_config()).eval()
    with torch.no_grad():  # transformers zero-inits the projection: randomize so the test means something
        proj = model.model.multi_modal_projector
        proj.mm_input_projection_weight.normal_(0, 0.3)
        proj.mm_soft_emb_norm.weight.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(1)) * 2 - 1


def hf_features(model: Gemma3ForConditionalGeneration, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_image_features(x).pooler_output


def test_features_equal_hf(hf_model: Any, pixels: torch.Tensor) -> None:
    enc = gv.Gemma3VisionEncoder.from_hf_gemma3(hf_model, hf_model.config)
    ref = hf_features(hf_model, pixels)
    with torch.no_grad():
        ours = enc.image_features(pixels)
    assert ours.shape == ref.shape == (3, 4, TEXT_HIDDEN)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert enc.config.llm_dtype == "float32"  # taken from the module's embedding dtype


def test_original_checkpoint_layout(hf_model: Any, pixels: torch.Tensor) -> None:
    # Hub safetensors / transformers 4: vision_tower.vision_model.*, multi_modal_projector.*, language_model.*
    renamed = {}
    for k, v in hf_model.state_dict().items():
        k = k.replace("model.vision_tower.", "vision_tower.vision_model.")
        k = k.replace("model.multi_modal_projector.", "multi_modal_projector.")
        renamed[k.replace("model.language_model.", "language_model.model.")] = v
    enc = gv.Gemma3VisionEncoder.from_hf_gemma3(renamed, hf_model.config.to_dict(), llm_dtype="bfloat16")
    with torch.no_grad():
        torch.testing.assert_close(
            enc.image_features(pixels), hf_features(hf_model, pixels), atol=1e-5, rtol=1e-5
        )
    assert enc.config.llm_dtype == "bfloat16"
    with pytest.raises(KeyError, match="missing"):
        gv.Gemma3VisionEncoder.from_hf_gemma3(
            {k: v for k, v in renamed.items() if "post_layernorm" not in k}, hf_model.config
        )


def test_checkpoint_dir_reads_only_vision(hf_model: Any, pixels: torch.Tensor, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if "lm_head" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_model.config.save_pretrained(tmp_path)
    enc = gv.from_hf_checkpoint_dir(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            enc.image_features(pixels), hf_features(hf_model, pixels), atol=1e-5, rtol=1e-5
        )


def capture_llm_inputs(
    model: Gemma3ForConditionalGeneration, ids: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}

    def hook(_mod: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=x, token_type_ids=(ids == IMAGE_TOKEN).long())
    finally:
        handle.remove()
    return seen["embeds"][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compensation_reproduces_hf_merge(hf_model: Any, pixels: torch.Tensor, dtype: torch.dtype) -> None:
    """TensorRT-LLM does table_row × scale for image rows; that must equal what HF feeds its decoder."""
    model = Gemma3ForConditionalGeneration(hf_model.config).eval()
    model.load_state_dict(hf_model.state_dict())
    model = model.to(dtype)
    enc = gv.Gemma3VisionEncoder.from_hf_gemma3(model, model.config)
    assert enc.config.llm_dtype == gv.dtype_name(dtype)
    ids = torch.tensor([[2, 5, 998, *[IMAGE_TOKEN] * 4, 999, 7, 998, *[IMAGE_TOKEN] * 4, 999]])
    x = pixels[:2].to(dtype)
    embeds = capture_llm_inputs(model, ids, x)
    img_rows = embeds[ids[0] == IMAGE_TOKEN]  # [8, hidden]: HF merged the features unscaled
    text_rows = embeds[ids[0] != IMAGE_TOKEN]
    emb = model.get_input_embeddings()
    # HF's text scale is a float32 tensor cast to the weight dtype; ours is the same number
    scale = float(emb.embed_scale.to(emb.weight.dtype))
    assert enc.embed_scale == scale
    torch.testing.assert_close(text_rows, emb.weight[ids[0][ids[0] != IMAGE_TOKEN]] * scale)
    with torch.no_grad():
        table = enc(x).reshape(-1, TEXT_HIDDEN)  # served prompt-table rows
    engine_rows = (table.float() * scale).to(dtype)  # what TRT-LLM's embedding multiplier produces
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        engine_rows.float(), img_rows.float(), atol=tol * img_rows.abs().max(), rtol=tol
    )


def test_embed_scale_rounding() -> None:
    assert gv.embed_scale_for(GEMMA3_27B.hidden_size, "bfloat16") == 73.5
    assert gv.embed_scale_for(GEMMA3_27B.hidden_size, "float16") == 73.3125
    assert abs(gv.embed_scale_for(GEMMA3_27B.hidden_size, "float32") - 5376**0.5) < 1e-5
    assert abs(gv.embed_scale_for(GEMMA3_270M.hidden_size, "float32") - 640**0.5) < 1e-5


def test_synthetic_deterministic_and_real_path(tmp_path: Path) -> None:
    kw = {"vision_hidden": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
    a = gv.synthetic_for_text_model(hidden_size=48, seed=3, **kw)
    b = gv.synthetic_for_text_model(hidden_size=48, seed=3, **kw)
    c = gv.synthetic_for_text_model(hidden_size=48, seed=4, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["multi_modal_projector.mm_input_projection_weight"],
        sc["multi_modal_projector.mm_input_projection_weight"],
    )
    x = torch.rand(2, 3, 896, 896, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = a(x)
        feats = a.image_features(x)
    assert out.shape == (2, 256, 48) and torch.isfinite(out).all() and out.abs().max() > 0
    torch.testing.assert_close(out * a.embed_scale, feats, rtol=1e-6, atol=1e-6)
    # different images → different rows (the tower really looks at the pixels)
    assert (out[0] - out[1]).abs().max() > 1e-3

    # save → load → Triton torch runner: fp16 [N*256, hidden] rows
    gv.save_encoder(a, tmp_path / "enc")
    loaded = gv.load_encoder(tmp_path / "enc")
    assert loaded.config == a.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)
    runner = gv.load_vision_runner(tmp_path / "enc", "torch", max_batch=1)
    table = runner(x.numpy())
    assert table.dtype == np.float16 and table.shape == (512, 48)
    np.testing.assert_allclose(table.astype(np.float32), out.reshape(-1, 48).numpy(), atol=1e-3, rtol=1e-2)
    assert runner(np.zeros((0, 3, 896, 896), np.float32)).shape == (0, 48)
    with pytest.raises(ValueError, match="pixel_values"):
        runner(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(ValueError, match="unknown vision backend"):
        gv.load_vision_runner(tmp_path / "enc", "onnx")


@pytest.mark.parametrize(("exporter", "opset"), [("dynamo", 18), ("torchscript", 17)])
def test_onnx_matches_torch(hf_model: Any, tmp_path: Path, exporter: str, opset: int) -> None:
    from build_engine.vision_export import check_onnx, export_onnx

    enc = gv.Gemma3VisionEncoder.from_hf_gemma3(hf_model, hf_model.config)
    exported = export_onnx(enc, tmp_path / "v.onnx", exporter=exporter)
    assert exported.exporter == exporter and exported.opset == opset
    path = exported.path
    import onnx

    model = onnx.load(str(path))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    (inp,) = model.graph.input
    assert inp.name == "pixel_values"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 56, 56]  # dynamic image batch
    assert [o.name for o in model.graph.output] == ["image_embeds"]
    result = check_onnx(path, enc, batch_sizes=(1, 2, 5), rtol=1e-4)
    assert result.max_abs_diff < 1e-4 * result.max_abs_ref

    # ONNX output × scale == HF features (the compensation is inside the exported graph)
    import onnxruntime as ort

    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(9)) * 2 - 1
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got * enc.embed_scale, hf_features(hf_model, x).numpy(), atol=1e-5, rtol=1e-4)


def test_auto_export_falls_back_to_torchscript(
    hf_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from build_engine import vision_export as ve

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("dynamo cannot export this")

    monkeypatch.setattr(ve, "_export_dynamo", broken)
    enc = gv.Gemma3VisionEncoder.from_hf_gemma3(hf_model, hf_model.config)
    exported = ve.export_onnx(enc, tmp_path / "v.onnx")
    assert exported.exporter == "torchscript" and exported.path.exists()
    assert "dynamo export failed (RuntimeError: dynamo cannot export this)" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="dynamo cannot"):
        ve.export_onnx(enc, tmp_path / "w.onnx", exporter="dynamo")  # no silent fallback when asked for it


# --- TensorRT engine build: the tensorrt module is replaced at its API boundary (no TensorRT here) -------
class FakeTrt:
    """Records what build_engine asks of TensorRT; the names mirror the TensorRT 10 Python API."""

    float32 = "float32"

    class Logger:
        WARNING = "warning"

        def __init__(self, level: str) -> None:
            self.level = level

    class LayerType:
        NORMALIZATION, SOFTMAX, REDUCE = "norm", "softmax", "reduce"

    class BuilderFlag:
        BF16, FP16, PREFER_PRECISION_CONSTRAINTS = "bf16", "fp16", "prefer"

    class MemoryPoolType:
        WORKSPACE = "workspace"

    def __init__(self, *, parse_ok: bool = True, build_ok: bool = True) -> None:
        self.parse_ok, self.build_ok = parse_ok, build_ok
        self.calls: dict[str, Any] = {"flags": [], "profiles": []}
        fake = self

        class Layer:
            def __init__(self, kind: str) -> None:
                self.type, self.precision, self.num_outputs, self.out_types = kind, None, 1, {}

            def set_output_type(self, i: int, t: str) -> None:
                self.out_types[i] = t

        class Network:
            def __init__(self) -> None:
                self.layers = [Layer(k) for k in ("matmul", "norm", "softmax", "matmul", "reduce")]
                self.num_layers = len(self.layers)

            def get_layer(self, i: int) -> Layer:
                return self.layers[i]

        class Parser:
            num_errors = 1

            def __init__(self, network: Network, logger: object) -> None:
                fake.calls["network"] = network

            def parse_from_file(self, path: str) -> bool:
                fake.calls["parsed"] = path
                return fake.parse_ok

            def get_error(self, i: int) -> str:
                return "Unsupported ONNX op: Foo"

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"+tuned"

        class Profile:
            def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
                fake.calls["profiles"].append((name, lo, opt, hi))

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["workspace"] = (pool, size)

            def set_flag(self, flag: str) -> None:
                fake.calls["flags"].append(flag)

            def add_optimization_profile(self, p: Profile) -> None:
                fake.calls["profile_added"] = True

            def create_timing_cache(self, data: bytes) -> Cache:
                fake.calls["cache_in"] = data
                return Cache(data)

            def set_timing_cache(self, cache: Cache, _ignore_mismatch: bool) -> None:
                self.cache = cache

            def get_timing_cache(self) -> Cache:
                return self.cache

        class Builder:
            def __init__(self, logger: object) -> None:
                pass

            def create_network(self, flags: int) -> Network:
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
                return b"ENGINE" if fake.build_ok else None

        self.Builder, self.OnnxParser = Builder, Parser


def test_engine_build_uses_one_profile_bf16_fp32_norms_and_a_timing_cache(tmp_path: Path) -> None:
    from build_engine.vision_export import EngineSpec, build_engine

    spec = EngineSpec(
        onnx_path=tmp_path / "v.onnx",
        engine_path=tmp_path / "out" / "vision_encoder.engine",
        image_size=896,
        max_batch=8,
        timing_cache=tmp_path / "timing.cache",
    )
    trt = FakeTrt()
    assert build_engine(spec, trt=trt) == spec.engine_path
    assert spec.engine_path.read_bytes() == b"ENGINE"
    assert not list(spec.engine_path.parent.glob("*.partial"))
    assert trt.calls["parsed"] == str(spec.onnx_path)
    assert trt.calls["profiles"] == [("pixel_values", (1, 3, 896, 896), (4, 3, 896, 896), (8, 3, 896, 896))]
    assert trt.calls["flags"] == ["bf16", "prefer"] and trt.calls["workspace"] == ("workspace", 4096 << 20)
    layers = trt.calls["network"].layers
    assert [x.precision for x in layers] == [None, "float32", "float32", None, "float32"]
    assert layers[1].out_types == {0: "float32"} and layers[0].out_types == {}
    assert trt.calls["cache_in"] == b"" and spec.timing_cache.read_bytes() == b"+tuned"
    build_engine(spec, trt=(again := FakeTrt()))  # the second build starts from the saved cache
    assert again.calls["cache_in"] == b"+tuned"
    fp16 = EngineSpec(spec.onnx_path, tmp_path / "e16", 896, 8, precision="fp16")
    build_engine(fp16, trt=(t16 := FakeTrt()))
    assert t16.calls["flags"][0] == "fp16"


def test_engine_build_failures_are_named(tmp_path: Path) -> None:
    from build_engine.vision_export import EngineSpec, build_engine

    spec = EngineSpec(tmp_path / "v.onnx", tmp_path / "e", image_size=56, max_batch=2)
    with pytest.raises(RuntimeError, match=r"could not parse.*Unsupported ONNX op: Foo"):
        build_engine(spec, trt=FakeTrt(parse_ok=False))
    with pytest.raises(RuntimeError, match="failed to build"):
        build_engine(spec, trt=FakeTrt(build_ok=False))
    assert not spec.engine_path.exists()
    with pytest.raises(ValueError, match="opt_batch"):
        EngineSpec(tmp_path / "v.onnx", tmp_path / "e", 56, max_batch=2, opt_batch=3).shapes()
    with pytest.raises(ValueError, match="precision"):
        EngineSpec(tmp_path / "v.onnx", tmp_path / "e", 56, max_batch=2, precision="fp8").shapes()


def test_missing_packages_are_named_not_installed() -> None:
    from build_engine.vision_export import MissingPackage, require

    with pytest.raises(MissingPackage, match=r"needs no_such_module_x.*installs nothing"):
        require("json", "no_such_module_x", purpose="the test")
    require("json", purpose="the test")


@pytest.mark.slow
def test_onnx_fp16_synthetic_full_size(tmp_path: Path) -> None:
    from build_engine.vision_export import check_onnx, export_onnx

    enc = gv.synthetic_for_text_model(hidden_size=GEMMA3_270M.hidden_size, seed=0)
    path = export_onnx(enc, tmp_path / "v16.onnx", dtype="float16").path
    check_onnx(path, enc, batch_sizes=(1,), rtol=3e-2)
