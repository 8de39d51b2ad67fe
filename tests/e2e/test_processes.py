"""The real ``orderflow`` processes, as an operator runs them: consume and relay carrying a
sample stream end to end, SIGKILL mid-stream and restart, a clean SIGTERM, one-line start-up
errors, ``migrate`` twice, and ``--help``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterator
from itertools import islice
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from consumer.models import ProcessedEvent
from orderflow.runtime.settings import Settings
from orderflow.tools.samples import SampleStream
from tests.e2e.processes import ORDERFLOW, Process, Start, process_env
from tests.helpers import (
    Expected,
    TestEnv,
    applied_count,
    decode_json,
    eventually,
    expected_outcome,
    header_map,
    orders_by_id,
    outbox_rows,
    pending_ids,
    produce,
    read_topic,
)
from tests.services import Services

pytestmark = pytest.mark.e2e

T = TypeVar("T")

SCHEMA_TABLES = {
    "orders",
    "customers",
    "order_lines",
    "processed_events",
    "outbox_messages",
    "outbox_pending",
    "outbox_throughput",
    "consumer_offsets",
}
#: A password that must never show in an error line.
SECRET = "s3cret-e2e"


async def while_running(work: Awaitable[T], *processes: Process) -> T:
    """Await ``work``, failing at once (with their stderr) if one of ``processes`` exits."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            for process in processes:
                process.assert_running()
            await asyncio.wait({task}, timeout=0.2)
        try:
            return task.result()
        except AssertionError as error:
            logs = "\n\n".join(process.describe() for process in processes)
            raise AssertionError(f"{error}\n\n{logs}") from error
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def sample_messages(count: int, *, seed: int) -> list[tuple[bytes | None, bytes | None]]:
    stream = SampleStream(seed=seed, fault_every=9)
    return [(message.key, message.value) for message in islice(stream, count)]


async def assert_orders(env: TestEnv, expected: Expected) -> None:
    orders = await orders_by_id(env.sessions)
    assert {
        order_id: (order.status, order.total, order.version) for order_id, order in orders.items()
    } == {
        order_id: (state.status.value, state.total, state.version)
        for order_id, state in expected.orders.items()
    }


def versions_by_order(documents: list[dict[str, Any]]) -> dict[str, list[int]]:
    versions: dict[str, list[int]] = {}
    for document in documents:
        versions.setdefault(document["order_id"], []).append(document["order_version"])
    return versions


def expected_versions(expected: Expected) -> dict[str, list[int]]:
    return {str(order_id): versions for order_id, versions in expected.updates.items()}


# --- the whole flow ---------------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_consume_and_relay_processes_carry_a_sample_stream_and_stop_on_sigterm(
    env: TestEnv, orderflow: Start
) -> None:
    settings = env.settings
    messages = sample_messages(1000, seed=5)
    expected = expected_outcome(messages)
    dead_letter_count = sum(expected.dead_letters.values())
    assert expected.applied
    assert dead_letter_count
    consumer = orderflow("consume", settings)
    relay = orderflow("relay", settings)

    await while_running(produce(settings, messages), consumer, relay)
    updates = await while_running(
        read_topic(settings, settings.outbound_topic, len(expected.applied), within=60),
        consumer,
        relay,
    )
    dead_letters = await while_running(
        read_topic(settings, settings.dlq_topic, dead_letter_count, within=30), consumer, relay
    )

    # One update per applied event, each order's versions in increasing order on the topic.
    assert len(updates) == len(expected.applied)
    documents = [decode_json(record.value) for record in updates]
    assert sorted(document["causation_id"] for document in documents) == sorted(
        str(event_id) for event_id in expected.applied
    )
    assert versions_by_order(documents) == expected_versions(expected)
    assert all(
        record.key == document["order_id"].encode()
        for record, document in zip(updates, documents, strict=True)
    )
    # Dead letters: the reasons expected, the original bytes, where they came from.
    assert Counter(header_map(r.headers)["error.reason"] for r in dead_letters) == (
        expected.dead_letters
    )
    inbound_values = {value for _, value in messages}
    assert all(record.value in inbound_values for record in dead_letters)
    assert {header_map(r.headers)["source.topic"] for r in dead_letters} == {settings.inbound_topic}
    await assert_orders(env, expected)

    for process in (consumer, relay):
        process.popen.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(consumer.exit_code(within=30), relay.exit_code(within=30))
    assert codes == [0, 0], f"{consumer.describe()}\n\n{relay.describe()}"
    for process in (consumer, relay):
        assert "Traceback" not in process.stderr(), process.describe()
    # Stopped cleanly: nothing left half-done in the outbox.
    rows = await outbox_rows(env.sessions)
    assert len(rows) == len(expected.applied) + dead_letter_count
    assert await pending_ids(env.sessions) == []


# --- SIGKILL mid-stream -----------------------------------------------------------------------


@pytest.mark.timeout(150)
async def test_consume_killed_with_sigkill_mid_stream_and_restarted_ends_in_the_exact_state(
    env: TestEnv, orderflow: Start
) -> None:
    settings = env.settings
    messages = sample_messages(2000, seed=29)
    expected = expected_outcome(messages)
    applied_total = len(expected.applied)
    outbox_total = applied_total + sum(expected.dead_letters.values())
    await produce(settings, messages)
    small_batches = {"ORDERFLOW_CONSUMER_BATCH_SIZE": "50"}

    killed_at: list[int] = []
    for fraction in (0.15, 0.4, 0.65):
        consumer = orderflow("consume", settings, **small_batches)
        threshold = int(applied_total * fraction)

        async def past_threshold(consumer: Process = consumer, threshold: int = threshold) -> None:
            consumer.assert_running()
            assert await applied_count(env.sessions) >= threshold

        await eventually(past_threshold, within=60, interval=0.02)
        consumer.popen.kill()
        assert await consumer.exit_code(within=10) == -signal.SIGKILL
        killed_at.append(await applied_count(env.sessions))
    assert killed_at == sorted(killed_at)
    assert killed_at[-1] < applied_total, f"killed too late to test anything: {killed_at}"

    consumer = orderflow("consume", settings, **small_batches)

    async def all_done() -> None:
        consumer.assert_running()
        assert await applied_count(env.sessions) == applied_total
        assert len(await outbox_rows(env.sessions)) == outbox_total

    await eventually(all_done, within=60, interval=0.1)
    consumer.popen.send_signal(signal.SIGTERM)
    assert await consumer.exit_code(within=30) == 0, consumer.describe()
    assert "Traceback" not in consumer.stderr(), consumer.describe()

    # Exactly the expected effects, each once, whatever the kills interrupted.
    async with env.sessions() as session:
        processed = list((await session.execute(select(ProcessedEvent.event_id))).scalars())
    assert len(processed) == applied_total
    assert set(processed) == set(expected.applied)
    await assert_orders(env, expected)
    updates = [
        decode_json(row.payload) for row in await outbox_rows(env.sessions, settings.outbound_topic)
    ]
    causes = Counter(document["causation_id"] for document in updates)
    assert [cause for cause, times in causes.items() if times > 1] == []
    assert set(causes) == {str(event_id) for event_id in expected.applied}
    versions = versions_by_order(updates)  # in outbox id order
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values()), versions
    assert versions == expected_versions(expected)
    dead_letters = await outbox_rows(env.sessions, settings.dlq_topic)
    assert Counter(header_map(row.headers)["error.reason"] for row in dead_letters) == (
        expected.dead_letters
    )


# --- start-up errors --------------------------------------------------------------------------


def run_orderflow(
    *arguments: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ORDERFLOW, *arguments],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *mentions: str) -> str:
    assert result.returncode != 0, f"exit code 0; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert SECRET not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{result.stderr}"
    (line,) = lines
    assert line.startswith("orderflow: error: "), line
    for mention in mentions:
        assert mention in line, f"{mention!r} not in {line!r}"
    return line


UNREACHABLE = Settings(
    database_url=f"postgresql://orderflow:{SECRET}@127.0.0.1:1/orders",
    kafka_bootstrap_servers="127.0.0.1:1",
)


@pytest.mark.parametrize("command", ["consume", "relay", "migrate"])
def test_an_unreachable_database_is_one_line_without_the_password(command: str) -> None:
    result = run_orderflow(command, env=process_env(UNREACHABLE))
    line = assert_one_line_error(result, "PostgreSQL", "127.0.0.1:1")
    assert "***" in line  # where the password was


@pytest.mark.parametrize("command", ["consume", "relay"])
def test_an_unreachable_broker_is_one_line(command: str, test_settings: Settings) -> None:
    environment = process_env(test_settings, KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert_one_line_error(run_orderflow(command, env=environment), "Kafka", "127.0.0.1:1")


def test_idempotence_against_a_broker_without_it_is_one_line_saying_what_to_set(
    test_settings: Settings, services: Services
) -> None:
    if services.kafka_idempotence:
        pytest.skip("the test broker has the idempotent producer")
    environment = process_env(test_settings, ORDERFLOW_KAFKA_IDEMPOTENCE="true")
    assert_one_line_error(
        run_orderflow("relay", env=environment),
        "idempotent producer",
        "InitProducerId",
        "ORDERFLOW_KAFKA_IDEMPOTENCE=false",
    )


@pytest.mark.parametrize(
    ("command", "variables", "named"),
    [
        ("consume", {"DATABASE_URL": f"mysql://orderflow:{SECRET}@localhost/x"}, "DATABASE_URL"),
        ("relay", {"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ("migrate", {"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ("migrate", {"DATABASE_URL": ""}, "DATABASE_URL"),
        ("consume", {"ORDERFLOW_CONSUMER_BATCH_SIZE": "lots"}, "ORDERFLOW_CONSUMER_BATCH_SIZE"),
        ("consume", {"ORDERFLOW_KAFKA_IDEMPOTENCE": "maybe"}, "ORDERFLOW_KAFKA_IDEMPOTENCE"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    command: str, variables: dict[str, str], named: str
) -> None:
    result = run_orderflow(command, env=process_env(UNREACHABLE, **variables))
    assert_one_line_error(result, named)


@pytest.mark.parametrize("command", ["consume", "relay"])
def test_a_missing_broker_setting_is_one_line_naming_it(
    command: str, test_settings: Settings
) -> None:
    environment = process_env(test_settings)
    del environment["KAFKA_BOOTSTRAP_SERVERS"]
    assert_one_line_error(run_orderflow(command, env=environment), "KAFKA_BOOTSTRAP_SERVERS")


def _plain(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def _admin(services: Services, statement: str) -> None:
    connection = await asyncpg.connect(_plain(services.admin_database_url))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
def empty_database(services: Services) -> Iterator[str]:
    """The URL of a database that exists and holds nothing (not migrated)."""
    name = f"orderflow_e2e_empty_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(services, f'CREATE DATABASE "{name}"'))
    try:
        yield _plain(services.admin_database_url, name)
    finally:
        asyncio.run(_admin(services, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.parametrize("command", ["consume", "relay"])
def test_a_database_without_the_schema_is_one_line_telling_to_migrate(
    command: str, empty_database: str, services: Services
) -> None:
    settings = Settings(
        database_url=empty_database, kafka_bootstrap_servers=services.bootstrap_servers
    )
    assert_one_line_error(
        run_orderflow(command, env=process_env(settings)), "PostgreSQL", "orderflow migrate"
    )


# --- migrate ----------------------------------------------------------------------------------


async def _schema(database_url: str) -> dict[str, list[tuple[Any, ...]]]:
    queries = {
        "tables": "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        "columns": (
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2"
        ),
        "indexes": "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
        "ORDER BY 1",
        "constraints": (
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
            "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
        ),
        "triggers": (
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger "
            "WHERE NOT tgisinternal ORDER BY 1, 2"
        ),
    }
    connection = await asyncpg.connect(database_url)
    try:
        snapshot = {
            name: [tuple(row) for row in await connection.fetch(query)]
            for name, query in queries.items()
        }
        if ("alembic_version",) in snapshot["tables"]:
            snapshot["revision"] = [
                tuple(row) for row in await connection.fetch("SELECT * FROM alembic_version")
            ]
        return snapshot
    finally:
        await connection.close()


def test_migrate_creates_the_schema_and_a_second_run_changes_nothing(
    empty_database: str,
) -> None:
    environment = process_env(Settings(database_url=empty_database, kafka_bootstrap_servers=None))
    assert asyncio.run(_schema(empty_database))["tables"] == []

    first = run_orderflow("migrate", env=environment)
    assert first.returncode == 0, first.stderr
    migrated = asyncio.run(_schema(empty_database))
    assert {table for (table,) in migrated["tables"]} >= SCHEMA_TABLES
    assert migrated["revision"], "no alembic revision recorded"

    second = run_orderflow("migrate", env=environment)
    assert second.returncode == 0, second.stderr
    assert asyncio.run(_schema(empty_database)) == migrated
    for result in (first, second):
        assert "Traceback" not in result.stderr, result.stderr


# --- help -------------------------------------------------------------------------------------


def help_text(command: str) -> str:
    # Wide enough that rich does not wrap a variable's name.
    environment = {**process_env(UNREACHABLE), "COLUMNS": "200"}
    result = run_orderflow(command, "--help", env=environment)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        (
            "consume",
            [
                "DATABASE_URL",
                "KAFKA_BOOTSTRAP_SERVERS",
                "ORDERFLOW_INBOUND_TOPIC",
                "ORDERFLOW_OUTBOUND_TOPIC",
                "ORDERFLOW_DLQ_TOPIC",
                "ORDERFLOW_CONSUMER_GROUP",
                "ORDERFLOW_DB_POOL_SIZE",
                "ORDERFLOW_CONSUMER_BATCH_SIZE",
                "ORDERFLOW_PARK_TIMEOUT_S",
            ],
        ),
        ("relay", ["DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "ORDERFLOW_RELAY_BATCH_SIZE"]),
        ("migrate", ["DATABASE_URL"]),
        (
            "check",
            [
                "DATABASE_URL",
                "KAFKA_BOOTSTRAP_SERVERS",
                "ORDERFLOW_INBOUND_TOPIC",
                "ORDERFLOW_OUTBOUND_TOPIC",
                "ORDERFLOW_DLQ_TOPIC",
                "ORDERFLOW_CONSUMER_GROUP",
                "ORDERFLOW_DB_POOL_SIZE",
                "ORDERFLOW_METRICS_PORT",
                "ORDERFLOW_MAX_MESSAGE_BYTES",
                "ORDERFLOW_OUTBOX_RETENTION_HOURS",
                "ORDERFLOW_KAFKA_IDEMPOTENCE",
            ],
        ),
        ("dev", []),  # reads no variable: embedded services, nothing to configure
    ],
)
def test_help_exits_0_and_names_the_variables_read(command: str, variables: list[str]) -> None:
    text = help_text(command)
    assert f"orderflow {command}" in text
    missing = [variable for variable in variables if variable not in text]
    assert missing == [], text
    if command == "dev":
        assert "embedded" in text


def test_consume_help_shows_the_default_of_each_variable() -> None:
    text = help_text("consume")
    defaults = {
        "ORDERFLOW_CONSUMER_GROUP": "orderflow",
        "ORDERFLOW_INBOUND_TOPIC": "orders.events",
        "ORDERFLOW_OUTBOUND_TOPIC": "orders.updates",
        "ORDERFLOW_DLQ_TOPIC": "orders.events.dlq",
    }
    for variable, default in defaults.items():
        (line,) = [line for line in text.splitlines() if variable in line]
        assert default in line.replace(variable, ""), line
