"""Every order transition, in one place (pure: no session, no clock, no I/O).

``transition(state, event, at=...)`` either returns the order's next state or raises the
:class:`~consumer.errors.RejectedEvent` that says why the event can't be applied. The
caller passes the time the change takes effect, so the function stays deterministic.

    none      --OrderPlaced-->     pending
    pending   --OrderPaid-->       paid        (amount must equal the total)
    paid      --OrderShipped-->    shipped
    shipped   --OrderDelivered-->  delivered
    pending   --OrderCancelled-->  cancelled
    paid      --OrderCancelled-->  cancelled

``delivered`` and ``cancelled`` are terminal. Every applied event adds exactly 1 to the
order's version, starting at 1 for ``OrderPlaced``.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Final

from consumer.errors import AmountMismatch, DuplicateOrder, InvalidTransition, UnknownOrder
from consumer.events import (
    InboundEvent,
    OrderCancelled,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
)


class OrderStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


TERMINAL_STATUSES: Final = frozenset({OrderStatus.DELIVERED, OrderStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class LineState:
    sku: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True, slots=True)
class OrderState:
    """Everything an ``OrderUpdated`` carries about one order, as of one version."""

    id: uuid.UUID
    status: OrderStatus
    currency: str
    total: Decimal
    version: int
    customer_email: str
    customer_name: str
    lines: tuple[LineState, ...]
    created_at: datetime
    updated_at: datetime


#: (from, event payload type) -> to. The one table of legal moves besides OrderPlaced.
_MOVES: Final[dict[tuple[OrderStatus, type], OrderStatus]] = {
    (OrderStatus.PENDING, OrderPaid): OrderStatus.PAID,
    (OrderStatus.PAID, OrderShipped): OrderStatus.SHIPPED,
    (OrderStatus.SHIPPED, OrderDelivered): OrderStatus.DELIVERED,
    (OrderStatus.PENDING, OrderCancelled): OrderStatus.CANCELLED,
    (OrderStatus.PAID, OrderCancelled): OrderStatus.CANCELLED,
}


def _sources() -> dict[type, frozenset[OrderStatus]]:
    sources: dict[type, set[OrderStatus]] = {}
    for status, payload in _MOVES:
        sources.setdefault(payload, set()).add(status)
    return {payload: frozenset(statuses) for payload, statuses in sources.items()}


def _reachable() -> dict[OrderStatus, frozenset[OrderStatus]]:
    reachable: dict[OrderStatus, frozenset[OrderStatus]] = {}
    for status in OrderStatus:
        seen: set[OrderStatus] = set()
        frontier = [status]
        while frontier:
            current = frontier.pop()
            for (source, _), target in _MOVES.items():
                if source is current and target not in seen:
                    seen.add(target)
                    frontier.append(target)
        reachable[status] = frozenset(seen)
    return reachable


#: Event payload type -> the statuses it applies from.
SOURCES: Final = _sources()
#: Status -> the statuses an order can still reach from it, by one or more legal moves.
REACHABLE: Final = _reachable()


def can_apply_later(state: OrderState | None, event: InboundEvent) -> bool:
    """Whether ``event``, which can't apply to ``state`` now, may apply after other events
    of its order: the order does not exist yet (any event but ``OrderPlaced``), or the
    event applies from a status the order can still reach (``OrderShipped`` on a
    ``pending`` order waits for ``OrderPaid``). Everything else can never apply: an
    ``OrderPlaced`` on an existing order, an event whose statuses the order has left for
    good, anything on a ``cancelled`` or ``delivered`` order."""
    payload = event.payload
    if isinstance(payload, OrderPlaced):
        return False
    if state is None:
        return True
    return not SOURCES[type(payload)].isdisjoint(REACHABLE[state.status])


def order_total(lines: tuple[LineState, ...]) -> Decimal:
    return sum((line.unit_price * line.quantity for line in lines), Decimal(0))


def transition(state: OrderState | None, event: InboundEvent, *, at: datetime) -> OrderState:
    """The state after ``event``, or raise the ``RejectedEvent`` that forbids it."""
    payload = event.payload
    if isinstance(payload, OrderPlaced):
        if state is not None:
            raise DuplicateOrder(
                f"order {event.order_id} already exists (version {state.version}, "
                f"{state.status}); OrderPlaced can only create a new order"
            )
        lines = tuple(
            LineState(sku=line.sku, quantity=line.quantity, unit_price=line.unit_price)
            for line in payload.lines
        )
        return OrderState(
            id=event.order_id,
            status=OrderStatus.PENDING,
            currency=payload.currency,
            total=order_total(lines),
            version=1,
            customer_email=payload.customer.email,
            customer_name=payload.customer.name,
            lines=lines,
            created_at=at,
            updated_at=at,
        )

    if state is None:
        raise UnknownOrder(f"{event.event_type} for order {event.order_id}, which does not exist")
    target = _MOVES.get((state.status, type(payload)))
    if target is None:
        raise InvalidTransition(
            f"{event.event_type} is not allowed for order {event.order_id} in status {state.status}"
        )
    if isinstance(payload, OrderPaid) and payload.amount != state.total:
        raise AmountMismatch(
            f"OrderPaid amount {payload.amount} does not equal the total {state.total} "
            f"{state.currency} of order {event.order_id}"
        )
    # Spelled out rather than dataclasses.replace(): this is the consumer's hot path.
    return OrderState(
        id=state.id,
        status=target,
        currency=state.currency,
        total=state.total,
        version=state.version + 1,
        customer_email=state.customer_email,
        customer_name=state.customer_name,
        lines=state.lines,
        created_at=state.created_at,
        updated_at=at,
    )
