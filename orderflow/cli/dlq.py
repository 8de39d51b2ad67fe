"""Operator commands: dlq list, dlq redrive."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from orderflow.cli.support import (
    INTERRUPTED_EXIT,
    TIME_HELP,
    BootstrapServers,
    DlqTopic,
    DryRun,
    InboundTopic,
    QuietLogLevel,
    Rate,
    command_group,
    fail,
    load_settings,
    note,
    parse_dlq_positions,
    parse_optional_time,
    positive_rate,
    run,
    stop_on_interrupt,
    when,
    wide_console,
)
from orderflow.runtime import logs

if TYPE_CHECKING:
    from orderflow.tools.dlq import DeadLetter, DeadLetterFilter

dlq_app = command_group(
    "Dead letters: inspect them, and send chosen ones back to the inbound topic."
)


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
        help=f"Only dead letters written at or after this time: {TIME_HELP}.",
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


def parse_reasons(values: Sequence[str]) -> frozenset[str]:
    from consumer.errors import DeadLetterReason

    known = {reason.value for reason in DeadLetterReason}
    for value in values:
        if value not in known:
            fail(f"--reason: {value!r} is not a dead-letter reason ({', '.join(sorted(known))})")
    return frozenset(values)


def _dead_letter_filter(
    reason: list[str] | None, since: str | None, at: list[str] | None
) -> DeadLetterFilter:
    from orderflow.tools.dlq import DeadLetterFilter

    since_at, _ = parse_optional_time(since, "--since")
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
        from orderflow.tools.ranges import ReplayError, create_reader, stop_client

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
            with progress_bar("dead letters", scan.total) as progress, stop_on_interrupt(stop):
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
        note(
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
            when(letter.timestamp),
            letter.reason or "?",
            letter.message or "",
            letter.source,
            letter.preview(),
        )
    wide_console().print(table)


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
        note("no --reason, --since or --at given: every dead letter is redriven")

    async def main() -> None:
        from aiokafka import AIOKafkaProducer

        from orderflow.runtime.wiring import create_producer, start_kafka_client
        from orderflow.tools.dlq import DeadLetterScan, redrive
        from orderflow.tools.progress import Summary, progress_bar
        from orderflow.tools.ranges import ReplayError, create_reader, stop_client

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
            with progress_bar("dead letters", scan.total) as progress, stop_on_interrupt(stop):

                def scanned(_letter: DeadLetter, _matched: bool) -> None:
                    progress.advance()

                outcome = await redrive(
                    scan,
                    producer,
                    inbound_topic=settings.inbound_topic,
                    rate=positive_rate(rate),
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
            note("interrupted: dead letters after the last one scanned were not redriven")
            raise typer.Exit(INTERRUPTED_EXIT)

    run(main())
