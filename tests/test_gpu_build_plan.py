"""GPU build plan without a GPU: trtllm-build flags, RoPE tables, repository values, stages and dry-run."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from build_engine.gpu import build, pipeline, repository, verify
from build_engine.gpu import gemma3_fixes as rope
from build_engine.gpu.settings import (
    PROFILES,
    TRITON_IMAGE,
    TRITON_IMAGE_TAG,
    BuildSettings,
    settings_from_env,
)
from gemma3_core import constants as C

A = C.GEMMA3_27B


# --- trtllm-build ----------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_trtllm_build_command(profile: str, tmp_path: Path) -> None:
    s = BuildSettings(work_dir=tmp_path, profile=PROFILES[profile])
    cmd = build.trtllm_build_command(s)
    assert cmd[0] == "trtllm-build"
    p = s.profile
    expect = {
        "--checkpoint_dir": str(s.trtllm_checkpoint_dir),
        "--output_dir": str(s.engine_dir),
        "--model_cls_file": str(build.FIXES_MODULE),
        "--model_cls_name": rope.MODEL_CLS_NAME,
        "--max_batch_size": str(p.max_batch_size),
        "--max_input_len": str(p.max_input_len),
        "--max_seq_len": str(p.max_seq_len),
        "--max_num_tokens": str(p.max_num_tokens),
        "--max_prompt_embedding_table_size": str(p.max_batch_size * p.max_images_per_request * 256),
        "--kv_cache_type": "paged",
        "--remove_input_padding": "enable",
        "--gpt_attention_plugin": "auto",
        "--gemm_plugin": "auto",
        "--use_paged_context_fmha": "enable",
        "--workers": "1",
    }
    for flag, value in expect.items():
        assert build.flag_value(cmd, flag) == value, flag
    assert "--lora_plugin=auto" not in cmd
    assert p.max_input_len <= p.max_seq_len <= A.max_position_embeddings


def test_latency_profile_reaches_128k() -> None:
    assert PROFILES["latency"].max_seq_len == 131072


def test_lora_flags_only_with_adapters(tmp_path: Path) -> None:
    s = BuildSettings(work_dir=tmp_path, lora_dirs=(tmp_path / "a", tmp_path / "b"), max_lora_rank=16)
    cmd = build.trtllm_build_command(s)
    assert "--lora_plugin=auto" in cmd and "--max_lora_rank=16" in cmd
    i = cmd.index("--lora_dir")
    assert cmd[i + 1 : i + 3] == [str(tmp_path / "a"), str(tmp_path / "b")]
    j = cmd.index("--lora_target_modules")
    assert set(cmd[j + 1 :]) == set(build.LORA_TARGET_MODULES)
    assert s.engine_dir.name.endswith("-lora")


def test_pinned_image_in_one_place() -> None:
    assert f"nvcr.io/nvidia/tritonserver:{TRITON_IMAGE_TAG}-trtllm-python-py3" == TRITON_IMAGE
    compose = (Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text()
    env = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    assert f"TRITON_IMAGE_TAG={TRITON_IMAGE_TAG}" in env.splitlines()
    # compose's default tag (used without a .env) is the tested one, and the only tag it names
    import re

    defaults = re.findall(r"\$\{TRITON_IMAGE_TAG:-([^}]*)\}", compose)
    assert defaults and set(defaults) == {TRITON_IMAGE_TAG}
    assert compose.count(TRITON_IMAGE_TAG) == len(defaults)


# --- RoPE --------------------------------------------------------------------------------------------
def test_rope_module_is_self_contained() -> None:
    """trtllm-build loads it with SourceFileLoader: only stdlib, numpy and tensorrt_llm may be imported."""
    tree = ast.parse(build.FIXES_MODULE.read_text())
    roots = {
        (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert roots <= {"__future__", "math", "typing", "numpy", "tensorrt_llm"}, roots
    spec = importlib.util.spec_from_file_location("models", build.FIXES_MODULE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports fine without tensorrt_llm
    assert mod.MODEL_CLS_NAME == "Gemma3FidelityFixesForCausalLM"
    assert f"class {mod.MODEL_CLS_NAME}(GemmaForCausalLM)" in build.FIXES_MODULE.read_text()


def test_hf_rope_reference_values() -> None:
    dim = A.head_dim
    glob = rope.hf_inv_freq(A.rope_theta, dim, A.rope_linear_factor)
    loc = rope.hf_inv_freq(A.rope_local_base_freq, dim)
    assert glob.shape == loc.shape == (64,)
    assert math.isclose(float(glob[0]), 1 / 8) and math.isclose(float(loc[0]), 1.0)
    assert math.isclose(float(glob[1]), (1e6 ** (-2 / 128)) / 8, rel_tol=1e-6)
    assert math.isclose(float(loc[1]), 1e4 ** (-2 / 128), rel_tol=1e-6)
    cs = rope.hf_cos_sin(A.rope_local_base_freq, dim, np.array([0, 5]))
    assert np.allclose(cs[0, 0::2], 1) and np.allclose(cs[0, 1::2], 0)
    assert math.isclose(float(cs[1, 1]), math.sin(5.0), abs_tol=1e-6)


def _plugin_table(base: float, dim: int, max_pos: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """What TensorRT-LLM's create_sinusoidal_positions_for_attention_plugin computes (linear: 1/scale)."""
    inv = (1.0 / scale) / (base ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    ang = np.einsum("i,j->ij", np.arange(max_pos, dtype=np.float32), inv, dtype=np.float32)[..., None]
    return inv, np.concatenate([np.cos(ang), np.sin(ang)], axis=-1).reshape(max_pos, dim)


def test_check_table_accepts_right_and_catches_upstream_bug() -> None:
    dim, max_pos = A.head_dim, 8192
    inv, cs = _plugin_table(A.rope_theta, dim, max_pos, 8.0)
    rope.check_table("global", inv, cs, A.rope_theta, dim, 8.0)
    inv, cs = _plugin_table(A.rope_local_base_freq, dim, max_pos, 1.0)
    rope.check_table("local", inv, cs, A.rope_local_base_freq, dim, None)
    # Upstream with rotary_scaling set scales the local table too: must be caught.
    bad_inv, bad_cs = _plugin_table(A.rope_local_base_freq, dim, max_pos, 8.0)
    with pytest.raises(AssertionError, match="local"):
        rope.check_table("local", bad_inv, bad_cs, A.rope_local_base_freq, dim, None)
    # Upstream without rotary_scaling (HF key ignored) leaves the global table unscaled: caught too.
    bad_inv, bad_cs = _plugin_table(A.rope_theta, dim, max_pos, 1.0)
    with pytest.raises(AssertionError, match="global"):
        rope.check_table("global", bad_inv, bad_cs, A.rope_theta, dim, 8.0)


# --- q/k-norm epsilon (the second fidelity fix) -----------------------------------------------------------
def _fake_network(n_layers: int, eps: float = 1e-5) -> object:
    """The attribute path upstream's RmsNorm sits on (layer.attention.{q,k}_layernorm.eps)."""
    from types import SimpleNamespace as NS

    layers = [NS(attention=NS(q_layernorm=NS(eps=eps), k_layernorm=NS(eps=eps))) for _ in range(n_layers)]
    return NS(transformer=NS(layers=layers))


def test_qk_norm_eps_is_set_on_every_layer() -> None:
    net = _fake_network(A.num_layers)
    assert rope.set_qk_norm_eps(net, 1e-6) == 2 * A.num_layers
    assert {a.attention.q_layernorm.eps for a in net.transformer.layers} == {1e-6}
    assert {a.attention.k_layernorm.eps for a in net.transformer.layers} == {1e-6}
    broken = _fake_network(2)
    del broken.transformer.layers[1].attention.k_layernorm
    with pytest.raises(AssertionError, match=r"layer 1.*k_layernorm"):
        rope.set_qk_norm_eps(broken, 1e-6)
    with pytest.raises(ValueError, match="epsilon"):
        rope.set_qk_norm_eps(_fake_network(1), 0.1)


def test_checkpoint_config_carries_hf_norm_epsilon() -> None:
    """The hook reads `norm_epsilon` from the checkpoint config the converter writes (HF rms_norm_eps)."""
    src = build.FIXES_MODULE.read_text()
    assert "model.config.norm_epsilon" in src and "set_qk_norm_eps(model, eps)" in src
    assert "apply_fidelity_fixes(self)" in src


# --- repository values ---------------------------------------------------------------------------------
def test_repository_values(tmp_path: Path) -> None:
    s = BuildSettings(work_dir=tmp_path)
    v = repository.tensorrt_llm_values(s)
    assert v["max_attention_window_size"] == "1024,1024,1024,1024,1024,131072"
    assert v["engine_dir"] == str(tmp_path / "engines" / "latency-tp1")
    assert v["prompt_embedding_table_data_type"] == "TYPE_BF16"
    assert v["guided_decoding_backend"] == "xgrammar"
    assert v["xgrammar_tokenizer_info_path"].endswith("xgrammar_tokenizer_info.json")
    off = repository.tensorrt_llm_values(BuildSettings(work_dir=tmp_path, guided_decoding=False))
    assert off["guided_decoding_backend"] == off["xgrammar_tokenizer_info_path"] == ""
    tp = repository.tensorrt_llm_values(BuildSettings(work_dir=tmp_path, profile=PROFILES["throughput"]))
    assert (
        tp["max_attention_window_size"].endswith(",32768")
        and tp["batch_scheduler_policy"] == "max_utilization"
    )
    # Shared values are passed only when some GPU template uses them (render rejects unused values).
    full = repository.repository_values(s, used={"tokenizer_dir", "vision_backend"})
    assert full["vision_backend"] == "tensorrt" and "hf_model_dir" not in full
    assert set(v) <= set(full)


# --- settings ----------------------------------------------------------------------------------------
def test_fp16_is_refused_with_the_reason_and_the_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from build_engine.__main__ import main
    from build_engine.gpu.settings import UnsupportedDtype

    with pytest.raises(UnsupportedDtype, match=r"overflows in float16.*sm80"):
        BuildSettings(work_dir=tmp_path, dtype="float16")
    with pytest.raises(UnsupportedDtype):
        settings_from_env({"ENGINE_DTYPE": "float16"})
    assert main(["convert", "--dry-run", f"--work-dir={tmp_path}", "--dtype=float16"]) == 2
    assert "bfloat16 only" in capsys.readouterr().err
    assert BuildSettings(work_dir=tmp_path).triton_dtype == "TYPE_BF16"


def test_engine_dtype_reaches_prompt_table_and_lora_weights(tmp_path: Path) -> None:
    full = repository.repository_values(BuildSettings(work_dir=tmp_path))
    assert full["prompt_embedding_table_data_type"] == full["lora_weights_data_type"] == "TYPE_BF16"


def test_settings_from_env(tmp_path: Path) -> None:
    env = {
        "ENGINE_PROFILE": "throughput",
        "TP_SIZE": "2",
        "ENGINE_WORK_DIR": str(tmp_path),
        "LORA_DIRS": "/l/a,/l/b",
        "GUIDED_DECODING": "0",
    }
    s = settings_from_env(env)
    assert (s.profile.name, s.tp_size, s.work_dir, s.guided_decoding) == ("throughput", 2, tmp_path, False)
    assert s.lora_dirs == (Path("/l/a"), Path("/l/b"))
    assert settings_from_env(env, profile="latency", tp_size=1).profile.name == "latency"
    with pytest.raises(ValueError, match="profile"):
        settings_from_env({"ENGINE_PROFILE": "nope"})


# --- stages, idempotency, dry run -------------------------------------------------------------------------
def test_stage_runs_once_then_skips_until_inputs_change(tmp_path: Path) -> None:
    calls: list[int] = []

    def make(value: int) -> pipeline.Stage:
        return pipeline.Stage(
            "demo",
            tmp_path / "out",
            {"v": value},
            [pipeline.Action("count", call=lambda _d: calls.append(value))],
        )

    assert pipeline.run_stage(make(1)) == "ran"
    assert pipeline.run_stage(make(1)) == "skipped"
    assert pipeline.run_stage(make(2)) == "ran"
    assert pipeline.run_stage(make(2), force=True) == "ran"
    assert calls == [1, 2, 2]


def test_failed_stage_leaves_no_stamp(tmp_path: Path) -> None:
    def boom(_d: Path) -> None:
        raise RuntimeError("x")

    stage = pipeline.Stage("demo", tmp_path / "out", {"v": 1}, [pipeline.Action("fail", call=boom)])
    with pytest.raises(RuntimeError):
        pipeline.run_stage(stage)
    assert not stage.stamp.exists()


def test_dry_run_prints_every_command_and_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from build_engine.__main__ import main

    assert main(["all", "--dry-run", f"--work-dir={tmp_path}", "--profile=throughput"]) == 0
    out = capsys.readouterr().out
    for name in pipeline.ALL:
        assert f"[{name}] would run" in out, name
    assert "$ trtllm-build " in out and f"--model_cls_name={rope.MODEL_CLS_NAME}" in out
    assert "TensorRT Python API" in out and "max (16, 3, 896, 896)" in out and "BF16" in out
    assert "trtexec" not in out
    assert str(tmp_path / "trtllm-checkpoint" / "bfloat16-tp1" / "rank0.safetensors") in out
    assert str(tmp_path / "model_repository" / "throughput-tp1" / "tensorrt_llm" / "config.pbtxt") in out
    assert TRITON_IMAGE in out
    assert 'backend: "tensorrtllm"' in out  # rendered configs are shown too
    assert "1024,1024,1024,1024,1024,32768" in out
    assert not any(tmp_path.iterdir()), "a dry run must not write anything"


def test_verify_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from build_engine.__main__ import main

    assert main(["verify", "--dry-run", f"--work-dir={tmp_path}", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "build_engine.gpu.verify" in out and "--max-new-tokens=8" in out


# --- verify's pure parts -------------------------------------------------------------------------------
def test_verify_metrics() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=1000)
    m = verify.compare_logits(a, a + rng.normal(scale=1e-3, size=1000))
    assert m["top1_match"] == 1.0 and m["cosine"] > 0.9999 and m["kl"] < 1e-4
    assert verify.compare_logits(a, -a)["top1_match"] == 0.0
    steps = np.eye(5)[[1, 2, 3, 4]]  # argmax 1, 2, 3, 4
    assert verify.teacher_forced_agreement([1, 2, 0, 4], steps) == 0.75
    assert verify.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_verify_thresholds() -> None:
    def r(kind: str, cos: float, agree: float, top1: bool = True) -> verify.CaseResult:
        return verify.CaseResult("x", kind, 10, top1, cos, 0.0, 0.0, agree, 5)

    t = verify.Thresholds()
    assert verify.evaluate([r("text", 0.999, 0.95), r("image", 0.96, 0.75)], t)[0]
    ok, why = verify.evaluate([r("long", 0.98, 0.95)], t)
    assert not ok and "cosine" in why[0]
    ok, why = verify.evaluate([r("text", 0.999, 0.95, top1=False)], t)
    assert not ok and "first token" in why[0]
    assert not verify.evaluate([r("image", 0.96, 0.5)], t)[0]


def test_verify_long_prompt_is_longer_than_the_window() -> None:
    def enc(text: str) -> list[int]:  # ~1 token per word, good enough to size the document
        return text.split()

    text = verify.long_text(3000, enc)
    assert len(enc(verify.chat_prompt(text))) >= 3000 > A.sliding_window
    assert "PAPAYA-7" in text.splitlines()[0]
    img = verify.synthetic_image()
    assert img.startswith(b"\x89PNG")


# --- long-context needles and the KV pools the engine reports ------------------------------------------
def test_needle_lengths_follow_the_profile() -> None:
    assert verify.needle_lengths(PROFILES["latency"].max_input_len) == [32_000, 100_000]
    assert verify.needle_lengths(PROFILES["throughput"].max_input_len) == []


def test_needle_document_puts_the_fact_beyond_every_window() -> None:
    def enc(text: str) -> list[str]:
        return text.split()

    text = verify.long_text(20_000, enc, needle="MANGO-31", step=200)
    n = len(enc(verify.chat_prompt(text)))
    assert 20_000 <= n < 20_000 + verify.NEEDLE_OVERSHOOT
    first, last = text.splitlines()[0], text.splitlines()[-1]
    assert "MANGO-31" in first and "MANGO" not in "\n".join(text.splitlines()[1:])
    assert last.startswith("Question:")


def test_needle_retrieval_and_evaluation() -> None:
    assert verify.retrieved("MANGO-31", "The code word is **mango 31**.")
    assert not verify.retrieved("MANGO-31", "The code word is PAPAYA-7.")
    nan = float("nan")
    good = verify.CaseResult(
        "n", "needle", 100_000, False, nan, nan, nan, nan, 0, hf_compared=False, retrieved=True
    )
    bad = verify.CaseResult(
        "n", "needle", 100_000, False, nan, nan, nan, nan, 0, hf_compared=False, retrieved=False
    )
    assert verify.evaluate([good], verify.Thresholds()) == (True, [])
    ok, why = verify.evaluate([bad], verify.Thresholds())
    assert not ok and "needle" in why[0]


def test_native_output_is_captured_and_parsed(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    line = (
        "[TensorRT-LLM][INFO] Blocks per window size:\n"
        "[TensorRT-LLM][INFO] [windowSize=1024] {.primaryBlocks=300, .secondaryBlocks=0}\n"
        "[TensorRT-LLM][INFO] [windowSize=131072] {.primaryBlocks=40960, .secondaryBlocks=0}\n"
    )
    with verify.capture_native_output() as cap:
        os.write(1, line.encode())  # as C++ would: straight to the file descriptor
    assert cap.text == line and line in capfd.readouterr().err
    report = verify.kv_capacity_report(cap.text, PROFILES["latency"])
    assert report["found"] and [w["window"] for w in report["windows"]] == [1024, 131072]
    # global pool: 40960 x 32 / 131072 = 10 sequences; the sliding pool (9600 / 1056) is tighter
    assert report["concurrent_max_len_sequences"] == pytest.approx(300 * 32 / (1024 + 32))
    assert verify.kv_capacity_report("nothing", PROFILES["latency"])["found"] is False
