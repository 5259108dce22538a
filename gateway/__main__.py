"""`python -m gateway`: serve the gateway with uvicorn (settings from the environment: docs/gateway.md).

With `GATEWAY_WORKERS` > 1 uvicorn runs that many worker processes on one socket. prometheus_client's
multiprocess mode needs its directory before any worker imports it: this process creates it (or empties the
one `PROMETHEUS_MULTIPROC_DIR` names, since stale files from an earlier run would be summed in) and removes
a directory it created when it exits.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from gateway import grpc_env


def _multiprocess_dir() -> tuple[Path, bool]:
    """(directory, created here) for prometheus_client's multiprocess files, emptied."""
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if named:
        path = Path(named)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path, True


def main() -> None:
    grpc_env.apply()  # before anything imports grpc
    from gateway.settings import GatewaySettings

    settings = GatewaySettings()
    multiprocess = settings.workers > 1 or bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    metrics_dir, created = _multiprocess_dir() if multiprocess else (None, False)
    import uvicorn

    from gateway.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    common = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # Our JSON logging instead of uvicorn's; AccessLogMiddleware writes the access log (with request ids).
        log_config=None,
        access_log=False,
        # Streams can idle for a long time during a long prefill; only idle keep-alive sockets are closed.
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
    )
    try:
        if settings.workers > 1:
            # Workers are spawned processes: each builds its app from the same environment.
            uvicorn.run(
                "gateway.app:create_worker_app",
                factory=True,
                workers=settings.workers,
                timeout_worker_healthcheck=settings.worker_healthcheck_timeout_s,
                **common,  # type: ignore[arg-type]
            )
        else:
            from gateway.app import create_app

            uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
    finally:
        if created and metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
