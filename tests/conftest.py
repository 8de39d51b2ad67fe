"""Fixtures: real services once per session, a private database and topics per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from orderflow.runtime.migrate import upgrade
from orderflow.runtime.settings import Settings
from orderflow.runtime.topics import ensure_topics
from orderflow.runtime.wiring import create_engine, session_factory
from tests.helpers import TestEnv
from tests.services import Services, provide_services


def _plain_url(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def _admin(services: Services, *statements: str) -> None:
    connection = await asyncpg.connect(_plain_url(services.admin_database_url))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    with provide_services() as provided:
        yield provided


@pytest.fixture(scope="session")
def template_database(services: Services) -> Iterator[str]:
    """A database holding the migrated schema; each test's database is a copy of it."""
    name = f"orderflow_template_{os.getpid()}"
    asyncio.run(_admin(services, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"'))
    upgrade(_plain_url(services.admin_database_url, name))
    yield name
    asyncio.run(_admin(services, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def pytest_report_header(config: pytest.Config) -> str:
    return "services: real PostgreSQL and Kafka-protocol broker (see tests/services.py)"


@pytest.fixture
def test_settings(services: Services, template_database: str) -> Iterator[Settings]:
    """Settings naming a fresh database (a copy of the template) and fresh topics."""
    suffix = uuid.uuid4().hex[:10]
    database = f"orderflow_test_{suffix}"
    asyncio.run(_admin(services, f'CREATE DATABASE "{database}" TEMPLATE "{template_database}"'))
    settings = Settings(
        database_url=_plain_url(services.admin_database_url, database),
        kafka_bootstrap_servers=services.bootstrap_servers,
        inbound_topic=f"orders.events.{suffix}",
        outbound_topic=f"orders.updates.{suffix}",
        dlq_topic=f"orders.events.dlq.{suffix}",
        consumer_group=f"orderflow-{suffix}",
        kafka_idempotence=services.kafka_idempotence,
        kafka_session_timeout_ms=services.session_timeout_ms,
        db_pool_size=4,
        # Parking off: what cannot apply is dead-lettered at once, which the tests of the
        # other guarantees count on; the parking tests turn it on.
        park_timeout_s=0,
    )
    asyncio.run(ensure_topics(settings, partitions=3))
    yield settings
    asyncio.run(_admin(services, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


@pytest.fixture
async def env(test_settings: Settings) -> AsyncIterator[TestEnv]:
    engine = create_engine(test_settings)
    try:
        yield TestEnv(test_settings, engine, session_factory(engine))
    finally:
        await engine.dispose()
