"""Settings.from_env and the database URL: the contract's defaults and one-line errors."""

import dataclasses

import pytest

from orderflow.settings import Settings, SettingsError, async_database_url, redacted

DB = "postgresql://orderflow:s3cret-pw@db.example:5432/orders"
KAFKA = "kafka-1:9092,kafka-2:9092"
BASE = {"DATABASE_URL": DB, "KAFKA_BOOTSTRAP_SERVERS": KAFKA}


def settings(**environ: str) -> Settings:
    return Settings.from_env({**BASE, **environ})


def assert_one_line_naming(error: SettingsError, variable: str) -> None:
    message = str(error)
    assert variable in message
    assert "\n" not in message
    assert message.strip() == message


# --- defaults and overrides -------------------------------------------------------------------


def test_contract_defaults() -> None:
    s = Settings.from_env({})
    assert s.inbound_topic == "orders.events"
    assert s.outbound_topic == "orders.updates"
    assert s.dlq_topic == "orders.events.dlq"
    assert s.consumer_group == "orderflow"
    assert s.database_url is None
    assert s.kafka_bootstrap_servers is None


def test_defaults_are_sane() -> None:
    s = Settings.from_env({})
    assert s.db_pool_size >= 1
    assert s.consumer_batch_size >= 1
    assert s.relay_batch_size >= 1
    assert s.outbox_retention_hours > 0
    assert s.kafka_idempotence is True


def test_explicit_environ_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://leak@elsewhere/db")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "leak:9092")
    monkeypatch.setenv("ORDERFLOW_INBOUND_TOPIC", "leaked.topic")
    s = Settings.from_env({})
    assert s.database_url is None
    assert s.kafka_bootstrap_servers is None
    assert s.inbound_topic == "orders.events"


def test_environment_overrides() -> None:
    s = settings(
        ORDERFLOW_INBOUND_TOPIC="in",
        ORDERFLOW_OUTBOUND_TOPIC="out",
        ORDERFLOW_DLQ_TOPIC="dead",
        ORDERFLOW_CONSUMER_GROUP="group-2",
        ORDERFLOW_DB_POOL_SIZE="3",
        ORDERFLOW_CONSUMER_BATCH_SIZE="50",
        ORDERFLOW_RELAY_BATCH_SIZE="70",
        ORDERFLOW_OUTBOX_RETENTION_HOURS="1.5",
        ORDERFLOW_KAFKA_IDEMPOTENCE="false",
    )
    assert s.database_url == DB
    assert s.kafka_bootstrap_servers == KAFKA
    assert (s.inbound_topic, s.outbound_topic, s.dlq_topic) == ("in", "out", "dead")
    assert s.consumer_group == "group-2"
    assert (s.db_pool_size, s.consumer_batch_size, s.relay_batch_size) == (3, 50, 70)
    assert s.outbox_retention_hours == 1.5
    assert s.kafka_idempotence is False


def test_empty_variables_mean_unset() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "",
            "KAFKA_BOOTSTRAP_SERVERS": "",
            "ORDERFLOW_INBOUND_TOPIC": "",
            "ORDERFLOW_DB_POOL_SIZE": "",
            "ORDERFLOW_KAFKA_IDEMPOTENCE": "",
        }
    )
    assert s.database_url is None
    assert s.kafka_bootstrap_servers is None
    assert s.inbound_topic == "orders.events"
    assert s.db_pool_size == Settings.from_env({}).db_pool_size
    assert s.kafka_idempotence is True


def test_flags_override_the_environment() -> None:
    s = Settings.from_env(
        {**BASE, "ORDERFLOW_INBOUND_TOPIC": "from-env"},
        inbound_topic="from-flag",
        consumer_group=None,  # a flag not given
    )
    assert s.inbound_topic == "from-flag"
    assert s.consumer_group == "orderflow"


def test_with_overrides_skips_none_and_keeps_the_original() -> None:
    s = settings()
    changed = s.with_overrides(dlq_topic="other.dlq", outbound_topic=None)
    assert changed.dlq_topic == "other.dlq"
    assert changed.outbound_topic == "orders.updates"
    assert s.dlq_topic == "orders.events.dlq"


def test_settings_are_frozen() -> None:
    s = settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.inbound_topic = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True), ("true", True), ("TRUE", True), ("yes", True), (" on ", True),
        ("0", False), ("false", False), ("False", False), ("no", False), ("off", False),
    ],
)  # fmt: skip
def test_booleans(raw: str, expected: bool) -> None:
    assert settings(ORDERFLOW_KAFKA_IDEMPOTENCE=raw).kafka_idempotence is expected


# --- bad values name their variable ----------------------------------------------------------


@pytest.mark.parametrize(
    "variable",
    ["ORDERFLOW_DB_POOL_SIZE", "ORDERFLOW_CONSUMER_BATCH_SIZE", "ORDERFLOW_RELAY_BATCH_SIZE"],
)
@pytest.mark.parametrize("raw", ["abc", "1.5", "eight", "0", "-3", "1e3"])
def test_bad_integers_name_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(**{variable: raw})
    assert_one_line_naming(excinfo.value, variable)


@pytest.mark.parametrize("raw", ["maybe", "2", "enabled", "tru"])
def test_bad_boolean_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(ORDERFLOW_KAFKA_IDEMPOTENCE=raw)
    assert_one_line_naming(excinfo.value, "ORDERFLOW_KAFKA_IDEMPOTENCE")
    assert repr(raw) in str(excinfo.value)


@pytest.mark.parametrize("raw", ["a week", "7d", "1,5"])
def test_bad_retention_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(ORDERFLOW_OUTBOX_RETENTION_HOURS=raw)
    assert_one_line_naming(excinfo.value, "ORDERFLOW_OUTBOX_RETENTION_HOURS")


@pytest.mark.parametrize("raw", ["nan", "inf", "-1"])
def test_retention_must_be_a_finite_positive_number(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(ORDERFLOW_OUTBOX_RETENTION_HOURS=raw)
    assert_one_line_naming(excinfo.value, "ORDERFLOW_OUTBOX_RETENTION_HOURS")


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


# --- required services ------------------------------------------------------------------------


def test_missing_database_url_names_it() -> None:
    s = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": KAFKA})
    with pytest.raises(SettingsError) as excinfo:
        s.require_database()
    assert_one_line_naming(excinfo.value, "DATABASE_URL")


def test_missing_kafka_names_it() -> None:
    s = Settings.from_env({"DATABASE_URL": DB})
    with pytest.raises(SettingsError) as excinfo:
        s.require_kafka()
    assert_one_line_naming(excinfo.value, "KAFKA_BOOTSTRAP_SERVERS")


@pytest.mark.parametrize(
    ("raw", "servers"),
    [
        ("localhost:9092", ["localhost:9092"]),
        ("a:1, b:2 ,c:3", ["a:1", "b:2", "c:3"]),
        ("a:1,,b:2,", ["a:1", "b:2"]),
        ("[::1]:9092", ["[::1]:9092"]),
    ],
)
def test_kafka_servers_are_split(raw: str, servers: list[str]) -> None:
    assert settings(KAFKA_BOOTSTRAP_SERVERS=raw).require_kafka() == servers


@pytest.mark.parametrize("raw", ["localhost", "localhost:", ":9092", "a:1,b", "host:port"])
def test_bad_kafka_servers_name_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(KAFKA_BOOTSTRAP_SERVERS=raw).require_kafka()
    assert_one_line_naming(excinfo.value, "KAFKA_BOOTSTRAP_SERVERS")


@pytest.mark.parametrize("raw", [",", " , ,"])
def test_kafka_servers_without_any_server_name_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(KAFKA_BOOTSTRAP_SERVERS=raw).require_kafka()
    assert_one_line_naming(excinfo.value, "KAFKA_BOOTSTRAP_SERVERS")


# --- the database URL -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://u:pw@host:5432/db",
        "postgresql+asyncpg://u:pw@host:5432/db",
        "postgres://u:pw@host:5432/db",
    ],
)
def test_postgres_urls_are_normalised_to_asyncpg(raw: str) -> None:
    url = async_database_url(raw)
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "u", "pw", "host", 5432, "db",
    )  # fmt: skip
    assert settings(DATABASE_URL=raw).require_database() == url


def test_query_parameters_are_kept() -> None:
    url = async_database_url("postgresql://u@host/db?ssl=require")
    assert url.drivername == "postgresql+asyncpg"
    assert url.query == {"ssl": "require"}


@pytest.mark.parametrize(
    "raw",
    [
        "mysql://u:pw@host/db",
        "sqlite:///orders.db",
        "postgresql+psycopg2://u:pw@host/db",
        "http://host/db",
        "garbage",
        "not a url",
        "://",
    ],
)
def test_other_urls_are_refused_naming_database_url(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        async_database_url(raw)
    assert_one_line_naming(excinfo.value, "DATABASE_URL")
    with pytest.raises(SettingsError) as excinfo:
        settings(DATABASE_URL=raw).require_database()
    assert_one_line_naming(excinfo.value, "DATABASE_URL")


def test_refusal_does_not_leak_the_password() -> None:
    with pytest.raises(SettingsError) as excinfo:
        async_database_url("mysql://u:hunter2-secret@host/db")
    assert "hunter2-secret" not in str(excinfo.value)


def test_redacted_hides_the_password() -> None:
    url = settings().require_database()
    text = redacted(url)
    assert "s3cret-pw" not in text
    assert "***" in text
    assert text == "postgresql+asyncpg://orderflow:***@db.example:5432/orders"
    assert url.password == "s3cret-pw"  # the URL itself still works


def test_redacted_without_a_password() -> None:
    assert redacted(async_database_url("postgresql://host/db")) == "postgresql+asyncpg://host/db"
