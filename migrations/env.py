"""Alembic environment: async engine (asyncpg), or a connection handed in by the caller.

``orderflow migrate`` and the test harness call Alembic from code: when a connection is in
``config.attributes["connection"]`` it is used as is (this is how migrations run inside
an already running event loop); otherwise an async engine is created from the URL.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from consumer.models import Base
from outbox.models import OutboxBase

config = context.config

target_metadata: list[MetaData] = [Base.metadata, OutboxBase.metadata]

# One transaction-wide lock so that two `orderflow migrate` started together don't race.
_MIGRATION_LOCK_KEY = 0x6F666D67


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK_KEY})")
        context.run_migrations()


async def run_async_migrations() -> None:
    connectable = async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    async with connectable.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
elif (connection := config.attributes.get("connection")) is not None:
    do_run_migrations(connection)
else:
    asyncio.run(run_async_migrations())
