"""docker-compose.yml validates (for every profile) and has the shape docs/gpu.md promises.

Needs a compose binary, no Docker engine: Debian's `docker-compose` (apt-get install -y docker-compose) or
the `docker compose` plugin. Skipped with the install line when neither is present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from build_engine.gpu.kv_capacity import ENV_VAR as SHARES_VAR
from build_engine.gpu.kv_capacity import default_shares_env
from build_engine.gpu.settings import ENV_DEFAULTS, SDK_IMAGE, TRITON_IMAGE_TAG, BuildSettings
from gateway.settings import GatewaySettings

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
    assert s["bench"]["image"] == SDK_IMAGE


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


def test_up_works_without_a_dotenv(tmp_path: Path) -> None:
    """No .env at all: the pinned tag and every builder default come from compose itself."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    s = config(env_file=empty)["services"]
    assert s["builder"]["image"] == f"nvcr.io/nvidia/tritonserver:{TRITON_IMAGE_TAG}-trtllm-python-py3"
    env = s["builder"]["environment"]
    for key, value in ENV_DEFAULTS.items():
        if key != "TRITON_IMAGE_TAG":
            assert str(env[key]) == value, key
    assert s["builder"]["command"] == ["python", "-m", "build_engine", "all"]  # installs nothing


def _env_example() -> dict[str, str]:
    lines = [ln for ln in ENV_EXAMPLE.read_text().splitlines() if ln and not ln.startswith("#")]
    return dict(ln.split("=", 1) for ln in lines)


def test_env_example_equals_the_settings_defaults() -> None:
    example = _env_example()
    for key, value in ENV_DEFAULTS.items():
        assert example.get(key) == value, f".env.example {key}={example.get(key)!r}, settings say {value!r}"
    assert example[SHARES_VAR] == default_shares_env("latency")
    assert f"throughput profile: {default_shares_env('throughput')}" in ENV_EXAMPLE.read_text()
    compose = COMPOSE.read_text()
    unknown = [k for k in example if "${" + k not in compose]
    assert not unknown, f".env.example sets variables compose never reads: {unknown}"


def test_window_size_shares_reach_triton_and_verify() -> None:
    s = config()["services"]
    want = default_shares_env("latency")
    assert s["triton"]["environment"][SHARES_VAR] == want
    assert s["builder"]["environment"][SHARES_VAR] == want  # verify runs in the builder container


def _gateway_reads(environment: dict, monkeypatch: pytest.MonkeyPatch) -> GatewaySettings:
    """The settings the gateway builds from the service's environment (and nothing from this process's)."""
    for name in os.environ:
        if name.startswith(("GATEWAY_", "TRITON_")):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    return GatewaySettings()


def test_gateway_workers_default_to_the_settings_and_follow_the_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = GatewaySettings.model_fields["workers"].default
    empty = tmp_path / "empty.env"
    empty.write_text("")
    chosen = tmp_path / ".env"
    chosen.write_text(f"GATEWAY_WORKERS={default + 2}\n")
    # Both renders first: compose substitutes this process's variables, which _gateway_reads sets.
    unset = config(env_file=empty)["services"]["gateway"]["environment"]
    given = config(env_file=chosen)["services"]["gateway"]["environment"]
    assert str(unset["GATEWAY_WORKERS"]) == str(default), "compose's default differs from gateway/settings.py"
    assert _env_example()["GATEWAY_WORKERS"] == str(default)
    assert _gateway_reads(unset, monkeypatch).workers == default
    assert _gateway_reads(given, monkeypatch).workers == default + 2


def test_python_backend_shm_fits_image_tensors() -> None:
    cmd = config()["services"]["triton"]["command"]
    sizes = {
        c.split("=")[1].split(",")[1]: int(c.rsplit("=", 1)[1])
        for c in cmd
        if c.startswith("--backend-config=python,shm-") and "byte-size" in c
    }
    eight_images = 8 * 3 * 896 * 896 * 4
    assert sizes["shm-default-byte-size"] >= eight_images and sizes["shm-growth-byte-size"] >= 2**24


@pytest.mark.parametrize("model_id", ["ISTA-DASLab/gemma-3-27b-it-GPTQ-4b-128g", "acme/other-model"])
def test_gateway_tokenizer_follows_model_id(tmp_path: Path, model_id: str) -> None:
    env = tmp_path / ".env"
    env.write_text(f"MODEL_ID={model_id}\n")
    g = config(env_file=env)["services"]["gateway"]
    assert g["environment"]["GATEWAY_MODEL_ID"] == model_id
    # Run the gateway's start command with a stand-in `python` that prints what the gateway would read.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\nprintf %s "$GATEWAY_TOKENIZER_DIR"\n')
    (fake / "python").chmod(0o755)
    argv = [c.replace("$$", "$") for c in g["command"]]
    run_env = {"PATH": f"{fake}:/usr/bin:/bin", "GATEWAY_MODEL_ID": model_id}
    out = subprocess.run(argv, env=run_env, capture_output=True, text=True, check=True).stdout
    assert out == str(BuildSettings(work_dir=Path("/engines"), model_id=model_id).checkpoint_dir)


def test_dockerfiles() -> None:
    gateway = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    cpu = (ROOT / "docker" / "cpu.Dockerfile").read_text()
    assert "FROM python:3.11-slim" in gateway
    assert 'CMD ["python", "-m", "gateway"]' in gateway
    # The CPU image runs the Triton Python stub, which only works with the OS's own Python 3.11.
    assert "FROM debian:bookworm-slim" in cpu and "libpython3.11" in cpu and "python3 -m venv" in cpu
    assert 'CMD ["python", "-m", "stack.serve"]' in cpu
