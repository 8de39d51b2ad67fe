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
from tests.helpers import (
    TestEnv,
    eventually,
    mark_published,
    outbox_rows,
    pending_ids,
    running_relay,
)

pytestmark = pytest.mark.integration


async def test_stats_per_topic(env: TestEnv) -> None:
    async with env.sessions() as session, session.begin():
        await add_messages(
            session,
            [OutboxMessage("updates", b"k1", b"v")] * 5 + [OutboxMessage("dlq", None, b"v")] * 2,
        )
    rows = await outbox_rows(env.sessions)
    updates = [row.id for row in rows if row.topic == "updates"]
    dlq = [row.id for row in rows if row.topic == "dlq"]
    # Three updates are published: two went out just now (by two relays), one ten minutes
    # ago (as the relays count them in outbox_throughput); one unpublished row is an hour old.
    await mark_published(env.sessions, updates[:3])
    async with env.engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO outbox_throughput (second, relay, topic, published) VALUES "
                "(date_trunc('second', now()), 1, 'updates', 1), "
                "(date_trunc('second', now()), 2, 'updates', 1), "
                "(date_trunc('second', now() - interval '10 minutes'), 1, 'updates', 1)"
            )
        )
        await connection.execute(
            text(
                "UPDATE outbox_messages SET created_at = now() - interval '1 hour' WHERE id = :id"
            ),
            {"id": dlq[0]},
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


async def test_what_a_relay_publishes_counts_in_the_last_minute(env: TestEnv) -> None:
    """The relay's marks count what it published, per topic, batch after batch."""
    updates, dlq = env.settings.outbound_topic, env.settings.dlq_topic
    async with env.sessions() as session, session.begin():
        await add_messages(
            session,
            [OutboxMessage(updates, f"k{i}".encode(), b"v") for i in range(7)]
            + [OutboxMessage(dlq, None, b"v")] * 3,
        )
    async with running_relay(env.with_settings(relay_batch_size=2)) as relay:

        async def drained() -> None:
            assert await pending_ids(env.sessions) == []
            assert relay.stats.published == 10  # a moment after the last mark is visible

        await eventually(drained)
        assert relay.stats.batches >= 5
    async with env.engine.connect() as connection:
        stats = {line.topic: line for line in await outbox_stats(connection)}

    assert set(stats) == {updates, dlq}
    assert (stats[updates].backlog, stats[updates].published_last_minute) == (0, 7)
    assert (stats[dlq].backlog, stats[dlq].published_last_minute) == (0, 3)
    assert stats[updates].oldest_unpublished_age is None
    assert stats[dlq].oldest_unpublished_age is None


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
