"""The rows a batch writes for its orders (``consumer.apply._order_rows``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from consumer.apply import _order_rows
from consumer.events import decode_event
from consumer.messages import InboundMessage
from consumer.state_machine import OrderState, OrderStatus
from tests.events import paid

AT = datetime(2026, 1, 2, tzinfo=UTC)


def test_a_new_order_without_its_placing_event_is_refused_not_written_without_a_customer() -> None:
    """Its customer's id comes from the upsert of the batch's placing events' customers:
    without one it would be NULL, and the database's refusal would dead-letter the batch's
    events as bad data. A bug, so it fails loudly instead."""
    order_id = uuid.uuid4()
    state = OrderState(
        id=order_id,
        status=OrderStatus.PAID,
        currency="EUR",
        total=Decimal("1.00"),
        version=2,
        customer_email="ada@example.com",
        customer_name="Ada",
        lines=(),
        created_at=AT,
        updated_at=AT,
    )
    message = InboundMessage("orders.events", 0, 0, *paid(order_id))
    applied = [(message, decode_event(message.key, message.value))]
    with pytest.raises(RuntimeError, match="no OrderPlaced of it applied"):
        _order_rows({}, {order_id: state}, applied)
