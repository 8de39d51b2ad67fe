"""Operator commands: backfill snapshots, replay outbox/topic, dlq list/redrive."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Final

import typer

from orderflow.cli.support import (
    BootstrapServers,
    DatabaseUrl,
    DlqTopic,
    InboundTopic,
    OutboundTopic,
    fail,
    load_settings,
    run,
)
from orderflow.runtime import logs

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy.ext.asyncio import AsyncEngine

    from consumer.snapshots import SnapshotBatch
    from orderflow.runtime.settings import Settings
    from orderflow.tools.dlq import DeadLetter, DeadLetterFilter

backfill_app = typer.Typer(
    help=(
        "Backfills: write every matching order's current state to the outbox as a Snapshot "
        "update, for subscribers that need the whole state."
    ),
    no_args_is_help=True,
)
replay_app = typer.Typer(
    help=(
        "Replays: publish retained outbox messages again (same event_ids), or run inbound "
        "events through the consumer again (the inbox skips what was applied)."
    ),
    no_args_is_help=True,
)
dlq_app = typer.Typer(
    help="Dead letters: inspect them, and send chosen ones back to the inbound topic.",
    no_args_is_help=True,
)

#: Exit code after Ctrl-C / SIGTERM stopped a command before it was done (128 + SIGINT).
INTERRUPTED_EXIT: Final = 130
_DURATION: Final = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d|w)$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_POSITION: Final = re.compile(r"^\s*(?P<partition>\d+)\s*:\s*(?P<offset>\d+)\s*$")
_TIME_HELP: Final = (
    "an ISO 8601 instant (2026-11-24T10:15:00Z; no zone means UTC), a date (2026-11-24, "
    "midnight UTC) or a duration ago (90s, 30m, 2h, 7d, 1w)"
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(backfill_app, name="backfill")
    app.add_typer(replay_app, name="replay")
    app.add_typer(dlq_app, name="dlq")


# --------------------------------------------------------------------------- input


def parse_time(text: str, option: str, *, now: datetime | None = None) -> tuple[datetime, str]:
    """(the instant, its canonical text). A relative time keeps its relative text, so the
    same command typed again names the same backfill run."""
    raw = text.strip()
    relative = _DURATION.match(raw.lower())
    if relative:
        seconds = float(relative["amount"]) * _UNIT_SECONDS[relative["unit"]]
        moment = (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        return moment, f"{relative['amount']}{relative['unit']}"
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        fail(f"{option}: {text!r} is not a time; use {_TIME_HELP}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment, moment.isoformat().replace("+00:00", "Z")


def _optional_time(text: str | None, option: str) -> tuple[datetime | None, str | None]:
    if text is None:
        return None, None
    return parse_time(text, option)


def parse_positions(values: Sequence[str], option: str) -> dict[int, int]:
    """``P:O`` texts -> {partition: offset}, one per partition."""
    positions: dict[int, int] = {}
    for value in values:
        match = _POSITION.match(value)
        if match is None:
            fail(f"{option}: {value!r} is not PARTITION:OFFSET (e.g. 0:1200)")
        partition, offset = int(match["partition"]), int(match["offset"])
        if partition in positions:
            fail(f"{option}: partition {partition} is given twice")
        positions[partition] = offset
    return positions


def parse_dlq_positions(values: Sequence[str]) -> frozenset[tuple[int, int]]:
    positions: set[tuple[int, int]] = set()
    for value in values:
        match = _POSITION.match(value)
        if match is None:
            fail(f"--at: {value!r} is not PARTITION:OFFSET of the dead-letter topic (e.g. 2:17)")
        positions.add((int(match["partition"]), int(match["offset"])))
    return frozenset(positions)


def parse_order_ids(values: Sequence[str]) -> tuple[uuid.UUID, ...]:
    ids: list[uuid.UUID] = []
    for value in values:
        try:
            ids.append(uuid.UUID(value.strip()))
        except ValueError:
            fail(f"--order: {value!r} is not an order id (a UUID)")
    return tuple(dict.fromkeys(ids))


def parse_reasons(values: Sequence[str]) -> frozenset[str]:
    from consumer.errors import DeadLetterReason

    known = {reason.value for reason in DeadLetterReason}
    for value in values:
        if value not in known:
            fail(f"--reason: {value!r} is not a dead-letter reason ({', '.join(sorted(known))})")
    return frozenset(values)


def _rate(rate: float | None) -> float | None:
    if rate is not None and not rate > 0:
        fail(f"--rate must be a positive number of messages per second, got {rate}")
    return rate


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """The first Ctrl-C / SIGTERM sets ``stop`` (the second ends the process at once).
    Signal handlers exist only in the main thread; elsewhere (embedded) nothing is set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from orderflow.runtime.signals import stop_on_signals

    with stop_on_signals(stop):
        yield


@contextlib.asynccontextmanager
async def _database(settings: Settings, *, pool_size: int) -> AsyncIterator[AsyncEngine]:
    """A command's engine: the database and its schema checked first, disposed at the end."""
    from orderflow.runtime.wiring import check_database, create_engine

    engine = create_engine(settings, pool_size=pool_size)
    try:
        await check_database(engine)
        yield engine
    finally:
        await engine.dispose()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# --------------------------------------------------------------------------- options

Rate = Annotated[
    float | None,
    typer.Option(
        "--rate",
        help="Publish at most this many messages per second (default: as fast as possible).",
        show_default=False,
    ),
]
DryRun = Annotated[
    bool,
    typer.Option("--dry-run", help="Count what would happen; write and publish nothing."),
]
QuietLogLevel = Annotated[
    str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR (logs go to stderr).")
]


# --------------------------------------------------------------------------- backfill


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
            help=f"Only orders updated at or after this time: {_TIME_HELP}.",
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
    since_at, since_given = _optional_time(since, "--since")
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
            rate=_rate(rate),
            new=new,
            dry_run=dry_run,
        )
        summary = Summary("backfill snapshots", "queued", "skipped")
        stop = asyncio.Event()
        async with _database(settings, pool_size=2) as engine:
            with progress_bar("snapshots", None) as progress, _stop_on_signals(stop):

                def started(outcome: SnapshotOutcome) -> None:
                    progress.set_total(outcome.remaining_at_start)
                    run = outcome.run
                    if run is None:
                        _note(f"dry run: {outcome.remaining_at_start} matching orders")
                    elif outcome.resumed:
                        _note(
                            f"resuming backfill run {run.id} (started {_when(run.started_at)}, "
                            f"{run.queued} snapshots queued so far): "
                            f"{outcome.remaining_at_start} orders to go"
                        )
                    else:
                        _note(
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
                _note(f"(would resume backfill run {outcome.run.id})")
            return
        summary.print()
        run = outcome.run
        assert run is not None
        if outcome.finished:
            _note(
                f"backfill run {run.id} finished: {run.queued} snapshots queued in all; "
                f"the relay publishes them to {settings.outbound_topic}"
            )
        elif outcome.taken_over:
            _note(f"backfill run {run.id} was finished or replaced by another process")
        elif outcome.interrupted:
            _note(
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
            _database(settings, pool_size=1) as engine,
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
                _when(item.started_at),
                _when(item.finished_at),
            )
        if not runs:
            table.add_row("(no backfill runs yet)", "", "", "", "", "", "", "")
        _wide_console().print(table)

    run(main())


# --------------------------------------------------------------------------- replay


@replay_app.command("outbox")
def replay_outbox_command(
    since: Annotated[
        str,
        typer.Option(
            "--since",
            help=f"Messages published at or after this time: {_TIME_HELP}.",
            show_default=False,
        ),
    ],
    until: Annotated[
        str | None,
        typer.Option(
            "--until", help="... and published before this time (default: now).", show_default=False
        ),
    ] = None,
    order: Annotated[
        list[str] | None,
        typer.Option(
            "--order", help="Only this order's messages (repeat for several).", show_default=False
        ),
    ] = None,
    topic: Annotated[
        str | None,
        typer.Option(
            "--topic",
            help="Replay the outbox messages of this topic (default: the outbound topic; the "
            "dead-letter topic works too).",
            show_default=False,
        ),
    ] = None,
    to_topic: Annotated[
        str | None,
        typer.Option(
            "--to-topic",
            help="Publish to this topic instead of the original one (e.g. a subscriber's "
            "private repair topic).",
            show_default=False,
        ),
    ] = None,
    rate: Rate = None,
    batch: Annotated[
        int, typer.Option("--batch", min=1, max=10000, help="Messages read and acked per round.")
    ] = 500,
    dry_run: DryRun = False,
    database_url: DatabaseUrl = None,
    bootstrap_servers: BootstrapServers = None,
    outbound_topic: OutboundTopic = None,
    log_level: QuietLogLevel = "WARNING",
) -> None:
    """Publish retained outbox messages again, with the same event_ids.

    Publish retained, already published outbox messages again: same event_ids,
    keys, headers and values, in outbox id order (so each order's messages in
    their order).

    For a subscriber that lost data. Messages go straight to the broker (the
    outbox is only read; the relay and live traffic are not held up). Replayed
    messages interleave with live ones: a subscriber that drops repeated
    event_ids, or keeps each order's highest order_version, is unaffected.
    Only messages still retained can be replayed
    (ORDERFLOW_OUTBOX_RETENTION_HOURS).
    """
    logs.configure(log_level)
    since_at, _ = parse_time(since, "--since")
    until_at, _ = _optional_time(until, "--until")
    if until_at is not None and until_at <= since_at:
        fail("--until must be later than --since")
    order_ids = parse_order_ids(order or [])
    settings = load_settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap_servers,
        outbound_topic=outbound_topic,
    )

    async def main() -> None:
        from aiokafka import AIOKafkaProducer

        from orderflow.runtime.wiring import create_producer, session_factory, start_kafka_client
        from orderflow.tools.progress import Summary, progress_bar
        from orderflow.tools.replay import (
            OutboxReplayOutcome,
            OutboxReplayRequest,
            replay_outbox,
            stop_client,
        )

        request = OutboxReplayRequest(
            since=since_at,
            until=until_at,
            topic=topic or settings.outbound_topic,
            destination=to_topic,
            order_ids=order_ids,
            rate=_rate(rate),
            batch=batch,
            dry_run=dry_run,
        )
        if not dry_run:
            settings.require_kafka()
        summary = Summary("replay outbox", "matched", "published")
        producer: AIOKafkaProducer | None = None
        stop = asyncio.Event()
        async with _database(settings, pool_size=1) as engine:
            try:
                if not dry_run:
                    producer = create_producer(settings)
                    await start_kafka_client(producer, settings)
                with progress_bar("replaying", None) as progress, _stop_on_signals(stop):

                    def started(outcome: OutboxReplayOutcome) -> None:
                        progress.set_total(outcome.matched)
                        summary.add("matched", outcome.matched)
                        oldest = outcome.oldest_retained
                        hours = settings.outbox_retention_hours
                        kept = f"published messages are kept {hours:g} h"
                        if oldest is None:
                            _note(
                                f"note: no published message of {request.topic} is retained "
                                f"({kept})"
                            )
                        elif oldest > since_at:
                            _note(
                                f"note: {kept}; the oldest one of {request.topic} still retained "
                                f"was published at {_when(oldest)}: nothing older can be replayed"
                            )

                    def published(count: int) -> None:
                        summary.add("published", count)
                        progress.advance(count)

                    outcome = await replay_outbox(
                        session_factory(engine),
                        producer,
                        request,
                        stop=stop,
                        on_start=started,
                        on_published=published,
                    )
            finally:
                if producer is not None:
                    await stop_client(producer)
        summary.print(dry_run=dry_run)
        if outcome.interrupted:
            _note(f"interrupted after {outcome.published} of {outcome.matched} messages")
            raise typer.Exit(INTERRUPTED_EXIT)

    run(main())


@replay_app.command("topic")
def replay_topic_command(
    from_timestamp: Annotated[
        str | None,
        typer.Option(
            "--from-timestamp",
            help=f"Start at the first event at or after this time, in every partition: "
            f"{_TIME_HELP}.",
            show_default=False,
        ),
    ] = None,
    from_offset: Annotated[
        list[str] | None,
        typer.Option(
            "--from-offset",
            help="Start partition P at offset O (P:O; repeat for several partitions; only "
            "the partitions named are replayed).",
            show_default=False,
        ),
    ] = None,
    to_timestamp: Annotated[
        str | None,
        typer.Option(
            "--to-timestamp",
            help="Stop before the first event at or after this time (default: the end of "
            "each partition when the replay starts).",
            show_default=False,
        ),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            help="Group id of the replay (its offsets in consumer_offsets). "
            "Default: <consumer group>.replay.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Read the range and count events already applied (would be skipped), to "
            "process, and undecodable; change nothing.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
    bootstrap_servers: BootstrapServers = None,
    inbound_topic: InboundTopic = None,
    outbound_topic: OutboundTopic = None,
    dlq_topic: DlqTopic = None,
    log_level: QuietLogLevel = "WARNING",
) -> None:
    """Run inbound events through the consumer again, up to an end; then stop.

    Runs under a separate group id, from a start position (--from-timestamp or
    --from-offset) to the end each partition had when the replay started (or
    --to-timestamp). Events the inbox holds are skipped and counted; events
    that failed before are tried again and applied, or dead-lettered again
    (once). Safe while the live consumers run.
    """
    logs.configure(log_level)
    if (from_timestamp is None) == (not from_offset):
        fail("give exactly one start: --from-timestamp T or --from-offset P:O")
    start_at, _ = _optional_time(from_timestamp, "--from-timestamp")
    end_at, _ = _optional_time(to_timestamp, "--to-timestamp")
    if start_at is not None and end_at is not None and end_at <= start_at:
        fail("--to-timestamp must be later than --from-timestamp")
    offsets = parse_positions(from_offset or [], "--from-offset")
    settings = load_settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap_servers,
        inbound_topic=inbound_topic,
        outbound_topic=outbound_topic,
        dlq_topic=dlq_topic,
    )

    async def main() -> None:
        from orderflow.tools.progress import Summary, progress_bar
        from orderflow.tools.replay import (
            ReplayError,
            TopicReplayOutcome,
            TopicReplayRequest,
            replay_topic,
        )

        settings.require_kafka()
        replay_group = group or f"{settings.consumer_group}.replay"
        if replay_group == settings.consumer_group:
            fail(
                f"--group {replay_group!r} is the live consumer group; a replay needs its own "
                "(it rewrites the group's stored offsets)"
            )
        request = TopicReplayRequest(
            group=replay_group,
            from_timestamp=start_at,
            from_offsets=offsets,
            to_timestamp=end_at,
            dry_run=dry_run,
        )
        summary = (
            Summary("replay topic", "skipped", "to_process", "undecodable")
            if dry_run
            else Summary("replay topic", "applied", "skipped", "dead_lettered")
        )
        stop = asyncio.Event()
        async with _database(settings, pool_size=settings.db_pool_size + 1) as engine:
            with progress_bar("events", None) as progress, _stop_on_signals(stop):

                def planned(outcome: TopicReplayOutcome) -> None:
                    progress.set_total(outcome.total)
                    for r in outcome.ranges:
                        span = f"offsets {r.start}-{r.end - 1}" if r.size else "nothing"
                        _note(f"{settings.inbound_topic}[{r.partition}]: {span} ({r.size} events)")

                def covered(count: int) -> None:
                    progress.advance(count - progress.done)

                try:
                    outcome = await replay_topic(
                        settings,
                        engine,
                        request,
                        stop=stop,
                        on_plan=planned,
                        on_progress=covered,
                    )
                except ReplayError as error:
                    fail(str(error))
        if dry_run:
            summary.add("skipped", outcome.skipped)
            summary.add("to_process", outcome.to_process)
            summary.add("undecodable", outcome.undecodable)
            summary.print(dry_run=True)
        else:
            summary.add("applied", outcome.applied)
            summary.add("skipped", outcome.skipped)
            summary.add("dead_lettered", outcome.dead_lettered)
            summary.print()
            if outcome.dead_letters:
                reasons = ", ".join(
                    f"{reason}={count}" for reason, count in sorted(outcome.dead_letters.items())
                )
                _note(f"dead-lettered by reason: {reasons} (see `orderflow dlq list`)")
        if outcome.interrupted:
            _note("interrupted before the end; run it again (applied events are skipped)")
            raise typer.Exit(INTERRUPTED_EXIT)

    run(main())


# --------------------------------------------------------------------------- dlq

Reasons = Annotated[
    list[str] | None,
    typer.Option(
        "--reason",
        help="Only this error.reason (malformed_json, schema_violation, unknown_event_type, "
        "unknown_order, duplicate_order, invalid_transition, amount_mismatch). Repeatable.",
        show_default=False,
    ),
]
Since = Annotated[
    str | None,
    typer.Option(
        "--since",
        help=f"Only dead letters written at or after this time: {_TIME_HELP}.",
        show_default=False,
    ),
]
At = Annotated[
    list[str] | None,
    typer.Option(
        "--at",
        help="Only the dead letter at this PARTITION:OFFSET of the dead-letter topic "
        "(as `dlq list` shows it). Repeatable.",
        show_default=False,
    ),
]


def _dead_letter_filter(
    reason: list[str] | None, since: str | None, at: list[str] | None
) -> DeadLetterFilter:
    from orderflow.tools.dlq import DeadLetterFilter

    since_at, _ = _optional_time(since, "--since")
    return DeadLetterFilter(
        reasons=parse_reasons(reason or []),
        since=since_at,
        positions=parse_dlq_positions(at or []),
    )


@dlq_app.command("list")
def dlq_list_command(
    reason: Reasons = None,
    since: Since = None,
    at: At = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Show at most this many (the oldest first).")
    ] = 50,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="One JSON object per dead letter, with the full key and value."
        ),
    ] = False,
    bootstrap_servers: BootstrapServers = None,
    dlq_topic: DlqTopic = None,
    log_level: QuietLogLevel = "WARNING",
) -> None:
    """Show dead letters: reason, message, source position, a value preview.

    Show dead letters: position in the dead-letter topic, time, error.reason,
    error.message, where it came from (source topic:partition:offset) and a
    value preview.

    Reads the dead-letter topic up to its current end and stops.
    """
    logs.configure(log_level)
    filters = _dead_letter_filter(reason, since, at)
    settings = load_settings(kafka_bootstrap_servers=bootstrap_servers, dlq_topic=dlq_topic)

    async def main() -> None:
        from collections import Counter

        import orjson

        from orderflow.runtime.wiring import start_kafka_client
        from orderflow.tools.dlq import DeadLetterScan
        from orderflow.tools.progress import progress_bar
        from orderflow.tools.replay import ReplayError, create_reader, stop_client

        reader = create_reader(settings)
        await start_kafka_client(reader, settings)
        shown: list[DeadLetter] = []
        by_reason: Counter[str] = Counter()
        matched = 0
        stop = asyncio.Event()
        try:
            scan = DeadLetterScan(reader, settings.dlq_topic, filters)
            try:
                await scan.plan()
            except ReplayError as error:
                fail(str(error))
            with progress_bar("dead letters", scan.total) as progress, _stop_on_signals(stop):
                async for letter, matches in scan:
                    progress.advance()
                    if matches:
                        matched += 1
                        by_reason[letter.reason or "?"] += 1
                        if len(shown) < limit:
                            shown.append(letter)
                    if stop.is_set():
                        break
        finally:
            await stop_client(reader)
        if as_json:
            for letter in shown:
                print(orjson.dumps(letter.as_json()).decode())
        else:
            _print_dead_letters(shown)
        more = f" (showing the oldest {len(shown)})" if matched > len(shown) else ""
        reasons = ", ".join(f"{name}={count}" for name, count in sorted(by_reason.items()))
        _note(
            f"{matched} dead letters match in {settings.dlq_topic}{more}"
            + (f"; by reason: {reasons}" if reasons else "")
        )
        if stop.is_set():
            raise typer.Exit(INTERRUPTED_EXIT)

    run(main())


def _print_dead_letters(letters: Sequence[DeadLetter]) -> None:
    from rich.table import Table

    table = Table("dlq position", "time", "reason", "message", "source", "value")
    for letter in letters:
        table.add_row(
            f"{letter.partition}:{letter.offset}",
            _when(letter.timestamp),
            letter.reason or "?",
            letter.message or "",
            letter.source,
            letter.preview(),
        )
    _wide_console().print(table)


def _wide_console() -> Console:
    """A terminal's own width; when piped, wide enough that rows are not wrapped."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))


@dlq_app.command("redrive")
def dlq_redrive_command(
    reason: Reasons = None,
    since: Since = None,
    at: At = None,
    dry_run: DryRun = False,
    rate: Rate = None,
    bootstrap_servers: BootstrapServers = None,
    dlq_topic: DlqTopic = None,
    inbound_topic: InboundTopic = None,
    log_level: QuietLogLevel = "WARNING",
) -> None:
    """Send chosen dead letters back to the inbound topic, after a fix.

    Each goes with its original key and value bytes and a header
    orderflow.redrive.source = <dlq topic>:<partition>:<offset>. Reads the
    dead-letter topic up to the end it had at the start, so a redriven event
    that fails again is dead-lettered again once, never looped. An event
    applied by an earlier redrive is skipped by the consumer as a duplicate.
    """
    logs.configure(log_level)
    filters = _dead_letter_filter(reason, since, at)
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap_servers, dlq_topic=dlq_topic, inbound_topic=inbound_topic
    )
    if not reason and not since and not at and not dry_run:
        _note("no --reason, --since or --at given: every dead letter is redriven")

    async def main() -> None:
        from aiokafka import AIOKafkaProducer

        from orderflow.runtime.wiring import create_producer, start_kafka_client
        from orderflow.tools.dlq import DeadLetterScan, redrive
        from orderflow.tools.progress import Summary, progress_bar
        from orderflow.tools.replay import ReplayError, create_reader, stop_client

        reader = create_reader(settings)
        await start_kafka_client(reader, settings)
        producer: AIOKafkaProducer | None = None
        summary = Summary("dlq redrive", "scanned", "matched", "published")
        stop = asyncio.Event()
        try:
            scan = DeadLetterScan(reader, settings.dlq_topic, filters)
            try:
                await scan.plan()
            except ReplayError as error:
                fail(str(error))
            if not dry_run:
                producer = create_producer(settings)
                await start_kafka_client(producer, settings)
            with progress_bar("dead letters", scan.total) as progress, _stop_on_signals(stop):

                def scanned(_letter: DeadLetter, _matched: bool) -> None:
                    progress.advance()

                outcome = await redrive(
                    scan,
                    producer,
                    inbound_topic=settings.inbound_topic,
                    rate=_rate(rate),
                    stop=stop,
                    dry_run=dry_run,
                    on_scanned=scanned,
                )
        finally:
            if producer is not None:
                await stop_client(producer)
            await stop_client(reader)
        summary.add("scanned", outcome.scanned)
        summary.add("matched", outcome.matched)
        summary.add("published", outcome.published)
        summary.print(dry_run=dry_run)
        if outcome.interrupted:
            _note("interrupted: dead letters after the last one scanned were not redriven")
            raise typer.Exit(INTERRUPTED_EXIT)

    run(main())
