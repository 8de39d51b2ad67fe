"""Operator commands: backfill snapshots, backfill runs."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from orderflow.cli.support import (
    INTERRUPTED_EXIT,
    TIME_HELP,
    DatabaseUrl,
    DryRun,
    OutboundTopic,
    QuietLogLevel,
    command_group,
    fail,
    load_settings,
    note,
    open_database,
    parse_optional_time,
    positive_rate,
    run,
    stop_on_interrupt,
    when,
    wide_console,
)
from orderflow.runtime import logs

if TYPE_CHECKING:
    from consumer.snapshots import SnapshotBatch

backfill_app = command_group(
    "Backfills: write every matching order's current state to the outbox as a Snapshot "
    "update, for subscribers that need the whole state."
)


@backfill_app.command("snapshots")
def backfill_snapshots_command(
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            help="Only orders in this status (pending, paid, shipped, delivered, cancelled). "
            "Repeat for several.",
            show_default=False,
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help=f"Only orders updated at or after this time: {TIME_HELP}.",
            show_default=False,
        ),
    ] = None,
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            min=1,
            max=10000,
            help="Orders per transaction. Each batch locks only its own orders, briefly.",
        ),
    ] = 500,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            help="Write at most this many snapshots per second (the relay publishes them as "
            "they come; keep --batch near the rate for an even flow). Default: no limit.",
            show_default=False,
        ),
    ] = None,
    new: Annotated[
        bool,
        typer.Option(
            "--new",
            help="Start a fresh run even if a run with the same filters finished (or is "
            "unfinished: it is abandoned).",
        ),
    ] = False,
    dry_run: DryRun = False,
    database_url: DatabaseUrl = None,
    outbound_topic: OutboundTopic = None,
    log_level: QuietLogLevel = "WARNING",
) -> None:
    """Write a Snapshot of every matching order to the outbox, for the relay.

    Each snapshot is an OrderUpdated with change "Snapshot", causation_id
    null, the order's current state and order_version, and a fresh event_id,
    keyed by order id. It reaches the topic in order with the order's live
    updates: a batch locks its orders (FOR SHARE, which waits for and holds
    off the consumer's updates of just those orders) before writing their
    snapshots.

    Resumable: progress is recorded with each batch. After Ctrl-C or a kill,
    run the same command again: it continues after the last committed batch
    and emits no order twice. Once a run with these filters has finished,
    running it again needs --new.
    """
    logs.configure(log_level)
    from consumer.state_machine import OrderStatus

    statuses: set[OrderStatus] = set()
    for value in status or []:
        try:
            statuses.add(OrderStatus(value.strip().lower()))
        except ValueError:
            fail(
                f"--status: {value!r} is not an order status "
                f"({', '.join(s.value for s in OrderStatus)})"
            )
    since_at, since_given = parse_optional_time(since, "--since")
    settings = load_settings(database_url=database_url, outbound_topic=outbound_topic)

    async def main() -> None:
        from orderflow.runtime.wiring import session_factory
        from orderflow.tools.backfill import (
            AlreadyFinished,
            SnapshotOutcome,
            SnapshotRequest,
            backfill_snapshots,
        )
        from orderflow.tools.progress import Summary, progress_bar

        request = SnapshotRequest(
            topic=settings.outbound_topic,
            statuses=frozenset(statuses),
            since=since_at,
            since_given=since_given,
            batch=batch,
            rate=positive_rate(rate),
            new=new,
            dry_run=dry_run,
        )
        summary = Summary("backfill snapshots", "queued", "skipped")
        stop = asyncio.Event()
        async with open_database(settings, pool_size=2) as engine:
            with progress_bar("snapshots", None) as progress, stop_on_interrupt(stop):

                def started(outcome: SnapshotOutcome) -> None:
                    progress.set_total(outcome.remaining_at_start)
                    run = outcome.run
                    if run is None:
                        note(f"dry run: {outcome.remaining_at_start} matching orders")
                    elif outcome.resumed:
                        note(
                            f"resuming backfill run {run.id} (started {when(run.started_at)}, "
                            f"{run.queued} snapshots queued so far): "
                            f"{outcome.remaining_at_start} orders to go"
                        )
                    else:
                        note(
                            f"backfill run {run.id} started: "
                            f"{outcome.remaining_at_start} matching orders"
                        )

                def advanced(result: SnapshotBatch) -> None:
                    summary.add("queued", result.queued)
                    summary.add("skipped", result.skipped)
                    progress.advance(result.scanned)

                try:
                    outcome = await backfill_snapshots(
                        session_factory(engine),
                        request,
                        stop=stop,
                        on_start=started,
                        on_batch=advanced,
                    )
                except AlreadyFinished as error:
                    fail(str(error))
        if dry_run:
            summary.add("queued", outcome.queued)
            summary.print(dry_run=True)
            if outcome.run is not None:
                note(f"(would resume backfill run {outcome.run.id})")
            return
        summary.print()
        run = outcome.run
        assert run is not None
        if outcome.finished:
            note(
                f"backfill run {run.id} finished: {run.queued} snapshots queued in all; "
                f"the relay publishes them to {settings.outbound_topic}"
            )
        elif outcome.taken_over:
            note(f"backfill run {run.id} was finished or replaced by another process")
        elif outcome.interrupted:
            note(
                f"interrupted: backfill run {run.id} stopped after {run.queued} snapshots; "
                "run the same command again to continue"
            )
            raise typer.Exit(INTERRUPTED_EXIT)

    run(main())


@backfill_app.command("runs")
def backfill_runs_command(
    limit: Annotated[int, typer.Option("--limit", min=1, help="Newest runs to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per run.")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """List backfill runs, newest first: filters, status, progress and counts."""
    settings = load_settings(database_url=database_url)

    async def main() -> None:
        import orjson

        from consumer.snapshots import list_runs
        from orderflow.runtime.wiring import session_factory

        async with (
            open_database(settings, pool_size=1) as engine,
            session_factory(engine)() as session,
        ):
            runs = await list_runs(session, limit=limit)
        if as_json:
            for item in runs:
                print(
                    orjson.dumps(
                        {
                            "id": item.id,
                            "kind": item.kind,
                            "filters": item.filters,
                            "status": item.status.value,
                            "cursor": item.cursor,
                            "queued": item.queued,
                            "skipped": item.skipped,
                            "batches": item.batches,
                            "started_at": item.started_at,
                            "updated_at": item.updated_at,
                            "finished_at": item.finished_at,
                        }
                    ).decode()
                )
            return
        from rich.table import Table

        table = Table("run", "kind", "filters", "topic", "status", "queued", "started", "finished")
        for item in runs:
            filters = []
            if item.filters.get("status"):
                filters.append("status=" + ",".join(item.filters["status"]))
            if item.filters.get("since_given"):
                filters.append(f"since={item.filters['since_given']}")
            table.add_row(
                str(item.id),
                item.kind,
                " ".join(filters) or "(all orders)",
                str(item.filters.get("topic", "-")),
                item.status.value,
                f"{item.queued:,}",
                when(item.started_at),
                when(item.finished_at),
            )
        if not runs:
            table.add_row("(no backfill runs yet)", "", "", "", "", "", "", "")
        wide_console().print(table)

    run(main())
