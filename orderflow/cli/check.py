"""``orderflow check``: the preflight before a deployment (the checks are in
:mod:`orderflow.tools.check`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from orderflow.cli.support import (
    BootstrapServers,
    DatabaseUrl,
    DlqTopic,
    Group,
    InboundTopic,
    OutboundTopic,
    QuietLogLevel,
    load_settings,
    run,
)
from orderflow.runtime import logs

if TYPE_CHECKING:
    from orderflow.tools.check import Check

_STYLES = {"pass": "green", "warn": "yellow", "fail": "bold red", "unknown": "magenta"}


def check(
    consumers: Annotated[
        int,
        typer.Option(
            "--consumers",
            min=0,
            help="consume instances you plan to run (each holds its pool, +1 with --metrics).",
        ),
    ] = 1,
    relays: Annotated[
        int,
        typer.Option(
            "--relays", min=0, help="relay instances you plan to run (1 connection each)."
        ),
    ] = 1,
    apis: Annotated[
        int, typer.Option("--api", min=0, help="api instances you plan to run (their pool each).")
    ] = 0,
    pool_size: Annotated[
        int | None,
        typer.Option(
            "--pool-size",
            min=1,
            help="Each consume's pool. Env: ORDERFLOW_DB_POOL_SIZE (default: 8).",
            show_default=False,
        ),
    ] = None,
    api_pool_size: Annotated[
        int | None,
        typer.Option(
            "--api-pool-size",
            min=1,
            help="Each api's pool (its --pool-size). Default: the same as --pool-size.",
            show_default=False,
        ),
    ] = None,
    metrics: Annotated[
        bool | None,
        typer.Option(
            "--metrics/--no-metrics",
            help=(
                "consume and relay serve /metrics and /readyz (--metrics-port), whose database "
                "connection counts too. Default: when ORDERFLOW_METRICS_PORT is set."
            ),
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON document: a list of {name, status, detail, fix}."),
    ] = False,
    database_url: DatabaseUrl = None,
    bootstrap_servers: BootstrapServers = None,
    group: Group = None,
    inbound_topic: InboundTopic = None,
    outbound_topic: OutboundTopic = None,
    dlq_topic: DlqTopic = None,
    log_level: QuietLogLevel = "WARNING",
) -> None:
    """Check a deployment before it starts: database, schema, connections, topics, brokers.

    Configured like consume, relay and api (the same environment, TLS and SASL), it
    connects and reports each check as pass, warn, fail or unknown (the service did not
    answer), with the fix in one line: the database, its version and schema revision;
    max_connections against the planned instances (--consumers, --relays, --api); the
    brokers, the three topics, the dead-letter topic's max.message.bytes against
    ORDERFLOW_MAX_MESSAGE_BYTES, the outbound topic's retention against the outbox's
    (ORDERFLOW_OUTBOX_RETENTION_HOURS); the idempotent producer (when
    ORDERFLOW_KAFKA_IDEMPOTENCE is on); the consumer group and its lag; the TLS and SASL
    settings in use. No password is printed.

    It writes nothing (no topic, no offset, no row). Exit status 0 when nothing fails
    (warnings allowed), 1 when a check fails, 2 for a bad setting.
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
    )
    results: list[Check] = []

    async def main() -> None:
        from orderflow.tools.check import Plan, run_checks

        plan = Plan(
            consumers=consumers,
            relays=relays,
            apis=apis,
            consumer_pool=settings.db_pool_size,
            api_pool=api_pool_size or settings.db_pool_size,
            health=settings.metrics_port is not None if metrics is None else metrics,
        )
        results.extend(await run_checks(settings, plan))

    run(main())
    from orderflow.tools.check import failed

    if as_json:
        import orjson

        print(orjson.dumps([check.as_json() for check in results]).decode())
    else:
        _print(results)
    if failed(results):
        raise typer.Exit(1)


def _print(checks: Sequence[Check]) -> None:
    """A table on a terminal; plain lines otherwise (a log, a CI job), one per check and
    one per fix."""
    from rich.console import Console

    from orderflow.tools.check import summary

    console = Console()
    if console.is_terminal:
        from rich.table import Table
        from rich.text import Text

        table = Table("", "check", "detail and fix", show_lines=True)
        for check in checks:
            status = check.status.value
            cell = Text(check.detail, overflow="fold")
            if check.fix:
                cell.append(f"\nfix: {check.fix}", style="bold")
            table.add_row(Text(status, style=_STYLES[status]), check.name, cell)
        console.print(table)
        console.print(summary(checks))
        return
    width = max(len(check.name) for check in checks)
    for check in checks:
        print(f"{check.status.value:<8} {check.name:<{width}}  {check.detail}")
        if check.fix:
            print(f"{'':<8} {'':<{width}}  fix: {check.fix}")
    print(summary(checks))
