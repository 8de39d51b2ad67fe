"""Settings.from_env and the database URL: the contract's defaults and one-line errors."""

import dataclasses
import os
from pathlib import Path

import pytest

from orderflow.runtime.settings import Settings, SettingsError, async_database_url, redacted

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
    url = async_database_url("postgresql://u@host/db?ssl=require&application_name=x")
    assert url.drivername == "postgresql+asyncpg"
    assert url.query == {"ssl": "require", "application_name": "x"}


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


# --- inbound size limit -------------------------------------------------------------------------


def test_max_message_bytes_from_the_environment() -> None:
    assert Settings.from_env({}).max_message_bytes == 1_048_576
    assert settings(ORDERFLOW_MAX_MESSAGE_BYTES="2000000").max_message_bytes == 2_000_000


@pytest.mark.parametrize("raw", ["1MiB", "0", "-1", "1.5"])
def test_bad_max_message_bytes_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(ORDERFLOW_MAX_MESSAGE_BYTES=raw)
    assert_one_line_naming(excinfo.value, "ORDERFLOW_MAX_MESSAGE_BYTES")


def test_park_timeout_from_the_environment() -> None:
    assert Settings.from_env({}).park_timeout_s == 300.0
    assert settings(ORDERFLOW_PARK_TIMEOUT_S="2.5").park_timeout_s == 2.5
    assert settings(ORDERFLOW_PARK_TIMEOUT_S="0").park_timeout_s == 0.0  # parking off


@pytest.mark.parametrize("raw", ["5m", "-1", "nan", "inf"])
def test_bad_park_timeout_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(ORDERFLOW_PARK_TIMEOUT_S=raw)
    assert_one_line_naming(excinfo.value, "ORDERFLOW_PARK_TIMEOUT_S")


# --- secrets never shown ---------------------------------------------------------------------


def sasl(**environ: str) -> dict[str, str]:
    return {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "orderflow",
        "KAFKA_SASL_PASSWORD": "sasl-s3cret",
        **environ,
    }


def test_repr_and_str_hide_every_secret(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not checked here")
    s = settings(
        DATABASE_URL=f"{DB}?password=query-s3cret",
        KAFKA_SSL_CERTFILE=str(cert),
        KAFKA_SSL_KEY_PASSWORD="key-s3cret",
        **sasl(),
    )
    for text in (repr(s), str(s), f"{s}", repr([s])):
        for secret in ("s3cret-pw", "sasl-s3cret", "key-s3cret", "query-s3cret"):
            assert secret not in text
        assert "db.example" in text  # the rest is still there to debug with
        assert "SCRAM-SHA-512" in text
    assert s.kafka_sasl_password == "sasl-s3cret"  # the value itself is intact


def test_repr_of_an_unparsable_url_shows_none_of_it() -> None:
    s = Settings(
        database_url="postgresql://u:pw-s3cret@host:notaport/db", kafka_bootstrap_servers=None
    )
    assert "pw-s3cret" not in repr(s)


def test_a_bad_port_is_one_line_without_the_password() -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(DATABASE_URL="postgresql://u:pw-s3cret@host:notaport/db").require_database()
    assert_one_line_naming(excinfo.value, "DATABASE_URL")
    assert "pw-s3cret" not in str(excinfo.value)


def test_redacted_hides_a_password_in_the_query() -> None:
    url = async_database_url("postgresql://u@host/db?password=q-s3cret&application_name=x")
    text = redacted(url)
    assert "q-s3cret" not in text
    assert "password=***" in text
    assert "application_name=x" in text


# --- Kafka security ---------------------------------------------------------------------------


def test_kafka_security_defaults_to_plaintext() -> None:
    s = settings()
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.kafka_sasl_mechanism is None


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "scram-sha-256"])
@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT", "sasl_ssl"])
def test_sasl_settings(protocol: str, mechanism: str) -> None:
    s = Settings.from_env(
        {**BASE, **sasl(KAFKA_SECURITY_PROTOCOL=protocol, KAFKA_SASL_MECHANISM=mechanism)}
    )
    assert s.kafka_security_protocol == protocol.upper()
    assert s.kafka_sasl_mechanism == mechanism.upper()
    assert (s.kafka_sasl_username, s.kafka_sasl_password) == ("orderflow", "sasl-s3cret")


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL"),
        ("KAFKA_SASL_MECHANISM", "GSSAPI"),
        ("KAFKA_SASL_MECHANISM", "SCRAM"),
    ],
)
def test_unknown_protocol_or_mechanism_names_the_variable(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        Settings.from_env({**BASE, **sasl(**{variable: raw})})
    assert_one_line_naming(excinfo.value, variable)
    assert repr(raw) in str(excinfo.value)


@pytest.mark.parametrize(
    "missing", ["KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"]
)
def test_sasl_needs_mechanism_username_and_password(missing: str) -> None:
    environ = {**BASE, **sasl()}
    del environ[missing]
    with pytest.raises(SettingsError) as excinfo:
        Settings.from_env(environ)
    assert_one_line_naming(excinfo.value, missing)
    assert "SASL_SSL" in str(excinfo.value)
    assert "sasl-s3cret" not in str(excinfo.value)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
@pytest.mark.parametrize(
    "variable", ["KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"]
)
def test_sasl_settings_without_a_sasl_protocol_are_refused(protocol: str, variable: str) -> None:
    """A credential that would be silently ignored is a mistake worth stopping for."""
    values = {"KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SASL_USERNAME": "u"}
    values["KAFKA_SASL_PASSWORD"] = "sasl-s3cret"
    with pytest.raises(SettingsError) as excinfo:
        settings(KAFKA_SECURITY_PROTOCOL=protocol, **{variable: values[variable]})
    assert_one_line_naming(excinfo.value, variable)
    assert "KAFKA_SECURITY_PROTOCOL" in str(excinfo.value)
    assert "sasl-s3cret" not in str(excinfo.value)


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_tls_files_are_taken_with_a_tls_protocol(protocol: str, tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("pem")
    environ = sasl() if protocol == "SASL_SSL" else {"KAFKA_SECURITY_PROTOCOL": protocol}
    s = settings(
        **environ,
        KAFKA_SSL_CAFILE=str(files["ca"]),
        KAFKA_SSL_CERTFILE=str(files["cert"]),
        KAFKA_SSL_KEYFILE=str(files["key"]),
    )
    assert s.kafka_ssl_cafile == str(files["ca"])
    assert (s.kafka_ssl_certfile, s.kafka_ssl_keyfile) == (str(files["cert"]), str(files["key"]))


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SASL_PLAINTEXT"])
def test_tls_files_without_a_tls_protocol_are_refused(protocol: str, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    environ = sasl(KAFKA_SECURITY_PROTOCOL=protocol) if protocol.startswith("SASL") else {}
    environ["KAFKA_SECURITY_PROTOCOL"] = protocol
    with pytest.raises(SettingsError) as excinfo:
        settings(**environ, KAFKA_SSL_CAFILE=str(ca))
    assert_one_line_naming(excinfo.value, "KAFKA_SSL_CAFILE")
    assert "KAFKA_SECURITY_PROTOCOL" in str(excinfo.value)


@pytest.mark.parametrize("variable", ["KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE"])
def test_a_missing_tls_file_names_the_variable(variable: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(SettingsError) as excinfo:
        settings(KAFKA_SECURITY_PROTOCOL="SSL", **{variable: str(missing)})
    assert_one_line_naming(excinfo.value, variable)
    assert str(missing) in str(excinfo.value)


def test_a_directory_is_not_a_tls_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=str(tmp_path))
    assert_one_line_naming(excinfo.value, "KAFKA_SSL_CAFILE")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_tls_file_names_the_variable(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    ca.chmod(0)
    with pytest.raises(SettingsError) as excinfo:
        settings(KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CAFILE=str(ca))
    assert_one_line_naming(excinfo.value, "KAFKA_SSL_CAFILE")
    assert "cannot read" in str(excinfo.value)


@pytest.mark.parametrize("variable", ["KAFKA_SSL_KEYFILE", "KAFKA_SSL_KEY_PASSWORD"])
def test_a_key_without_a_certificate_is_refused(variable: str, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("pem")
    value = str(key) if variable == "KAFKA_SSL_KEYFILE" else "key-s3cret"
    with pytest.raises(SettingsError) as excinfo:
        settings(KAFKA_SECURITY_PROTOCOL="SSL", **{variable: value})
    assert_one_line_naming(excinfo.value, variable)
    assert "KAFKA_SSL_CERTFILE" in str(excinfo.value)
    assert "key-s3cret" not in str(excinfo.value)


# --- PostgreSQL TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
)
@pytest.mark.parametrize("parameter", ["sslmode", "ssl"])
def test_sslmode_in_the_url_is_taken_out_of_it(mode: str, parameter: str) -> None:
    url, tls = settings(DATABASE_URL=f"{DB}?{parameter}={mode}&application_name=of").database_tls()
    assert tls.mode == mode
    assert dict(url.query) == {"application_name": "of"}  # asyncpg never sees sslmode
    assert settings(DATABASE_URL=f"{DB}?{parameter}={mode}").require_database().query == {}


def test_sslmode_from_the_environment() -> None:
    s = settings(ORDERFLOW_DB_SSLMODE="Verify-Full")
    assert s.db_sslmode == "verify-full"
    assert s.database_tls()[1].mode == "verify-full"


def test_no_sslmode_leaves_the_driver_default() -> None:
    url, tls = settings().database_tls()
    assert tls.mode is None
    assert tls.root_cert is None
    assert url.query == {}


def test_the_same_sslmode_in_both_places_is_fine() -> None:
    s = settings(DATABASE_URL=f"{DB}?sslmode=require", ORDERFLOW_DB_SSLMODE="require")
    assert s.database_tls()[1].mode == "require"


def test_conflicting_sslmodes_name_both_places() -> None:
    s = settings(DATABASE_URL=f"{DB}?sslmode=disable", ORDERFLOW_DB_SSLMODE="verify-full")
    with pytest.raises(SettingsError) as excinfo:
        s.database_tls()
    assert_one_line_naming(excinfo.value, "ORDERFLOW_DB_SSLMODE")
    assert "DATABASE_URL" in str(excinfo.value)
    assert "s3cret-pw" not in str(excinfo.value)


@pytest.mark.parametrize("raw", ["on", "true", "verify_full", "strict"])
def test_bad_sslmode_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(ORDERFLOW_DB_SSLMODE=raw)
    assert_one_line_naming(excinfo.value, "ORDERFLOW_DB_SSLMODE")
    assert "verify-full" in str(excinfo.value)  # lists what is allowed


def test_bad_sslmode_in_the_url_names_it() -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(DATABASE_URL=f"{DB}?sslmode=sometimes").require_database()
    assert_one_line_naming(excinfo.value, "DATABASE_URL parameter sslmode")
    assert "s3cret-pw" not in str(excinfo.value)


@pytest.mark.parametrize("parameter", ["sslcrl", "sslpassword", "sslnegotiation"])
def test_unsupported_tls_parameters_are_named(parameter: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(DATABASE_URL=f"{DB}?{parameter}=x").require_database()
    assert_one_line_naming(excinfo.value, parameter)
    assert "sslrootcert" in str(excinfo.value)  # says what is supported


def test_root_certificate_from_the_url_or_the_environment(tmp_path: Path) -> None:
    ca = tmp_path / "root.crt"
    ca.write_text("pem")
    from_url = settings(DATABASE_URL=f"{DB}?sslmode=verify-full&sslrootcert={ca}")
    assert from_url.database_tls()[1].root_cert == str(ca)
    from_env = settings(ORDERFLOW_DB_SSLMODE="verify-ca", ORDERFLOW_DB_SSLROOTCERT=str(ca))
    assert from_env.database_tls()[1].root_cert == str(ca)
    assert from_env.database_tls()[1].mode == "verify-ca"


def test_system_root_certificates_need_no_file() -> None:
    tls = settings(ORDERFLOW_DB_SSLMODE="verify-full", ORDERFLOW_DB_SSLROOTCERT="system")
    assert tls.database_tls()[1].root_cert == "system"


def test_a_missing_root_certificate_names_where_it_came_from(tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    with pytest.raises(SettingsError) as excinfo:
        settings(ORDERFLOW_DB_SSLROOTCERT=str(missing))
    assert_one_line_naming(excinfo.value, "ORDERFLOW_DB_SSLROOTCERT")
    with pytest.raises(SettingsError) as excinfo:
        settings(DATABASE_URL=f"{DB}?sslmode=verify-ca&sslrootcert={missing}").database_tls()
    assert_one_line_naming(excinfo.value, "sslrootcert")


@pytest.mark.parametrize("mode", ["prefer", "allow", "disable"])
def test_a_client_certificate_needs_tls_required(mode: str, tmp_path: Path) -> None:
    cert = tmp_path / "client.crt"
    cert.write_text("pem")
    s = settings(ORDERFLOW_DB_SSLMODE=mode, ORDERFLOW_DB_SSLCERT=str(cert))
    with pytest.raises(SettingsError) as excinfo:
        s.database_tls()
    assert_one_line_naming(excinfo.value, "ORDERFLOW_DB_SSLCERT")
    assert "require" in str(excinfo.value)


# --- log format -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [("json", "json"), ("CONSOLE", "console")])
def test_log_format(raw: str, expected: str) -> None:
    assert settings(ORDERFLOW_LOG_FORMAT=raw).log_format == expected
    assert settings().log_format is None  # decided by whether stderr is a terminal


def test_bad_log_format_names_the_variable() -> None:
    with pytest.raises(SettingsError) as excinfo:
        settings(ORDERFLOW_LOG_FORMAT="xml")
    assert_one_line_naming(excinfo.value, "ORDERFLOW_LOG_FORMAT")
