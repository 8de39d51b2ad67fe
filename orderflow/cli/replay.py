"""Operator commands: replay outbox, replay topic."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Annotated

import typer

from orderflow.cli.support import (
    INTERRUPTED_EXIT,
    TIME_HELP,
    BootstrapServers,
    DatabaseUrl,
    DlqTopic,
    DryRun,
    InboundTopic,
    OutboundTopic,
    QuietLogLevel,
    Rate,
    command_group,
    fail,
    load_settings,
    note,
    open_database,
    parse_optional_time,
    parse_positions,
    parse_time,
    positive_rate,
    run,
    stop_on_interrupt,
    when,
)
from orderflow.runtime import logs

replay_app = command_group(
    "Replays: publish retained outbox messages again (same event_ids), or run inbound "
    "events through the consumer again (the inbox skips what was applied)."
)


def parse_order_ids(values: Sequence[str]) -> tuple[uuid.UUID, ...]:
    ids: list[uuid.UUID] = []
    for value in values:
        try:
            ids.append(uuid.UUID(value.strip()))
        except ValueError:
            fail(f"--order: {value!r} is not an order id (a UUID)")
    return tuple(dict.fromkeys(ids))


@replay_app.command("outbox")
def replay_outbox_command(
    since: Annotated[
        str,
        typer.Option(
            "--since",
            help=f"Published messages written to the outbox at or after this time: {TIME_HELP}.",
            show_default=False,
        ),
    ],
    until: Annotated[
        str | None,
        typer.Option(
            "--until",
            help="... and written before this time (default: now).",
            show_default=False,
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
    until_at, _ = parse_optional_time(until, "--until")
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
        from orderflow.tools.ranges import stop_client
        from orderflow.tools.replay import (
            OutboxReplayOutcome,
            OutboxReplayRequest,
            replay_outbox,
        )

        request = OutboxReplayRequest(
            since=since_at,
            until=until_at,
            topic=topic or settings.outbound_topic,
            destination=to_topic,
            order_ids=order_ids,
            rate=positive_rate(rate),
            batch=batch,
            dry_run=dry_run,
        )
        if not dry_run:
            settings.require_kafka()
        summary = Summary("replay outbox", "matched", "published")
        producer: AIOKafkaProducer | None = None
        stop = asyncio.Event()
        async with open_database(settings, pool_size=1) as engine:
            try:
                if not dry_run:
                    producer = create_producer(settings)
                    await start_kafka_client(producer, settings)
                with progress_bar("replaying", None) as progress, stop_on_interrupt(stop):

                    def started(outcome: OutboxReplayOutcome) -> None:
                        progress.set_total(outcome.matched)
                        summary.add("matched", outcome.matched)
                        oldest = outcome.oldest_retained
                        hours = settings.outbox_retention_hours
                        kept = f"published messages are kept {hours:g} h after they were written"
                        if oldest is None:
                            note(
                                f"note: no published message of {request.topic} is retained "
                                f"({kept})"
                            )
                        elif oldest > since_at:
                            note(
                                f"note: {kept}; the oldest one of {request.topic} still retained "
                                f"was written at {when(oldest)}: nothing older can be replayed"
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
            note(f"interrupted after {outcome.published} of {outcome.matched} messages")
            raise typer.Exit(INTERRUPTED_EXIT)

    run(main())


@replay_app.command("topic")
def replay_topic_command(
    from_timestamp: Annotated[
        str | None,
        typer.Option(
            "--from-timestamp",
            help=f"Start at the first event at or after this time, in every partition: "
            f"{TIME_HELP}.",
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
    start_at, _ = parse_optional_time(from_timestamp, "--from-timestamp")
    end_at, _ = parse_optional_time(to_timestamp, "--to-timestamp")
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
        from orderflow.tools.ranges import ReplayError
        from orderflow.tools.replay import (
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
        async with open_database(settings, pool_size=settings.db_pool_size + 1) as engine:
            with progress_bar("events", None) as progress, stop_on_interrupt(stop):

                def planned(outcome: TopicReplayOutcome) -> None:
                    progress.set_total(outcome.total)
                    for r in outcome.ranges:
                        span = f"offsets {r.start}-{r.end - 1}" if r.size else "nothing"
                        note(f"{settings.inbound_topic}[{r.partition}]: {span} ({r.size} events)")

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
                note(f"dead-lettered by reason: {reasons} (see `orderflow dlq list`)")
        if outcome.interrupted:
            note("interrupted before the end; run it again (applied events are skipped)")
            raise typer.Exit(INTERRUPTED_EXIT)

    run(main())
