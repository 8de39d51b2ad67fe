"""Upstream and subscriber commands: import, publish, loadgen, tail."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Annotated

import typer
from aiokafka import ConsumerRecord
from rich.console import Console

from consumer.errors import RejectedEvent
from orderflow.cli.support import (
    INTERRUPTED_EXIT,
    BootstrapServers,
    InboundTopic,
    LogLevel,
    OutboundTopic,
    fail,
    load_settings,
    run,
)
from orderflow.runtime import logs
from orderflow.runtime.settings import Settings
from orderflow.runtime.signals import stop_on_signals
from orderflow.subscriber import Outcome, Subscriber, Verdict, follow
from orderflow.tools.progress import Summary, progress_bar
from orderflow.tools.upstream import (
    Publisher,
    PublishFailed,
    Rejection,
    check_event,
    explain,
    generate_load,
    open_producer,
    order_key,
    publish_one,
    read_lines,
    validate_file,
    validate_line,
)

Rate = Annotated[
    float | None,
    typer.Option(
        "--rate",
        min=0.001,
        help="At most this many events per second (default: as fast as the broker acks).",
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("import")(import_command)
    app.command("publish")(publish_command)
    app.command("loadgen")(loadgen_command)
    app.command("tail")(tail_command)


# --------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_events(path: str) -> Iterator[IO[bytes]]:
    """The file to read twice (validate, then send); standard input is spooled to disk."""
    if path == "-":
        with tempfile.TemporaryFile() as spool:
            try:
                shutil.copyfileobj(sys.stdin.buffer, spool, 1024 * 1024)
            except KeyboardInterrupt:
                fail("interrupted while reading standard input; nothing was sent", INTERRUPTED_EXIT)
            spool.seek(0)
            yield spool
        return
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below, after both passes
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror or error}", 2)
    with stream:
        yield stream


def import_command(
    file: Annotated[
        str,
        typer.Argument(
            metavar="FILE.jsonl",
            help="JSON Lines: one inbound event per line. '-' reads standard input.",
            show_default=False,
        ),
    ],
    validate_only: Annotated[
        bool,
        typer.Option(
            "--validate-only",
            "--dry-run",
            help="Check every line and report; connect to nothing and send nothing.",
        ),
    ] = False,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            "--skip-invalid",
            help=(
                "Send the valid lines even when some are invalid. Careful: when an order's "
                "event is skipped, its later events will most likely be dead-lettered."
            ),
        ),
    ] = False,
    rate: Rate = None,
    show_errors: Annotated[
        int,
        typer.Option(
            "--show-errors",
            min=0,
            help="Print at most this many invalid lines (0: all). All of them are counted.",
        ),
    ] = 100,
    bootstrap_servers: BootstrapServers = None,
    inbound_topic: InboundTopic = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Publish inbound events from a JSON Lines file to the inbound topic, keyed by order id.

    First every line is checked exactly as the consumer will check it; each invalid line is
    reported with its line number and the JSON path of the problem, and is never sent. If
    any line is invalid, NOTHING is sent (fix the file and run again) unless --skip-invalid
    is given. Then the valid lines are sent in file order (keep each order's events in
    order), keyed by order id, with acks=all, at most --rate per second, with a progress
    bar on stderr and a summary on stdout.

    Blank lines are ignored. Running an import again is safe: the consumer skips events it
    has applied (by event_id). The file is streamed, never loaded whole.

    Exit status: 0 all sent (or, with --validate-only, all valid); 1 invalid lines, or Kafka
    did not acknowledge an event; 2 bad usage or settings; 130 interrupted (Ctrl-C).
    """
    logs.configure(log_level)
    settings = load_settings(kafka_bootstrap_servers=bootstrap_servers, inbound_topic=inbound_topic)
    code = 0

    async def main(stream: IO[bytes]) -> None:
        nonlocal code
        code = await _import(
            stream,
            settings=settings,
            name=file,
            validate_only=validate_only,
            skip_invalid=skip_invalid,
            rate=rate,
            show_errors=show_errors,
        )

    with _open_events(file) as stream:
        run(main(stream))
    if code:
        raise typer.Exit(code)


async def _import(
    stream: IO[bytes],
    *,
    settings: Settings,
    name: str,
    validate_only: bool,
    skip_invalid: bool,
    rate: float | None,
    show_errors: int,
) -> int:
    console = Console(stderr=True)
    limit = settings.max_message_bytes
    shown = 0

    def report(rejection: Rejection) -> None:
        nonlocal shown
        if show_errors == 0 or shown < show_errors:
            shown += 1
            console.print(rejection.render(), markup=False, highlight=False, soft_wrap=True)

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    summary = (
        Summary(f"import {name}", "valid", "rejected")
        if validate_only
        else Summary(f"import {name}", "published", "rejected")
    )
    stop = asyncio.Event()
    with stop_on_signals(stop):
        with progress_bar("validating", None, console=console) as progress:
            validation = await validate_file(
                stream, limit, on_rejection=report, on_line=progress.advance, stop=stop
            )
        if validation.rejected > shown:
            say(
                f"... and {validation.rejected - shown} more invalid lines "
                "(--show-errors 0 prints all)"
            )
        if validation.interrupted:
            say("interrupted while validating: nothing was sent")
            return INTERRUPTED_EXIT
        summary.add("rejected", validation.rejected)
        if validate_only:
            summary.add("valid", validation.valid)
            summary.print(dry_run=True)
            return 1 if validation.rejected else 0

        if validation.rejected and not skip_invalid:
            say(
                f"nothing was sent: {validation.rejected} of "
                f"{validation.valid + validation.rejected} events are invalid. Fix them and "
                "run again, or pass --skip-invalid to send the valid ones."
            )
            summary.print()
            return 1
        if validation.valid == 0:
            say(f"{name} holds no valid event: nothing to send")
            summary.print()
            return 1 if validation.rejected else 0

        stream.seek(0)
        interrupted = False
        failure: str | None = None
        async with open_producer(settings, settings.inbound_topic) as producer:
            publisher = Publisher(producer, settings.inbound_topic, rate)
            with progress_bar("publishing", validation.valid, console=console) as progress:
                publisher.on_published = progress.advance
                rejected_again = 0
                try:
                    for index, line in enumerate(read_lines(stream, limit)):
                        if index % 500 == 0:
                            await asyncio.sleep(0)  # let Ctrl-C and the progress bar in
                        if stop.is_set():
                            interrupted = True
                            break
                        checked = validate_line(line, limit)
                        if isinstance(checked, Rejection):
                            rejected_again += 1
                            if rejected_again > validation.rejected:
                                failure = (
                                    f"{name} changed while it was being imported "
                                    f"({checked.render()}); stopped"
                                )
                                break
                            continue
                        assert line.value is not None
                        await publisher.send(
                            order_key(checked), line.value, label=f"line {line.number}"
                        )
                    await publisher.flush()
                except PublishFailed as error:
                    await publisher.abandon()
                    failure = str(error)
        summary.add("published", publisher.published)
        if failure is not None or interrupted:
            say(
                (failure or "interrupted")
                + f": {publisher.published} of {validation.valid} events were published. "
                "Running the import again is safe (events already applied are skipped)."
            )
        summary.print()
        if interrupted:
            return INTERRUPTED_EXIT
        return 1 if failure is not None or validation.rejected else 0


# --------------------------------------------------------------------------------------
# publish
# --------------------------------------------------------------------------------------


def publish_command(
    event_file: Annotated[
        str,
        typer.Argument(
            metavar="EVENT.json",
            help="One inbound event as JSON (it may span several lines). '-' reads stdin.",
            show_default=False,
        ),
    ],
    validate_only: Annotated[
        bool,
        typer.Option(
            "--validate-only", "--dry-run", help="Check the event and report; send nothing."
        ),
    ] = False,
    bootstrap_servers: BootstrapServers = None,
    inbound_topic: InboundTopic = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Publish one inbound event to the inbound topic, keyed by its order id.

    The event is checked exactly as the consumer will check it; an invalid event is
    reported (with the JSON path of the problem) and not sent. On success, prints the
    topic, partition and offset the event was written to (acks=all). For many events, use
    `orderflow import`.
    """
    logs.configure(log_level)
    settings = load_settings(kafka_bootstrap_servers=bootstrap_servers, inbound_topic=inbound_topic)
    limit = settings.max_message_bytes
    try:
        if event_file == "-":
            raw = sys.stdin.buffer.read(limit + 1)
        else:
            with open(event_file, "rb") as stream:
                raw = stream.read(limit + 1)
    except OSError as error:
        fail(f"cannot read {event_file}: {error.strerror or error}", 2)
    value = raw.strip()
    if value.startswith(b"\xef\xbb\xbf"):  # a byte-order mark belongs to the file
        value = value[3:].strip()
    if not value:
        fail(f"{event_file} is empty: expected one event as JSON")
    try:
        event = check_event(value, limit)
    except RejectedEvent as error:
        hint = ""
        if "trailing characters" in error.message:
            hint = " (one event per file: for JSON Lines use `orderflow import`)"
        fail(f"{event_file}: {explain(error)} ({error.reason.value}){hint}; nothing was sent")
    if validate_only:
        print(f"valid: {event.event_type.value} {event.event_id} for order {event.order_id}")
        return
    outcome: list[str] = []

    async def main() -> None:
        try:
            published, metadata = await publish_one(settings, value)
        except PublishFailed as error:
            fail(f"{error}; it may or may not have been written (sending it again is safe)")
        outcome.append(
            f"published {published.event_type.value} {published.event_id} "
            f"for order {published.order_id} to {metadata.topic} "
            f"partition {metadata.partition} offset {metadata.offset}"
        )

    run(main())
    print(outcome[0])


# --------------------------------------------------------------------------------------
# loadgen
# --------------------------------------------------------------------------------------


def loadgen_command(
    rate: Annotated[
        float,
        typer.Option(
            "--rate", min=0, help="Events per second; 0 sends as fast as the broker acks."
        ),
    ] = 100.0,
    orders: Annotated[
        int | None,
        typer.Option(
            "--orders",
            min=1,
            help="Stop once this many orders have run their whole lifecycle.",
            show_default=False,
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            "--duration", min=0.001, help="Stop after this many seconds.", show_default=False
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help=(
                "Make the orders and event ids reproducible (default: random, printed at the "
                "end). Sending a seed's events again yields duplicates, which are skipped."
            ),
            show_default=False,
        ),
    ] = None,
    faults: Annotated[
        int,
        typer.Option(
            "--faults",
            min=0,
            help=(
                "Make about every N-th message a mistake: a repeated event, malformed JSON, "
                "a schema violation, an unknown type or order, a wrong amount, a shipment "
                "before payment (0: none)."
            ),
        ),
    ] = 0,
    bootstrap_servers: BootstrapServers = None,
    inbound_topic: InboundTopic = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Publish realistic order traffic to the inbound topic, for testing.

    Orders run their whole lifecycle (placed, paid, shipped, delivered, some cancelled),
    interleaved as in real traffic, each keyed by its order id. Runs until --orders
    lifecycles are complete, --duration has passed or Ctrl-C (exit 0), whichever comes
    first, then waits for every ack and prints what was sent. Progress on stderr.
    """
    logs.configure(log_level)
    settings = load_settings(kafka_bootstrap_servers=bootstrap_servers, inbound_topic=inbound_topic)
    chosen_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    failed: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        summary = Summary("loadgen", "published", "orders", "duplicates", "poison")
        with stop_on_signals(stop), progress_bar("publishing", None) as progress:
            try:
                result = await generate_load(
                    settings,
                    seed=chosen_seed,
                    rate=rate or None,
                    orders=orders,
                    duration=duration,
                    faults=faults,
                    stop=stop,
                    on_published=progress.advance,
                )
            except PublishFailed as error:
                failed.append(str(error))
                return
        summary.add("published", result.published)
        summary.add("orders", result.counts.orders)
        summary.add("duplicates", result.counts.duplicates)
        summary.add("poison", result.counts.poison)
        summary.print()
        print(
            f"seed {chosen_seed} (--seed {chosen_seed} generates the same orders again)",
            file=sys.stderr,
        )

    run(main())
    if failed:
        fail(f"{failed[0]} (seed {chosen_seed})")


# --------------------------------------------------------------------------------------
# tail
# --------------------------------------------------------------------------------------


def tail_command(
    order: Annotated[
        list[str] | None,
        typer.Option(
            "--order",
            metavar="ORDER_ID",
            help="Only this order (repeat the option for several).",
            show_default=False,
        ),
    ] = None,
    from_beginning: Annotated[
        bool,
        typer.Option(
            "--from-beginning",
            help="Read the topic from its start (default: only updates from now on).",
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help=(
                "Print each new update as it came, one JSON per line (with trace_id, when "
                "it carries a trace context)."
            ),
        ),
    ] = False,
    group: Annotated[
        str | None,
        typer.Option(
            "--group",
            help=(
                "Join this consumer group and commit offsets, so that a restart goes on where "
                "it stopped (default: no group; read every partition, commit nothing)."
            ),
            show_default=False,
        ),
    ] = None,
    bootstrap_servers: BootstrapServers = None,
    outbound_topic: OutboundTopic = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Follow the order updates as a subscriber sees them: each order's latest state.

    Reads the outbound topic, drops repeated event_ids and versions not newer than the one
    already shown, and prints one line per new version: time, order id, version, status,
    total and what changed (a jump in versions is flagged: updates were missed). Messages
    it cannot read are reported on stderr and skipped. Ctrl-C stops it (exit 0) with counts
    on stderr. The code (orderflow/subscriber.py) is meant to be copied by subscribers.
    """
    logs.configure(log_level)
    settings = load_settings(
        kafka_bootstrap_servers=bootstrap_servers, outbound_topic=outbound_topic
    )
    wanted: list[uuid.UUID] = []
    for text in order or []:
        try:
            wanted.append(uuid.UUID(text))
        except ValueError:
            fail(f"--order {text!r} is not an order id (a UUID)", 2)

    async def main() -> None:
        def show(outcome: Outcome, record: ConsumerRecord[bytes, bytes]) -> None:
            if outcome.verdict is not Verdict.NEW:
                return
            if as_json:
                assert record.value is not None
                print(_with_trace_id(record), flush=True)
                return
            print(describe(outcome), flush=True)

        def unreadable(record: ConsumerRecord[bytes, bytes], reason: str) -> None:
            print(
                f"tail: skipped {record.topic} partition {record.partition} offset "
                f"{record.offset}: {reason}",
                file=sys.stderr,
                flush=True,
            )

        def ready(partitions: int) -> None:
            where = "from the beginning" if from_beginning else "from now on"
            print(
                f"tail: reading {settings.outbound_topic} ({partitions} partitions) {where}; "
                "Ctrl-C stops",
                file=sys.stderr,
                flush=True,
            )

        subscriber = Subscriber(on_update=show, on_unreadable=unreadable, orders=wanted)
        stop = asyncio.Event()
        with stop_on_signals(stop):
            await follow(
                settings,
                subscriber,
                stop,
                from_beginning=from_beginning,
                group=group,
                on_ready=ready,
            )
        stats = subscriber.stats
        print(
            f"tail: read={stats.read} shown={stats.new} repeated={stats.repeated} "
            f"stale={stats.stale} gaps={stats.gaps} unreadable={stats.unreadable}",
            file=sys.stderr,
            flush=True,
        )

    run(main())


def describe(outcome: Outcome) -> str:
    """One line per new version: ``time  order  v3  shipped  25.00 EUR  OrderShipped``."""
    update = outcome.update
    order = update.order
    line = (
        f"{update.occurred_at:%Y-%m-%d %H:%M:%S}  {update.order_id}  "
        f"v{update.order_version:<3} {order.status.value:<9}  "
        f"{order.total:>12} {order.currency}  {update.change}"
    )
    if outcome.missed:
        line += f"  (missed {outcome.missed} earlier version{'s' if outcome.missed > 1 else ''})"
    return line


def _with_trace_id(record: ConsumerRecord[bytes, bytes]) -> str:
    """The update as it came, with ``trace_id`` added when it carries a ``traceparent``."""
    import orjson

    from consumer.tracing import trace_headers, trace_id

    value: bytes = record.value or b""
    found = trace_id(trace_headers(record.headers))
    if found is None:
        return value.decode(errors="replace")
    document = orjson.loads(value)
    document["trace_id"] = found
    return orjson.dumps(document).decode()
