"""How the outbox is doing, per topic: backlog, oldest unpublished age, recent throughput.

Both queries use the outbox's partial indexes (unpublished rows; published_at), so they
stay cheap however many published rows are retained.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_BACKLOG: Final = text(
    """
    SELECT topic, count(*) AS backlog, now() - min(created_at) AS oldest
    FROM outbox_messages WHERE published_at IS NULL GROUP BY topic
    """
)
_RECENT: Final = text(
    """
    SELECT topic, count(*) AS published
    FROM outbox_messages WHERE published_at >= now() - CAST(:window AS interval)
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
