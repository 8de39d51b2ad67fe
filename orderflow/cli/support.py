"""What the ``orderflow`` subcommands share: option types, settings loading, error exits,
and the operator commands' input (times, positions), options and output."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn

import typer

from orderflow.runtime.settings import Settings, SettingsError
from orderflow.runtime.wiring import ServiceError, StartupError

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy.ext.asyncio import AsyncEngine

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL (postgresql:// or postgresql+asyncpg://). Env: DATABASE_URL.",
        show_default=False,
    ),
]
BootstrapServers = Annotated[
    str | None,
    typer.Option(
        "--bootstrap-servers",
        help="Kafka host:port list, comma-separated. Env: KAFKA_BOOTSTRAP_SERVERS.",
        show_default=False,
    ),
]
Group = Annotated[
    str | None,
    typer.Option(
        "--group",
        help="Consumer group id. Env: ORDERFLOW_CONSUMER_GROUP (default: orderflow).",
        show_default=False,
    ),
]
InboundTopic = Annotated[
    str | None,
    typer.Option(
        "--inbound-topic",
        help="Env: ORDERFLOW_INBOUND_TOPIC (default: orders.events).",
        show_default=False,
    ),
]
OutboundTopic = Annotated[
    str | None,
    typer.Option(
        "--outbound-topic",
        help="Env: ORDERFLOW_OUTBOUND_TOPIC (default: orders.updates).",
        show_default=False,
    ),
]
DlqTopic = Annotated[
    str | None,
    typer.Option(
        "--dlq-topic",
        help="Env: ORDERFLOW_DLQ_TOPIC (default: orders.events.dlq).",
        show_default=False,
    ),
]
LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]


def command_group(help: str) -> typer.Typer:
    """A group of commands (``orderflow <group> <command>``); the group alone shows its help."""
    return typer.Typer(help=help, no_args_is_help=True)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"orderflow: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except SettingsError as error:
        fail(str(error), 2)


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a command's coroutine; known failures become one line and a non-zero exit."""
    try:
        asyncio.run(coroutine)
    except SettingsError as error:
        fail(str(error), 2)
    except (StartupError, ServiceError) as error:
        fail(str(error), 1)


# --------------------------------------------------------------------------- operator commands
# backfill, replay and dlq: their input (times, positions), options and output.

INTERRUPTED_EXIT: Final = 130
_DURATION: Final = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d|w)$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_POSITION: Final = re.compile(r"^\s*(?P<partition>\d+)\s*:\s*(?P<offset>\d+)\s*$")
TIME_HELP: Final = (
    "an ISO 8601 instant (2026-11-24T10:15:00Z; no zone means UTC), a date (2026-11-24, "
    "midnight UTC) or a duration ago (90s, 30m, 2h, 7d, 1w)"
)


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
        fail(f"{option}: {text!r} is not a time; use {TIME_HELP}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment, moment.isoformat().replace("+00:00", "Z")


def parse_duration(text: str, option: str) -> timedelta:
    """A duration: 90s, 30m, 2h, 7d, 1w, or a number of seconds."""
    raw = text.strip().lower()
    match = _DURATION.match(raw)
    if match:
        return timedelta(seconds=float(match["amount"]) * _UNIT_SECONDS[match["unit"]])
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        fail(f"{option}: {text!r} is not a duration; use 90s, 30m, 2h, 7d, 1w or seconds")
    return timedelta(seconds=seconds)


def parse_optional_time(text: str | None, option: str) -> tuple[datetime | None, str | None]:
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


def positive_rate(rate: float | None) -> float | None:
    if rate is not None and not rate > 0:
        fail(f"--rate must be a positive number of messages per second, got {rate}")
    return rate


@contextlib.contextmanager
def stop_on_interrupt(stop: asyncio.Event) -> Iterator[None]:
    """The first Ctrl-C / SIGTERM sets ``stop`` (the second ends the process at once).
    Signal handlers exist only in the main thread; elsewhere (embedded) nothing is set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from orderflow.runtime.signals import stop_on_signals

    with stop_on_signals(stop):
        yield


@contextlib.asynccontextmanager
async def open_database(settings: Settings, *, pool_size: int) -> AsyncIterator[AsyncEngine]:
    """A command's engine: the database and its schema checked first, disposed at the end."""
    from orderflow.runtime.wiring import check_database, create_engine

    engine = create_engine(settings, pool_size=pool_size)
    try:
        await check_database(engine)
        yield engine
    finally:
        await engine.dispose()


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def wide_console() -> Console:
    """A terminal's own width; when piped, wide enough that rows are not wrapped."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))


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
