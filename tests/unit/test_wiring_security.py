"""TLS and SASL as the clients get them: the Kafka options every client takes, and the
``ssl.SSLContext`` the database engine gets for each ``sslmode`` — checked against a real
TLS handshake with certificates made for the test."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from orderflow.runtime.settings import DatabaseTls, Settings, SettingsError
from orderflow.runtime.wiring import (
    FETCH_MAX_BYTES,
    create_consumer,
    create_engine,
    create_producer,
    database_ssl,
    kafka_common,
    max_partition_fetch_bytes,
)

DB = "postgresql://orderflow:db-s3cret@db.example:5432/orders"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    encrypted_key: Path
    key_password: str = "key-s3cret"


def _openssl(*arguments: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, arguments)], cwd=cwd, check=True, capture_output=True, timeout=60
    )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A CA, a server certificate it signed for localhost / 127.0.0.1, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificates")
    folder = tmp_path_factory.mktemp("tls")
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", *curve, "-keyout", f"{name}.key", "-out", f"{name}.crt",
            "-days", "3650", "-subj", f"/CN=orderflow test {name}", cwd=folder,
        )  # fmt: skip
    _openssl(
        "req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=folder,
    )  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "3650", "-extfile", "san.ext",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "pkey", "-in", "server.key", "-aes256", "-passout", "pass:key-s3cret",
        "-out", "encrypted.key", cwd=folder,
    )  # fmt: skip
    return Certificates(
        ca=folder / "ca.crt",
        other_ca=folder / "other-ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        encrypted_key=folder / "encrypted.key",
    )


@contextlib.asynccontextmanager
async def tls_server(certificates: Certificates) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 presenting the CA-signed localhost certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.server_cert, certificates.server_key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def handshake(context: ssl.SSLContext, port: int, server_hostname: str) -> None:
    """Connect as asyncpg does (TLS to the host it was told), or raise the TLS error."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_hostname),
        10,
    )
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def context_for(tls: DatabaseTls) -> ssl.SSLContext:
    context = database_ssl(tls)
    assert isinstance(context, ssl.SSLContext)
    return context


def ca_subjects(context: ssl.SSLContext) -> list[str]:
    return [
        value
        for certificate in context.get_ca_certs()
        for rdn in certificate["subject"]
        for key, value in rdn
        if key == "commonName"
    ]


# --- PostgreSQL: sslmode -> asyncpg's ssl argument ---------------------------------------------


def test_no_tls_setting_leaves_asyncpgs_default() -> None:
    assert database_ssl(DatabaseTls()) is None


def test_disable_is_no_tls() -> None:
    assert database_ssl(DatabaseTls(mode="disable")) is False


@pytest.mark.parametrize("mode", ["allow", "prefer"])
def test_allow_and_prefer_are_left_to_asyncpg(mode: str) -> None:
    """asyncpg implements the fallback to plaintext; a context would forbid it."""
    assert database_ssl(DatabaseTls(mode=mode)) == mode


def test_require_encrypts_without_checking_the_certificate() -> None:
    context = context_for(DatabaseTls(mode="require"))
    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_require_with_a_ca_file_checks_the_chain_like_libpq(certificates: Certificates) -> None:
    context = context_for(DatabaseTls(mode="require", root_cert=str(certificates.ca)))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is False


def test_verify_ca_checks_the_chain_not_the_host_name(certificates: Certificates) -> None:
    context = context_for(DatabaseTls(mode="verify-ca", root_cert=str(certificates.ca)))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is False
    assert ca_subjects(context) == ["orderflow test ca"]


def test_verify_full_checks_the_chain_and_the_host_name(certificates: Certificates) -> None:
    context = context_for(DatabaseTls(mode="verify-full", root_cert=str(certificates.ca)))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert ca_subjects(context) == ["orderflow test ca"]


@pytest.mark.parametrize("root_cert", [None, "system"])
def test_verify_without_a_ca_file_trusts_the_system(root_cert: str | None) -> None:
    context = context_for(DatabaseTls(mode="verify-full", root_cert=root_cert))
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert "orderflow test ca" not in ca_subjects(context)


async def test_verify_full_accepts_the_right_host_and_refuses_another(
    certificates: Certificates,
) -> None:
    context = context_for(DatabaseTls(mode="verify-full", root_cert=str(certificates.ca)))
    async with tls_server(certificates) as port:
        await handshake(context, port, "localhost")
        with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):
            await handshake(context, port, "db.example")


async def test_verify_ca_accepts_any_host_name_but_not_another_ca(
    certificates: Certificates,
) -> None:
    async with tls_server(certificates) as port:
        await handshake(
            context_for(DatabaseTls(mode="verify-ca", root_cert=str(certificates.ca))),
            port,
            "db.example",
        )
        other = context_for(DatabaseTls(mode="verify-ca", root_cert=str(certificates.other_ca)))
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(other, port, "localhost")


async def test_require_accepts_an_unknown_ca(certificates: Certificates) -> None:
    async with tls_server(certificates) as port:
        await handshake(context_for(DatabaseTls(mode="require")), port, "db.example")


def test_a_ca_file_that_is_no_certificate_is_a_settings_error(tmp_path: Path) -> None:
    junk = tmp_path / "root.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match="ORDERFLOW_DB_SSLROOTCERT") as excinfo:
        database_ssl(DatabaseTls(mode="verify-full", root_cert=str(junk)))
    assert "\n" not in str(excinfo.value)


def test_a_client_certificate_is_loaded(certificates: Certificates) -> None:
    tls = DatabaseTls(
        mode="verify-full",
        root_cert=str(certificates.ca),
        cert=str(certificates.server_cert),
        key=str(certificates.server_key),
    )
    assert isinstance(database_ssl(tls), ssl.SSLContext)


def test_an_encrypted_client_key_fails_at_once_instead_of_prompting(
    certificates: Certificates,
) -> None:
    tls = DatabaseTls(
        mode="require", cert=str(certificates.server_cert), key=str(certificates.encrypted_key)
    )
    with pytest.raises(SettingsError, match="ORDERFLOW_DB_SSLCERT"):
        database_ssl(tls)


async def test_the_engine_gets_the_context_and_a_url_without_tls_parameters(
    certificates: Certificates,
) -> None:
    settings = Settings(
        database_url=f"{DB}?sslmode=verify-full&sslrootcert={certificates.ca}",
        kafka_bootstrap_servers=None,
    )
    engine = create_engine(settings, pool_size=1)
    try:
        assert engine.url.query == {}
        # What SQLAlchemy will hand to asyncpg.connect (nothing is connected here).
        _, arguments = engine.dialect.create_connect_args(engine.url)
        assert "sslmode" not in arguments
        assert "sslrootcert" not in arguments
        assert engine.url.password == "db-s3cret"
        assert "db-s3cret" not in repr(engine.url)
    finally:
        await engine.dispose()


# --- Kafka: one set of options for every client -------------------------------------------------


def kafka_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {"database_url": DB, "kafka_bootstrap_servers": "k1:9093,k2:9093"}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_plaintext_has_no_tls_and_no_sasl() -> None:
    options = kafka_common(kafka_settings())
    assert options["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in options
    assert "sasl_mechanism" not in options
    assert options["bootstrap_servers"] == ["k1:9093", "k2:9093"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_carries_credentials_and_a_verifying_context(
    mechanism: str, certificates: Certificates
) -> None:
    options = kafka_common(
        kafka_settings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism=mechanism,
            kafka_sasl_username="orderflow",
            kafka_sasl_password="sasl-s3cret",
            kafka_ssl_cafile=str(certificates.ca),
        )
    )
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == mechanism
    assert options["sasl_plain_username"] == "orderflow"
    assert options["sasl_plain_password"] == "sasl-s3cret"
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert "orderflow test ca" in ca_subjects(context)


def test_sasl_plaintext_has_no_tls_context() -> None:
    options = kafka_common(
        kafka_settings(
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="SCRAM-SHA-256",
            kafka_sasl_username="u",
            kafka_sasl_password="p",
        )
    )
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert "ssl_context" not in options
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"


def test_ssl_without_a_ca_file_trusts_the_system() -> None:
    context = kafka_common(kafka_settings(kafka_security_protocol="SSL"))["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert "orderflow test ca" not in ca_subjects(context)


async def test_kafka_ssl_context_verifies_the_broker(certificates: Certificates) -> None:
    context = kafka_common(
        kafka_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(certificates.ca))
    )["ssl_context"]
    async with tls_server(certificates) as port:
        await handshake(context, port, "localhost")
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(context, port, "kafka.example")


def test_mutual_tls_with_an_encrypted_key_and_its_password(certificates: Certificates) -> None:
    settings = kafka_settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=str(certificates.ca),
        kafka_ssl_certfile=str(certificates.server_cert),
        kafka_ssl_keyfile=str(certificates.encrypted_key),
        kafka_ssl_key_password=certificates.key_password,
    )
    assert isinstance(kafka_common(settings)["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize("password", [None, "wrong"])
def test_mutual_tls_with_a_missing_or_wrong_key_password_is_one_line(
    password: str | None, certificates: Certificates
) -> None:
    settings = kafka_settings(
        kafka_security_protocol="SSL",
        kafka_ssl_certfile=str(certificates.server_cert),
        kafka_ssl_keyfile=str(certificates.encrypted_key),
        kafka_ssl_key_password=password,
    )
    with pytest.raises(SettingsError, match="KAFKA_SSL_KEY_PASSWORD") as excinfo:
        kafka_common(settings)
    assert "\n" not in str(excinfo.value)
    assert "wrong" not in str(excinfo.value)


def test_a_kafka_ca_file_that_is_no_certificate_is_a_settings_error(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("junk\n")
    with pytest.raises(SettingsError, match="KAFKA_SSL_CAFILE"):
        kafka_common(kafka_settings(kafka_security_protocol="SSL", kafka_ssl_cafile=str(junk)))


async def test_every_client_gets_the_security_options(certificates: Certificates) -> None:
    settings = kafka_settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="orderflow",
        kafka_sasl_password="sasl-s3cret",
        kafka_ssl_cafile=str(certificates.ca),
    )
    consumer = create_consumer(settings)
    producer = create_producer(settings)
    admin = AIOKafkaAdminClient(**kafka_common(settings))  # as orderflow.runtime.topics builds it
    try:
        for client in (consumer._client, producer.client, admin._client):
            assert client._security_protocol == "SASL_SSL"
            assert client._sasl_mechanism == "SCRAM-SHA-512"
            assert client._sasl_plain_username == "orderflow"
            assert client._sasl_plain_password == "sasl-s3cret"
            assert isinstance(client._ssl_context, ssl.SSLContext)
            assert client._ssl_context.check_hostname is True
    finally:
        await consumer.stop()
        await producer.stop()
        await admin.close()


async def test_consumer_fetches_are_bounded_and_fit_a_message_at_the_limit() -> None:
    for limit in (1_000, 1_048_576, 5_000_000):
        settings = kafka_settings(max_message_bytes=limit)
        consumer = create_consumer(settings)
        try:
            per_partition = max_partition_fetch_bytes(settings)
            assert consumer._max_partition_fetch_bytes == per_partition
            assert per_partition > limit  # a record at the limit, with its overhead, fits
            assert consumer._fetch_max_bytes == max(FETCH_MAX_BYTES, per_partition)
        finally:
            await consumer.stop()


async def test_the_producer_can_send_a_dead_letter_larger_than_the_limit() -> None:
    """A dead letter carries the oversized value untouched; the client must not refuse it
    (the broker, which accepted it upstream, judges)."""
    producer = create_producer(kafka_settings())
    try:
        assert producer._max_request_size >= 16 * 1024 * 1024
    finally:
        await producer.stop()
