"""Real ``orderflow`` processes given passwords everywhere (database URL, its query, SASL):
no password is ever written, whether the process fails at start-up or runs and logs (JSON
lines, at DEBUG)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.engine import make_url

from orderflow.runtime.settings import Settings
from tests.e2e.processes import ORDERFLOW, process_env
from tests.events import key, placed
from tests.helpers import TestEnv, applied_count, eventually, outbox_rows, produce
from tests.integration.test_security import server_has_tls

pytestmark = pytest.mark.e2e

DB_SECRET = "db-s3cret-e2e"
QUERY_SECRET = "query-s3cret-e2e"
SASL_SECRET = "sasl-s3cret-e2e"
SASL = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
    "KAFKA_SASL_USERNAME": "orderflow",
    "KAFKA_SASL_PASSWORD": SASL_SECRET,
}


def run(*arguments: str, env: dict[str, str], timeout: float = 90) -> tuple[int, str, str]:
    result = subprocess.run(
        [*ORDERFLOW, *arguments],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


def assert_no_secret(*outputs: str, secrets: tuple[str, ...]) -> None:
    for output in outputs:
        for secret in secrets:
            assert secret not in output, f"{secret!r} was written:\n{output}"


def assert_one_error_line(stderr: str, *mentions: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    (line,) = lines
    assert line.startswith("orderflow: error: "), line
    for mention in mentions:
        assert mention in line, f"{mention!r} not in {line!r}"
    return line


def with_password(url: str) -> tuple[str, str]:
    """``url`` carrying a password (ignored with trust authentication), and the password."""
    parsed = make_url(url)
    if parsed.password:
        return url, str(parsed.password)
    return parsed.set(password=DB_SECRET).render_as_string(hide_password=False), DB_SECRET


UNREACHABLE = Settings(
    database_url=f"postgresql://orderflow:{DB_SECRET}@127.0.0.1:1/orders?password={QUERY_SECRET}",
    kafka_bootstrap_servers="127.0.0.1:1",
)


@pytest.mark.parametrize("command", ["migrate", "consume", "relay"])
def test_an_unreachable_database_never_shows_a_password_even_at_debug(command: str) -> None:
    environment = process_env(UNREACHABLE, ORDERFLOW_LOG_FORMAT="json", **SASL)
    code, stdout, stderr = run(command, "--log-level", "DEBUG", env=environment)
    assert code == 1, stderr
    assert "Traceback" not in stderr
    assert_no_secret(stdout, stderr, secrets=(DB_SECRET, QUERY_SECRET, SASL_SECRET))
    last = stderr.splitlines()[-1]
    assert last.startswith("orderflow: error: cannot reach PostgreSQL at "), stderr
    assert "orderflow:***@127.0.0.1:1" in last


def test_migrate_with_tls_required_by_a_server_without_it_is_one_line(
    test_settings: Settings,
) -> None:
    if asyncio.run(server_has_tls(test_settings)):
        pytest.skip("this PostgreSQL offers TLS")
    url, password = with_password(str(test_settings.database_url))
    settings = test_settings.with_overrides(database_url=f"{url}?sslmode=require")
    code, stdout, stderr = run("migrate", env=process_env(settings))
    assert code == 1
    assert_one_error_line(stderr, "PostgreSQL", "the server does not support TLS", "***")
    assert_no_secret(stdout, stderr, secrets=(password,))


def test_sasl_to_a_broker_without_it_is_one_line_without_the_password(
    test_settings: Settings,
) -> None:
    """The SASL settings reach the client: the broker refuses the handshake."""
    url, password = with_password(str(test_settings.database_url))
    settings = test_settings.with_overrides(database_url=url)
    code, stdout, stderr = run("consume", env=process_env(settings, **SASL))
    assert code == 1
    assert_one_error_line(stderr, "cannot reach Kafka", "SASL_PLAINTEXT")
    assert_no_secret(stdout, stderr, secrets=(password, SASL_SECRET))


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({**SASL, "KAFKA_SASL_MECHANISM": ""}, "KAFKA_SASL_MECHANISM"),
        ({"KAFKA_SASL_PASSWORD": SASL_SECRET}, "KAFKA_SASL_PASSWORD"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
            "KAFKA_SSL_CAFILE",
        ),
        ({"ORDERFLOW_DB_SSLMODE": "sometimes"}, "ORDERFLOW_DB_SSLMODE"),
        ({"ORDERFLOW_LOG_FORMAT": "xml"}, "ORDERFLOW_LOG_FORMAT"),
        ({"ORDERFLOW_MAX_MESSAGE_BYTES": "1MB"}, "ORDERFLOW_MAX_MESSAGE_BYTES"),
    ],
)
def test_a_bad_security_setting_is_one_line_naming_it(
    variables: dict[str, str], named: str
) -> None:
    code, stdout, stderr = run("consume", env=process_env(UNREACHABLE, **variables))
    assert code == 2, stderr
    assert_one_error_line(stderr, named)
    assert_no_secret(stdout, stderr, secrets=(DB_SECRET, QUERY_SECRET, SASL_SECRET))


def test_a_bad_database_tls_parameter_is_one_line_naming_it() -> None:
    settings = UNREACHABLE.with_overrides(
        database_url=f"postgresql://orderflow:{DB_SECRET}@127.0.0.1:1/orders?sslcrl=/x"
    )
    code, stdout, stderr = run("migrate", env=process_env(settings))
    assert code == 2, stderr
    assert_one_error_line(stderr, "DATABASE_URL parameter sslcrl")
    assert_no_secret(stdout, stderr, secrets=(DB_SECRET,))


# --- a running consumer's logs ----------------------------------------------------------------


@contextlib.contextmanager
def started(
    arguments: list[str], environment: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*ORDERFLOW, *arguments],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.timeout(120)
async def test_a_running_consumer_writes_json_lines_and_never_the_password(
    env: TestEnv, tmp_path: Path
) -> None:
    url, password = with_password(str(env.settings.database_url))
    settings = env.settings.with_overrides(database_url=url)
    order_id = uuid.uuid4()
    poison = (key(order_id), b'{"event_id": "not json at all')
    await produce(env.settings, [placed(order_id), poison])
    log = tmp_path / "consume.stderr"
    environment = process_env(settings, ORDERFLOW_LOG_FORMAT="json")
    with started(["consume", "--log-level", "DEBUG"], environment, log) as consumer:

        async def consumed() -> None:
            assert consumer.poll() is None, log.read_text()
            assert await applied_count(env.sessions) == 1
            assert len(await outbox_rows(env.sessions, env.settings.dlq_topic)) == 1

        await eventually(consumed, within=60)
        consumer.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(consumer.wait, 30) == 0, log.read_text()

    stderr = log.read_text()
    assert_no_secret(stderr, secrets=(password,))
    records: list[dict[str, Any]] = []
    for line in stderr.splitlines():
        record = orjson.loads(line)  # every line is one JSON object
        assert {"event", "level", "logger", "timestamp"} <= set(record), line
        records.append(record)
    batches = [r for r in records if r["event"] == "batch applied"]
    assert batches, stderr
    assert all(r["component"] == "consumer" and r["level"] == "info" for r in batches)
    assert sum(r["applied"] for r in batches) == 1
    assert sum(r["dead_lettered"] for r in batches) == 1
    (dead,) = [r for r in records if r["event"] == "event dead-lettered"]
    assert (dead["reason"], dead["offset"]) == ("malformed_json", 1)
    assert dead["topic"] == env.settings.inbound_topic
    # Nothing per message at info: the two messages made batch lines only.
    info = [r for r in records if r["level"] == "info" and r["logger"] == "orderflow.consumer"]
    assert all(r["event"] == "batch applied" or r["event"].startswith("seeking") for r in info)
