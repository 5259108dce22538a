"""`make gpu-acceptance` without a GPU: the dry run prints every step; each judge reads real-shaped output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from build_engine.gpu import acceptance as acc
from build_engine.gpu.settings import TRITON_IMAGE, TRTLLM_VERSION

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "build_engine.gpu.acceptance",
            "--dry-run",
            f"--report-dir={tmp_path}",
            "--compose=docker-compose",
            "--date=2030-01-02",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    out = res.stdout
    names = [
        "host facts",
        "image facts",
        "build",
        "free the GPU",
        "verify",
        "serve",
        "KV pools",
        "end-to-end",
        "bench",
    ]
    positions = [out.index(f"[{n}]") for n in names]
    assert positions == sorted(positions), "steps out of order"
    assert "$ nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total" in out
    assert "$ docker-compose run --rm builder\n" in out
    assert "python -m build_engine verify" in out and "$ docker-compose up -d" in out
    assert "E2E_BASE_URL=http://localhost:8080 E2E_MODEL=" in out and "E2E_GPU=1" in out
    for f in acc.E2E_FILES:
        assert f in out and (ROOT / f).exists(), f
    assert "OUT=build/bench-gpu/acceptance-2030-01-02 bench bash benchmarks/gpu_bench.sh" in out
    assert f"report → {tmp_path / 'gpu-acceptance-2030-01-02.md'}" in out
    assert not any(tmp_path.iterdir())


def test_makefile_has_the_one_command() -> None:
    text = (ROOT / "Makefile").read_text()
    assert "gpu-acceptance:" in text and "build_engine.gpu.acceptance" in text
    res = subprocess.run(
        ["make", "-n", "gpu-acceptance", "ACCEPTANCE_ARGS=--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "-m build_engine.gpu.acceptance --dry-run" in res.stdout


def test_judge_host() -> None:
    ok = acc.judge_host("NVIDIA H100 80GB HBM3, 590.48.01, 9.0, 81559 MiB\n")
    assert ok.ok and ok.figures["gpu"] == "NVIDIA H100 80GB HBM3"
    assert not acc.judge_host("Tesla T4, 590.48.01, 7.5, 15360 MiB").ok  # no bf16 W4A16 kernels
    assert not acc.judge_host("NVIDIA A100-SXM4-80GB, 535.104.05, 8.0, 81920 MiB").ok  # driver too old
    assert not acc.judge_host("").ok


def test_judge_image() -> None:
    facts = {
        "tensorrt": "10.14.1.48",
        "tensorrt_llm": TRTLLM_VERSION,
        "torch": "2.10.0a0",
        "onnx": "1.19.0",
        "onnxruntime": "missing: ModuleNotFoundError",
        "onnxscript": "0.5.0",
        "transformers": "4.57",
        "trtexec_on_path": None,
        "trtexec_files": ["/usr/local/tensorrt/bin/trtexec"],
    }
    check = acc.judge_image("noise\nIMAGE_FACTS " + json.dumps(facts) + "\n")
    assert check.ok and "/usr/local/tensorrt/bin/trtexec" in check.detail
    assert not acc.judge_image("IMAGE_FACTS " + json.dumps({**facts, "tensorrt": "missing: ImportError"})).ok
    assert not acc.judge_image("IMAGE_FACTS " + json.dumps({**facts, "tensorrt_llm": "0.1"})).ok
    assert not acc.judge_image("container failed").ok


VERIFY_OUT = """[verify] KV pools (0.07,0.93): window 1024: 9600 tokens, window 131072: 620000 tokens \
→ 4.7 concurrent max-length sequences

case          kind   prompt  top1   cosine       KL  agree  prefix
text-0        text       21   yes   0.9990   0.0021   0.97      32
needle-32410  needle  32410    NO      nan      nan    nan       0
PASS  (report: /engines/verify/report.json)
"""


def test_judge_verify() -> None:
    assert "tokens → 4.7" in VERIFY_OUT  # one line, as verify prints it
    check = acc.judge_verify(VERIFY_OUT, 0)
    assert check.ok and check.figures["concurrent_max_len_sequences"] == 4.7
    assert check.figures["text-0"]["cosine"] == "0.9990" and check.figures["needle-32410"]["prompt"] == 32410
    assert not acc.judge_verify(VERIFY_OUT.replace("PASS", "FAIL: needle-32410: no needle"), 1).ok
    assert not acc.judge_verify("Traceback ...", 1).ok


def test_judge_triton_log() -> None:
    log = (
        "I1202 triton | [TensorRT-LLM][INFO] Blocks per window size:\n"
        "[TensorRT-LLM][INFO] [windowSize=1024] {.primaryBlocks=270, .secondaryBlocks=0}\n"
        "[TensorRT-LLM][INFO] [windowSize=131072] {.primaryBlocks=19000, .secondaryBlocks=0}\n"
    )
    check = acc.judge_triton_log(log, "latency")
    assert check.ok and check.figures["concurrent_max_len_sequences"] == pytest.approx(19000 * 32 / 131072)
    # A starved sliding pool (fewer full windows than the batch while the global pool has room) fails.
    starved = log.replace("=270,", "=100,")
    assert not acc.judge_triton_log(starved, "latency").ok
    assert not acc.judge_triton_log("no such line", "latency").ok


def test_judge_junit_and_bench(tmp_path: Path) -> None:
    xml = tmp_path / "e2e.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="0" errors="0" skipped="1">'
        '<testcase classname="tests.test_e2e_lora" name="test_x"><skipped message="remote: needs adapters"/>'
        "</testcase></testsuite></testsuites>"
    )
    check = acc.judge_junit(xml)
    assert check.ok and check.figures["skipped_reasons"] == [
        "tests.test_e2e_lora::test_x: remote: needs adapters"
    ]
    assert not acc.judge_junit(tmp_path / "missing.xml").ok
    assert acc.expected_range("NVIDIA H100 80GB HBM3") == pytest.approx((110.77, 121.22))
    assert acc.expected_range("NVIDIA H100 PCIe") == pytest.approx((66.25, 72.5))
    assert acc.judge_bench(115.0, 112.0, "NVIDIA H100 80GB HBM3").ok
    assert not acc.judge_bench(80.0, 79.0, "NVIDIA H100 80GB HBM3").ok  # below the range
    assert not acc.judge_bench(115.0, 90.0, "NVIDIA H100 80GB HBM3").ok  # the gateway costs too much
    assert not acc.judge_bench(None, None, "x").ok


def test_report_lists_every_check(tmp_path: Path) -> None:
    ctx = acc.Context(["docker", "compose"], "2030-01-02", "http://h:8080", "m", "latency", tmp_path)
    text = acc.report(
        [acc.Check("a", True, "fine", {"x": 1}), acc.Check("b", None, "not run: a failed")], ctx
    )
    assert "**Overall: FAIL**" in text and "| a | PASS | fine |" in text and "| b | not run |" in text
    assert TRITON_IMAGE in text and '"x": 1' in text
