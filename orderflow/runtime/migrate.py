"""Alembic, driven from the CLI: the scripts ship inside the package (``migrations``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from orderflow.runtime.settings import async_database_url


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(next(iter(migrations.__path__)))))
    if database_url is not None:
        # ConfigParser interpolation: a literal % must be doubled.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade(database_url: str) -> None:
    """Bring the schema to the newest revision (harmless when it is already there)."""
    url = async_database_url(database_url).render_as_string(hide_password=False)
    command.upgrade(alembic_config(url), "head")


async def upgrade_async(engine: AsyncEngine) -> None:
    """``upgrade`` from inside a running event loop, on a connection of ``engine``."""

    def run_upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.run_sync(run_upgrade)
