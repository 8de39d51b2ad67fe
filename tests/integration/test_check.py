"""``orderflow check`` run for real (the Typer app) against real services: a healthy
setup passes, and every fail case this machine can create fails, with its fix: a missing
topic, a dead-letter topic too small for the largest inbound message, an unmigrated (and a
lagging) database, more planned connections than the server allows, and the idempotent
producer against a broker without it. No password is ever printed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import text
from sqlalchemy.engine import make_url

from consumer.models import ConsumerOffset
from orderflow.runtime.settings import Settings
from orderflow.tools.check import DEAD_LETTER_HEADROOM_BYTES, NAMES
from tests.events import placed
from tests.helpers import (
    TestEnv,
    applied_count,
    eventually,
    invoke_cli,
    produce,
    running_consumer,
)
from tests.services import Services

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


async def run_check(settings: Settings, *arguments: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """``orderflow check --json``: the exit code and the checks by name (all of them, in
    the documented order)."""
    result = await invoke_cli(settings, "check", "--json", *arguments)
    document = orjson.loads(result.stdout)
    assert isinstance(document, list)
    assert [check["name"] for check in document] == list(NAMES)
    for check in document:
        assert set(check) == {"name", "status", "detail", "fix"}
        assert check["status"] in {"pass", "warn", "fail", "unknown"}
        if check["status"] == "pass":
            assert check["fix"] is None, check
        elif check["status"] in {"warn", "fail"}:
            assert check["fix"], check
    return result.exit_code, {check["name"]: check for check in document}


async def create_topics(
    settings: Settings, configs: Mapping[str, Mapping[str, str]], *, partitions: int = 3
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.require_kafka())
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(name, partitions, 1, topic_configs=dict(topic_configs))
                for name, topic_configs in configs.items()
            ]
        )
        assert all(error_code == 0 for _, error_code, *_ in response.topic_errors), response
    finally:
        await admin.close()


async def topic_names(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.require_kafka())
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def fresh_topics(env: TestEnv) -> Settings:
    """The test's database and group, with topics of its own that don't exist yet."""
    suffix = uuid.uuid4().hex[:10]
    return env.with_settings(
        inbound_topic=f"check.events.{suffix}",
        outbound_topic=f"check.updates.{suffix}",
        dlq_topic=f"check.dlq.{suffix}",
    )


async def healthy_topics(settings: Settings) -> None:
    """The three topics, configured as check wants them (and as a broker that reports
    only a topic's own settings can tell)."""
    await create_topics(
        settings,
        {
            settings.inbound_topic: {"max.message.bytes": str(MIB + 12)},
            settings.outbound_topic: {"cleanup.policy": "compact"},
            settings.dlq_topic: {"max.message.bytes": str(2 * MIB)},
        },
    )


async def test_a_healthy_setup_passes(env: TestEnv) -> None:
    settings = fresh_topics(env)
    await healthy_topics(settings)

    code, checks = await run_check(settings, "--consumers", "2", "--relays", "2", "--api", "1")

    assert code == 0
    assert {name: check["status"] for name, check in checks.items()} == dict.fromkeys(
        NAMES, "pass"
    ), checks
    assert checks["schema"]["detail"].startswith("at the newest revision")
    assert (
        "2 consume × 4 pool + 2 relay × 1 + 1 api × 4 pool = 14"
        in (checks["connections"]["detail"])
    )
    assert checks["inbound topic"]["detail"] == (
        f"{settings.inbound_topic}: 3 partitions, replication factor 1"
    )
    assert "room for the largest" in checks["dead-letter size"]["detail"]
    assert "cleanup.policy=compact" in checks["outbound retention"]["detail"]
    assert checks["consumer group"]["detail"] == (
        f"{settings.consumer_group} does not exist yet: the first consume creates it"
    )
    assert checks["consumer lag"]["detail"].startswith(f"lag 0: {settings.inbound_topic} is empty")

    # Without --json (not a terminal): one line per check, the fixes under them, a summary.
    plain = await invoke_cli(settings, "check")
    assert plain.exit_code == 0
    lines = plain.stdout.splitlines()
    assert len(lines) == len(NAMES) + 1
    assert lines[0].startswith("pass     database ")
    assert lines[-1] == f"{len(NAMES)} pass, 0 warn, 0 fail, 0 unknown"


async def test_a_missing_topic_fails_and_check_does_not_create_it(env: TestEnv) -> None:
    settings = fresh_topics(env)
    await create_topics(
        settings, {settings.inbound_topic: {}, settings.outbound_topic: {}}
    )  # no dead-letter topic

    code, checks = await run_check(settings)

    assert code == 1
    missing = checks["dead-letter topic"]
    assert missing["status"] == "fail"
    assert missing["detail"] == f"{settings.dlq_topic} (ORDERFLOW_DLQ_TOPIC) does not exist"
    assert "orderflow topics create" in missing["fix"]
    assert checks["dead-letter size"] == {
        "name": "dead-letter size",
        "status": "unknown",
        "detail": f"not checked: {settings.dlq_topic} does not exist",
        "fix": None,
    }
    assert checks["inbound topic"]["status"] == "pass"
    # Asking a broker that creates topics on demand (Tansu does) must not create it.
    assert settings.dlq_topic not in await topic_names(settings)


async def test_a_dead_letter_topic_too_small_for_the_largest_message_fails(env: TestEnv) -> None:
    settings = fresh_topics(env)
    await create_topics(
        settings,
        {
            settings.inbound_topic: {"max.message.bytes": str(MIB + 12)},
            settings.outbound_topic: {"cleanup.policy": "compact"},
            settings.dlq_topic: {"max.message.bytes": "1000"},
        },
    )

    code, checks = await run_check(settings)

    assert code == 1
    size = checks["dead-letter size"]
    assert size["status"] == "fail", size
    assert size["detail"].startswith(f"{settings.dlq_topic} takes 1,000 bytes")
    assert "a dead letter of an accepted 1,048,576-byte value cannot be written" in size["detail"]
    needed = MIB + 12 + DEAD_LETTER_HEADROOM_BYTES
    assert f"max.message.bytes={needed} on {settings.dlq_topic}" in size["fix"]
    assert checks["dead-letter topic"]["status"] == "pass"  # it exists: only its size fails


async def test_a_dead_letter_size_the_broker_does_not_report_is_not_a_pass(
    env: TestEnv, services: Services
) -> None:
    """The fixture's topics are created without settings: Apache Kafka still reports its
    defaults (a DLQ of 1 MiB + 12 bytes: room for the value, maybe not for its headers);
    Tansu reports nothing, and nothing is vouched for."""
    code, checks = await run_check(env.settings)

    assert code == 0  # warnings and unknowns are no failure
    size, retention = checks["dead-letter size"], checks["outbound retention"]
    if services.kafka_origin == "embedded Tansu":
        assert size["status"] == "unknown"
        assert "the broker reports no max.message.bytes" in size["detail"]
        assert retention["status"] == "unknown"
        assert "the broker reports no cleanup.policy" in retention["detail"]
    else:
        assert size["status"] == "warn"
        assert retention["status"] == "pass"  # Kafka's default: delete after 7 days


async def test_an_outbound_topic_that_keeps_less_than_the_outbox_warns(env: TestEnv) -> None:
    settings = fresh_topics(env)
    await create_topics(
        settings,
        {
            settings.inbound_topic: {"max.message.bytes": str(MIB + 12)},
            settings.outbound_topic: {"cleanup.policy": "delete", "retention.ms": "3600000"},
            settings.dlq_topic: {"max.message.bytes": str(2 * MIB)},
        },
    )

    code, checks = await run_check(settings)

    assert code == 0
    retention = checks["outbound retention"]
    assert retention["status"] == "warn"
    assert "retention.ms=3600000 (keeps 1 h)" in retention["detail"]
    assert "less than the 168 h the outbox keeps published rows" in retention["detail"]
    assert retention["fix"] == (
        f"set retention.ms=604800000 (or -1) on {settings.outbound_topic}, "
        "or cleanup.policy=compact"
    )


async def test_an_unmigrated_database_fails(env: TestEnv, services: Services) -> None:
    name = f"orderflow_check_empty_{uuid.uuid4().hex[:10]}"
    admin_url = make_url(services.admin_database_url).set(drivername="postgresql")
    admin = await asyncpg.connect(admin_url.render_as_string(hide_password=False))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        empty = env.with_settings(
            database_url=admin_url.set(database=name).render_as_string(hide_password=False)
        )
        code, checks = await run_check(empty)
        assert code == 1
        assert checks["database"]["status"] == "pass"
        schema = checks["schema"]
        assert schema["status"] == "fail"
        assert schema["detail"].startswith("no orderflow schema")
        assert schema["fix"] == "run `orderflow migrate`"
        assert checks["consumer lag"] == {
            "name": "consumer lag",
            "status": "unknown",
            "detail": "not checked: the database has no up-to-date schema",
            "fix": None,
        }
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_database_behind_the_newest_revision_fails(env: TestEnv) -> None:
    async with env.engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = '0001'"))

    code, checks = await run_check(env.settings)

    assert code == 1
    schema = checks["schema"]
    assert schema["status"] == "fail"
    assert schema["detail"].startswith("at revision 0001, ")
    assert "behind the newest" in schema["detail"]
    assert schema["fix"] == "run `orderflow migrate`"


async def test_more_planned_connections_than_the_server_allows_fail(env: TestEnv) -> None:
    code, checks = await run_check(env.settings, "--consumers", "1000", "--metrics")

    assert code == 1
    connections = checks["connections"]
    assert connections["status"] == "fail"
    assert connections["detail"].startswith(
        "planned 1000 consume × (4 pool + 1 health) + 1 relay × (1 + 1 health) = 5002; "
        "available: max_connections "
    )
    assert "more than the limit" in connections["detail"]
    assert "--consumers" in connections["fix"]
    # The same plan without the health endpoints, on a server with room: one fewer each.
    code, checks = await run_check(env.settings, "--consumers", "2", "--no-metrics")
    assert checks["connections"]["detail"].startswith(
        "planned 2 consume × 4 pool + 1 relay × 1 = 9"
    )


async def test_the_idempotent_producer_against_the_broker(env: TestEnv, services: Services) -> None:
    """Tansu refuses InitProducerId: with idempotence on, check fails with start-up's
    fix. A broker that grants it passes."""
    settings = env.with_settings(kafka_idempotence=True)

    code, checks = await run_check(settings)

    idempotence = checks["idempotent producer"]
    if services.kafka_idempotence:
        assert idempotence["status"] == "pass"
        assert "InitProducerId" in idempotence["detail"]
    else:
        assert code == 1
        assert idempotence["status"] == "fail"
        assert "refused the idempotent producer (InitProducerId failed" in idempotence["detail"]
        assert idempotence["fix"] == (
            "set ORDERFLOW_KAFKA_IDEMPOTENCE=false for a broker without it"
        )
    off = await run_check(env.with_settings(kafka_idempotence=False))
    assert off[1]["idempotent producer"]["status"] == "pass"
    assert off[1]["idempotent producer"]["detail"].startswith("off (")


async def test_the_lag_is_exact_where_the_listed_end_offsets_trail(env: TestEnv) -> None:
    """Three producers write one partition at once, so Tansu's listed end offset may trail
    the log by a batch; the lag comes from fetch high watermarks against the database's
    stored next offsets, and is exact either way."""
    settings = env.settings
    per_producer = 200

    async def burst(partition: int) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.require_kafka(), linger_ms=5)
        await producer.start()
        try:
            sent = [
                await producer.send(settings.inbound_topic, b"{}", key=b"k", partition=partition)
                for _ in range(per_producer)
            ]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()

    await asyncio.gather(*(burst(0) for _ in range(3)), burst(1))
    async with env.sessions() as session, session.begin():
        session.add_all(
            [
                ConsumerOffset(
                    group_id=settings.consumer_group,
                    topic=settings.inbound_topic,
                    partition=0,
                    next_offset=100,
                ),
                ConsumerOffset(
                    group_id=settings.consumer_group,
                    topic=settings.inbound_topic,
                    partition=1,
                    next_offset=per_producer,
                ),
            ]
        )

    _, checks = await run_check(settings)

    lag = checks["consumer lag"]
    assert lag["status"] == "pass", lag
    assert lag["detail"].startswith(
        f"lag {3 * per_producer - 100} on {settings.inbound_topic} for {settings.consumer_group}"
    )
    assert "never consumed" not in lag["detail"]  # partition 2 holds nothing

    # A database ahead of the topic (another cluster's, or the topic was recreated) warns.
    async with env.engine.begin() as connection:
        await connection.execute(
            text("UPDATE consumer_offsets SET next_offset = 5000 WHERE partition = 1")
        )
    _, checks = await run_check(settings)
    assert checks["consumer lag"]["status"] == "warn"
    assert f"partition 1: stored 5,000, end {per_producer}" in checks["consumer lag"]["detail"]


async def test_a_running_consumer_its_group_and_no_lag(env: TestEnv, services: Services) -> None:
    settings = env.settings
    orders = [uuid.uuid4() for _ in range(6)]

    async with running_consumer(settings):
        await produce(settings, [placed(order) for order in orders])

        async def all_applied() -> None:
            assert await applied_count(env.sessions) == len(orders)

        await eventually(all_applied)
        _, checks = await run_check(settings)

    group = checks["consumer group"]
    if services.kafka_origin == "embedded Tansu":
        # Tansu describes no member's subscription or assignment: not vouched for.
        assert group["status"] == "unknown"
        assert group["detail"].startswith(f"{settings.consumer_group}: Stable, 1 member")
    else:
        assert group["status"] == "pass"
        assert group["detail"] == (
            f"{settings.consumer_group}: Stable, 1 member; all 3 partitions of "
            f"{settings.inbound_topic} assigned"
        )
    lag = checks["consumer lag"]
    assert lag["status"] == "pass"
    assert lag["detail"].startswith(f"lag 0 on {settings.inbound_topic}")


async def test_unreachable_services_fail_and_the_rest_is_unknown(env: TestEnv) -> None:
    nowhere = env.with_settings(
        database_url="postgresql://orderflow@127.0.0.1:1/orders",
        kafka_bootstrap_servers="127.0.0.1:1",
    )

    code, checks = await run_check(nowhere)

    assert code == 1
    assert checks["database"]["status"] == "fail"
    assert checks["database"]["detail"].startswith("cannot reach PostgreSQL at ")
    assert checks["brokers"]["status"] == "fail"
    assert checks["brokers"]["detail"].startswith("cannot reach Kafka at 127.0.0.1:1 (PLAINTEXT)")
    for name in NAMES:
        if name not in {"database", "brokers", "kafka security"}:
            assert checks[name]["status"] == "unknown", checks[name]


async def test_a_bad_setting_exits_2(env: TestEnv) -> None:
    result = await invoke_cli(env.settings, "check", "--database-url", "mysql://u:p-s3cret@h/db")
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "orderflow: error: DATABASE_URL must be a postgresql:// URL, got a mysql:// one"
    ]


async def test_no_password_is_ever_printed(env: TestEnv) -> None:
    """The database password (accepted and ignored by the test server's trust
    authentication) and a SASL password, in healthy and failing runs, as JSON and lines."""
    secret = "db-s3cret-check"
    sasl_secret = "sasl-s3cret-check"
    url = make_url(env.settings.database_url or "").set(password=secret)
    with_password = env.with_settings(database_url=url.render_as_string(hide_password=False))
    unreachable = with_password.with_overrides(
        database_url=url.set(port=1).render_as_string(hide_password=False)
    )
    sasl = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": "orderflow",
        "KAFKA_SASL_PASSWORD": sasl_secret,
    }
    outputs = []
    for settings, extra_env in ((with_password, {}), (unreachable, {}), (with_password, sasl)):
        for arguments in (("--json",), ()):
            result = await invoke_cli(settings, "check", *arguments, extra_env=extra_env)
            outputs.append(result.output)
    assert "***@" in outputs[0]  # the URL is shown, redacted
    for output in outputs:
        assert secret not in output, output
        assert sasl_secret not in output, output
