"""One frozen ``Settings``, read from the environment, validated at start-up.

Flags on the command line override the environment. Errors are :class:`SettingsError`
with a one-line message naming the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError


class SettingsError(ValueError):
    """A bad or missing setting; the message is one line that names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None
    kafka_bootstrap_servers: str | None
    inbound_topic: str = "orders.events"
    outbound_topic: str = "orders.updates"
    dlq_topic: str = "orders.events.dlq"
    consumer_group: str = "orderflow"
    #: Connections in the consumer's pool; also the number of partitions applied at once.
    db_pool_size: int = 8
    #: Most records per poll (each partition's share is one transaction).
    consumer_batch_size: int = 500
    relay_batch_size: int = 500
    #: Hours a published outbox row is kept (for resend) before it is pruned.
    outbox_retention_hours: float = 168.0
    #: Idempotent Kafka producer (recommended on Apache Kafka; Tansu does not support it).
    kafka_idempotence: bool = True
    #: A group member silent for this long is declared dead and its partitions move.
    #: (Tansu also holds every group join for half of it.)
    kafka_session_timeout_ms: int = 10000
    #: Port of the HTTP endpoint with /metrics, /healthz and /readyz (None: not served).
    metrics_port: int | None = None
    #: Inbound messages larger than this are dead-lettered (schema_violation), not parsed.
    max_message_bytes: int = 1_048_576

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "database_url": env.get("DATABASE_URL") or None,
            "kafka_bootstrap_servers": env.get("KAFKA_BOOTSTRAP_SERVERS") or None,
        }
        for name, variable in _TEXT.items():
            if env.get(variable):
                values[name] = env[variable]
        for name, variable in _INTEGERS.items():
            if env.get(variable):
                values[name] = _positive_int(variable, env[variable])
        if env.get("ORDERFLOW_OUTBOX_RETENTION_HOURS"):
            raw = env["ORDERFLOW_OUTBOX_RETENTION_HOURS"]
            try:
                hours = float(raw)
            except ValueError:
                hours = math.nan
            if not math.isfinite(hours) or hours <= 0:
                raise SettingsError(
                    "ORDERFLOW_OUTBOX_RETENTION_HOURS must be a positive number of hours, "
                    f"got {raw!r}"
                )
            values["outbox_retention_hours"] = hours
        if env.get("ORDERFLOW_KAFKA_IDEMPOTENCE"):
            values["kafka_idempotence"] = _boolean(
                "ORDERFLOW_KAFKA_IDEMPOTENCE", env["ORDERFLOW_KAFKA_IDEMPOTENCE"]
            )
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def require_database(self) -> URL:
        """The database URL for SQLAlchemy's asyncpg dialect, or a ``SettingsError``."""
        if not self.database_url:
            raise SettingsError(
                "DATABASE_URL is not set (e.g. postgresql://user:pass@host:5432/db)"
            )
        return async_database_url(self.database_url)

    def require_kafka(self) -> list[str]:
        if not self.kafka_bootstrap_servers:
            raise SettingsError("KAFKA_BOOTSTRAP_SERVERS is not set (e.g. localhost:9092)")
        servers = [s.strip() for s in self.kafka_bootstrap_servers.split(",") if s.strip()]
        if not servers:
            raise SettingsError("KAFKA_BOOTSTRAP_SERVERS names no server (e.g. localhost:9092)")
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit():
                raise SettingsError(f"KAFKA_BOOTSTRAP_SERVERS entry {server!r} is not host:port")
        return servers


_TEXT = {
    "inbound_topic": "ORDERFLOW_INBOUND_TOPIC",
    "outbound_topic": "ORDERFLOW_OUTBOUND_TOPIC",
    "dlq_topic": "ORDERFLOW_DLQ_TOPIC",
    "consumer_group": "ORDERFLOW_CONSUMER_GROUP",
}
_INTEGERS = {
    "db_pool_size": "ORDERFLOW_DB_POOL_SIZE",
    "consumer_batch_size": "ORDERFLOW_CONSUMER_BATCH_SIZE",
    "relay_batch_size": "ORDERFLOW_RELAY_BATCH_SIZE",
    "kafka_session_timeout_ms": "ORDERFLOW_KAFKA_SESSION_TIMEOUT_MS",
    "metrics_port": "ORDERFLOW_METRICS_PORT",
    "max_message_bytes": "ORDERFLOW_MAX_MESSAGE_BYTES",
}


def _positive_int(variable: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{variable} must be a whole number, got {raw!r}") from None
    if value < 1:
        raise SettingsError(f"{variable} must be at least 1, got {value}")
    return value


def _boolean(variable: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{variable} must be true or false, got {raw!r}")


def async_database_url(raw: str) -> URL:
    """Accept ``postgresql://`` and ``postgresql+asyncpg://`` (the contract) and use asyncpg."""
    try:
        url = make_url(raw)
    except ArgumentError:
        raise SettingsError("DATABASE_URL is not a valid URL (expected postgresql://...)") from None
    if url.get_backend_name() not in {"postgresql", "postgres"}:
        raise SettingsError(
            f"DATABASE_URL must be a postgresql:// URL, got a {url.get_backend_name()}:// one"
        )
    if url.drivername not in {"postgresql", "postgres", "postgresql+asyncpg"}:
        raise SettingsError(
            f"DATABASE_URL driver {url.drivername!r} is not supported; "
            "use postgresql:// or postgresql+asyncpg://"
        )
    return url.set(drivername="postgresql+asyncpg")


def redacted(url: URL) -> str:
    """The URL for messages and logs: never the password."""
    return url.render_as_string(hide_password=True)
