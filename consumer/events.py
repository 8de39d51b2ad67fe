"""Inbound events: decode and validate raw Kafka bytes into typed, immutable values (pure).

The JSON is decoded straight into typed ``msgspec`` structs: no dicts of ``Any`` escape
this module. Money fields accept JSON strings or numbers and are decoded into ``Decimal``
exactly from the JSON text (never through a binary float). Unknown fields are ignored,
so upstream can add fields without breaking us; a missing or mistyped required field is
a :class:`~consumer.errors.SchemaViolation` whose message names the JSON path.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Final

import msgspec

from consumer.errors import MalformedJson, SchemaViolation, UnknownEventType

SCHEMA_VERSION: Final = 1
#: Larger inbound values are dead-lettered as schema violations before any parsing
#: (the default of ``decode_event``'s ``max_bytes``; ORDERFLOW_MAX_MESSAGE_BYTES sets it).
MAX_EVENT_BYTES: Final = 1024 * 1024
#: Money: non-negative, at most this many digits after the point and before it.
MONEY_MAX_SCALE: Final = 4
MONEY_MAX_INTEGER_DIGITS: Final = 14

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Email = Annotated[str, msgspec.Meta(max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]


class EventType(enum.StrEnum):
    ORDER_PLACED = "OrderPlaced"
    ORDER_PAID = "OrderPaid"
    ORDER_SHIPPED = "OrderShipped"
    ORDER_DELIVERED = "OrderDelivered"
    ORDER_CANCELLED = "OrderCancelled"


class Customer(msgspec.Struct, frozen=True):
    email: Email
    name: Text


class Line(msgspec.Struct, frozen=True):
    sku: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    quantity: Quantity
    unit_price: Decimal


class OrderPlaced(msgspec.Struct, frozen=True):
    customer: Customer
    currency: Currency
    lines: Annotated[tuple[Line, ...], msgspec.Meta(min_length=1, max_length=1000)]


class OrderPaid(msgspec.Struct, frozen=True):
    payment_id: Text
    amount: Decimal


class OrderShipped(msgspec.Struct, frozen=True):
    carrier: Text
    tracking_number: Text


class OrderDelivered(msgspec.Struct, frozen=True):
    pass


class OrderCancelled(msgspec.Struct, frozen=True):
    reason: Annotated[str, msgspec.Meta(max_length=1000)]


Payload = OrderPlaced | OrderPaid | OrderShipped | OrderDelivered | OrderCancelled

PAYLOAD_TYPES: Final[dict[EventType, type[Payload]]] = {
    EventType.ORDER_PLACED: OrderPlaced,
    EventType.ORDER_PAID: OrderPaid,
    EventType.ORDER_SHIPPED: OrderShipped,
    EventType.ORDER_DELIVERED: OrderDelivered,
    EventType.ORDER_CANCELLED: OrderCancelled,
}


class Envelope(msgspec.Struct, frozen=True):
    """The common fields of every inbound event; the payload is decoded once its type is known."""

    event_id: uuid.UUID
    event_type: str
    schema_version: int
    occurred_at: datetime
    order_id: uuid.UUID
    payload: msgspec.Raw


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """A validated inbound event."""

    event_id: uuid.UUID
    event_type: EventType
    occurred_at: datetime
    order_id: uuid.UUID
    payload: Payload


_envelope_decoder: Final = msgspec.json.Decoder(Envelope)
_payload_decoders: Final = {
    event_type: msgspec.json.Decoder(payload_type)
    for event_type, payload_type in PAYLOAD_TYPES.items()
}


def decode_event(
    key: bytes | None, value: bytes | None, *, max_bytes: int = MAX_EVENT_BYTES
) -> InboundEvent:
    """Turn one Kafka message into an :class:`InboundEvent`, or raise a ``RejectedEvent``.

    Whatever the bytes, this returns an event or raises a ``RejectedEvent``: no other
    exception escapes (a property test throws arbitrary bytes and JSON at it). A value
    over ``max_bytes`` is rejected before any parsing, so it costs no more than its length.
    """
    if value is None:
        raise MalformedJson("the message has no value (a null record), expected a JSON object")
    if len(value) > max_bytes:
        raise SchemaViolation(
            f"message is {len(value):,} bytes; the limit is {max_bytes:,} "
            "(ORDERFLOW_MAX_MESSAGE_BYTES)"
        )
    try:
        return _decode(key, value)
    except RecursionError:
        # msgspec refuses to nest deeper than the interpreter's recursion limit: valid JSON
        # perhaps, but no event looks like that (and it must not stop the consumer).
        raise SchemaViolation(
            "the JSON is nested too deeply to decode; an event nests a few levels at most"
        ) from None


def _decode(key: bytes | None, value: bytes) -> InboundEvent:
    try:
        # The contract says UTF-8; checking the whole value also covers fields we ignore.
        value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MalformedJson(f"the value is not valid UTF-8 JSON: {error}") from error
    try:
        envelope = _envelope_decoder.decode(value)
    except msgspec.ValidationError as error:
        # The typed decoder stops at the first bad field, before it has seen the whole
        # text: make sure the text is JSON at all before calling it a schema problem.
        _require_json(value)
        raise SchemaViolation(f"invalid event: {error}") from error
    except msgspec.DecodeError as error:
        raise MalformedJson(f"the value is not valid UTF-8 JSON: {error}") from error

    try:
        event_type = EventType(envelope.event_type)
    except ValueError:
        known = ", ".join(event_type.value for event_type in EventType)
        raise UnknownEventType(
            f"unknown event_type {envelope.event_type!r}; known types: {known}"
        ) from None
    if envelope.schema_version != SCHEMA_VERSION:
        raise SchemaViolation(
            f"unsupported schema_version {envelope.schema_version}; "
            f"this consumer understands version {SCHEMA_VERSION}"
        )
    if envelope.occurred_at.tzinfo is None:
        raise SchemaViolation(
            "occurred_at must carry a time zone (e.g. a trailing Z) - at `$.occurred_at`"
        )
    if key is not None and not _key_names_order(key, envelope.order_id):
        raise SchemaViolation(
            f"the message key {key[:80]!r} is not the order_id {envelope.order_id}; "
            "events must be keyed by order id to keep each order's events in order"
        )

    try:
        payload = _payload_decoders[event_type].decode(envelope.payload)
    except msgspec.ValidationError as error:
        raise SchemaViolation(f"invalid {event_type} payload: {_payload_path(error)}") from error
    except msgspec.DecodeError as error:  # pragma: no cover - the envelope parse saw valid JSON
        raise MalformedJson(f"the payload is not valid JSON: {error}") from error

    _check_money(payload)
    return InboundEvent(
        event_id=envelope.event_id,
        event_type=event_type,
        occurred_at=envelope.occurred_at,
        order_id=envelope.order_id,
        payload=payload,
    )


def _key_names_order(key: bytes, order_id: uuid.UUID) -> bool:
    if key == str(order_id).encode():
        return True
    try:  # the same UUID written differently (upper case, braces, no dashes)
        return uuid.UUID(key.decode("utf-8")) == order_id
    except (UnicodeDecodeError, ValueError):
        return False


def _require_json(value: bytes) -> None:
    try:
        msgspec.json.decode(value)
    except msgspec.DecodeError as error:
        raise MalformedJson(f"the value is not valid UTF-8 JSON: {error}") from error


def _payload_path(error: msgspec.ValidationError) -> str:
    return str(error).replace("`$", "`$.payload")


_MONEY_LIMIT: Final = Decimal(10) ** MONEY_MAX_INTEGER_DIGITS


def _check_money(payload: Payload) -> None:
    if isinstance(payload, OrderPlaced):
        for index, line in enumerate(payload.lines):
            if not _valid_amount(line.unit_price):
                _check_amount(line.unit_price, f"$.payload.lines[{index}].unit_price")
    elif isinstance(payload, OrderPaid) and not _valid_amount(payload.amount):
        _check_amount(payload.amount, "$.payload.amount")


def _valid_amount(amount: Decimal) -> bool:
    """The fast path: True for every amount that ``_check_amount`` accepts."""
    return (
        amount.is_finite()
        and 0 <= amount < _MONEY_LIMIT
        and amount.as_tuple().exponent >= -MONEY_MAX_SCALE  # type: ignore[operator]
    )


def _check_amount(amount: Decimal, path: str) -> None:
    """Raise the ``SchemaViolation`` that says what is wrong with ``amount``."""
    if not amount.is_finite():
        raise SchemaViolation(f"a money amount must be a finite number, got {amount} - at `{path}`")
    if amount < 0:
        raise SchemaViolation(f"a money amount must not be negative, got {amount} - at `{path}`")
    _sign, _digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    if -exponent > MONEY_MAX_SCALE:
        raise SchemaViolation(
            f"a money amount has at most {MONEY_MAX_SCALE} decimal places, "
            f"got {amount} - at `{path}`"
        )
    if amount >= _MONEY_LIMIT:
        raise SchemaViolation(
            f"a money amount must be below 10^{MONEY_MAX_INTEGER_DIGITS}, "
            f"got {amount} - at `{path}`"
        )
