"""``orderflow outbox stats``: backlog, oldest unpublished age and recent throughput per topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta

import orjson
import pytest
from sqlalchemy import text

from outbox import OutboxMessage, add_messages
from outbox.stats import outbox_stats
from tests.helpers import TestEnv

pytestmark = pytest.mark.integration


async def test_stats_per_topic(env: TestEnv) -> None:
    async with env.sessions() as session, session.begin():
        await add_messages(
            session,
            [OutboxMessage("updates", b"k1", b"v")] * 5 + [OutboxMessage("dlq", None, b"v")] * 2,
        )
    async with env.engine.begin() as connection:
        # Two updates went out just now, one long ago; one unpublished row is an hour old.
        await connection.execute(
            text(
                "UPDATE outbox_messages SET published_at = now() "
                "WHERE id IN (SELECT id FROM outbox_messages WHERE topic = 'updates' "
                "ORDER BY id LIMIT 2)"
            )
        )
        await connection.execute(
            text(
                "UPDATE outbox_messages SET published_at = now() - interval '10 minutes' "
                "WHERE id = (SELECT min(id) FROM outbox_messages WHERE published_at IS NULL "
                "AND topic = 'updates')"
            )
        )
        await connection.execute(
            text(
                "UPDATE outbox_messages SET created_at = now() - interval '1 hour' "
                "WHERE id = (SELECT min(id) FROM outbox_messages WHERE topic = 'dlq')"
            )
        )
    async with env.engine.connect() as connection:
        stats = {line.topic: line for line in await outbox_stats(connection)}

    assert set(stats) == {"updates", "dlq"}
    assert (stats["updates"].backlog, stats["updates"].published_last_minute) == (2, 2)
    assert (stats["dlq"].backlog, stats["dlq"].published_last_minute) == (2, 0)
    dlq_age = stats["dlq"].oldest_unpublished_age
    assert dlq_age is not None
    assert timedelta(minutes=59) < dlq_age < timedelta(minutes=61)
    updates_age = stats["updates"].oldest_unpublished_age
    assert updates_age is not None
    assert updates_age < timedelta(minutes=1)


async def test_the_command_prints_json_lines(env: TestEnv) -> None:
    async with env.sessions() as session, session.begin():
        await add_messages(session, [OutboxMessage("updates", b"k", b"v")] * 3)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "orderflow", "outbox", "stats", "--json"],
        env={**os.environ, "DATABASE_URL": env.settings.database_url or ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (line,) = [orjson.loads(row) for row in result.stdout.splitlines()]
    assert line["topic"] == "updates"
    assert line["backlog"] == 3
    assert line["published_last_minute"] == 0
    assert 0 <= line["oldest_unpublished_age_seconds"] < 60
