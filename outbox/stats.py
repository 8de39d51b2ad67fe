"""How the outbox is doing, per topic: backlog, oldest unpublished age, recent throughput.

The backlog is read from ``outbox_pending`` (only the unpublished ids), each message
looked up by its id (a join the planner could turn into a scan of every retained
message), and the throughput from the relays' per-second counts (``outbox_throughput``),
so both stay cheap however many published rows are retained.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_BACKLOG: Final = text(
    """
    SELECT m.topic, count(*) AS backlog, now() - min(m.created_at) AS oldest
    FROM outbox_pending AS p
    CROSS JOIN LATERAL (
        SELECT topic, created_at FROM outbox_messages WHERE id = p.id OFFSET 0
    ) AS m
    GROUP BY m.topic
    """
)
_RECENT: Final = text(
    """
    SELECT topic, sum(published) AS published
    FROM outbox_throughput WHERE second >= now() - CAST(:window AS interval)
    GROUP BY topic
    """
)


@dataclass(frozen=True, slots=True)
class TopicStats:
    topic: str
    backlog: int
    oldest_unpublished_age: timedelta | None
    published_last_minute: int


async def outbox_stats(connection: AsyncConnection) -> list[TopicStats]:
    """One line per topic that has unpublished rows or published in the last minute."""
    backlog = {
        row.topic: (int(row.backlog), row.oldest) for row in await connection.execute(_BACKLOG)
    }
    recent = {
        row.topic: int(row.published)
        for row in await connection.execute(_RECENT, {"window": timedelta(minutes=1)})
    }
    return [
        TopicStats(
            topic=topic,
            backlog=backlog.get(topic, (0, None))[0],
            oldest_unpublished_age=backlog.get(topic, (0, None))[1],
            published_last_minute=recent.get(topic, 0),
        )
        for topic in sorted(backlog.keys() | recent.keys())
    ]
