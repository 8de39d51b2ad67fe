"""The outbound ``OrderUpdated`` message: state-carried, built inside the transaction."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import orjson

from consumer.state_machine import OrderState

UPDATE_EVENT_TYPE: Final = "OrderUpdated"
SNAPSHOT_CHANGE: Final = "Snapshot"
#: Mixed into the causing event's id to derive the update's id (it keeps the RFC 4122
#: variant bits as they are).
_UPDATE_ID_MASK: Final = 0x5B0C1D528F574F0E1A5261C1C0A3F1D7
_VERSION_BITS: Final = 0xF << 76


def update_event_id(causation_id: uuid.UUID) -> uuid.UUID:
    """The ``OrderUpdated.event_id`` caused by ``causation_id``: deterministic (a re-applied
    batch can't mint a new one), distinct from the causing id, and a valid UUID (version 8,
    "custom"). Two inbound v4 ids never map to the same update id (the mapping is an XOR)."""
    return uuid.UUID(int=((causation_id.int ^ _UPDATE_ID_MASK) & ~_VERSION_BITS) | (8 << 76))


@functools.lru_cache(maxsize=4096)
def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a ``Z``, as the contract shows.

    Cached: a batch stamps all its updates with one time, and an order's ``created_at``
    repeats in each of its updates.
    """
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def money_text(amount: Decimal) -> str:
    """Plain decimal notation (``"25.00"``), never an exponent (``"1E+2"``)."""
    return format(amount, "f")


def build_update(
    state: OrderState,
    *,
    event_id: uuid.UUID,
    change: str,
    causation_id: uuid.UUID | None,
    occurred_at: datetime,
) -> bytes:
    """Serialise one ``OrderUpdated`` (UTF-8 JSON bytes) for ``state``."""
    document = {
        "event_id": event_id,
        "event_type": UPDATE_EVENT_TYPE,
        "schema_version": 1,
        "occurred_at": format_timestamp(occurred_at),
        "causation_id": causation_id,
        "order_id": state.id,
        "order_version": state.version,
        "change": change,
        "order": {
            "id": state.id,
            "status": state.status.value,
            "currency": state.currency,
            "total": money_text(state.total),
            "customer": {"email": state.customer_email, "name": state.customer_name},
            "lines": [
                {
                    "sku": line.sku,
                    "quantity": line.quantity,
                    "unit_price": money_text(line.unit_price),
                }
                for line in state.lines
            ],
            "created_at": format_timestamp(state.created_at),
            "updated_at": format_timestamp(state.updated_at),
        },
    }
    return orjson.dumps(document)
