"""Production commands: api (the read API)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Annotated

import typer

from orderflow.cli.support import DatabaseUrl, LogLevel, load_settings, run
from orderflow.runtime import logs
from orderflow.runtime.settings import redacted

log = logging.getLogger("orderflow")

#: After SIGTERM, how long requests in flight may take to finish before they are cut.
SHUTDOWN_TIMEOUT_SECONDS = 30.0


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command()(api)


def api(
    host: Annotated[
        str,
        typer.Option(
            envvar="ORDERFLOW_API_HOST",
            help="Address to listen on (0.0.0.0 or :: for every interface).",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(envvar="ORDERFLOW_API_PORT", min=1, max=65535, help="TCP port."),
    ] = 8000,
    database_url: DatabaseUrl = None,
    pool_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=(
                "Database connections, and so requests served at once. "
                "Env: ORDERFLOW_DB_POOL_SIZE (default: 8)."
            ),
            show_default=False,
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option(help="Log one line per request (uvicorn's access log).")
    ] = True,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve the read-only HTTP API: orders, outbox stats, health probes, metrics.

    GET /orders/{id} and GET /orders (filters, cursor pagination), GET /outbox/stats.

    GET /healthz (alive) and GET /readyz (database answers) for probes; GET /metrics for
    Prometheus.

    Interactive docs at /docs, the OpenAPI schema at /openapi.json.

    Needs a migrated database (checked at start).

    SIGTERM or Ctrl-C lets requests in flight finish, then exits 0.
    """
    logs.configure(log_level)
    settings = load_settings(database_url=database_url, db_pool_size=pool_size)

    async def main() -> None:
        import uvicorn

        from orderflow.api import create_app
        from orderflow.runtime.signals import stop_on_signals
        from orderflow.runtime.wiring import StartupError, check_database, create_engine

        engine = create_engine(settings, pool_size=1)
        try:
            await check_database(engine)
        finally:
            await engine.dispose()
        listener = _listen(host, port)
        where = _where(host, port)
        config = uvicorn.Config(
            create_app(settings),
            host=host,
            port=port,
            log_config=None,  # our logging (orderflow.runtime.logs) formats uvicorn's lines too
            access_log=access_log,
            server_header=False,
            timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT_SECONDS),
        )

        class Server(uvicorn.Server):
            """uvicorn's server with orderflow's signal handling instead of its own.

            uvicorn re-raises a SIGTERM after its graceful shutdown, so the process would
            end by the signal (exit code 143) instead of 0. Here the signal only sets
            ``stop`` (``stop_on_signals``), as in ``consume`` and ``relay``.
            """

            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        server = Server(config)
        stop = asyncio.Event()
        with stop_on_signals(stop), listener:

            async def exit_on_stop() -> None:
                await stop.wait()
                server.should_exit = True

            watcher = asyncio.create_task(exit_on_stop())
            log.info(
                "serving the read API on http://%s/ (docs at /docs)",
                where,
                extra={"database": redacted(settings.require_database())},
            )
            try:
                await server.serve(sockets=[listener])
            finally:
                watcher.cancel()
        if not server.started:
            raise StartupError("the read API did not start (see the log lines above)")

    run(main())


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket for ``host:port``, or a one-line start-up error naming them."""
    from orderflow.runtime.wiring import StartupError

    where = _where(host, port)
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise StartupError(f"cannot listen on {where}: unknown host ({error.strerror})") from None
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError as error:
        listener.close()
        raise StartupError(f"cannot listen on {where}: {error.strerror or error}") from None
    listener.setblocking(False)
    return listener


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
