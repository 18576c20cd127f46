"""`eas serve`: run the HTTP service under uvicorn with graceful draining.

Configuration problems found before the server starts are one `error:` line with exit code 2: an `EAS_*`
variable the settings refuse, an `EAS_MODEL_PATH` / `EAS_BASELINE_PATH` that is not a directory or that
cannot be labelled (service/runner/resolve.py). The store (`EAS_MODEL_STORE`, default var/store) is
created and seeded with the embedded model on first use, as always: a server is told to create it.
"""

from __future__ import annotations

import logging

import typer

from eas_tools.common import fail

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 for all; mind EAS_API_TOKEN)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    log_level: str = typer.Option("info", help=f"uvicorn log level: {', '.join(LOG_LEVELS)}."),
) -> None:
    """Serve the configured model (EAS_* environment variables) over HTTP until SIGTERM/SIGINT."""
    if log_level.lower() not in LOG_LEVELS:
        fail(f"unknown --log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    log_level = log_level.lower()
    # Imported here so that `eas --help` and other subcommands do not pay for the server stack.
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        variable = "EAS_" + "_".join(str(p) for p in first["loc"]).upper() if first["loc"] else "EAS_* settings"
        fail(f"{variable}: {first['msg']}")
    from service.cpu import prepare_process

    prepare_process(settings.inference_threads)  # before torch loads: OpenMP reads its environment once
    if settings.model_path is not None or settings.baseline_path is not None:
        from service.runner.resolve import resolve_variants

        try:
            resolve_variants(settings)  # paths only: no store I/O, reads the directories' configs
        except (OSError, ValueError) as exc:
            fail(str(exc))

    from service.app import create_app
    from service.server import DrainingServer, uvicorn_config

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn_config(  # the connection limits of Settings (docs/hardening.md)
        app,
        settings,
        host=host,
        port=port,
        log_level=log_level,
        # After our own drain (DrainingServer) connections only need to flush their responses; this
        # bounds uvicorn's wait if a client is slow to read.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)),
        lifespan="on",
    )
    DrainingServer(config, app.state.service).run()
