"""`python -m gateway` as a child process next to a Triton server: one place for its environment and for
waiting until it is ready (`make serve`, the test fixtures and the benchmarks all start it this way)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parent.parent


class GatewayStartError(RuntimeError):
    pass


def gateway_env(
    *,
    grpc_url: str,
    port: int,
    tokenizer_dir: str | Path,
    model_id: str,
    max_model_len: int,
    host: str = "127.0.0.1",
    model_aliases: Sequence[str] = (),
    **extra: str,
) -> dict[str, str]:
    """The process environment plus the gateway settings for one Triton; `extra` adds/overrides settings.

    The names are `GatewaySettings`' (env prefix `GATEWAY_`); `base_url` reads back the address set here.
    """
    return {
        **os.environ,
        "TRITON_GRPC_URL": grpc_url,
        "GATEWAY_HOST": host,
        "GATEWAY_PORT": str(port),
        "GATEWAY_MODEL_ID": model_id,
        "GATEWAY_MODEL_ALIASES": json.dumps(list(model_aliases)),
        "GATEWAY_TOKENIZER_DIR": str(tokenizer_dir),
        "GATEWAY_MAX_MODEL_LEN": str(max_model_len),
        **extra,
    }


def base_url(env: dict[str, str]) -> str:
    host = env["GATEWAY_HOST"]
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{env['GATEWAY_PORT']}"


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return ""
    with contextlib.suppress(OSError):
        return "\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    *,
    timeout: float = 120.0,
    path: str = "/health/ready",
    log_path: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise GatewayStartError(f"gateway exited with code {proc.returncode}{_tail(log_path)}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + path, timeout=2) as response:
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise GatewayStartError(f"gateway not ready after {timeout:.0f}s ({url}{path}){_tail(log_path)}")
        time.sleep(0.25)


def start(env: dict[str, str], log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    out = log if log is not None else None
    return subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        cwd=REPO_ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if log is not None else None,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(
    env: dict[str, str], log_path: Path, *, timeout: float = 120.0, path: str = "/health/ready"
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start the gateway (output to `log_path`), wait until `path` answers 200, stop it on exit."""
    url = base_url(env)
    with log_path.open("wb") as log:
        proc = start(env, log)
    try:
        wait_ready(url, proc, timeout=timeout, path=path, log_path=log_path)
        yield url, proc
    finally:
        stop(proc)
