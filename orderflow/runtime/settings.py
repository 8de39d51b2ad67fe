"""One frozen ``Settings``, read from the environment, validated at start-up.

Flags on the command line override the environment. Errors are :class:`SettingsError`
with a one-line message naming the variable. Secrets (the database password, the SASL
password, a key's pass phrase) never appear in a message or in ``repr(settings)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final

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
    #: Seconds an event that cannot apply yet waits (parked) for the events of its order it
    #: needs before it is dead-lettered; 0 turns parking off.
    park_timeout_s: float = 300.0
    #: Kafka: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    kafka_security_protocol: str = "PLAINTEXT"
    #: Kafka SASL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (required with the SASL protocols).
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    #: Kafka TLS: the CA bundle that signed the brokers' certificates (default: the system's).
    kafka_ssl_cafile: str | None = None
    #: Kafka TLS client certificate (mutual TLS) and its private key.
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_key_password: str | None = field(default=None, repr=False)
    #: PostgreSQL TLS, as libpq's ``sslmode`` (also accepted in DATABASE_URL's query).
    db_sslmode: str | None = None
    #: PostgreSQL TLS: the CA bundle for verify-ca / verify-full (``system``: the system's).
    db_sslrootcert: str | None = None
    #: PostgreSQL TLS client certificate and key (certificate authentication).
    db_sslcert: str | None = None
    db_sslkey: str | None = None
    #: Log lines as ``json`` or ``console``; None: JSON unless stderr is a terminal.
    log_format: str | None = None

    def __post_init__(self) -> None:
        # Spelling is free (sasl_ssl, scram-sha-256, Verify-Full): store the canonical one.
        for name, variable, allowed in _CHOICES:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _choice(variable, value, allowed))
        _check_kafka_security(self)
        _check_database_tls_files(self)

    def __repr__(self) -> str:
        """Like the dataclass repr, with the database password and every secret hidden."""
        shown = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "database_url" and value:
                value = redacted_url_text(value)
            elif not item.repr and value is not None:
                value = "***"
            shown.append(f"{item.name}={value!r}")
        return f"Settings({', '.join(shown)})"

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
        if env.get("ORDERFLOW_PARK_TIMEOUT_S"):
            raw = env["ORDERFLOW_PARK_TIMEOUT_S"]
            try:
                seconds = float(raw)
            except ValueError:
                seconds = math.nan
            if not math.isfinite(seconds) or seconds < 0:
                raise SettingsError(
                    "ORDERFLOW_PARK_TIMEOUT_S must be a number of seconds, 0 or more (0: no "
                    f"parking), got {raw!r}"
                )
            values["park_timeout_s"] = seconds
        if env.get("ORDERFLOW_KAFKA_IDEMPOTENCE"):
            values["kafka_idempotence"] = _boolean(
                "ORDERFLOW_KAFKA_IDEMPOTENCE", env["ORDERFLOW_KAFKA_IDEMPOTENCE"]
            )
        for name, variable in _SECURITY_TEXT.items():
            if env.get(variable):
                values[name] = env[variable]
        values["log_format"] = log_format_from_env(env)
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def require_database(self) -> URL:
        """The database URL for SQLAlchemy's asyncpg dialect, or a ``SettingsError``.

        libpq's TLS parameters (``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``, and
        asyncpg's ``ssl``) are taken out of the query: asyncpg does not understand them as
        keywords. :meth:`database_tls` returns them, merged with ``ORDERFLOW_DB_SSL*``,
        and the engine turns them into an ``ssl.SSLContext``.
        """
        return self.database_tls()[0]

    def database_tls(self) -> tuple[URL, DatabaseTls]:
        """The URL without its TLS parameters, and the TLS settings, checked."""
        if not self.database_url:
            raise SettingsError(
                "DATABASE_URL is not set (e.g. postgresql://user:pass@host:5432/db)"
            )
        url = async_database_url(self.database_url)
        from_url: dict[str, str] = {}
        for name in list(url.query):
            if name in _URL_TLS_PARAMETERS or name.startswith("ssl"):
                raw = url.query[name]
                if not isinstance(raw, str):
                    raise SettingsError(f"DATABASE_URL parameter {name} is given more than once")
                from_url[name] = raw
        unsupported = sorted(set(from_url) - set(_URL_TLS_PARAMETERS))
        if unsupported:
            raise SettingsError(
                f"DATABASE_URL parameter {unsupported[0]} is not supported; "
                f"TLS takes {', '.join(_URL_TLS_PARAMETERS)} (or ORDERFLOW_DB_SSL*)"
            )
        if "ssl" in from_url and "sslmode" in from_url and from_url["ssl"] != from_url["sslmode"]:
            raise SettingsError("DATABASE_URL gives both ssl and sslmode, with different values")
        url_mode = from_url.get("sslmode", from_url.get("ssl"))
        if url_mode is not None:
            url_mode = _choice("DATABASE_URL parameter sslmode", url_mode, DATABASE_SSL_MODES)
        values: dict[str, str | None] = {}
        for parameter, (name, variable) in _DATABASE_TLS.items():
            in_url = url_mode if parameter == "sslmode" else from_url.get(parameter)
            in_env = getattr(self, name)
            if in_url is not None and in_env is not None and in_url != in_env:
                raise SettingsError(
                    f"{variable} is {in_env!r} but DATABASE_URL says {parameter}={in_url}; "
                    "set one of them"
                )
            values[parameter] = in_env if in_env is not None else in_url
        tls = DatabaseTls(
            mode=values["sslmode"],
            root_cert=values["sslrootcert"],
            cert=values["sslcert"],
            key=values["sslkey"],
        )
        _check_database_tls(tls)
        return url.difference_update_query(list(from_url)), tls

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


@dataclass(frozen=True, slots=True)
class DatabaseTls:
    """PostgreSQL TLS as libpq understands it (``sslmode`` and the certificate files)."""

    #: disable, allow, prefer, require, verify-ca or verify-full; None: asyncpg's default
    #: (prefer: TLS when the server offers it, unverified).
    mode: str | None = None
    #: CA bundle (PEM) for verify-ca / verify-full; ``system``: the system's trusted CAs.
    root_cert: str | None = None
    cert: str | None = None
    key: str | None = None


KAFKA_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: Final = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
DATABASE_SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_FORMATS: Final = ("json", "console")
#: The TLS parameters DATABASE_URL's query may carry (libpq's names, and asyncpg's ``ssl``).
_URL_TLS_PARAMETERS: Final = ("sslmode", "ssl", "sslrootcert", "sslcert", "sslkey")
#: URL parameter -> (Settings field, environment variable).
_DATABASE_TLS: Final = {
    "sslmode": ("db_sslmode", "ORDERFLOW_DB_SSLMODE"),
    "sslrootcert": ("db_sslrootcert", "ORDERFLOW_DB_SSLROOTCERT"),
    "sslcert": ("db_sslcert", "ORDERFLOW_DB_SSLCERT"),
    "sslkey": ("db_sslkey", "ORDERFLOW_DB_SSLKEY"),
}
_CHOICES: Final = (
    ("kafka_security_protocol", "KAFKA_SECURITY_PROTOCOL", KAFKA_PROTOCOLS),
    ("kafka_sasl_mechanism", "KAFKA_SASL_MECHANISM", SASL_MECHANISMS),
    ("db_sslmode", "ORDERFLOW_DB_SSLMODE", DATABASE_SSL_MODES),
    ("log_format", "ORDERFLOW_LOG_FORMAT", LOG_FORMATS),
)
_SECURITY_TEXT: Final = {
    "kafka_security_protocol": "KAFKA_SECURITY_PROTOCOL",
    "kafka_sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "kafka_sasl_username": "KAFKA_SASL_USERNAME",
    "kafka_sasl_password": "KAFKA_SASL_PASSWORD",
    "kafka_ssl_cafile": "KAFKA_SSL_CAFILE",
    "kafka_ssl_certfile": "KAFKA_SSL_CERTFILE",
    "kafka_ssl_keyfile": "KAFKA_SSL_KEYFILE",
    "kafka_ssl_key_password": "KAFKA_SSL_KEY_PASSWORD",
    **{name: variable for name, variable in _DATABASE_TLS.values()},
}

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


def _choice(variable: str, raw: str, allowed: tuple[str, ...]) -> str:
    """``raw`` as one of ``allowed`` (case-insensitive), or a ``SettingsError`` listing them."""
    for choice in allowed:
        if raw.strip().lower() == choice.lower():
            return choice
    raise SettingsError(f"{variable} must be one of {', '.join(allowed)}; got {raw!r}")


def log_format_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``ORDERFLOW_LOG_FORMAT``: ``json``, ``console``, or None (unset: decided by stderr)."""
    env = os.environ if environ is None else environ
    raw = env.get("ORDERFLOW_LOG_FORMAT")
    return _choice("ORDERFLOW_LOG_FORMAT", raw, LOG_FORMATS) if raw else None


def _check_kafka_security(settings: Settings) -> None:
    """Combinations that would silently ignore a credential or leak it are refused."""
    protocol = settings.kafka_security_protocol
    sasl = protocol.startswith("SASL_")
    tls = protocol.endswith("SSL")
    sasl_values = {
        "KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "KAFKA_SASL_USERNAME": settings.kafka_sasl_username,
        "KAFKA_SASL_PASSWORD": settings.kafka_sasl_password,
    }
    if not sasl:
        for variable, value in sasl_values.items():
            if value is not None:
                raise SettingsError(
                    f"{variable} is set but KAFKA_SECURITY_PROTOCOL is {protocol}; "
                    "use SASL_SSL (or SASL_PLAINTEXT) for SASL"
                )
    else:
        for variable, value in sasl_values.items():
            if not value:
                raise SettingsError(
                    f"{variable} must be set with KAFKA_SECURITY_PROTOCOL={protocol}"
                    + (f" ({', '.join(SASL_MECHANISMS)})" if variable.endswith("MECHANISM") else "")
                )
    files = {
        "KAFKA_SSL_CAFILE": settings.kafka_ssl_cafile,
        "KAFKA_SSL_CERTFILE": settings.kafka_ssl_certfile,
        "KAFKA_SSL_KEYFILE": settings.kafka_ssl_keyfile,
        "KAFKA_SSL_KEY_PASSWORD": settings.kafka_ssl_key_password,
    }
    for variable, value in files.items():
        if value is None:
            continue
        if not tls:
            raise SettingsError(
                f"{variable} is set but KAFKA_SECURITY_PROTOCOL is {protocol}; "
                "use SSL (or SASL_SSL) for TLS"
            )
        if not variable.endswith("PASSWORD"):
            _readable_file(variable, value)
    if settings.kafka_ssl_certfile is None:
        for variable in ("KAFKA_SSL_KEYFILE", "KAFKA_SSL_KEY_PASSWORD"):
            if files[variable] is not None:
                raise SettingsError(f"{variable} is set without KAFKA_SSL_CERTFILE")


def _check_database_tls_files(settings: Settings) -> None:
    for name, variable in _DATABASE_TLS.values():
        value = getattr(settings, name)
        if name != "db_sslmode" and value is not None and value != "system":
            _readable_file(variable, value)


def _check_database_tls(tls: DatabaseTls) -> None:
    where = {
        "sslrootcert": "ORDERFLOW_DB_SSLROOTCERT / sslrootcert",
        "sslcert": "ORDERFLOW_DB_SSLCERT / sslcert",
        "sslkey": "ORDERFLOW_DB_SSLKEY / sslkey",
    }
    for parameter, value in (
        ("sslrootcert", tls.root_cert),
        ("sslcert", tls.cert),
        ("sslkey", tls.key),
    ):
        if value is not None and not (parameter == "sslrootcert" and value == "system"):
            _readable_file(where[parameter], value)
    if tls.cert is not None and tls.mode in {None, "disable", "allow", "prefer"}:
        raise SettingsError(
            f"{where['sslcert']} needs sslmode require, verify-ca or verify-full "
            f"(ORDERFLOW_DB_SSLMODE), not {tls.mode or 'the default (prefer)'}"
        )
    if tls.key is not None and tls.cert is None:
        raise SettingsError(f"{where['sslkey']} is set without a certificate (sslcert)")
    if tls.cert == "system":
        raise SettingsError(f"{where['sslcert']} must name a file")


def _readable_file(variable: str, path: str) -> None:
    if not os.path.isfile(path):
        raise SettingsError(f"{variable} names {path!r}, which is not a file")
    if not os.access(path, os.R_OK):
        raise SettingsError(f"{variable} names {path!r}, which this user cannot read")


def async_database_url(raw: str) -> URL:
    """Accept ``postgresql://`` and ``postgresql+asyncpg://`` (the contract) and use asyncpg."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        # (A bad port is a ValueError; its text would not help, and must not echo the URL.)
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


#: Query parameters that carry a secret (libpq's ``password``, ``sslpassword``).
_SECRET_QUERY: Final = ("password", "sslpassword")


def redacted(url: URL) -> str:
    """The URL for messages and logs: never the password (in the user part or the query)."""
    hidden = {name: "***" for name in _SECRET_QUERY if name in url.query}
    if hidden:
        url = url.update_query_dict(hidden)
    # The query's values are percent-encoded when rendered: keep the marker readable.
    return url.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def redacted_url_text(raw: str) -> str:
    """``raw`` (any URL text) for messages: the password replaced by ``***``, or the whole
    URL hidden when it does not even parse (so a typo can't echo a password)."""
    try:
        return redacted(make_url(raw))
    except (ArgumentError, ValueError):
        return "<unparsable URL>"
