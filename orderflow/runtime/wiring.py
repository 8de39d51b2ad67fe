"""Creating engines and Kafka clients from ``Settings``, and start-up checks.

Every failure to reach a service at start-up becomes a :class:`StartupError` with one
line that names the service and where it was looked for (never the password).

Every Kafka client (consumer, producer, admin) takes its connection and security options
from :func:`kafka_common`, and every engine its TLS from :func:`database_ssl`: one place
each, so no client can be left talking plaintext by mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from orderflow.runtime.settings import DatabaseTls, Settings, SettingsError, redacted

CONNECT_TIMEOUT_SECONDS = 10.0
#: Room for a record's overhead (headers, key, batch framing) above the value size limit.
_RECORD_OVERHEAD_BYTES: Final = 64 * 1024
#: Most bytes one fetch response may carry over all partitions (aiokafka's default: 50 MiB).
FETCH_MAX_BYTES: Final = 16 * 1024 * 1024
#: Largest request the relay's producer sends. Dead letters carry the original value, and
#: an inbound value may be larger than ``max_message_bytes`` (that is why it is a dead
#: letter): the broker, which accepted it upstream, is the one to judge its size.
PRODUCER_MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024


class StartupError(RuntimeError):
    """A service is unreachable or not ready; the message is the one line to print."""


class ServiceError(RuntimeError):
    """A running service cannot go on until an operator acts; the message is the one line
    to print."""


def create_engine(
    settings: Settings, *, pool_size: int | None = None, pre_ping: bool = True
) -> AsyncEngine:
    """An engine for ``settings``. ``pre_ping=False`` skips the check of each connection
    taken from the pool (three round trips): for callers that retry a transaction that
    fails on a connection the server dropped, as the consumer does."""
    url, tls = settings.database_tls()
    size = pool_size or settings.db_pool_size
    connect_args: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_SECONDS}
    tls_option = database_ssl(tls)
    if tls_option is not None:
        connect_args["ssl"] = tls_option
    return create_async_engine(
        url,
        pool_size=size,
        max_overflow=0,
        pool_pre_ping=pre_ping,
        pool_timeout=30,
        pool_recycle=1800,
        connect_args=connect_args,
        # JSONB (the outbox headers) through orjson rather than the standard library.
        json_serializer=lambda value: orjson.dumps(value).decode(),
        json_deserializer=orjson.loads,
    )


def database_ssl(tls: DatabaseTls) -> ssl.SSLContext | str | bool | None:
    """asyncpg's ``ssl`` argument for libpq-style TLS settings (None: asyncpg's default).

    - ``disable``: no TLS. ``allow`` / ``prefer``: handed to asyncpg as they are (TLS
      without verification when available, plaintext otherwise).
    - ``require``: TLS or no connection; the certificate is not checked unless a CA file
      is given, in which case it is checked like ``verify-ca`` (as libpq does).
    - ``verify-ca``: the server's certificate must chain to the CA file (or, without one
      or with ``system``, to the system's trusted CAs); the host name is not checked.
    - ``verify-full``: as ``verify-ca``, and the certificate must name the host.

    Files are read here, so a bad file is a ``SettingsError`` at start-up.
    """
    if tls.mode is None and tls.cert is None:
        return None
    if tls.mode == "disable":
        return False
    if tls.mode in {"allow", "prefer"}:
        return tls.mode
    verify = tls.mode in {"verify-ca", "verify-full"} or tls.root_cert is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.mode == "verify-full"
    if verify:
        context.verify_mode = ssl.CERT_REQUIRED
        if tls.root_cert is None or tls.root_cert == "system":
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            try:
                context.load_verify_locations(cafile=tls.root_cert)
            except (ssl.SSLError, OSError) as error:
                raise SettingsError(
                    f"ORDERFLOW_DB_SSLROOTCERT / sslrootcert {tls.root_cert!r} holds no usable "
                    f"PEM certificate ({_reason(error)})"
                ) from None
    else:
        context.verify_mode = ssl.CERT_NONE
    if tls.cert is not None:
        try:
            # A pass phrase is never asked for on the terminal: an encrypted key fails here.
            context.load_cert_chain(tls.cert, keyfile=tls.key, password=lambda: b"")
        except (ssl.SSLError, OSError) as error:
            raise SettingsError(
                "ORDERFLOW_DB_SSLCERT / ORDERFLOW_DB_SSLKEY: cannot load the client certificate "
                f"{tls.cert!r} ({_reason(error)}; an encrypted key is not supported)"
            ) from None
    return context


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Every session orderflow opens, the read API's included, comes from here.

    ``expire_on_commit=False``: what a transaction loaded stays readable after its commit
    and after the session closes, without a lazy load (a ``MissingGreenlet`` in async
    code) or a ``DetachedInstanceError``.
    """
    return async_sessionmaker(engine, expire_on_commit=False)


async def check_database(engine: AsyncEngine, *, require_schema: bool = True) -> None:
    """Reach the database and, unless migrating, check the schema is at the newest revision."""
    where = redacted(engine.url)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            if not require_schema:
                return
            from orderflow.runtime.migrate import head_revision

            current = (
                await connection.execute(
                    text(
                        "SELECT version_num FROM alembic_version "
                        "WHERE to_regclass('alembic_version') IS NOT NULL"
                    )
                )
            ).scalar_one_or_none()
    except (TimeoutError, OSError) as error:
        reason = _reason(error)
        if "rejected SSL upgrade" in reason:
            reason = "the server does not support TLS (sslmode is require or stricter)"
        raise StartupError(f"cannot reach PostgreSQL at {where}: {reason}") from error
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
    """The options every Kafka client takes: where the brokers are, timeouts, security."""
    return {
        "bootstrap_servers": settings.require_kafka(),
        "client_id": "orderflow",
        "request_timeout_ms": 15000,
        "retry_backoff_ms": 200,
        "metadata_max_age_ms": 30000,
        **kafka_security(settings),
    }


def kafka_security(settings: Settings) -> dict[str, Any]:
    """aiokafka's security options: protocol, TLS context, SASL mechanism and credentials."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in {"SSL", "SASL_SSL"}:
        options["ssl_context"] = kafka_ssl_context(settings)
    if protocol in {"SASL_PLAINTEXT", "SASL_SSL"}:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password
    return options


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    """Brokers' certificates checked against KAFKA_SSL_CAFILE (or the system's CAs), host
    names checked; a client certificate for mutual TLS when KAFKA_SSL_CERTFILE is set."""
    try:
        context: ssl.SSLContext = create_ssl_context(cafile=settings.kafka_ssl_cafile)
    except (ssl.SSLError, OSError) as error:
        raise SettingsError(
            f"KAFKA_SSL_CAFILE {settings.kafka_ssl_cafile!r} holds no usable PEM certificate "
            f"({_reason(error)})"
        ) from None
    if settings.kafka_ssl_certfile is not None:
        password = (settings.kafka_ssl_key_password or "").encode()
        try:
            # Loaded here rather than through create_ssl_context so that a missing pass
            # phrase fails at once instead of OpenSSL asking for it on the terminal.
            context.load_cert_chain(
                settings.kafka_ssl_certfile,
                keyfile=settings.kafka_ssl_keyfile,
                password=lambda: password,
            )
        except (ssl.SSLError, OSError) as error:
            raise SettingsError(
                f"KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE: cannot load the client certificate "
                f"{settings.kafka_ssl_certfile!r} ({_reason(error)}; "
                "is KAFKA_SSL_KEY_PASSWORD right?)"
            ) from None
    return context


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
        # Memory: one fetch carries at most FETCH_MAX_BYTES, one partition's share at most
        # a record at the size limit (a larger record still comes, alone, and is
        # dead-lettered unparsed).
        max_partition_fetch_bytes=max_partition_fetch_bytes(settings),
        fetch_max_bytes=max(FETCH_MAX_BYTES, max_partition_fetch_bytes(settings)),
        **kafka_common(settings),
    )


def create_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=2,
        max_batch_size=256 * 1024,
        max_request_size=PRODUCER_MAX_REQUEST_BYTES,
        **kafka_common(settings),
    )


def max_partition_fetch_bytes(settings: Settings) -> int:
    """A record whose value is at the size limit fits in one partition's fetch."""
    return max(1024 * 1024, settings.max_message_bytes + _RECORD_OVERHEAD_BYTES)


async def start_kafka_client(
    client: AIOKafkaConsumer | AIOKafkaProducer, settings: Settings
) -> None:
    # aiokafka logs its own error (the useful one: refused, TLS, SASL) and then raises a
    # generic "Unable to bootstrap": at start-up ours is the one line to show, with its
    # error in it.
    kafka_log = logging.getLogger("aiokafka")
    level, propagate = kafka_log.level, kafka_log.propagate
    captured = _LastError()
    kafka_log.addHandler(captured)
    kafka_log.propagate = False
    kafka_log.setLevel(logging.ERROR)
    try:
        await client.start()
    except (KafkaError, OSError) as error:
        with contextlib.suppress(Exception):
            await client.stop()
        reason = _reason(error)
        if captured.last is not None:
            reason = f"{reason} ({captured.last})"
        if "InitProducerId" in reason:
            raise StartupError(
                f"the Kafka broker at {settings.kafka_bootstrap_servers} refused the "
                f"idempotent producer (InitProducerId failed: {_reason(error)}): it does not "
                "support it, or does not allow it to this client; set "
                "ORDERFLOW_KAFKA_IDEMPOTENCE=false for a broker without it"
            ) from error
        raise StartupError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers} "
            f"({settings.kafka_security_protocol}): {reason}"
        ) from error
    finally:
        kafka_log.removeHandler(captured)
        kafka_log.propagate = propagate
        kafka_log.setLevel(level)


class _LastError(logging.Handler):
    """Keeps the last error aiokafka logged, as one short line."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            lines = record.getMessage().strip().splitlines()
            if lines:
                self.last = lines[0][:300]


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
