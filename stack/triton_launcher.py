"""Start the real `tritonserver` shipped in the `nvidia-pytriton` wheel on a CPU machine.

The wheel carries Triton 2.51 (`pytriton/tritonserver/bin/tritonserver`), the Python backend and one
backend stub per Python version. The stub is a separate process that *embeds* the system libpython
(`libpython3.X.so.1.0` from the OS), so two things must be made explicit:

1. the interpreter running this launcher must be the one whose libpython the stub links (on Debian 12:
   `/usr/bin/python3.11` and virtualenvs made from it). With another build of the same version (pyenv,
   conda) the stub starts, imports fine, and then silently drops every output tensor — so we refuse it;
2. the stub does not read `PYTHONPATH`; it finds its `sys.prefix` by looking up `python3` on `PATH`. Putting
   this virtualenv's `bin/` first on `PATH` makes the stub see the venv's site-packages (numpy, torch,
   tokenizers and this project, installed editable).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class LauncherError(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonDist:
    """Where the pieces of the pytriton-shipped Triton live."""

    server: Path
    backends: Path
    stub: Path
    libs: Path
    caches: Path


def find_dist() -> TritonDist:
    try:
        import pytriton
    except ImportError as exc:
        raise LauncherError(
            "nvidia-pytriton is not installed in this environment; run `make serve` (or "
            "`pip install -e .[cpu]`) to get the tritonserver binary"
        ) from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDist(
        server=root / "bin" / "tritonserver",
        backends=root / "backends",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        libs=libs,
        caches=root / "caches",
    )
    for what, path in (
        ("tritonserver binary", dist.server),
        ("python backend", dist.backends / "python"),
        (f"backend stub for Python {version}", dist.stub),
        ("bundled libraries", dist.libs),
    ):
        if not path.exists():
            raise LauncherError(f"{what} not found at {path} (nvidia-pytriton 0.7.0 is expected)")
    return dist


def _stub_libpython(dist: TritonDist) -> Path | None:
    env = {**os.environ, "LD_LIBRARY_PATH": str(dist.libs)}
    out = subprocess.run(["ldd", str(dist.stub)], capture_output=True, text=True, env=env, check=False).stdout
    m = re.search(r"libpython\S+\s+=>\s+(\S+)", out)
    return Path(m.group(1)).resolve() if m and m.group(1) != "not" else None


def _interpreter_libpython() -> Path | None:
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname:
        return None
    path = Path(libdir) / soname
    return path.resolve() if path.exists() else None


def check_interpreter(dist: TritonDist) -> None:
    """Refuse an interpreter whose libpython differs from the one the stub embeds (see module doc)."""
    stub_lib = _stub_libpython(dist)
    if stub_lib is None:
        raise LauncherError(
            f"the Python backend stub {dist.stub} needs libpython{sys.version_info.major}."
            f"{sys.version_info.minor}.so.1.0 from the OS; install it (Debian: "
            f"apt-get install libpython{sys.version_info.major}.{sys.version_info.minor})"
        )
    mine = _interpreter_libpython()
    if mine != stub_lib:
        raise LauncherError(
            f"the Triton Python backend stub embeds {stub_lib}, but this interpreter ({sys.executable}, "
            f"libpython {mine or 'static/none'}) is another Python build. Create the virtualenv with the "
            f"system interpreter that owns {stub_lib} (e.g. `/usr/bin/python3.11 -m venv .venv`), "
            "as `make` does."
        )


def stub_environment(dist: TritonDist) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(dist.libs), env.get("LD_LIBRARY_PATH")) if p)
    # One torch thread pool per process is enough on small machines; the engine sets its own count.
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    env.pop("PYTHONHOME", None)
    return env


def prepare_backends(dist: TritonDist, workdir: Path) -> Path:
    """A backend directory with the stub for this Python next to libtriton_python.so (copied, not moved)."""
    backends = workdir / "backends"
    if backends.exists():
        shutil.rmtree(backends)
    shutil.copytree(dist.backends, backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(dist.stub, backends / "python" / "triton_python_backend_stub")
    return backends


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TritonPorts:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"

    @classmethod
    def free(cls) -> TritonPorts:
        """Three ports nobody listens on now (tests and benchmarks run servers side by side)."""
        return cls(grpc=free_port(), http=free_port(), metrics=free_port())

    @classmethod
    def from_env(cls) -> TritonPorts:
        return cls(
            grpc=int(os.environ.get("TRITON_GRPC_PORT", 8001)),
            http=int(os.environ.get("TRITON_HTTP_PORT", 8000)),
            metrics=int(os.environ.get("TRITON_METRICS_PORT", 8002)),
        )


@dataclass
class TritonProcess:
    proc: subprocess.Popen[str]
    ports: TritonPorts
    log_lines: list[str] = field(default_factory=list)

    @property
    def grpc_url(self) -> str:
        return self.ports.grpc_url

    @property
    def http_url(self) -> str:
        return self.ports.http_url

    @property
    def metrics_url(self) -> str:
        return self.ports.metrics_url

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = "\n".join(self.log_lines[-40:])
                raise LauncherError(f"tritonserver exited with code {self.proc.returncode}:\n{tail}")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise LauncherError(
            f"tritonserver not ready after {timeout:.0f}s:\n" + "\n".join(self.log_lines[-40:])
        )

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # Triton unloads models and exits on SIGINT/SIGTERM
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _die_with_parent() -> None:
    # Triton runs in its own session (a terminal's Ctrl-C goes to us, and we stop it cleanly); if we are
    # killed outright, the kernel sends it SIGTERM (PR_SET_PDEATHSIG) so no orphan holds the ports.
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def start(
    model_repository: Path,
    *,
    ports: TritonPorts | None = None,
    workdir: Path | None = None,
    log_sink: Callable[[str], None] | None = None,
    extra_args: list[str] | None = None,
) -> TritonProcess:
    """Start tritonserver (not waiting for readiness); its log goes to `log_sink` line by line."""
    dist = find_dist()
    check_interpreter(dist)
    ports = ports or TritonPorts.from_env()
    workdir = workdir or model_repository.parent / ".triton"
    workdir.mkdir(parents=True, exist_ok=True)
    backends = prepare_backends(dist, workdir)
    cmd = [
        str(dist.server),
        f"--model-repository={model_repository}",
        f"--backend-directory={backends}",
        f"--cache-directory={dist.caches}",
        f"--grpc-port={ports.grpc}",
        f"--http-port={ports.http}",
        f"--metrics-port={ports.metrics}",
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        "--exit-on-error=true",
        "--allow-gpu-metrics=false",
        "--allow-cpu-metrics=true",
        # A unique shm prefix lets several servers (tests, a dev stack) share one machine.
        f"--backend-config=python,shm-region-prefix-name=gemma3tr{os.getpid()}x{ports.grpc}_",
        "--backend-config=python,shm-default-byte-size=16777216",
        "--backend-config=python,shm-growth-byte-size=16777216",
        *(extra_args or []),
    ]
    proc = subprocess.Popen(
        cmd,
        env=stub_environment(dist),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    handle = TritonProcess(proc, ports)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            handle.log_lines.append(line)
            if len(handle.log_lines) > 2000:
                del handle.log_lines[:1000]
            if log_sink:
                log_sink(line)

    threading.Thread(target=pump, name="tritonserver-log", daemon=True).start()
    return handle
