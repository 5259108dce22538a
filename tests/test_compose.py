"""docker-compose.yml validates (for every profile) and has the shape docs/gpu.md promises.

Needs a compose binary, no Docker engine: Debian's `docker-compose` (apt-get install -y docker-compose) or
the `docker compose` plugin. Skipped with the install line when neither is present.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from build_engine.gpu.settings import TRITON_IMAGE_TAG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


COMPOSE_CMD = _compose_cmd()
pytestmark = pytest.mark.skipif(
    COMPOSE_CMD is None,
    reason="no compose binary: `apt-get install -y docker-compose` (no Docker engine needed)",
)


def config(*profiles: str, env_file: Path = ENV_EXAMPLE) -> dict:
    args = [*COMPOSE_CMD, "--env-file", str(env_file), "-f", str(COMPOSE)]
    for p in profiles:
        args += ["--profile", p]
    res = subprocess.run([*args, "config"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


@pytest.mark.parametrize("profiles", [(), ("cpu",), ("bench",), ("cpu", "bench")])
def test_validates_for_every_profile(profiles: tuple[str, ...]) -> None:
    services = config(*profiles)["services"]
    assert {"builder", "triton", "gateway", "cpu", "bench"} <= set(services)


def _gpu_reserved(svc: dict) -> bool:
    devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_gpu_services() -> None:
    s = config()["services"]
    image = f"nvcr.io/nvidia/tritonserver:{TRITON_IMAGE_TAG}-trtllm-python-py3"
    for name in ("builder", "triton"):
        assert s[name]["image"] == image, name
        assert _gpu_reserved(s[name]), name
        assert "profiles" not in s[name], f"{name} must run by default"
        assert s[name]["ulimits"]["memlock"] == -1
    t = s["triton"]
    assert t["command"][0] == "tritonserver" and "launch_triton_server" not in " ".join(t["command"])
    assert any(c.startswith("--model-repository=/engines/model_repository/latency-tp1") for c in t["command"])
    assert "/v2/health/ready" in " ".join(t["healthcheck"]["test"])
    assert t["shm_size"]
    assert t["depends_on"]["builder"]["condition"] == "service_completed_successfully"
    b = s["builder"]
    assert "python -m build_engine all" in " ".join(b["command"])
    assert b["restart"] == "no"
    assert any(v.startswith("engines:/engines") for v in b["volumes"])
    g = s["gateway"]
    assert g["depends_on"]["triton"]["condition"] == "service_healthy"
    assert (ROOT / g["build"]["dockerfile"]).exists()
    assert g["environment"]["TRITON_GRPC_URL"] == "triton:8001"
    assert "gemma-3-27b-it" in g["environment"]["GATEWAY_MODEL_ALIASES"]
    assert not _gpu_reserved(g)


def test_cpu_and_bench_profiles() -> None:
    s = config("cpu", "bench")["services"]
    assert s["cpu"]["profiles"] == ["cpu"] and not _gpu_reserved(s["cpu"])
    assert (ROOT / s["cpu"]["build"]["dockerfile"]).exists()
    assert s["bench"]["profiles"] == ["bench"]
    assert s["bench"]["image"] == f"nvcr.io/nvidia/tritonserver:{TRITON_IMAGE_TAG}-py3-sdk"


def test_env_file_drives_token_gpus_ports_and_profile(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        ENV_EXAMPLE.read_text()
        + "\nHF_TOKEN=hf_secret\nGPU_DEVICE_IDS=2,3\nGATEWAY_PORT=9090\n"
        + "ENGINE_PROFILE=throughput\nTP_SIZE=2\n"
    )
    s = config(env_file=env)["services"]
    assert s["builder"]["environment"]["HF_TOKEN"] == "hf_secret"
    assert s["builder"]["environment"]["ENGINE_PROFILE"] == "throughput"
    devices = s["triton"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["device_ids"] == ["2,3"]
    assert any("throughput-tp2" in c for c in s["triton"]["command"])
    ports = s["gateway"]["ports"]
    assert any(str(p.get("published", p) if isinstance(p, dict) else p).startswith("9090") for p in ports)


def test_dockerfiles() -> None:
    gateway = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    cpu = (ROOT / "docker" / "cpu.Dockerfile").read_text()
    assert "FROM python:3.11-slim" in gateway
    assert 'CMD ["python", "-m", "gateway"]' in gateway
    # The CPU image runs the Triton Python stub, which only works with the OS's own Python 3.11.
    assert "FROM debian:bookworm-slim" in cpu and "libpython3.11" in cpu and "python3 -m venv" in cpu
    assert 'CMD ["python", "-m", "stack.serve"]' in cpu
