"""Consumer offsets stored in PostgreSQL, next to the effects they account for.

``advance_offset`` is a compare-and-set: it moves a partition's next offset from the value
this consumer believes is stored to the new one, inside the batch's transaction, taking
the row lock, so that two owners of one partition (a zombie and its successor) serialise
on it. The loser sees :class:`~consumer.errors.OffsetConflict` and its whole
transaction is rolled back: a fenced-off consumer can't commit over the new owner's work.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy import any_, bindparam, exists, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY, UUID, insert
from sqlalchemy.ext.asyncio import AsyncSession

from consumer.bulk import bulk_connection
from consumer.errors import OffsetConflict
from consumer.models import ConsumerOffset, Order, ParkedEvent, ProcessedEvent


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


# The compare-and-set and the inbox lookup of a batch, as one statement (one round trip),
# built once with named parameters so that it is compiled once. The inbox is read in the
# same statement, whose snapshot is taken after the caller locked the batch's orders. An
# event waiting in ``parked_events`` counts as seen too (its repeat is a duplicate), and
# the statement tells whether any of the batch's orders has events waiting.
_EVENT_IDS = bindparam("event_ids", type_=ARRAY(UUID(as_uuid=True)))
_ORDER_IDS = bindparam("order_ids", type_=ARRAY(UUID(as_uuid=True)))
_IN_INBOX = (
    select(ProcessedEvent.event_id)
    .where(ProcessedEvent.event_id == any_(_EVENT_IDS))
    .union_all(select(ParkedEvent.event_id).where(ParkedEvent.event_id == any_(_EVENT_IDS)))
).scalar_subquery()
_WAITING = exists(select(ParkedEvent.id).where(ParkedEvent.order_id == any_(_ORDER_IDS)))
_EXISTING = select(Order.id).where(Order.id == any_(_ORDER_IDS)).scalar_subquery()
# (Parameter names that are not column names: in an UPDATE, those would mean SET.)
_KEY = (
    ConsumerOffset.group_id == bindparam("key_group"),
    ConsumerOffset.topic == bindparam("key_topic"),
    ConsumerOffset.partition == bindparam("key_partition"),
)
_FIRST_ADVANCE = (
    insert(ConsumerOffset)
    .values(
        group_id=bindparam("key_group"),
        topic=bindparam("key_topic"),
        partition=bindparam("key_partition"),
        next_offset=bindparam("to"),
    )
    .on_conflict_do_nothing()
    .returning(ConsumerOffset.next_offset)
    .cte("advanced")
)
_NEXT_ADVANCE = (
    update(ConsumerOffset)
    .where(*_KEY, ConsumerOffset.next_offset == bindparam("expected"))
    .values(next_offset=bindparam("to"), updated_at=func.now())
    .returning(ConsumerOffset.next_offset)
    .cte("advanced")
)
_ADVANCE_FIRST: Final = select(
    exists(select(_FIRST_ADVANCE.c.next_offset)),
    func.array(_IN_INBOX),
    _WAITING,
    func.array(_EXISTING),
)
_ADVANCE_NEXT: Final = select(
    exists(select(_NEXT_ADVANCE.c.next_offset)),
    func.array(_IN_INBOX),
    _WAITING,
    func.array(_EXISTING),
)


@dataclass(frozen=True, slots=True)
class Advanced:
    """What the compare-and-set statement found besides moving the offset."""

    #: The batch's event ids already applied, or waiting (parked).
    seen: set[uuid.UUID]
    #: Whether any of the batch's orders has parked events.
    waiting: bool
    #: The batch's orders that exist.
    existing: set[uuid.UUID] = field(default_factory=set)


async def advance_offset(
    session: AsyncSession,
    *,
    group_id: str,
    topic: str,
    partition: int,
    expected: int | None,
    to: int,
    event_ids: Sequence[uuid.UUID] = (),
    order_ids: Sequence[uuid.UUID] = (),
) -> Advanced:
    """Move the stored offset from ``expected`` to ``to``, or raise ``OffsetConflict``;
    in the same statement, find which of ``event_ids`` the inbox (or the parked events)
    already holds, whether any of ``order_ids`` has parked events, and which exist.

    The statement waits for the partition's row lock when another transaction holds it
    (a zombie and the new owner of one partition serialise here), then re-checks the
    stored offset: the loser finds it moved and rolls back.
    """
    parameters: dict[str, object] = {
        "key_group": group_id,
        "key_topic": topic,
        "key_partition": partition,
        "to": to,
        "event_ids": list(event_ids),
        "order_ids": list(order_ids),
    }
    if expected is None:
        statement = _ADVANCE_FIRST
    else:
        statement = _ADVANCE_NEXT
        parameters["expected"] = expected
    connection = await bulk_connection(session)
    advanced, processed, waiting, existing = (await connection.execute(statement, parameters)).one()
    if not advanced:
        stored = await load_offset(session, group_id, topic, partition)
        raise OffsetConflict(topic, partition, expected, stored)
    # The driver's UUID subclass -> plain UUIDs, as the decoded events carry.
    return Advanced(
        {uuid.UUID(int=event_id.int) for event_id in processed},
        bool(waiting),
        {uuid.UUID(int=order_id.int) for order_id in existing},
    )
