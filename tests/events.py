"""Building inbound events for tests."""

from __future__ import annotations

import uuid
from typing import Any

from orderflow.tools.samples import encode, event_document

Message = tuple[bytes | None, bytes | None]


def key(order_id: uuid.UUID) -> bytes:
    return str(order_id).encode()


def event(event_type: str, order_id: uuid.UUID, payload: dict[str, Any], **fields: Any) -> Message:
    document = event_document(event_type, order_id, payload)
    document.update(fields)
    return key(order_id), encode(document)


def placed(
    order_id: uuid.UUID,
    *,
    email: str = "ada@example.com",
    name: str = "Ada",
    lines: list[dict[str, Any]] | None = None,
    currency: str = "EUR",
) -> Message:
    return event(
        "OrderPlaced",
        order_id,
        {
            "customer": {"email": email, "name": name},
            "currency": currency,
            "lines": lines or [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
        },
    )


def paid(order_id: uuid.UUID, amount: str = "25.00") -> Message:
    return event("OrderPaid", order_id, {"payment_id": "pay_1", "amount": amount})


def shipped(order_id: uuid.UUID) -> Message:
    return event("OrderShipped", order_id, {"carrier": "DHL", "tracking_number": "TRK1"})


def delivered(order_id: uuid.UUID) -> Message:
    return event("OrderDelivered", order_id, {})


def cancelled(order_id: uuid.UUID) -> Message:
    return event("OrderCancelled", order_id, {"reason": "changed mind"})
