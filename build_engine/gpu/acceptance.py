"""`make gpu-acceptance`: the first run on a GPU host settles what no CPU test can, and writes one report.

    python -m build_engine.gpu.acceptance [--dry-run] [--report-dir reports] [--skip-bench]

On a host with Docker, the NVIDIA container runtime and the repository checked out, in order:

  1. host facts: GPU, driver, compute capability (sm80+ needed), memory;
  2. image facts: TensorRT / TensorRT-LLM / torch / onnx versions inside the pinned image, where `trtexec`
     is (the vision engine no longer needs it);
  3. the build stages (`docker compose run builder`; finished stages are reused from their stamps);
  4. `python -m build_engine verify` (HF fidelity, long-context needles, KV pools from the engine's log);
  5. `docker compose up -d` and wait for the gateway;
  6. the `Blocks per window size` line in Triton's log → the 128k capacity it implies;
  7. every end-to-end test file against the deployment by URL (`E2E_BASE_URL`, `E2E_MODEL`, `E2E_GPU=1`);
  8. the `bench` profile (benchmarks/gpu_bench.sh), single-stream tokens/s against the expected range in
     docs/benchmarks.md;

then writes `reports/gpu-acceptance-<date>.md` with pass/fail per check and the figures. `--dry-run` prints
every step (command, environment, timeout, what is checked) and runs nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_engine.gpu import kv_capacity as kv
from build_engine.gpu.settings import (
    MIN_COMPUTE_CAPABILITY,
    MIN_DRIVER,
    PROFILES,
    TRITON_IMAGE,
    TRTLLM_VERSION,
    settings_from_env,
)

REPO = Path(__file__).resolve().parents[2]
E2E_FILES = (
    "tests/test_e2e_gateway.py",
    "tests/test_e2e_images.py",
    "tests/test_e2e_tools.py",
    "tests/test_e2e_lora.py",
    "tests/test_reliability_e2e.py",
)
# Single-stream decode bounds (memory bandwidth / bytes read per step) and the fraction published stacks
# reach, from docs/benchmarks.md "GPU servers"; keyed by a substring of nvidia-smi's GPU name.
DECODE_BOUND_TOK_S = {"H200": 300.0, "H100 PCIe": 125.0, "H100": 209.0}
EXPECTED_FRACTION = (0.53, 0.58)
GATEWAY_MIN_RATIO = 0.95

IMAGE_FACTS = r"""
import importlib, json, os, shutil
facts = {}
for m in ("tensorrt", "tensorrt_llm", "torch", "onnx", "onnxruntime", "onnxscript", "transformers"):
    try:
        facts[m] = getattr(importlib.import_module(m), "__version__", "?")
    except Exception as exc:
        facts[m] = "missing: " + type(exc).__name__
facts["trtexec_on_path"] = shutil.which("trtexec")
facts["trtexec_files"] = [p for p in ("/usr/local/tensorrt/bin/trtexec", "/usr/src/tensorrt/bin/trtexec")
                          if os.path.exists(p)]
print("IMAGE_FACTS " + json.dumps(facts))
"""


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not run / not applicable
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    name: str
    what: str  # what is checked, for the dry run and the report
    argv: list[str] | None = None
    call: Callable[[Context], Check] | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: int = 600
    judge: Callable[[subprocess.CompletedProcess[str], Context], Check] | None = None
    stop_on_failure: bool = False


@dataclass
class Context:
    compose: list[str]
    date: str
    gateway_url: str
    model_id: str
    profile: str
    report_dir: Path
    facts: dict[str, Any] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def bench_dir(self) -> str:
        return f"build/bench-gpu/acceptance-{self.date}"

    @property
    def junit(self) -> Path:
        return self.report_dir / f"gpu-acceptance-{self.date}-e2e.xml"


# --- judges (pure: unit-tested on canned output) ----------------------------------------------------------
def judge_host(out: str) -> Check:
    line = out.strip().splitlines()[0] if out.strip() else ""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 4:
        return Check("host GPU", False, f"cannot read nvidia-smi output: {out.strip()[:200]!r}")
    name, driver, cc, mem = parts[:4]
    major, minor = (int(x) for x in cc.split("."))
    cc_ok = (major, minor) >= MIN_COMPUTE_CAPABILITY
    drv_ok = tuple(int(x) for x in driver.split(".")) >= tuple(int(x) for x in MIN_DRIVER.split("."))
    detail = f"{name}, driver {driver} (need ≥ {MIN_DRIVER}), sm{major}{minor} (need sm80+), {mem}"
    figures = {"gpu": name, "driver": driver, "compute_capability": cc, "memory": mem}
    return Check("host GPU", cc_ok and drv_ok, detail, figures)


def judge_image(out: str) -> Check:
    m = re.search(r"IMAGE_FACTS (\{.*\})", out)
    if not m:
        return Check("image facts", False, "no IMAGE_FACTS line (did the image start?)")
    facts = json.loads(m.group(1))
    missing = [
        k for k in ("tensorrt", "tensorrt_llm", "torch", "onnx") if str(facts[k]).startswith("missing")
    ]
    version_ok = str(facts["tensorrt_llm"]) == TRTLLM_VERSION
    detail = (
        f"TensorRT-LLM {facts['tensorrt_llm']} (pinned {TRTLLM_VERSION}), TensorRT {facts['tensorrt']}, "
        f"torch {facts['torch']}, onnx {facts['onnx']}, onnxruntime {facts['onnxruntime']}, "
        f"onnxscript {facts['onnxscript']}; trtexec on PATH: {facts['trtexec_on_path']}, "
        f"files: {facts['trtexec_files'] or 'none'}"
    )
    if missing:
        detail += f"; missing: {', '.join(missing)}"
    return Check("image facts", not missing and version_ok, detail, facts)


def judge_rc(name: str) -> Callable[[subprocess.CompletedProcess[str], Context], Check]:
    def judge(res: subprocess.CompletedProcess[str], _ctx: Context) -> Check:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-3:])
        return Check(name, res.returncode == 0, f"exit {res.returncode}: {tail[-400:]}")

    return judge


def judge_verify(out: str, rc: int) -> Check:
    verdict = re.findall(r"^(PASS|FAIL[^\n]*)", out, flags=re.M)
    rows = re.findall(
        r"^(\S+)\s+(text|long|image|needle)\s+(\d+)\s+(yes|NO)\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M
    )
    figures: dict[str, Any] = {
        r[0]: {"prompt": int(r[2]), "top1": r[3], "cosine": r[4], "kl": r[5], "agree": r[6]} for r in rows
    }
    m = re.search(r"→ ([\d.]+) concurrent max-length sequences", out)
    if m:
        figures["concurrent_max_len_sequences"] = float(m.group(1))
    detail = verdict[-1] if verdict else f"no verdict (exit {rc})"
    return Check(
        "verify (HF fidelity, needles)", rc == 0 and bool(verdict) and verdict[-1] == "PASS", detail, figures
    )


def judge_triton_log(log: str, profile: str) -> Check:
    blocks = kv.parse_blocks_per_window(log)
    if not blocks:
        return Check("KV pools (Triton log)", False, "no 'Blocks per window size' line in the triton log")
    caps = kv.capacity_from_blocks(blocks, PROFILES[profile], tokens_per_block=kv.parse_tokens_per_block(log))
    n = kv.concurrent_max_len_sequences(caps)
    p = PROFILES[profile]
    detail = ", ".join(f"window {c.window}: {c.blocks} blocks = {c.tokens} tokens" for c in caps)
    detail += f" → {n:.1f} concurrent {p.max_seq_len}-token sequences (batch {p.max_batch_size})"
    # The window split is right when neither pool is the lone bottleneck by more than one sequence's worth.
    balanced = len(caps) < 2 or caps[0].sequences_at_max_len >= min(
        p.max_batch_size, caps[-1].sequences_at_max_len
    )
    return Check("KV pools (Triton log)", n >= 1 and balanced, detail, {"concurrent_max_len_sequences": n})


def judge_junit(path: Path) -> Check:
    if not path.exists():
        return Check("end-to-end tests", False, f"no junit report at {path}")
    suites = ET.parse(path).getroot()
    counts = {k: 0 for k in ("tests", "failures", "errors", "skipped")}
    for suite in suites.iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    skipped = [
        f"{case.get('classname')}::{case.get('name')}: {sk.get('message', '')}"
        for case in suites.iter("testcase")
        for sk in case.findall("skipped")
    ]
    ok = counts["failures"] == 0 and counts["errors"] == 0 and counts["tests"] > 0
    detail = (
        f"{counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped"
    )
    return Check("end-to-end tests", ok, detail, {**counts, "skipped_reasons": skipped})


def expected_range(gpu_name: str) -> tuple[float, float] | None:
    for key, bound in DECODE_BOUND_TOK_S.items():  # most specific first
        if key in gpu_name:
            return bound * EXPECTED_FRACTION[0], bound * EXPECTED_FRACTION[1]
    return None


def judge_bench(ensemble_tok_s: float | None, gateway_tok_s: float | None, gpu_name: str) -> Check:
    if ensemble_tok_s is None:
        return Check("bench (concurrency 1)", False, "no ensemble-c1 export")
    rng = expected_range(gpu_name)
    figures = {"ensemble_tok_s": ensemble_tok_s, "gateway_tok_s": gateway_tok_s, "expected": rng}
    detail = f"ensemble {ensemble_tok_s:.1f} tok/s"
    ok = True
    if rng is not None:
        detail += f" (expected {rng[0]:.0f}–{rng[1]:.0f} on {gpu_name})"
        ok = ensemble_tok_s >= rng[0]
    else:
        detail += f" (no expected range for {gpu_name!r} in docs/benchmarks.md)"
    if gateway_tok_s is not None:
        ratio = gateway_tok_s / ensemble_tok_s if ensemble_tok_s else 0.0
        detail += f"; gateway {gateway_tok_s:.1f} tok/s = {ratio:.2f} × ensemble (want ≥ {GATEWAY_MIN_RATIO})"
        ok = ok and ratio >= GATEWAY_MIN_RATIO
    return Check("bench (concurrency 1)", ok, detail, figures)


def bench_figures(out_dir: Path) -> tuple[float | None, float | None]:
    from benchmarks.loads import load_export, parse_openai, parse_triton

    def rate(name: str, parse: Callable[[dict[str, Any]], Any]) -> float | None:
        path = out_dir / name
        return parse(load_export(path)).tokens_per_s if path.exists() else None

    return rate("ensemble-c1.export.json", parse_triton), rate("openai-c1.export.json", parse_openai)


# --- the plan ---------------------------------------------------------------------------------------
def plan(ctx: Context, *, skip_bench: bool = False) -> list[Step]:
    c = ctx.compose
    run_builder = [*c, "run", "--rm", "--no-deps", "builder"]
    e2e_env = {"E2E_BASE_URL": ctx.gateway_url, "E2E_MODEL": ctx.model_id, "E2E_GPU": "1"}
    steps = [
        Step(
            "host facts",
            "GPU name, driver ≥ the image's minimum, compute capability ≥ 8.0 (W4A16 bf16 kernels)",
            argv=[
                "nvidia-smi",
                "--query-gpu=name,driver_version,compute_cap,memory.total",
                "--format=csv,noheader",
            ],
            timeout_s=60,
            judge=lambda r, x: _remember(x, "host", judge_host(r.stdout)),
            stop_on_failure=True,
        ),
        Step(
            "image facts",
            f"versions inside {TRITON_IMAGE}; TensorRT-LLM is the pinned {TRTLLM_VERSION}; where trtexec is",
            argv=[*run_builder, "python", "-c", IMAGE_FACTS],
            timeout_s=1800,  # the first pull of the image
            judge=lambda r, x: judge_image(r.stdout),
        ),
        Step(
            "build",
            "download → inspect → convert → build → vision → tokenizer-info → repository (stamps reused)",
            argv=[*c, "run", "--rm", "builder"],
            timeout_s=4 * 3600,
            judge=judge_rc("build stages"),
            stop_on_failure=True,
        ),
        Step(
            "free the GPU",
            "a running stack holds the GPU memory verify needs: stop triton and gateway",
            argv=[*c, "stop", "triton", "gateway"],
            timeout_s=300,
            judge=judge_rc("stop triton and gateway"),
        ),
        Step(
            "verify",
            "engine vs HF logits and greedy tokens; needles at ~32k/~100k tokens; KV pools from its log",
            argv=[*run_builder, "python", "-m", "build_engine", "verify"],
            timeout_s=3 * 3600,
            judge=lambda r, x: judge_verify(r.stdout + r.stderr, r.returncode),
        ),
        Step(
            "serve",
            f"docker compose up -d; the gateway at {ctx.gateway_url}/health/ready within 30 minutes",
            argv=[*c, "up", "-d"],
            timeout_s=1800,
            judge=lambda r, x: _wait_ready(r, x),
            stop_on_failure=True,
        ),
        Step(
            "KV pools",
            "Triton's 'Blocks per window size' log line → concurrent max-length sequences",
            argv=[*c, "logs", "--no-color", "triton"],
            timeout_s=120,
            judge=lambda r, x: judge_triton_log(r.stdout + r.stderr, x.profile),
        ),
        Step(
            "end-to-end",
            "every e2e test file against the deployment by URL; skips are listed with their reasons",
            argv=[
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "e2e",
                "--timeout=1800",
                f"--junitxml={ctx.junit}",
                *E2E_FILES,
            ],
            env=e2e_env,
            timeout_s=3 * 3600,
            judge=lambda r, x: judge_junit(x.junit),
        ),
    ]
    if not skip_bench:
        steps.append(
            Step(
                "bench",
                "benchmarks/gpu_bench.sh from the SDK image; concurrency-1 tokens/s vs docs/benchmarks.md",
                argv=[
                    *c,
                    "--profile",
                    "bench",
                    "run",
                    "--rm",
                    "-e",
                    f"OUT={ctx.bench_dir}",
                    "bench",
                    "bash",
                    "benchmarks/gpu_bench.sh",
                ],
                timeout_s=3 * 3600,
                judge=lambda r, x: judge_bench(
                    *bench_figures(REPO / x.bench_dir), str(x.facts.get("host", {}).get("gpu", "?"))
                ),
            )
        )
    return steps


def _remember(ctx: Context, key: str, check: Check) -> Check:
    ctx.facts[key] = check.figures
    return check


def _wait_ready(res: subprocess.CompletedProcess[str], ctx: Context, timeout_s: float = 1800) -> Check:
    if res.returncode != 0:
        return Check("serve", False, f"docker compose up failed: {res.stderr.strip()[-400:]}")
    deadline = time.monotonic() + timeout_s
    url = f"{ctx.gateway_url}/health/ready"
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return Check(
                        "serve",
                        True,
                        f"ready after {time.monotonic() - t0:.0f}s",
                        {"ready_s": time.monotonic() - t0},
                    )
        except OSError:
            pass
        time.sleep(10)
    return Check("serve", False, f"{url} not ready after {timeout_s:.0f}s")


# --- running and reporting ---------------------------------------------------------------------------
def show(step: Step) -> str:
    lines = [f"[{step.name}] {step.what}"]
    if step.argv:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in step.env.items())
        lines.append(f"    $ {env + ' ' if env else ''}{shlex.join(step.argv)}")
    lines.append(
        f"    timeout {step.timeout_s}s{'; stops the run on failure' if step.stop_on_failure else ''}"
    )
    return "\n".join(lines)


def run(steps: list[Step], ctx: Context) -> list[Check]:
    checks: list[Check] = []
    for i, step in enumerate(steps):
        print(f"== {step.name}: {step.what}", flush=True)
        t0 = time.monotonic()
        try:
            res = subprocess.run(
                step.argv or [],
                cwd=REPO,
                env={**os.environ, **step.env},
                capture_output=True,
                text=True,
                timeout=step.timeout_s,
                check=False,
            )
            ctx.logs[step.name] = res.stdout + res.stderr
            check = step.judge(res, ctx) if step.judge else judge_rc(step.name)(res, ctx)
        except subprocess.TimeoutExpired:
            check = Check(step.name, False, f"timed out after {step.timeout_s}s")
        except (OSError, ValueError, KeyError) as exc:
            check = Check(step.name, False, f"{type(exc).__name__}: {exc}")
        check.figures.setdefault("seconds", round(time.monotonic() - t0, 1))
        checks.append(check)
        print(f"   {'PASS' if check.ok else 'FAIL'}: {check.detail}", flush=True)
        if not check.ok and step.stop_on_failure:
            checks += [Check(s.name, None, f"not run: {step.name} failed") for s in steps[i + 1 :]]
            break
    return checks


def report(checks: list[Check], ctx: Context) -> str:
    def mark(ok: bool | None) -> str:
        return {True: "PASS", False: "FAIL", None: "not run"}[ok]

    passed = all(c.ok for c in checks)
    lines = [
        f"# GPU acceptance {ctx.date}",
        "",
        f"Image `{TRITON_IMAGE}`, profile `{ctx.profile}`, model `{ctx.model_id}`,",
        f"gateway {ctx.gateway_url}.",
        "Expected figures: docs/benchmarks.md (GPU servers) and docs/gpu.md (KV-cache arithmetic).",
        "",
        f"**Overall: {'PASS' if passed else 'FAIL'}**",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {mark(c.ok)} | {c.detail.replace('|', '/')} |" for c in checks]
    lines += ["", "## Figures", ""]
    for c in checks:
        if c.figures:
            lines += [f"### {c.name}", "", "```json", json.dumps(c.figures, indent=2, default=str), "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m build_engine.gpu.acceptance", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--dry-run", action="store_true", help="print every step, run nothing")
    ap.add_argument("--report-dir", type=Path, default=REPO / "reports")
    ap.add_argument("--compose", default=os.environ.get("COMPOSE", "docker compose"))
    ap.add_argument("--gateway-url", default=f"http://localhost:{os.environ.get('GATEWAY_PORT', '8080')}")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args(argv)
    s = settings_from_env()
    ctx = Context(
        compose=shlex.split(args.compose),
        date=args.date,
        gateway_url=args.gateway_url.rstrip("/"),
        model_id=s.model_id,
        profile=s.profile.name,
        report_dir=args.report_dir,
    )
    steps = plan(ctx, skip_bench=args.skip_bench)
    out = ctx.report_dir / f"gpu-acceptance-{ctx.date}.md"
    if args.dry_run:
        print(f"# GPU acceptance plan ({len(steps)} steps); report → {out}")
        for step in steps:
            print(show(step))
        return 0
    ctx.report_dir.mkdir(parents=True, exist_ok=True)
    checks = run(steps, ctx)
    out.write_text(report(checks, ctx))
    print(f"report: {out}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
