"""`python -m gateway`: serve the gateway with uvicorn (settings from the environment: docs/gateway.md)."""

from __future__ import annotations

from gateway import grpc_env


def main() -> None:
    grpc_env.apply()  # before anything imports grpc
    import uvicorn

    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.settings import GatewaySettings

    settings = GatewaySettings()
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
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


if __name__ == "__main__":
    main()
