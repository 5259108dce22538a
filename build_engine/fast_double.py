"""The engine TEST DOUBLE's render values and its native build (render target `cpu-fast-double`).

Two implementations of one contract live in `model_repository/tensorrt_llm_fast_double`: `1/model.py`
(Python backend; the contract tests use it) and `native/fast_double.cc` (a C++ Triton backend; the
benchmarks use it, because TensorRT-LLM's backend is native too and a Python double adds a per-response IPC
hop to tritonserver's CPU that a real deployment does not pay). Both read the token cycle below from their
config, so it is written down once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from build_engine.render import TEMPLATES_DIR
from triton_io.contract import TOP_LOG_PROBS_K

# "Hello, world! café 日本語 naïve 🙂€ über— tokens\n" in Gemma 3 ids (same vocabulary for 270M and 27B):
# 464, 368, 410 are the byte-fallback pieces <0xE2><0x82><0xAC> of "€", so a character crosses responses.
TOKEN_CYCLE: tuple[int, ...] = (
    *(9259, 236764, 1902, 236888, 33443, 33375, 238582, 120362),
    *(57235, 464, 368, 410, 8046, 237028, 21739, 107),
)
TOKEN_CYCLE_TEXT = "Hello, world! café 日本語 naïve 🙂€ über— tokens\n"

NATIVE_SOURCE = TEMPLATES_DIR / "tensorrt_llm_fast_double" / "native" / "fast_double.cc"
NATIVE_BACKEND = "fastdouble"  # Triton loads libtriton_fastdouble.so for `backend: "fastdouble"`
IMPLEMENTATIONS = ("python", "native")


class NativeBuildError(RuntimeError):
    pass


def values(interval_us: int, first_token_delay_us: int = 0, implementation: str = "python") -> dict[str, str]:
    """The double's template values: pacing (0 = as fast as it can send), token cycle, implementation."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, not {implementation!r}")
    return {
        "fast_double_token_interval_us": str(interval_us),
        "fast_double_first_token_delay_us": str(first_token_delay_us),
        "fast_double_backend": "python" if implementation == "python" else NATIVE_BACKEND,
        "fast_double_token_cycle": ",".join(map(str, TOKEN_CYCLE)),
        "fast_double_top_log_probs_k": str(TOP_LOG_PROBS_K),
    }


def build_native(model_dir: Path) -> Path:
    """Compile the native double into a rendered `tensorrt_llm` model's version directory (Triton looks for
    `libtriton_<backend>.so` there before its global backends directory)."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise NativeBuildError("the native fast double needs a C++17 compiler: apt-get install g++")
    out = model_dir / "1" / f"libtriton_{NATIVE_BACKEND}.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    # The Triton symbols stay undefined: tritonserver, which loads the library, provides them.
    cmd = [
        cxx,
        "-std=c++17",
        "-O2",
        "-Wall",
        "-shared",
        "-fPIC",
        "-o",
        str(out),
        str(NATIVE_SOURCE),
        "-pthread",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NativeBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return out


def render_repository(
    out: Path,
    interval_us: int,
    *,
    max_batch_size: int,
    max_seq_len: int,
    implementation: str = "python",
    first_token_delay_us: int = 0,
) -> Path:
    """The CPU ensemble around the double, rendered at `out` (the CPU artifacts are prepared first; the
    native library is compiled into it when asked for)."""
    from build_engine.cpu import prepare, repository_values
    from build_engine.render import render, values_for

    rendered = {
        **repository_values(prepare(), max_batch_size=max_batch_size, max_seq_len=max_seq_len),
        **values(interval_us, first_token_delay_us, implementation),
    }
    render("cpu-fast-double", out, values_for("cpu-fast-double", rendered))
    if implementation == "native":
        build_native(out / "tensorrt_llm")
    return out
