"""One partition batch, one transaction: dedup, lock, decide, write, emit, advance the offset.

The order of work inside the transaction is deliberate:

1. advance the stored offset (compare-and-set) *first*: it takes the partition's row lock,
   so a zombie and the partition's new owner serialise here and the loser rolls back;
2. drop event ids the inbox already holds (one set-based query);
3. lock the orders the batch touches (``SELECT ... FOR UPDATE``, lines and customer
   eager-loaded), in id order so that concurrent partitions can't deadlock;
4. run the pure state machine over the events in offset order, in memory: every event is
   applied, skipped as a duplicate, or rejected *before* anything is written, so a
   rejected event changes nothing;
5. write: customers (one upsert), orders through the ORM, the inbox rows, and the outbox
   rows (updates and dead letters, in offset order), each as one statement.

Because the order rows are locked before their outbox rows are inserted, outbox id order
is commit order for every order: what the relay needs to publish each order in sequence.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import joinedload, selectinload

from consumer.errors import DeadLetterReason, RejectedEvent
from consumer.events import InboundEvent, OrderPlaced, decode_event
from consumer.models import Customer, Order, OrderLine, ProcessedEvent
from consumer.offsets import advance_offset
from consumer.state_machine import LineState, OrderState, OrderStatus, transition
from consumer.updates import build_update, update_event_id
from outbox import OutboxMessage, add_messages
from outbox.bulk import insert_rows

CONTENT_TYPE: Final = "application/json"
_INBOX_COLUMNS: Final = ("event_id", "order_id", "event_type", "topic", "partition", "offset")


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One Kafka record as the consumer received it (the bytes untouched)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class Destinations:
    updates_topic: str
    dead_letter_topic: str


@dataclass(slots=True)
class BatchOutcome:
    next_offset: int
    applied: int = 0
    duplicates: int = 0
    dead_letters: Counter[DeadLetterReason] = field(default_factory=Counter)

    @property
    def dead_lettered(self) -> int:
        return sum(self.dead_letters.values())


def dead_letter(message: InboundMessage, error: RejectedEvent, topic: str) -> OutboxMessage:
    """The DLQ record of a rejected message: original key and value bytes, contract headers."""
    return OutboxMessage(
        topic=topic,
        key=message.key,
        payload=message.value,
        headers=(
            ("error.reason", error.reason.value),
            ("error.message", error.message),
            ("source.topic", message.topic),
            ("source.partition", str(message.partition)),
            ("source.offset", str(message.offset)),
        ),
    )


def _order_state(order: Order) -> OrderState:
    return OrderState(
        id=uuid.UUID(int=order.id.int),  # the driver's UUID subclass -> a plain UUID
        status=OrderStatus(order.status),
        currency=order.currency,
        total=order.total,
        version=order.version,
        customer_email=order.customer.email,
        customer_name=order.customer.name,
        lines=tuple(
            LineState(sku=line.sku, quantity=line.quantity, unit_price=line.unit_price)
            for line in order.lines
        ),
        created_at=order.created_at,
        updated_at=order.updated_at,
    )


async def apply_batch(
    session_factory: async_sessionmaker[AsyncSession],
    *,
    group_id: str,
    destinations: Destinations,
    messages: Sequence[InboundMessage],
    expected_offset: int | None,
    now: datetime,
    rejected: Mapping[int, RejectedEvent] | None = None,
) -> BatchOutcome:
    """Apply ``messages`` (one partition, consecutive, in offset order) in one transaction.

    ``expected_offset`` is the partition's stored next offset as this consumer knows it;
    ``rejected`` forces a rejection for some offsets (used to isolate a message that the
    database itself refuses). Raises ``OffsetConflict`` when fenced; any other exception
    means nothing was written.
    """
    if not messages:
        raise ValueError("apply_batch needs at least one message")
    first = messages[0]
    outcome = BatchOutcome(next_offset=messages[-1].offset + 1)
    forced = rejected or {}
    decoded: list[InboundEvent | RejectedEvent] = []
    for message in messages:
        if message.offset in forced:
            decoded.append(forced[message.offset])
            continue
        try:
            decoded.append(decode_event(message.key, message.value))
        except RejectedEvent as error:
            decoded.append(error)

    async with session_factory() as session, session.begin():
        await advance_offset(
            session,
            group_id=group_id,
            topic=first.topic,
            partition=first.partition,
            expected=expected_offset,
            to=outcome.next_offset,
        )
        events = [item for item in decoded if isinstance(item, InboundEvent)]
        processed = await _already_processed(session, [event.event_id for event in events])
        orders = await _lock_orders(
            session, {event.order_id for event in events if event.event_id not in processed}
        )
        states: dict[uuid.UUID, OrderState | None] = {
            order_id: _order_state(order) for order_id, order in orders.items()
        }

        emitted: list[OutboxMessage] = []
        applied: list[tuple[InboundMessage, InboundEvent]] = []
        seen = set(processed)
        for message, item in zip(messages, decoded, strict=True):
            if isinstance(item, RejectedEvent):
                emitted.append(dead_letter(message, item, destinations.dead_letter_topic))
                outcome.dead_letters[item.reason] += 1
                continue
            if item.event_id in seen:
                outcome.duplicates += 1
                continue
            try:
                state = transition(states.get(item.order_id), item, at=now)
            except RejectedEvent as error:
                emitted.append(dead_letter(message, error, destinations.dead_letter_topic))
                outcome.dead_letters[error.reason] += 1
                continue
            seen.add(item.event_id)
            states[item.order_id] = state
            applied.append((message, item))
            emitted.append(_update_message(state, item, destinations.updates_topic, now))

        if applied:
            await _write_orders(session, orders, states, applied)
            await insert_rows(
                session,
                cast(Table, ProcessedEvent.__table__),
                _INBOX_COLUMNS,
                [
                    (
                        event.event_id,
                        event.order_id,
                        event.event_type.value,
                        message.topic,
                        message.partition,
                        message.offset,
                    )
                    for message, event in applied
                ],
            )
        await add_messages(session, emitted)
        outcome.applied = len(applied)
    return outcome


def _update_message(
    state: OrderState, event: InboundEvent, topic: str, now: datetime
) -> OutboxMessage:
    update_id = update_event_id(event.event_id)
    return OutboxMessage(
        topic=topic,
        key=str(state.id).encode(),
        payload=build_update(
            state,
            event_id=update_id,
            change=event.event_type.value,
            causation_id=event.event_id,
            occurred_at=now,
        ),
        headers=(
            ("event_id", str(update_id)),
            ("event_type", "OrderUpdated"),
            ("content-type", CONTENT_TYPE),
        ),
    )


async def _already_processed(session: AsyncSession, event_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    if not event_ids:
        return set()
    rows = await session.execute(
        select(ProcessedEvent.event_id).where(ProcessedEvent.event_id.in_(event_ids))
    )
    return set(rows.scalars())


async def _lock_orders(session: AsyncSession, order_ids: set[uuid.UUID]) -> dict[uuid.UUID, Order]:
    if not order_ids:
        return {}
    result = await session.execute(
        select(Order)
        .where(Order.id.in_(sorted(order_ids)))
        .order_by(Order.id)
        .options(selectinload(Order.lines), joinedload(Order.customer, innerjoin=True))
        .with_for_update(of=Order)
    )
    return {order.id: order for order in result.unique().scalars()}


async def _write_orders(
    session: AsyncSession,
    orders: dict[uuid.UUID, Order],
    states: dict[uuid.UUID, OrderState | None],
    applied: list[tuple[InboundMessage, InboundEvent]],
) -> None:
    placed: dict[str, str] = {}
    for _, event in applied:
        if isinstance(event.payload, OrderPlaced):
            placed[event.payload.customer.email] = event.payload.customer.name
    customer_ids: dict[str, uuid.UUID] = {}
    if placed:
        # Sorted, so that two partitions upserting the same customers lock them in one order.
        values = pg_insert(Customer).values(
            [
                {"id": uuid.uuid4(), "email": email, "name": placed[email]}
                for email in sorted(placed)
            ]
        )
        statement = values.on_conflict_do_update(
            index_elements=[Customer.email],
            set_={"name": values.excluded.name, "updated_at": values.excluded.updated_at},
        ).returning(Customer.id, Customer.email)
        rows = await session.execute(statement)
        customer_ids = {email: customer_id for customer_id, email in rows}

    # ORM bulk statements: one executemany each, no unit-of-work bookkeeping per object.
    new_orders: list[dict[str, object]] = []
    new_lines: list[dict[str, object]] = []
    changed: list[dict[str, object]] = []
    for order_id in {event.order_id for _, event in applied}:
        state = states[order_id]
        assert state is not None  # an applied event always leaves a state
        if order_id in orders:
            changed.append(
                {
                    "id": order_id,
                    "status": state.status.value,
                    "version": state.version,
                    "updated_at": state.updated_at,
                }
            )
            continue
        new_orders.append(
            {
                "id": order_id,
                "customer_id": customer_ids[state.customer_email],
                "status": state.status.value,
                "currency": state.currency,
                "total": state.total,
                "version": state.version,
                "created_at": state.created_at,
                "updated_at": state.updated_at,
            }
        )
        new_lines.extend(
            {
                "order_id": order_id,
                "position": position,
                "sku": line.sku,
                "quantity": line.quantity,
                "unit_price": line.unit_price,
            }
            for position, line in enumerate(state.lines, start=1)
        )
    if new_orders:
        await session.execute(insert(Order), new_orders)
        await session.execute(insert(OrderLine), new_lines)
    if changed:
        # The rows are locked (FOR UPDATE) by this transaction: "bulk UPDATE by primary key".
        await session.execute(update(Order), changed)
