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


def test_onnx_matches_torch(hf_model: Any, tmp_path: Path) -> None:
    from build_engine.vision_export import check_onnx, export_onnx, trtexec_command

    enc = gv.Gemma3VisionEncoder.from_hf_gemma3(hf_model, hf_model.config)
    path = export_onnx(enc, tmp_path / "v.onnx")
    import onnx

    model = onnx.load(str(path))
    assert model.opset_import[0].version == 17
    (inp,) = model.graph.input
    assert inp.name == "pixel_values"
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, 56, 56]
    assert [o.name for o in model.graph.output] == ["image_embeds"]
    result = check_onnx(path, enc, batch_sizes=(1, 2, 5), rtol=1e-4)
    assert result.max_abs_diff < 1e-4 * result.max_abs_ref

    # ONNX output × scale == HF features (the compensation is inside the exported graph)
    import onnxruntime as ort

    x = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(9)) * 2 - 1
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got * enc.embed_scale, hf_features(hf_model, x).numpy(), atol=1e-5, rtol=1e-4)

    cmd = trtexec_command(path, tmp_path / "v.engine", max_batch=8, image_size=56)
    assert cmd[0] == "trtexec" and "--fp16" in cmd
    assert "--minShapes=pixel_values:1x3x56x56" in cmd
    assert "--optShapes=pixel_values:4x3x56x56" in cmd
    assert "--maxShapes=pixel_values:8x3x56x56" in cmd
    with pytest.raises(ValueError):
        trtexec_command(path, "e", max_batch=2, opt_batch=3)


@pytest.mark.slow
def test_onnx_fp16_synthetic_full_size(tmp_path: Path) -> None:
    from build_engine.vision_export import check_onnx, export_onnx

    enc = gv.synthetic_for_text_model(hidden_size=GEMMA3_270M.hidden_size, seed=0)
    path = export_onnx(enc, tmp_path / "v16.onnx", dtype="float16")
    check_onnx(path, enc, batch_sizes=(1,), rtol=3e-2)
