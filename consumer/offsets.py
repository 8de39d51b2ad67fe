"""Consumer offsets stored in PostgreSQL, next to the effects they account for.

``advance_offset`` is a compare-and-set: it moves a partition's next offset from the value
this consumer believes is stored to the new one, inside the batch's transaction, and takes
the row lock first so that two owners of one partition (a zombie and its successor)
serialise on it. The loser sees :class:`~consumer.errors.OffsetConflict` and its whole
transaction is rolled back: a fenced-off consumer can't commit over the new owner's work.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import ReturningInsert, ReturningUpdate

from consumer.errors import OffsetConflict
from consumer.models import ConsumerOffset


async def load_offset(
    session: AsyncSession, group_id: str, topic: str, partition: int
) -> int | None:
    """The stored next offset, or ``None`` if this group never committed the partition."""
    return (
        await session.execute(
            select(ConsumerOffset.next_offset).where(
                ConsumerOffset.group_id == group_id,
                ConsumerOffset.topic == topic,
                ConsumerOffset.partition == partition,
            )
        )
    ).scalar_one_or_none()


async def advance_offset(
    session: AsyncSession,
    *,
    group_id: str,
    topic: str,
    partition: int,
    expected: int | None,
    to: int,
) -> None:
    """Move the stored offset from ``expected`` to ``to``, or raise ``OffsetConflict``."""
    statement: ReturningInsert[tuple[int]] | ReturningUpdate[tuple[int]]
    if expected is None:
        statement = (
            insert(ConsumerOffset)
            .values(group_id=group_id, topic=topic, partition=partition, next_offset=to)
            .on_conflict_do_nothing()
            .returning(ConsumerOffset.next_offset)
        )
    else:
        statement = (
            update(ConsumerOffset)
            .where(
                ConsumerOffset.group_id == group_id,
                ConsumerOffset.topic == topic,
                ConsumerOffset.partition == partition,
                ConsumerOffset.next_offset == expected,
            )
            .values(next_offset=to)
            .returning(ConsumerOffset.next_offset)
        )
    if (await session.execute(statement)).scalar_one_or_none() is None:
        stored = await load_offset(session, group_id, topic, partition)
        raise OffsetConflict(topic, partition, expected, stored)
