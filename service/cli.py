"""`eas serve`: run the HTTP service under uvicorn with graceful draining."""

from __future__ import annotations

import logging

import typer


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 for all; mind EAS_API_TOKEN)."),
    port: int = typer.Option(8000, help="TCP port."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the configured model (EAS_* environment variables) over HTTP until SIGTERM/SIGINT."""
    # Imported here so that `eas --help` and other subcommands do not pay for the server stack.
    import uvicorn

    from service.app import create_app
    from service.server import DrainingServer
    from service.settings import Settings

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # After our own drain (DrainingServer) connections only need to flush their responses; this
        # bounds uvicorn's wait if a client is slow to read.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)),
        lifespan="on",
    )
    DrainingServer(config, app.state.service).run()
