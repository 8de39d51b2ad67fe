"""Events that cannot apply yet: parked, released once their order catches up, dead-lettered
when they waited too long (or can no longer apply).

Upstream services race: an order's ``OrderPaid`` can land one offset before its
``OrderPlaced``. Such an event is *parked* (a ``parked_events`` row, written in the
transaction that advances its partition's offset) instead of dead-lettered. Whenever an
event of the order applies, its parked events that now apply are applied right after it,
in the same transaction, in arrival order (see :mod:`consumer.apply`). One that waited
the park timeout is dead-lettered with the reason it arrived with, by the partition's
current owner (:func:`expire_parked`, fenced like a batch); any can also be dead-lettered
by an operator (:func:`expire_where`).

Every way out takes the event's row under a row lock (``FOR UPDATE`` when loading it for
release, ``DELETE`` when expiring it), so whichever transaction gets the row first is the
only one that sees it: a parked event ends applied or dead-lettered exactly once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import any_, bindparam, delete, insert, select, text
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from consumer.bulk import execute_bulk
from consumer.errors import DeadLetterReason, InvalidTransition, RejectedEvent, UnknownOrder
from consumer.events import InboundEvent, decode_event
from consumer.messages import InboundMessage, TraceHeaders, dead_letter
from consumer.models import ParkedEvent
from consumer.offsets import advance_offset
from outbox import OutboxMessage, add_messages

#: The reasons an event can be parked for (it can still apply later).
PARKABLE: Final = (UnknownOrder, InvalidTransition)
_ERRORS: Final[dict[str, type[RejectedEvent]]] = {error.reason.value: error for error in PARKABLE}
#: Header of a dead letter that was parked first: how long it waited, in milliseconds.
PARKED_MS_HEADER: Final = "error.parked_ms"
#: Far more than any event needs: it decoded within the consumer's own limit when parked.
_DECODE_LIMIT: Final = 1 << 40


@dataclass(slots=True)
class Parked:
    """An event waiting for an earlier one of its order."""

    message: InboundMessage
    event: InboundEvent
    #: Why it waits: the reason it arrived with.
    error: RejectedEvent
    parked_at: datetime
    #: Its ``parked_events`` row (None: parked by the batch at hand, not written yet).
    row_id: int | None = None


@dataclass(slots=True)
class Expired:
    """What an expiry dead-lettered."""

    expired: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[DeadLetterReason] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.expired.values())


def waited_ms(parked: Parked, now: datetime) -> int:
    return max(0, round((now - parked.parked_at).total_seconds() * 1000))


def parked_dead_letter(
    parked: Parked,
    error: RejectedEvent,
    topic: str,
    now: datetime,
    *,
    why: str,
    trace: TraceHeaders | None = None,
) -> OutboxMessage:
    """The dead letter of a parked event: as any dead letter (original bytes and source),
    with ``why`` after the reason's own sentence and how long it waited, and ``trace``
    (by default the trace context it came with)."""
    waited = waited_ms(parked, now)
    reason = type(error)(f"{error.message}; {why} ({waited / 1000:.1f} s parked)")
    carried = parked.message.trace if trace is None else trace
    letter = dead_letter(parked.message, reason, topic, carried)
    return OutboxMessage(
        topic=letter.topic,
        key=letter.key,
        payload=letter.payload,
        headers=(*letter.headers, (PARKED_MS_HEADER, str(waited))),
    )


_WAITING_FOR_ORDERS: Final = (
    select(ParkedEvent)
    .where(ParkedEvent.order_id == any_(bindparam("order_ids", type_=ARRAY(PG_UUID()))))
    .order_by(ParkedEvent.id)
    .with_for_update()
)


async def load_waiting(
    session: AsyncSession, order_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[Parked]]:
    """The parked events of ``order_ids``, locked, in arrival order, by order."""
    rows = (await session.execute(_WAITING_FOR_ORDERS, {"order_ids": list(order_ids)})).scalars()
    waiting: dict[uuid.UUID, list[Parked]] = {}
    for row in rows:
        parked = _from_row(row)
        waiting.setdefault(parked.event.order_id, []).append(parked)
    return waiting


def _from_row(row: Any) -> Parked:
    """A parked event from its row (an ORM object, or a row with the same columns)."""
    trace: TraceHeaders = ()
    if row.traceparent:
        trace = (("traceparent", row.traceparent),)
        if row.tracestate:
            trace += (("tracestate", row.tracestate),)
    message = InboundMessage(
        topic=row.topic,
        partition=row.partition,
        offset=row.offset,
        key=row.key,
        value=row.value,
        trace=trace,
    )
    return Parked(
        message=message,
        event=decode_event(row.key, row.value, max_bytes=_DECODE_LIMIT),
        error=_ERRORS[row.reason](row.message),
        parked_at=row.parked_at,
        row_id=row.id,
    )


_INSERT_PARKED: Final = insert(ParkedEvent)
_FORGET: Final = delete(ParkedEvent).where(
    ParkedEvent.id == any_(bindparam("ids", type_=ARRAY(BIGINT)))
)


async def write_parked(session: AsyncSession, group_id: str, parked: Sequence[Parked]) -> None:
    """Store events parked by the batch at hand (in arrival order: their ids follow it)."""
    if not parked:
        return
    await session.execute(
        _INSERT_PARKED,
        [
            {
                "event_id": item.event.event_id,
                "order_id": item.event.order_id,
                "event_type": item.event.event_type.value,
                "group_id": group_id,
                "topic": item.message.topic,
                "partition": item.message.partition,
                "offset": item.message.offset,
                "key": item.message.key,
                "value": item.message.value,
                "reason": item.error.reason.value,
                "message": item.error.message,
                "traceparent": dict(item.message.trace).get("traceparent"),
                "tracestate": dict(item.message.trace).get("tracestate"),
            }
            for item in parked
        ],
    )


async def forget_parked(session: AsyncSession, row_ids: Sequence[int]) -> None:
    """Delete the rows of parked events that were applied or dead-lettered (locked by
    this transaction when it loaded them)."""
    if row_ids:
        await execute_bulk(session, _FORGET, {"ids": list(row_ids)})


# Expiry deletes what it dead-letters in the same statement: the row lock it takes (or
# waits for) is the one a release takes, so each parked event leaves exactly once. It
# takes the locks in id order, as every other way out does (a plain DELETE would take
# them in the table's physical order, and two transactions could wait for each other).
_EXPIRE_PARTITION: Final = text(
    """
    DELETE FROM parked_events WHERE id IN (
        SELECT id FROM parked_events
        WHERE group_id = :group_id AND topic = :topic AND partition = :partition
          AND parked_at <= now() - CAST(:older_than AS interval)
        ORDER BY id
        FOR UPDATE
    )
    RETURNING id, event_id, order_id, event_type, group_id, topic, partition, "offset",
              key, value, reason, message, traceparent, tracestate, parked_at
    """
)


_DUE_PARTITIONS: Final = text(
    """
    SELECT DISTINCT partition FROM parked_events
    WHERE group_id = :group_id AND topic = :topic AND partition = ANY(CAST(:partitions AS int[]))
      AND parked_at <= now() - CAST(:older_than AS interval)
    """
)


async def due_partitions(
    session_factory: async_sessionmaker[AsyncSession],
    *,
    group_id: str,
    topic: str,
    partitions: Sequence[int],
    older_than: timedelta,
) -> list[int]:
    """The partitions among ``partitions`` with events parked ``older_than`` or longer."""
    if not partitions:
        return []
    async with session_factory() as session:
        rows = await session.execute(
            _DUE_PARTITIONS,
            {
                "group_id": group_id,
                "topic": topic,
                "partitions": list(partitions),
                "older_than": older_than,
            },
        )
        return sorted(int(partition) for partition in rows.scalars())


async def list_parked(
    session: AsyncSession, *, order_id: uuid.UUID | None = None, limit: int | None = None
) -> list[ParkedEvent]:
    """Parked events (of ``order_id``, or all), the earliest arrival first."""
    statement = select(ParkedEvent).order_by(ParkedEvent.id).limit(limit)
    if order_id is not None:
        statement = statement.where(ParkedEvent.order_id == order_id)
    return list((await session.execute(statement)).scalars())


_SUMMARY: Final = text(
    "SELECT count(*), coalesce(extract(epoch FROM now() - min(parked_at)), 0) "
    "FROM parked_events WHERE group_id = :group_id"
)


async def parked_summary(connection: AsyncConnection, group_id: str) -> tuple[int, float]:
    """(events parked by ``group_id`` now, seconds the oldest of them has waited)."""
    count, oldest = (await connection.execute(_SUMMARY, {"group_id": group_id})).one()
    return int(count), float(oldest)


async def expire_parked(
    session_factory: async_sessionmaker[AsyncSession],
    *,
    group_id: str,
    topic: str,
    partition: int,
    expected_offset: int,
    older_than: timedelta,
    dead_letter_topic: str,
    now: datetime,
) -> Expired:
    """Dead-letter the partition's events parked for ``older_than`` or longer, fenced like a
    batch: the stored offset must still be ``expected_offset`` (a compare-and-set that
    leaves it there), so a member that lost the partition expires nothing."""
    async with session_factory() as session, session.begin():
        await advance_offset(
            session,
            group_id=group_id,
            topic=topic,
            partition=partition,
            expected=expected_offset,
            to=expected_offset,
        )
        rows = (
            await execute_bulk(
                session,
                _EXPIRE_PARTITION,
                {
                    "group_id": group_id,
                    "topic": topic,
                    "partition": partition,
                    "older_than": older_than,
                },
            )
        ).all()
        return await _dead_letter_rows(session, rows, dead_letter_topic, now, waited_for=older_than)


async def expire_where(
    session_factory: async_sessionmaker[AsyncSession],
    *,
    dead_letter_topic: str,
    order_id: uuid.UUID | None,
    older_than: timedelta,
    now: datetime,
    dry_run: bool = False,
) -> tuple[Expired, list[ParkedEvent]]:
    """Dead-letter now the parked events of ``order_id`` (or all) parked ``older_than`` or
    longer, whoever owns their partitions (``orderflow parked expire``); what matched.
    With ``dry_run``, nothing changes."""
    async with session_factory() as session, session.begin():
        statement = (
            select(ParkedEvent)
            .where(ParkedEvent.parked_at <= text("now() - CAST(:older_than AS interval)"))
            .order_by(ParkedEvent.id)
            .with_for_update()
            .params(older_than=older_than)
        )
        if order_id is not None:
            statement = statement.where(ParkedEvent.order_id == order_id)
        rows = list((await session.execute(statement)).scalars())
        if dry_run or not rows:
            return Expired(), rows
        await forget_parked(session, [row.id for row in rows])
        expired = await _dead_letter_rows(session, rows, dead_letter_topic, now, waited_for=None)
        return expired, rows


async def _dead_letter_rows(
    session: AsyncSession,
    rows: Sequence[Any],
    topic: str,
    now: datetime,
    *,
    waited_for: timedelta | None,
) -> Expired:
    outcome = Expired()
    letters: list[OutboxMessage] = []
    for row in sorted(rows, key=lambda row: row.id):
        parked = _from_row(row)
        why = (
            f"it waited {waited_for.total_seconds():g} s (ORDERFLOW_PARK_TIMEOUT_S) for the "
            "events it needs, and they did not come"
            if waited_for is not None
            else "an operator dead-lettered it (orderflow parked expire)"
        )
        letters.append(parked_dead_letter(parked, parked.error, topic, now, why=why))
        outcome.expired[parked.event.event_type.value] += 1
        outcome.dead_letters[parked.error.reason] += 1
    await add_messages(session, letters)
    return outcome
