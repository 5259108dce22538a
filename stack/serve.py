"""`make serve`: the CPU embedded default — prepare Gemma 3 270M, start Triton, then the gateway.

Prints the URL when both are ready; Ctrl-C (or SIGTERM) stops the gateway first, then Triton.
The gateway's address and names come from its settings (GATEWAY_PORT, GATEWAY_HOST, GATEWAY_MODEL_ID, ...);
Triton's ports from TRITON_GRPC_PORT (8001), TRITON_HTTP_PORT (8000), TRITON_METRICS_PORT (8002).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from build_engine.cpu import DEFAULT_MAX_SEQ_LEN, cache_root, prepare, repository_values
from build_engine.render import render
from gateway.settings import GatewaySettings
from gemma3_core import constants as C
from stack import gateway_process
from stack.gateway_process import GatewayStartError, gateway_env
from stack.triton_launcher import LauncherError, TritonPorts, start

REPO = Path(os.environ.get("MODEL_REPOSITORY", "build/model_repository/cpu"))
MAX_SEQ_LEN = int(os.environ.get("CPU_MAX_SEQ_LEN", str(DEFAULT_MAX_SEQ_LEN)))


def say(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    art = prepare(cache_root())
    render("cpu", REPO, repository_values(art, max_seq_len=MAX_SEQ_LEN))
    say(f"model repository rendered at {REPO.resolve()}")
    ports = TritonPorts.from_env()
    verbose = os.environ.get("TRITON_LOG", "") == "1"
    triton = start(
        REPO.resolve(),
        ports=ports,
        log_sink=(lambda line: print(f"[triton] {line}", file=sys.stderr)) if verbose else None,
    )
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        say(
            f"starting tritonserver (gRPC {ports.grpc}, HTTP {ports.http}, metrics {ports.metrics}); "
            "TRITON_LOG=1 shows its log"
        )
        triton.wait_ready(timeout=600)
        settings = GatewaySettings()
        # The CPU default serves its own model id and no aliases unless GATEWAY_MODEL_ID /
        # GATEWAY_MODEL_ALIASES say otherwise (the settings' defaults name the 27B deployment).
        chosen = settings.model_fields_set
        env = gateway_env(
            grpc_url=triton.grpc_url,
            port=settings.port,
            tokenizer_dir=art.tokenizer_dir,
            model_id=settings.model_id if "model_id" in chosen else C.CPU_MODEL_ID,
            model_aliases=settings.model_aliases if "model_aliases" in chosen else [],
            max_model_len=MAX_SEQ_LEN,
            host=settings.host,
        )
        gateway = gateway_process.start(env)
        url = gateway_process.base_url(env)
        gateway_process.wait_ready(url, gateway)
        say(f"ready: OpenAI API at {url}/v1  (model {env['GATEWAY_MODEL_ID']}; docs at /docs). Ctrl-C stops.")
        while not stopping.is_set():
            if triton.proc.poll() is not None:
                say(f"tritonserver exited ({triton.proc.returncode}); stopping")
                return 1
            if gateway.poll() is not None:
                say(f"gateway exited ({gateway.returncode}); stopping")
                return 1
            stopping.wait(0.5)
        say("stopping ...")
        return 0
    except (LauncherError, GatewayStartError) as exc:
        say(f"error: {exc}")
        return 1
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.send_signal(signal.SIGINT)
            try:
                gateway.wait(15)
            except subprocess.TimeoutExpired:
                gateway.kill()
        triton.stop()
        say("stopped")


if __name__ == "__main__":
    sys.exit(main())
