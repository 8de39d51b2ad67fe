"""Creating engines and Kafka clients from ``Settings``, and start-up checks.

Every failure to reach a service at start-up becomes a :class:`StartupError` with one
line that names the service and where it was looked for (never the password).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from orderflow.settings import Settings, redacted

CONNECT_TIMEOUT_SECONDS = 10.0


class StartupError(RuntimeError):
    """A service is unreachable or not ready; the message is the one line to print."""


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    url = settings.require_database()
    size = pool_size or settings.db_pool_size
    return create_async_engine(
        url,
        pool_size=size,
        max_overflow=0,
        pool_pre_ping=True,
        pool_timeout=30,
        pool_recycle=1800,
        connect_args={"timeout": CONNECT_TIMEOUT_SECONDS},
        # JSONB (the outbox headers) through orjson rather than the standard library.
        json_serializer=lambda value: orjson.dumps(value).decode(),
        json_deserializer=orjson.loads,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def check_database(engine: AsyncEngine, *, require_schema: bool = True) -> None:
    """Reach the database and, unless migrating, check the schema is at the newest revision."""
    where = redacted(engine.url)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            if not require_schema:
                return
            from orderflow.migrate import head_revision

            current = (
                await connection.execute(
                    text(
                        "SELECT version_num FROM alembic_version "
                        "WHERE to_regclass('alembic_version') IS NOT NULL"
                    )
                )
            ).scalar_one_or_none()
    except (TimeoutError, OSError) as error:
        raise StartupError(f"cannot reach PostgreSQL at {where}: {_reason(error)}") from error
    except Exception as error:
        if "alembic_version" in str(error):
            current = None
        else:
            raise StartupError(f"cannot use PostgreSQL at {where}: {_reason(error)}") from error
    head = head_revision()
    if current != head:
        found = "no schema" if current is None else f"schema revision {current}"
        raise StartupError(
            f"PostgreSQL at {where} has {found}, expected {head}: run `orderflow migrate` first"
        )


def kafka_common(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.require_kafka(),
        "client_id": "orderflow",
        "request_timeout_ms": 15000,
        "retry_backoff_ms": 200,
        "metadata_max_age_ms": 30000,
    }


def create_consumer(settings: Settings, *, group_id: str | None = None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        group_id=group_id or settings.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=300000,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(100, min(3000, settings.kafka_session_timeout_ms // 5)),
        # A fetch returns as soon as data is there; this bounds how long an idle fetch waits
        # (brokers such as Tansu hold even a fetch that has data for part of it).
        fetch_max_wait_ms=20,
        **kafka_common(settings),
    )


def create_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=2,
        max_batch_size=256 * 1024,
        **kafka_common(settings),
    )


async def start_kafka_client(
    client: AIOKafkaConsumer | AIOKafkaProducer, settings: Settings
) -> None:
    # aiokafka logs its own error before raising; at start-up ours is the one line to show.
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        await client.start()
    except (KafkaError, OSError) as error:
        with contextlib.suppress(Exception):
            await client.stop()
        raise StartupError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {_reason(error)}"
        ) from error
    finally:
        kafka_log.setLevel(level)


def _reason(error: BaseException) -> str:
    cause: BaseException = error
    while cause.__cause__ is not None and not str(cause).strip():
        cause = cause.__cause__
    if isinstance(cause, socket.gaierror):
        return f"unknown host ({cause.strerror})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, asyncio.TimeoutError | TimeoutError):
        return "timed out"
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__
