"""What every ``orderflow`` subcommand shares: option types, settings loading, error exits."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Annotated, Any, NoReturn

import typer

from orderflow.runtime.settings import Settings, SettingsError
from orderflow.runtime.wiring import ServiceError, StartupError

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
