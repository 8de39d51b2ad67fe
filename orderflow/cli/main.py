"""The ``orderflow`` command line."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from orderflow.cli import backfill, observe, teams
from orderflow.cli.support import (
    BootstrapServers,
    DatabaseUrl,
    DlqTopic,
    Group,
    InboundTopic,
    LogLevel,
    OutboundTopic,
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
topics_app = typer.Typer(
    help="Manage the inbound, outbound and dead-letter topics.", no_args_is_help=True
)
app.add_typer(topics_app, name="topics")
outbox_app = typer.Typer(help="Inspect the transactional outbox.", no_args_is_help=True)
app.add_typer(outbox_app, name="outbox")


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
    metrics_port: MetricsPort = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run one consumer-group member: inbound events -> orders + outbox, one transaction per batch.

    Run as many as you like (up to one per partition does work). SIGTERM or Ctrl-C
    finishes the batch in flight and exits 0; a second signal exits at once.
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
    2 s, a vanished host's within about 12 s. SIGTERM or Ctrl-C stops after the batch in
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


@outbox_app.command("stats")
def outbox_stats_command(
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per topic.")] = False,
) -> None:
    """Per topic: unpublished backlog, age of the oldest unpublished message, and messages
    published in the last minute."""
    settings = load_settings(database_url=database_url)

    async def main() -> None:
        from orderflow.runtime.wiring import check_database, create_engine
        from outbox.stats import outbox_stats

        engine = create_engine(settings, pool_size=1)
        try:
            await check_database(engine)
            async with engine.connect() as connection:
                stats = await outbox_stats(connection)
        finally:
            await engine.dispose()
        if as_json:
            import orjson

            for line in stats:
                age = line.oldest_unpublished_age
                print(
                    orjson.dumps(
                        {
                            "topic": line.topic,
                            "backlog": line.backlog,
                            "oldest_unpublished_age_seconds": (
                                None if age is None else round(age.total_seconds(), 3)
                            ),
                            "published_last_minute": line.published_last_minute,
                        }
                    ).decode()
                )
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("topic", "backlog", "oldest unpublished", "published last minute")
        for line in stats:
            age = line.oldest_unpublished_age
            table.add_row(
                line.topic,
                str(line.backlog),
                "-" if age is None else f"{age.total_seconds():.1f} s",
                str(line.published_last_minute),
            )
        if not stats:
            table.add_row("(no messages waiting or published in the last minute)", "", "", "")
        Console().print(table)

    run(main())


for _module in (backfill, teams, observe):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
