"""One partition batch, one transaction: lock, dedup, decide, write, emit, advance the offset.

The order of work inside the transaction is deliberate:

1. in one statement, lock the ids of the orders the batch touches (transaction-level
   advisory locks, in key order), whether the orders exist yet or not, then the orders
   themselves (``FOR UPDATE``, read with their lines and customer as plain rows: the
   batch needs their state, not ORM objects), in id order, so that concurrent partitions
   can't deadlock;
2. in one statement, advance the stored offset (compare-and-set: a zombie and the
   partition's new owner serialise on its row, and the loser rolls back), find which of
   the batch's event ids the inbox (or the parked events) already holds, whether the
   batch's orders have parked events, and which of them exist: the first statement's
   snapshot predates its wait for an order lock, so an order placed by the transaction
   it waited for is missing there; then the transaction starts over, and its next
   first statement finds it. This one's snapshot is taken *after* the locks, so another
   group's transaction on the same orders (a replay) is seen committed. Every transaction
   takes order locks before the offset row, so none deadlock; then the parked events of
   the batch's orders, locked (see :mod:`consumer.parking`);
3. run the pure state machine over the events in offset order, in memory: every event is
   applied, parked, skipped as a duplicate, or rejected *before* anything is written, so
   a rejected event changes nothing; after each applied event, its order's parked events
   that now apply are applied too;
4. write, in one statement: the customers of the new orders (an upsert by email), the new
   orders (each taking its customer's id from that upsert) and their lines, the changed
   orders (by key: their rows are locked), the inbox rows and the outbox rows (updates
   and dead letters, in offset order); then the parked events that left or arrived.

Because the order rows are locked before their outbox rows are inserted, outbox id order
is commit order for every order: what the relay needs to publish each order in sequence.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import Row, Table, any_, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from consumer.bulk import bulk_connection
from consumer.errors import DeadLetterReason, RejectedEvent
from consumer.events import MAX_EVENT_BYTES, InboundEvent, OrderPlaced, decode_event
from consumer.messages import InboundMessage, TraceHeaders, dead_letter
from consumer.models import Customer, Order, OrderLine, ProcessedEvent
from consumer.offsets import advance_offset
from consumer.parking import (
    PARKABLE,
    Parked,
    forget_parked,
    load_waiting,
    parked_dead_letter,
    write_parked,
)
from consumer.state_machine import (
    LineState,
    OrderState,
    OrderStatus,
    can_apply_later,
    transition,
)
from consumer.tracing import NO_TRACING, BatchTrace, Tracing
from consumer.updates import UPDATE_EVENT_TYPE, build_update, update_event_id
from outbox import OutboxMessage, add_messages
from outbox.bulk import Lookup, TableRows, Upsert

CONTENT_TYPE: Final = "application/json"
_INBOX: Final = cast(Table, ProcessedEvent.__table__)
_INBOX_COLUMNS: Final = ("event_id", "order_id", "event_type", "topic", "partition", "offset")
_ORDERS: Final = cast(Table, Order.__table__)
_ORDER_COLUMNS: Final = (
    "id",
    "customer_id",
    "status",
    "currency",
    "total",
    "version",
    "created_at",
    "updated_at",
)
_ORDER_CHANGE_COLUMNS: Final = ("id", "status", "version", "updated_at")
_LINES: Final = cast(Table, OrderLine.__table__)
_LINE_COLUMNS: Final = ("order_id", "position", "sku", "quantity", "unit_price")
_CUSTOMERS: Final = cast(Table, Customer.__table__)
_CUSTOMER_COLUMNS: Final = ("id", "email", "name")
#: A known email keeps its customer (and id); the name is the latest placed order's.
_CUSTOMER_UPSERT: Final = Upsert(key=("email",), update=("name", "updated_at"))


@dataclass(frozen=True, slots=True)
class Destinations:
    updates_topic: str
    dead_letter_topic: str


@dataclass(slots=True)
class BatchOutcome:
    next_offset: int
    #: Events applied, released parked events included.
    applied: int = 0
    duplicates: int = 0
    dead_letters: Counter[DeadLetterReason] = field(default_factory=Counter)
    #: Each dead letter: (its message, why, and the event when it decoded), for the logs.
    rejections: list[tuple[InboundMessage, RejectedEvent, InboundEvent | None]] = field(
        default_factory=list
    )
    #: Events parked by this batch; parked events it applied; parked events it
    #: dead-lettered because they can never apply now (also in ``dead_letters``).
    parked: Counter[str] = field(default_factory=Counter)
    released: Counter[str] = field(default_factory=Counter)
    abandoned: Counter[str] = field(default_factory=Counter)
    #: The batch's trace id, when tracing is on (for its log line).
    trace_id: str | None = None

    @property
    def dead_lettered(self) -> int:
        return sum(self.dead_letters.values())


def order_state(order: Order) -> OrderState:
    """The pure state of a loaded order (lines and customer eager-loaded)."""
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
    max_message_bytes: int = MAX_EVENT_BYTES,
    park: bool = False,
    tracing: Tracing = NO_TRACING,
) -> BatchOutcome:
    """Apply ``messages`` (one partition, consecutive, in offset order) in one transaction.

    ``expected_offset`` is the partition's stored next offset as this consumer knows it;
    ``rejected`` forces a rejection for some offsets (used to isolate a message that the
    database itself refuses). A value over ``max_message_bytes`` is dead-lettered unparsed.
    With ``park``, an event that cannot apply *yet* is parked instead of dead-lettered (see
    :mod:`consumer.parking`); parked events of the batch's orders that now apply are
    applied whether or not ``park`` is set. Every row an event causes carries its trace
    context on (``tracing``: spans too, when tracing is on; see :mod:`consumer.tracing`).
    Raises ``OffsetConflict`` when fenced; any other exception means nothing was written.
    """
    if not messages:
        raise ValueError("apply_batch needs at least one message")
    outcome = BatchOutcome(next_offset=messages[-1].offset + 1)
    forced = rejected or {}
    decoded: list[InboundEvent | RejectedEvent] = []
    for message in messages:
        if message.offset in forced:
            decoded.append(forced[message.offset])
            continue
        try:
            decoded.append(decode_event(message.key, message.value, max_bytes=max_message_bytes))
        except RejectedEvent as error:
            decoded.append(error)

    first = messages[0]
    trace = tracing.batch(messages, group_id=group_id, topic=first.topic, partition=first.partition)
    try:
        with trace.transaction():
            while True:
                try:
                    await _apply(
                        session_factory,
                        group_id=group_id,
                        destinations=destinations,
                        messages=messages,
                        decoded=decoded,
                        expected_offset=expected_offset,
                        now=now,
                        park=park,
                        trace=trace,
                        outcome=outcome,
                    )
                    break
                except _PlacedMeanwhile:
                    # Rolled back: the next attempt locks the new orders with the others,
                    # in order. Each order is placed once, so this ends.
                    continue
    except BaseException as error:
        trace.end(error)
        raise
    trace.end()
    outcome.trace_id = trace.trace_id
    return outcome


async def _apply(
    session_factory: async_sessionmaker[AsyncSession],
    *,
    group_id: str,
    destinations: Destinations,
    messages: Sequence[InboundMessage],
    decoded: list[InboundEvent | RejectedEvent],
    expected_offset: int | None,
    now: datetime,
    park: bool,
    trace: BatchTrace,
    outcome: BatchOutcome,
) -> None:
    """The batch's transaction (see the module's docstring)."""
    first = messages[0]
    async with session_factory() as session, session.begin():
        events = [item for item in decoded if isinstance(item, InboundEvent)]
        order_ids = sorted({event.order_id for event in events})
        # Every transaction that applies events of an order holds its lock first, whether
        # the order exists yet or not (a row lock can't cover an order with no row): one
        # that parks an early OrderPaid and one that places its order elsewhere (a replay,
        # an event without a key on another partition) take turns, so the second one
        # sees what the first left: the parked payment to release, or the order. One
        # statement takes those locks, then the orders' row locks.
        orders = await _lock_orders(session, order_ids)
        # Then read the inbox: a transaction of another group (a replay) that applied one
        # of these events under the same order lock is then seen as committed, so its
        # event counts as a duplicate instead of failing the state machine here.
        advanced = await advance_offset(
            session,
            group_id=group_id,
            topic=first.topic,
            partition=first.partition,
            expected=expected_offset,
            to=outcome.next_offset,
            event_ids=[event.event_id for event in events],
            order_ids=order_ids,
        )
        if advanced.existing - orders.keys():
            # Placed by a transaction whose order lock the first statement waited for:
            # their rows were not in its snapshot. Locking them now would take row locks
            # out of id order (a backfill's FOR SHARE could then close a cycle): start over.
            raise _PlacedMeanwhile
        batch = _Batch(
            outcome=outcome,
            destinations=destinations,
            now=now,
            trace=trace,
            states={order_id: state for order_id, state in orders.items()},
            waiting=await load_waiting(session, order_ids) if advanced.waiting else {},
            seen=set(advanced.seen),
        )
        seen = batch.seen
        for message, item in zip(messages, decoded, strict=True):
            if isinstance(item, RejectedEvent):
                batch.reject(message, item, None)
                continue
            if item.event_id in seen:
                outcome.duplicates += 1
                trace.event(message, "duplicate")
                continue
            current = batch.states.get(item.order_id)
            try:
                state = transition(current, item, at=now)
            except RejectedEvent as error:
                if park and isinstance(error, PARKABLE) and can_apply_later(current, item):
                    seen.add(item.event_id)  # a repeat while it waits is a duplicate
                    batch.park(Parked(message, item, error, parked_at=now))
                else:
                    # Nothing of it is kept: the same event_id, corrected, may follow.
                    batch.reject(message, error, item)
                continue
            seen.add(item.event_id)
            batch.apply(message, item, state)
            batch.release(item.order_id)

        written: list[TableRows] = []
        if batch.applied:
            written = _order_rows(orders, batch.states, batch.applied)
            written.append(
                TableRows(
                    _INBOX,
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
                        for message, event in batch.applied
                    ],
                )
            )
        # Orders, lines, inbox and outbox rows: one statement.
        await add_messages(session, batch.emitted, along=written)
        await forget_parked(session, batch.left)
        await write_parked(session, group_id, batch.newly_parked())
        outcome.applied = len(batch.applied)


class _PlacedMeanwhile(Exception):
    """Orders of the batch were placed while its first statement waited for their locks."""


@dataclass(slots=True)
class _Batch:
    """What one transaction decides, in memory: order states, what it emits, parked events."""

    outcome: BatchOutcome
    destinations: Destinations
    now: datetime
    states: dict[uuid.UUID, OrderState | None]
    #: Parked events by order, in arrival order: loaded (locked) ones and this batch's own.
    waiting: dict[uuid.UUID, list[Parked]]
    #: Event ids applied or parked (a repeat is a duplicate); a dead-lettered one leaves.
    seen: set[uuid.UUID]
    trace: BatchTrace
    emitted: list[OutboxMessage] = field(default_factory=list)
    applied: list[tuple[InboundMessage, InboundEvent]] = field(default_factory=list)
    #: Rows of parked events this batch applied or dead-lettered.
    left: list[int] = field(default_factory=list)

    def apply(
        self,
        message: InboundMessage,
        event: InboundEvent,
        state: OrderState,
        *,
        outcome: str = "applied",
    ) -> None:
        self.states[event.order_id] = state
        self.applied.append((message, event))
        trace = self.trace.event(message, outcome)
        self.emitted.append(
            _update_message(state, event, self.destinations.updates_topic, self.now, trace)
        )

    def reject(
        self, message: InboundMessage, error: RejectedEvent, event: InboundEvent | None
    ) -> None:
        trace = self.trace.event(message, "dead-lettered")
        self.emitted.append(dead_letter(message, error, self.destinations.dead_letter_topic, trace))
        self.outcome.dead_letters[error.reason] += 1
        self.outcome.rejections.append((message, error, event))

    def park(self, parked: Parked) -> None:
        self.trace.event(parked.message, "parked")
        self.waiting.setdefault(parked.event.order_id, []).append(parked)
        self.outcome.parked[parked.event.event_type.value] += 1

    def release(self, order_id: uuid.UUID) -> None:
        """After an event of ``order_id`` applied: apply its parked events that now apply,
        the oldest first, again and again until none does; dead-letter those that now
        never can."""
        queue = self.waiting.get(order_id)
        while queue:
            for parked in queue:
                current = self.states.get(order_id)
                try:
                    state = transition(current, parked.event, at=self.now)
                except RejectedEvent as error:
                    if can_apply_later(current, parked.event):
                        continue  # still waiting
                    queue.remove(parked)
                    self._leave(parked)
                    # Dead-lettered, it leaves nothing: its corrected copy may apply.
                    self.seen.discard(parked.event.event_id)
                    self.emitted.append(
                        parked_dead_letter(
                            parked,
                            error,
                            self.destinations.dead_letter_topic,
                            self.now,
                            why="it was parked, and its order moved on to where it can't apply",
                            trace=self.trace.event(parked.message, "dead-lettered"),
                        )
                    )
                    self.outcome.dead_letters[error.reason] += 1
                    self.outcome.rejections.append((parked.message, error, parked.event))
                    self.outcome.abandoned[parked.event.event_type.value] += 1
                    break
                queue.remove(parked)
                self._leave(parked)
                self.apply(parked.message, parked.event, state, outcome="released")
                self.outcome.released[parked.event.event_type.value] += 1
                break  # start again from the oldest
            else:
                return  # none applies now

    def _leave(self, parked: Parked) -> None:
        if parked.row_id is not None:
            self.left.append(parked.row_id)

    def newly_parked(self) -> list[Parked]:
        """This batch's parked events that still wait, in arrival order."""
        return sorted(
            (
                parked
                for queue in self.waiting.values()
                for parked in queue
                if parked.row_id is None
            ),
            key=lambda parked: parked.message.offset,
        )


def _update_message(
    state: OrderState, event: InboundEvent, topic: str, now: datetime, trace: TraceHeaders
) -> OutboxMessage:
    return update_message(
        state,
        topic=topic,
        event_id=update_event_id(event.event_id),
        change=event.event_type.value,
        causation_id=event.event_id,
        now=now,
        trace=trace,
    )


def update_message(
    state: OrderState,
    *,
    topic: str,
    event_id: uuid.UUID,
    change: str,
    causation_id: uuid.UUID | None,
    now: datetime,
    trace: TraceHeaders = (),
) -> OutboxMessage:
    """The outbox message of one ``OrderUpdated`` (an applied event's, or a snapshot), with
    the trace context it carries on."""
    return OutboxMessage(
        topic=topic,
        key=str(state.id).encode(),
        payload=build_update(
            state,
            event_id=event_id,
            change=change,
            causation_id=causation_id,
            occurred_at=now,
        ),
        headers=(
            ("event_id", str(event_id)),
            ("event_type", UPDATE_EVENT_TYPE),
            ("content-type", CONTENT_TYPE),
            *trace,
        ),
    )


# The order-id locks: one transaction-level advisory lock per order (a hash of its id, in
# a namespace of their own), taken in key order so that two transactions can't deadlock.
ORDER_LOCK_NAMESPACE: Final = 0x6F6F7264  # "oord"
_ORDER_ID_LOCKS: Final = text(
    "(SELECT count(pg_advisory_xact_lock(:namespace, key)) FROM ("
    "SELECT DISTINCT hashtext(CAST(id AS text)) AS key "
    "FROM unnest(CAST(:order_ids AS uuid[])) AS id ORDER BY key) AS keys) >= 0"
)
# Then the orders that exist, locked in id order. Both in one statement: the subquery is
# uncorrelated, so it is evaluated once, before the scan returns its first row (a
# one-time filter), and every order lock is held before the first row lock is taken.
# Built once: a statement object caches its compiled form. One array parameter
# (``= ANY(...)``) gives one statement text, and so one prepared statement, whatever the
# number of ids (``IN`` would render one per count).
# One row per line (an order without lines: one row, the line's columns NULL), in id
# then line order; only the orders' rows are locked.
_LOCK_ORDERS: Final = (
    select(
        Order.id,
        Order.status,
        Order.currency,
        Order.total,
        Order.version,
        Order.created_at,
        Order.updated_at,
        Customer.email,
        Customer.name,
        OrderLine.sku,
        OrderLine.quantity,
        OrderLine.unit_price,
    )
    .join(Customer, Order.customer_id == Customer.id)
    .outerjoin(OrderLine, OrderLine.order_id == Order.id)
    .where(
        Order.id == any_(bindparam("order_ids", type_=ARRAY(PG_UUID(as_uuid=True)))),
        _ORDER_ID_LOCKS,
    )
    .order_by(Order.id, OrderLine.position)
    .with_for_update(of=Order)
)


async def _lock_orders(
    session: AsyncSession, order_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, OrderState]:
    """Take the order locks of ``order_ids``, then lock those orders that exist and read
    their state."""
    if not order_ids:
        return {}
    connection = await bulk_connection(session)
    result = await connection.execute(
        _LOCK_ORDERS, {"order_ids": list(order_ids), "namespace": ORDER_LOCK_NAMESPACE}
    )
    rows: dict[uuid.UUID, list[Row[*tuple[Any, ...]]]] = {}
    for row in result:
        rows.setdefault(row[0], []).append(row)
    states: dict[uuid.UUID, OrderState] = {}
    for found, lines in rows.items():
        first = lines[0]
        order_id = uuid.UUID(int=found.int)  # the driver's UUID subclass -> a plain UUID
        states[order_id] = OrderState(
            id=order_id,
            status=OrderStatus(first.status),
            currency=first.currency,
            total=first.total,
            version=first.version,
            customer_email=first.email,
            customer_name=first.name,
            lines=tuple(
                LineState(sku=line.sku, quantity=line.quantity, unit_price=line.unit_price)
                for line in lines
                if line.sku is not None
            ),
            created_at=first.created_at,
            updated_at=first.updated_at,
        )
    return states


def _order_rows(
    orders: Mapping[uuid.UUID, OrderState],
    states: dict[uuid.UUID, OrderState | None],
    applied: list[tuple[InboundMessage, InboundEvent]],
) -> list[TableRows]:
    """The rows to write for the batch's orders: the customers of its new orders (upserted
    by email), the new orders (their customer's id taken from that upsert, in the same
    statement), their lines, and the changed orders (updated by key)."""
    placed: dict[str, str] = {}
    for _, event in applied:
        if isinstance(event.payload, OrderPlaced):
            placed[event.payload.customer.email] = event.payload.customer.name
    # Sorted, so that two partitions upserting the same customers lock them in one order.
    customers = TableRows(
        _CUSTOMERS,
        _CUSTOMER_COLUMNS,
        [(uuid.uuid4(), email, placed[email]) for email in sorted(placed)],
        upsert=_CUSTOMER_UPSERT,
    )

    new_orders: list[tuple[object, ...]] = []
    new_lines: list[tuple[object, ...]] = []
    changed: list[tuple[object, ...]] = []
    for order_id in {event.order_id: None for _, event in applied}:
        state = states[order_id]
        assert state is not None  # an applied event always leaves a state
        if order_id in orders:
            changed.append((order_id, state.status.value, state.version, state.updated_at))
            continue
        if state.customer_email not in placed:
            # It would be left without a customer, and the write refused as bad data.
            raise RuntimeError(f"order {order_id} is new but no OrderPlaced of it applied")
        new_orders.append(
            (
                order_id,
                state.customer_email,  # -> the customer's id (see the lookup)
                state.status.value,
                state.currency,
                state.total,
                state.version,
                state.created_at,
                state.updated_at,
            )
        )
        new_lines.extend(
            (order_id, position, line.sku, line.quantity, line.unit_price)
            for position, line in enumerate(state.lines, start=1)
        )
    # The changed rows are locked (FOR UPDATE) by this transaction.
    return [
        customers,
        TableRows(
            _ORDERS,
            _ORDER_COLUMNS,
            new_orders,
            lookups=(Lookup("customer_id", customers, by="email", take="id"),),
        ),
        TableRows(_LINES, _LINE_COLUMNS, new_lines),
        TableRows(_ORDERS, _ORDER_CHANGE_COLUMNS, changed, update_key=("id",)),
    ]
