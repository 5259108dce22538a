"""`make bench`: the whole CPU benchmark in one session, then docs/benchmarks.md and its plots.

    .venv-sys/bin/python -m benchmarks.run_all            # ~5-8 min on 2 cores

Environments. The system under test (tritonserver's Python stubs, the gateway, transformers for the floor)
runs in the runtime virtualenv this script is started with (Debian's python3.11: the stub embeds it). The
measurement tools live in `.venv-bench`, created here if missing: perf_analyzer from the tritonclient
2.51.0 wheel (the last one whose binary runs on Debian 12's glibc), libcudart.so.12 from
nvidia-cuda-runtime-cu12 (perf_analyzer links it; no GPU is used) and matplotlib. None of it is installed
into the runtime. perf_analyzer also needs Debian's `libb64-0d`.

Phases (each starts its own tritonserver and gateway, on private ports):
1. fast test double paced like a GPU engine (10 ms/token): perf_analyzer on the ensemble (gRPC streaming)
   and on the gateway (OpenAI SSE) at concurrency 1, 8, 32, with per-process CPU accounting, plus the
   Python gRPC floor at 32 (benchmarks/grpc_floor.py: a bare client with the gateway's gRPC stack);
2. the double unpaced (as fast as it can send) at concurrency 32: the per-token CPU cost of each component,
   plus three calibration paths -- perf_analyzer straight to `tensorrt_llm`, the Python gRPC floor, and
   `ensemble_ids` (the ensemble without postprocessing, rendered only here) -- which isolate the engine
   double, the cost of receiving a token in Python at all, and the detokenizer step;
3a. the reference engine's model forwards alone (benchmarks/engine_steps.py): decode steps at 1 and 8 rows
   for each thread count, with plain and packed linear layers;
3. the real Gemma 3 270M reference engine: ensemble and gateway at concurrency 1 and 8;
4. transformers generate on the same checkpoint and prompts (the floor), with no server running;
5. llama.cpp (llama-cpp-python in `.venv-bench`) on the very same GGUF, in process, 1 and 8 streams
   decoded together (benchmarks/llama_cpp_anchor.py): the CPU anchor, reported as ours / llama.cpp;
then, on a double paced as in phase 1 (it returns made-up log probs in the reference engine's shapes):
- logprobs: the gateway streaming chat with `logprobs` and `top_logprobs` 5 and 20 against without, 32
  streams, the variants alternated over `logprob_rounds` rounds: the per-token cost log probs add
  (`--only logprobs` runs just this phase).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import loads  # noqa: E402
from stack.procstat import ProcessGroup, component, delta  # noqa: E402

if TYPE_CHECKING:
    from build_engine.cpu import CpuArtifacts

BENCH_VENV = REPO / ".venv-bench"
BENCH_REQUIREMENTS = REPO / "benchmarks" / "requirements-bench.txt"
WORK = REPO / "build" / "bench"
DOCS = REPO / "docs"
MODEL_ID = "gemma-3-270m"
MESSAGES = loads.MESSAGES
# Streamed chat through the gateway: plain, and with log probs (the per-token cost they add).
GATEWAY_VARIANTS: dict[str, dict[str, Any]] = {
    "gateway": {},
    "gateway_logprobs": {"logprobs": True},
    "gateway_top5": {"logprobs": True, "top_logprobs": 5},
    "gateway_top20": {"logprobs": True, "top_logprobs": 20},
}


@dataclass
class Config:
    fd_interval_us: int = 10_000  # ≈ an H100 decode step for the 27B int4 (docs/benchmarks.md)
    fd_tokens: int = 128
    real_tokens: int = 48
    c1_requests: int = 8
    c8_requests: int = 32
    c32_requests: int = 64
    real_c1_requests: int = 4
    real_c8_requests: int = 8
    logprob_rounds: int = 2  # the log-prob variants run alternated, this many times each
    # As deployed (REFERENCE_ENGINE_THREADS unset): every available core. Phase 3a measures the engine's
    # steps at each thread count, so the choice is checked on every run.
    engine_threads: int = field(default_factory=lambda: _available_cores())
    out_md: Path = DOCS / "benchmarks.md"
    results: dict[str, Any] = field(default_factory=dict)


def _available_cores() -> int:
    from cpu_engine.engine import available_cores

    return available_cores()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the benchmark environment ------------------------------------------------------------------------


def ensure_bench_env() -> loads.PerfAnalyzer:
    py = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".requirements"
    wanted = BENCH_REQUIREMENTS.read_text()
    if not py.exists() or not stamp.exists() or stamp.read_text() != wanted:
        log(f"creating {BENCH_VENV} (perf_analyzer, libcudart, matplotlib) ...")
        subprocess.run(["/usr/bin/python3.11", "-m", "venv", str(BENCH_VENV)], check=True)
        wheels = llama_cpp_wheel(py)
        subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "-q",
                "--find-links",
                str(wheels),
                "-r",
                str(BENCH_REQUIREMENTS),
            ],
            check=True,
        )
        stamp.write_text(wanted)
    site = next((BENCH_VENV / "lib").glob("python3*/site-packages"))
    cuda_lib = site / "nvidia" / "cuda_runtime" / "lib"
    pa = loads.PerfAnalyzer(BENCH_VENV / "bin" / "perf_analyzer", loads.perf_analyzer_env(cuda_lib))
    probe = subprocess.run([str(pa.binary), "--version"], capture_output=True, text=True, env=pa.env)
    if probe.returncode != 0:
        hint = "apt-get install -y libb64-0d" if "libb64" in probe.stderr else "see the error"
        raise SystemExit(f"perf_analyzer does not start ({hint}):\n{probe.stderr.strip()}")
    return pa


def llama_cpp_wheel(py: Path) -> Path:
    """A folder holding a llama-cpp-python wheel built for this machine (PyPI has only its sdist).

    Compiling llama.cpp takes a long time on a small machine, so the wheel is kept in the model cache and
    built once; only the library is built (no tools, tests, server or multimodal), for this CPU.
    """
    from build_engine.cpu import cache_root

    wheels = cache_root() / "wheels"
    wanted = next(
        line.split("==")[1].strip()
        for line in BENCH_REQUIREMENTS.read_text().splitlines()
        if line.startswith("llama-cpp-python==")
    )
    if not any(wheels.glob(f"llama_cpp_python-{wanted}-*.whl")):
        log(f"compiling llama-cpp-python {wanted} into {wheels} (once; it takes a while) ...")
        flags = [
            "-DGGML_NATIVE=ON",
            "-DLLAVA_BUILD=OFF",
            "-DLLAMA_CURL=OFF",
            *(f"-DLLAMA_BUILD_{part}=OFF" for part in ("TESTS", "EXAMPLES", "SERVER", "TOOLS")),
        ]
        env = {
            **os.environ,
            "CMAKE_ARGS": " ".join(flags),
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1),
        }
        cmd = [
            str(py),
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(wheels),
            f"llama-cpp-python=={wanted}",
        ]
        subprocess.run(cmd, check=True, env=env)
    return wheels


# --- servers ------------------------------------------------------------------------------------------


def render_repo(target: str, out: Path, extra: dict[str, str], max_batch_size: int) -> Path:
    from build_engine.cpu import prepare, repository_values
    from build_engine.render import render, values_for

    values = {**repository_values(prepare(), max_batch_size=max_batch_size, max_seq_len=2048), **extra}
    render(target, out, values_for(target, values))  # cpu-fast-double has no vision
    return out


def add_ids_ensemble(repo: Path) -> None:
    """`ensemble_ids`: the ensemble minus postprocessing, streaming `output_ids` (calibration only)."""
    text = (repo / "ensemble" / "config.pbtxt").read_text()
    start = text.index('    {\n      model_name: "postprocessing"')
    text = text[:start].rstrip().rstrip(",") + "\n" + text[text.index("  ]\n}", start) :]
    text = text.replace('name: "ensemble"', 'name: "ensemble_ids"')
    text = text.replace('      output_map { key: "sequence_length" value: "_SEQUENCE_LENGTH" }\n', "")
    text = text.replace('value: "_TOKENS_BATCH"', 'value: "output_ids"')
    text = text.replace(
        '{ name: "text_output" data_type: TYPE_STRING dims: [ -1 ] }',
        '{ name: "output_ids" data_type: TYPE_INT32 dims: [ -1, -1 ] }',
    )
    (repo / "ensemble_ids" / "1").mkdir(parents=True, exist_ok=True)
    (repo / "ensemble_ids" / "config.pbtxt").write_text(text)


@dataclass
class Stack:
    triton: Any  # stack.triton_launcher.TritonProcess
    gateway: subprocess.Popen[bytes]
    gateway_url: str
    tokenizer_dir: str

    def processes(self) -> ProcessGroup:
        return ProcessGroup.triton(self.triton.proc.pid, self.gateway.pid)


@contextlib.contextmanager
def serve(repo: Path, name: str, tokenizer_dir: str, engine_threads: int) -> Iterator[Stack]:
    from stack import gateway_process
    from stack.gateway_process import gateway_env
    from stack.triton_launcher import TritonPorts, free_port, start

    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    triton_log = (logs / f"{name}.tritonserver.log").open("w")
    os.environ["REFERENCE_ENGINE_THREADS"] = str(engine_threads)
    ports = TritonPorts.free()

    def log_line(line: str) -> None:
        triton_log.write(line + "\n")
        triton_log.flush()

    triton = start(repo, ports=ports, workdir=WORK / f".triton-{name}", log_sink=log_line)
    try:
        triton.wait_ready(timeout=600)
        env = gateway_env(
            grpc_url=triton.grpc_url,
            port=free_port(),
            tokenizer_dir=tokenizer_dir,
            model_id=MODEL_ID,
            max_model_len=2048,
            PYTHONPATH=str(REPO),
        )
        with gateway_process.running(env, logs / f"{name}.gateway.log") as (url, gateway):
            yield Stack(triton, gateway, url, tokenizer_dir)
    finally:
        triton.stop()
        triton_log.close()


# --- one load point -----------------------------------------------------------------------------------


def per_token(cpu: dict[str, float], tokens: int) -> dict[str, float | None]:
    """CPU seconds per process label -> µs per delivered token per component (model instances summed)."""
    totals: dict[str, float] = {}
    for label, seconds in cpu.items():
        totals[component(label)] = totals.get(component(label), 0.0) + seconds
    return {k: round(v / tokens * 1e6, 1) if tokens else None for k, v in totals.items()}


def measure(
    pa: loads.PerfAnalyzer,
    stack: Stack,
    *,
    path: str,
    concurrency: int,
    requests: int,
    max_tokens: int,
    prompts: list[str],
    name: str,
) -> dict[str, Any]:
    """Run one perf_analyzer point and return its latency/throughput summary plus CPU µs per token."""
    group = stack.processes()
    if path == "grpc_floor":
        return measure_floor(stack, concurrency, requests, max_tokens, prompts, name)
    if path in GATEWAY_VARIANTS:
        data = loads.openai_input_data(MESSAGES, MODEL_ID, max_tokens, GATEWAY_VARIANTS[path])
        kind, url, model = "openai", stack.gateway_url.removeprefix("http://"), MODEL_ID
    elif path == "engine":
        from gemma3_core.tokenizer import encode, load_tokenizer

        tok = load_tokenizer(stack.tokenizer_dir)
        data = loads.engine_input_data([encode(tok, p) for p in prompts], max_tokens)
        kind, url, model = "triton", stack.triton.grpc_url, "tensorrt_llm"
    else:  # "ensemble" or "ensemble_ids"
        data = loads.ensemble_input_data(prompts, max_tokens)
        kind, url, model = "triton", stack.triton.grpc_url, path
    loads.wait_idle(0.3)
    before = group.snapshot()
    export, pa_cpu = pa.run(
        kind=kind,
        url=url,
        model=model,
        input_data=data,
        concurrency=concurrency,
        requests=requests,
        workdir=WORK / "pa",
        name=name,
    )
    loads.wait_idle(0.5)  # stream teardown is part of the cost
    cpu = delta(before, group.snapshot())
    stats = loads.parse_openai(export) if kind == "openai" else loads.parse_triton(export)
    summary = stats.summary()
    summary["cpu_us_per_token"] = per_token(cpu, stats.tokens)
    summary["perf_analyzer_cpu_us_per_token"] = round(pa_cpu / stats.tokens * 1e6, 1) if stats.tokens else 0
    summary.update(path=path, concurrency=concurrency, max_tokens=max_tokens)
    log(
        f"{name}: {stats.tokens} tok, {summary['tokens_per_s']} tok/s, TTFT p50 {summary['ttft_p50_ms']} ms, "
        f"ITL p50 {summary['itl_p50_ms']} ms, CPU µs/tok {summary['cpu_us_per_token']}"
    )
    if stats.errors:
        log(f"{name}: {stats.errors} requests without output")
    return summary


def measure_floor(
    stack: Stack, concurrency: int, requests: int, max_tokens: int, prompts: list[str], name: str
) -> dict[str, Any]:
    """benchmarks/grpc_floor.py on the engine: a bare Python gRPC client's CPU per token (its own column)."""
    from gemma3_core.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(stack.tokenizer_dir)
    data_file = WORK / "pa" / f"{name}.input.json"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_text(json.dumps(loads.engine_input_data([encode(tok, p) for p in prompts], max_tokens)))
    group = stack.processes()
    loads.wait_idle(0.3)
    before = group.snapshot()
    out = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.grpc_floor", "--url", stack.triton.grpc_url),
            *("--input-data", str(data_file), "--concurrency", str(concurrency), "--requests", str(requests)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if out.returncode != 0:
        raise RuntimeError(f"grpc_floor {name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    loads.wait_idle(0.5)
    cpu = delta(before, group.snapshot())
    floor = json.loads(out.stdout.strip().splitlines()[-1])
    stats = loads.RunStats(requests=requests, tokens=floor["tokens"], wall_s=floor["wall_s"])
    summary = stats.summary()
    summary["cpu_us_per_token"] = per_token(cpu, stats.tokens)
    summary["client_cpu_us_per_token"] = round(floor["cpu_s"] / stats.tokens * 1e6, 1)
    summary.update(path="grpc_floor", concurrency=concurrency, max_tokens=max_tokens)
    log(f"{name}: {stats.tokens} tok, client CPU {summary['client_cpu_us_per_token']} µs/tok")
    return summary


def warm(pa: loads.PerfAnalyzer, stack: Stack, prompts: list[str], max_tokens: int) -> None:
    for path in ("ensemble", "gateway"):
        measure(
            pa,
            stack,
            path=path,
            concurrency=1,
            requests=2,
            max_tokens=max_tokens,
            prompts=prompts,
            name=f"warmup-{path}",
        )


# --- phases -------------------------------------------------------------------------------------------


def double_repo(name: str, interval_us: int, implementation: str) -> Path:
    """A `cpu-fast-double` repository (first token after one interval), native double compiled in."""
    from build_engine import fast_double

    values = fast_double.values(interval_us, interval_us, implementation)
    repo = render_repo(
        "cpu-fast-double", WORK / f"repo-{name}" / "model_repository", values, max_batch_size=64
    )
    if implementation == "native":
        fast_double.build_native(repo / "tensorrt_llm")
    return repo


def double_implementation() -> str:
    """The native double when a compiler is there (it is what the targets mean), else the Python one."""
    return "native" if shutil.which(os.environ.get("CXX", "g++")) else "python"


def measure_paths(
    pa: loads.PerfAnalyzer, stack: Stack, max_tokens: int, prompts: list[str], prefix: str, points: Any
) -> list[dict[str, Any]]:
    """One perf point per (path, concurrency, requests), named `prefix-path-cN`."""
    return [
        measure(
            pa,
            stack,
            path=path,
            concurrency=conc,
            requests=n,
            max_tokens=max_tokens,
            prompts=prompts,
            name=f"{prefix}-{path}-c{conc}",
        )
        for path, conc, n in points
    ]


def phase_fast_double(pa: loads.PerfAnalyzer, cfg: Config, prompts: list[str], tokenizer_dir: str) -> None:
    impl = double_implementation()
    cfg.results["fast_double_implementation"] = impl
    repo = double_repo("fd-paced", cfg.fd_interval_us, impl)
    log(f"phase 1: {impl} fast double paced at {cfg.fd_interval_us} µs/token")
    with serve(repo, "fd-paced", tokenizer_dir, cfg.engine_threads) as stack:
        warm(pa, stack, prompts, 16)
        points = [
            (path, conc, n)
            for conc, n in ((1, cfg.c1_requests), (8, cfg.c8_requests), (32, cfg.c32_requests))
            for path in (("ensemble", "gateway", "grpc_floor") if conc == 32 else ("ensemble", "gateway"))
        ]
        runs = measure_paths(pa, stack, cfg.fd_tokens, prompts, "fd-paced", points)
    cfg.results["fast_double_paced"] = {"interval_us": cfg.fd_interval_us, "runs": runs}

    repo = double_repo("fd-max", 0, impl)
    add_ids_ensemble(repo)
    log(f"phase 2: {impl} fast double unpaced (CPU cost per token at saturation)")
    with serve(repo, "fd-max", tokenizer_dir, cfg.engine_threads) as stack:
        warm(pa, stack, prompts, 16)
        paths = ("engine", "grpc_floor", "ensemble_ids", "ensemble", "gateway")
        runs = measure_paths(
            pa, stack, cfg.fd_tokens, prompts, "fd-max", [(p, 32, cfg.c32_requests) for p in paths]
        )
    cfg.results["fast_double_max"] = {"interval_us": 0, "runs": runs}

    if impl == "native":  # the Python double on the same load: what its IPC hop adds to tritonserver
        repo = double_repo("fd-max-py", 0, "python")
        log("phase 2b: Python fast double unpaced (calibration of the Python backend's per-response cost)")
        with serve(repo, "fd-max-py", tokenizer_dir, cfg.engine_threads) as stack:
            warm(pa, stack, prompts, 16)
            points = [(p, 32, cfg.c32_requests) for p in ("engine", "gateway")]
            runs = measure_paths(pa, stack, cfg.fd_tokens, prompts, "fd-max-py", points)
        cfg.results["fast_double_max_python"] = {"interval_us": 0, "runs": runs}


def phase_logprobs(pa: loads.PerfAnalyzer, cfg: Config, prompts: list[str], tokenizer_dir: str) -> None:
    """The gateway streaming chat with and without log probs on one stack (the double paced as in phase 1,
    32 streams); the variants alternate, round after round, so drift on a shared machine hits them alike."""
    impl = double_implementation()
    repo = double_repo("fd-logprobs", cfg.fd_interval_us, impl)
    log(f"logprobs: gateway with and without log probs, {impl} double paced at {cfg.fd_interval_us} µs/token")
    runs: list[dict[str, Any]] = []
    with serve(repo, "fd-logprobs", tokenizer_dir, cfg.engine_threads) as stack:
        warm(pa, stack, prompts, 16)
        points = [(path, 32, cfg.c32_requests) for path in GATEWAY_VARIANTS]
        for i in range(cfg.logprob_rounds):
            for r in measure_paths(pa, stack, cfg.fd_tokens, prompts, f"fd-logprobs-r{i}", points):
                runs.append({**r, "round": i})
    cfg.results["logprobs"] = {
        "interval_us": cfg.fd_interval_us,
        "implementation": impl,
        "variants": GATEWAY_VARIANTS,
        "runs": runs,
    }


def phase_real(pa: loads.PerfAnalyzer, cfg: Config, prompts: list[str], tokenizer_dir: str) -> None:
    repo = render_repo("cpu", WORK / "repo-real" / "model_repository", {}, max_batch_size=8)
    log("phase 3: real Gemma 3 270M reference engine")
    with serve(repo, "real", tokenizer_dir, cfg.engine_threads) as stack:
        warm(pa, stack, prompts, 8)
        points = [
            (path, conc, n)
            for conc, n in ((1, cfg.real_c1_requests), (8, cfg.real_c8_requests))
            for path in ("ensemble", "gateway")
        ]
        runs = measure_paths(pa, stack, cfg.real_tokens, prompts, "real", points)
    cfg.results["real"] = {"runs": runs}


def phase_engine_steps(cfg: Config, hf_dir: str, tokenizer_dir: str) -> None:
    log("phase 3a: the engine's decode steps alone (threads, kinds of layers, float16 fidelity)")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.engine_steps",
        "--model-dir",
        hf_dir,
        "--tokenizer-dir",
        tokenizer_dir,
    ]
    out = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    cfg.results["engine_steps"] = json.loads(out.stdout)


def phase_bare(cfg: Config, prompts: list[str], hf_dir: str) -> None:
    log("phase 4: bare transformers generate (floor)")
    prompts_file = WORK / "prompts.json"
    prompts_file.write_text(json.dumps(prompts[: cfg.real_c1_requests]))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bare_generate",
            "--model-dir",
            hf_dir,
            "--prompts-file",
            str(prompts_file),
            "--max-tokens",
            str(cfg.real_tokens),
            "--threads",
            str(cfg.engine_threads),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    bare = json.loads(out.stdout)
    log(f"bare generate: {bare['tokens']} tok, {bare['tokens_per_s']} tok/s")
    cfg.results["bare"] = bare


def phase_llama_cpp(cfg: Config, prompts: list[str], gguf: str) -> None:
    log("phase 5: llama.cpp on the same GGUF (anchor)")
    prompts_file = WORK / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    out = subprocess.run(
        [
            str(BENCH_VENV / "bin" / "python"),
            "-m",
            "benchmarks.llama_cpp_anchor",
            "--gguf",
            gguf,
            "--prompts-file",
            str(prompts_file),
            "--max-tokens",
            str(cfg.real_tokens),
            "--threads",
            str(cfg.engine_threads),
            "--streams",
            "1,8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    anchor = json.loads(out.stdout)
    ours = {(r["path"], r["concurrency"]): r for r in cfg.results.get("real", {}).get("runs", [])}
    for c in (1, 8):
        mine = ours.get(("gateway", c))
        theirs = anchor[f"c{c}"]["tokens_per_s_median"]
        anchor[f"c{c}"]["ours_over_llama_cpp"] = (
            round(mine["tokens_per_s"] / theirs, 3) if mine and mine.get("tokens_per_s") and theirs else None
        )
    c1, c8 = anchor["c1"]["tokens_per_s_median"], anchor["c8"]["tokens_per_s_median"]
    log(f"llama.cpp: c1 {c1} tok/s, c8 {c8} tok/s")
    cfg.results["llama_cpp"] = anchor


# --- environment facts --------------------------------------------------------------------------------


def phases_real_model(pa: loads.PerfAnalyzer, cfg: Config, prompts: list[str], art: CpuArtifacts) -> None:
    """The phases on the real Gemma 3 270M: engine steps, the reference engine served, bare generate,
    llama.cpp."""
    phase_engine_steps(cfg, str(art.hf_dir), str(art.tokenizer_dir))
    phase_real(pa, cfg, prompts, str(art.tokenizer_dir))
    phase_bare(cfg, prompts, str(art.hf_dir))
    phase_llama_cpp(cfg, prompts, str(art.gguf))


def phase_scale_out(cfg: Config) -> None:
    """benchmarks/scale_out.py's three measurements, each in its own processes (servers start and stop)."""
    log("phase 6: scale-out (3 replicas vs 1, gateway workers, gateway over the gRPC floor)")
    lines: list[dict[str, Any]] = []
    for what in ("replicas", "workers", "overhead"):
        cmd = [sys.executable, "-m", "benchmarks.scale_out", what]
        out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
        lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    cfg.results["scale_out"] = lines


def machine_facts(pa: loads.PerfAnalyzer) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    versions = {}
    packages = (
        "nvidia-pytriton",
        "tritonclient",
        "torch",
        "transformers",
        "tokenizers",
        "fastapi",
        "uvicorn",
        "grpcio",
        "numpy",
    )
    for pkg in packages:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "-"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "perf_analyzer": pa.version(),
        "tritonserver": "2.51.0 (from nvidia-pytriton 0.7.0)",
        "versions": versions,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-real", action="store_true", help="fast double phases only")
    parser.add_argument("--report-only", action="store_true", help="re-render docs from the last results")
    parser.add_argument(
        "--only",
        choices=("logprobs", "real"),
        help="run this phase alone and merge it into the last results (re-rendered if they are complete); "
        "`real`: the real-model phases (engine steps, reference engine, bare generate, llama.cpp) into "
        "their own file, never merged: the docs' figures all come from one session",
    )
    args = parser.parse_args(argv)
    # `kill` must still stop the servers (the `serve` context managers), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = Config()
    results_file = DOCS / "benchmarks" / "results.json"
    results_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    pa = ensure_bench_env()
    if args.only:
        return run_only(args.only, pa, cfg, results_file, t0)
    if not args.report_only:
        from build_engine.cpu import prepare
        from gemma3_core.chat_template import render_chat

        art = prepare()
        prompts = [render_chat([{"role": "user", "content": m}]) for m in MESSAGES]
        if WORK.exists():
            shutil.rmtree(WORK)
        cfg.results["machine"] = machine_facts(pa)
        cfg.results["config"] = {
            "messages": MESSAGES,
            "fast_double_tokens": cfg.fd_tokens,
            "real_tokens": cfg.real_tokens,
            "engine_threads": cfg.engine_threads,
        }
        phase_fast_double(pa, cfg, prompts, str(art.tokenizer_dir))
        phase_logprobs(pa, cfg, prompts, str(art.tokenizer_dir))
        phase_scale_out(cfg)
        if not args.skip_real:
            phases_real_model(pa, cfg, prompts, art)
        cfg.results["elapsed_s"] = round(time.monotonic() - t0, 1)
        results_file.write_text(json.dumps(cfg.results, indent=1))
    render_report(results_file, cfg.out_md)
    log(f"wrote {cfg.out_md} in {time.monotonic() - t0:.0f} s")
    return 0


def render_report(results_file: Path, out_md: Path) -> None:
    subprocess.run(
        [str(BENCH_VENV / "bin" / "python"), "-m", "benchmarks.report", str(results_file), str(out_md)],
        cwd=REPO,
        check=True,
    )


def run_only(phase: str, pa: loads.PerfAnalyzer, cfg: Config, results_file: Path, t0: float) -> int:
    """One phase alone: `logprobs` merged into the last full results (docs re-rendered), `real` kept in
    its own file."""
    from build_engine.cpu import prepare
    from gemma3_core.chat_template import render_chat

    art = prepare()
    prompts = [render_chat([{"role": "user", "content": m}]) for m in MESSAGES]
    if phase == "real":
        phases_real_model(pa, cfg, prompts, art)
        out = WORK / "real-alone.json"
        out.write_text(json.dumps(cfg.results, indent=1))
        log(f"wrote {out} in {time.monotonic() - t0:.0f} s")
        return 0
    if results_file.exists():
        cfg.results = json.loads(results_file.read_text())
    cfg.results.setdefault("config", {"fast_double_tokens": cfg.fd_tokens})
    phase_logprobs(pa, cfg, prompts, str(art.tokenizer_dir))
    cfg.results[phase]["measured_alone"] = machine_facts(pa)  # not in the full run's session
    results_file.write_text(json.dumps(cfg.results, indent=1))
    if "fast_double_paced" in cfg.results:
        render_report(results_file, cfg.out_md)
        log(f"wrote {cfg.out_md} in {time.monotonic() - t0:.0f} s")
    else:
        log(f"wrote {results_file}; no full run to render docs from (run `make bench`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
