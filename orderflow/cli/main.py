"""The ``orderflow`` command line: the app, and the commands that run or prepare the processes.

``consume``, ``relay`` and ``api`` are the production processes; ``migrate`` and ``topics
create`` prepare what they need, and ``check`` (:mod:`orderflow.cli.check`) tells whether
a deployment is ready for them; ``dev`` runs them all on one machine. The other command
families (:mod:`orderflow.cli.backfill`, :mod:`orderflow.cli.dlq`, ...) are added to
:data:`app` at the end of this module, in the order ``orderflow --help`` lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Annotated

import typer

from orderflow.cli import backfill, check, dlq, observe, parked, replay, schemas, teams
from orderflow.cli.support import (
    BootstrapServers,
    DatabaseUrl,
    DlqTopic,
    Group,
    InboundTopic,
    LogLevel,
    OutboundTopic,
    command_group,
    load_settings,
    run,
)
from orderflow.runtime import logs
from orderflow.runtime.settings import redacted

MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=1,
        max=65535,
        help=(
            "Serve /metrics (Prometheus), /healthz and /readyz on this port, on every "
            "interface. Env: ORDERFLOW_METRICS_PORT (default: not served)."
        ),
        show_default=False,
    ),
]

log = logging.getLogger("orderflow")

#: After SIGTERM, how long the read API's requests in flight may take to finish before they
#: are cut.
API_SHUTDOWN_TIMEOUT_SECONDS = 30.0

app = typer.Typer(
    name="orderflow",
    help=(
        "Kafka order events -> PostgreSQL (one transaction with an outbox) -> Kafka.\n\n"
        "Configuration comes from environment variables (DATABASE_URL, "
        "KAFKA_BOOTSTRAP_SERVERS, ORDERFLOW_*); the flags below override them."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
topics_app = command_group("Manage the inbound, outbound and dead-letter topics.")


@app.command()
def migrate(database_url: DatabaseUrl = None, log_level: LogLevel = "INFO") -> None:
    """Bring the database schema to the newest revision (safe to run again)."""
    logs.configure(log_level)
    settings = load_settings(database_url=database_url)

    async def main() -> None:
        from orderflow.runtime.migrate import head_revision, upgrade_async
        from orderflow.runtime.wiring import check_database, create_engine

        engine = create_engine(settings, pool_size=1)
        try:
            await check_database(engine, require_schema=False)
            await upgrade_async(engine)
        finally:
            await engine.dispose()
        print(f"database {redacted(settings.require_database())} is at revision {head_revision()}")

    run(main())


# Listed right after migrate: the order of a first deploy (migrate, check, then the processes).
app.command("check")(check.check)


@app.command()
def consume(
    database_url: DatabaseUrl = None,
    bootstrap_servers: BootstrapServers = None,
    group: Group = None,
    inbound_topic: InboundTopic = None,
    outbound_topic: OutboundTopic = None,
    dlq_topic: DlqTopic = None,
    pool_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=(
                "Database connections, and so partitions applied at once. "
                "Env: ORDERFLOW_DB_POOL_SIZE (default: 8)."
            ),
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Most records per poll. Env: ORDERFLOW_CONSUMER_BATCH_SIZE (default: 500).",
            show_default=False,
        ),
    ] = None,
    park_timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            help=(
                "Seconds an event that cannot apply yet waits for the events of its order "
                "it needs before it is dead-lettered; 0: no waiting. "
                "Env: ORDERFLOW_PARK_TIMEOUT_S (default: 300)."
            ),
            show_default=False,
        ),
    ] = None,
    metrics_port: MetricsPort = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run one consumer-group member: inbound events -> orders + outbox, one transaction per batch.

    Run as many as you like (up to one per partition does work). An event that arrives
    before one it needs (an OrderPaid before its OrderPlaced) waits, and is applied right
    after it. SIGTERM or Ctrl-C finishes the batch in flight and exits 0; a second signal
    exits at once.
    """
    logs.configure(log_level)
    settings = load_settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap_servers,
        consumer_group=group,
        inbound_topic=inbound_topic,
        outbound_topic=outbound_topic,
        dlq_topic=dlq_topic,
        db_pool_size=pool_size,
        consumer_batch_size=batch_size,
        park_timeout_s=park_timeout,
        metrics_port=metrics_port,
    )

    async def main() -> None:
        from orderflow.runtime.services import run_consumer
        from orderflow.runtime.signals import stop_on_signals

        stop = asyncio.Event()
        with stop_on_signals(stop):
            await run_consumer(settings, stop)

    run(main())


@app.command()
def relay(
    database_url: DatabaseUrl = None,
    bootstrap_servers: BootstrapServers = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Messages per publish batch. Env: ORDERFLOW_RELAY_BATCH_SIZE (default: 500).",
            show_default=False,
        ),
    ] = None,
    metrics_port: MetricsPort = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run one relay: publish unpublished outbox rows in order, then mark them published.

    Several relays may run: each key's messages stay in order (shards owned through
    PostgreSQL advisory locks). A crashed relay's shards move to the others within about
    2 s, a vanished host's within about 8 s. SIGTERM or Ctrl-C stops after the batch in
    flight. Exits 1 if the broker refuses the relay's messages (authorization).
    """
    logs.configure(log_level)
    settings = load_settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap_servers,
        relay_batch_size=batch_size,
        metrics_port=metrics_port,
    )

    async def main() -> None:
        from orderflow.runtime.services import run_relay
        from orderflow.runtime.signals import stop_on_signals

        stop = asyncio.Event()
        with stop_on_signals(stop):
            await run_relay(settings, stop)

    run(main())


@app.command()
def dev(
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of each topic.")] = 3,
    rate: Annotated[float, typer.Option(min=0.1, help="Sample events per second.")] = 20.0,
    duration: Annotated[
        float | None,
        typer.Option(
            min=1,
            help="Stop after this many seconds (default: run until Ctrl-C).",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Run the whole system on this machine with nothing to install or configure.

    Starts an embedded PostgreSQL and an embedded Kafka-protocol broker (Tansu), migrates,
    runs consume and relay, feeds a stream of sample orders (with duplicates and poison
    messages) and shows what flows. Ctrl-C stops everything and leaves no process behind.
    """
    logs.configure(log_level)
    from orderflow.devstand.dev import run_dev

    run(run_dev(partitions=partitions, rate=rate, duration=duration))


@topics_app.command("create")
def topics_create(
    bootstrap_servers: BootstrapServers = None,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of each new topic.")] = 6,
    replication_factor: Annotated[int, typer.Option(min=1, help="Replicas of each new topic.")] = 1,
    inbound_topic: InboundTopic = None,
    outbound_topic: OutboundTopic = None,
    dlq_topic: DlqTopic = None,
) -> None:
    """Create the inbound, outbound and dead-letter topics where they don't exist."""
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap_servers,
        inbound_topic=inbound_topic,
        outbound_topic=outbound_topic,
        dlq_topic=dlq_topic,
    )

    async def main() -> None:
        from orderflow.runtime.topics import ensure_topics

        created = await ensure_topics(
            settings, partitions=partitions, replication_factor=replication_factor
        )
        print("created: " + (", ".join(created) if created else "nothing (all exist)"))

    run(main())


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
            timeout_graceful_shutdown=int(API_SHUTDOWN_TIMEOUT_SECONDS),
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


# `orderflow --help` lists the commands in the order they are added (migrate, check, consume,
# relay and dev above, then import, publish, loadgen and tail, then api), then the groups in theirs.
teams.register(app)
app.command()(api)
for _name, _group in (
    ("topics", topics_app),
    ("outbox", observe.outbox_app),
    ("backfill", backfill.backfill_app),
    ("replay", replay.replay_app),
    ("dlq", dlq.dlq_app),
    ("parked", parked.parked_app),
    ("schemas", schemas.schemas_app),
):
    app.add_typer(_group, name=_name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
