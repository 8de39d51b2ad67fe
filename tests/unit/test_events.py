"""decode_event: raw Kafka bytes -> InboundEvent, or the RejectedEvent the contract names."""

import copy
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest

from consumer.errors import (
    AmountMismatch,
    DeadLetterReason,
    DuplicateOrder,
    InvalidTransition,
    MalformedJson,
    RejectedEvent,
    SchemaViolation,
    UnknownEventType,
    UnknownOrder,
)
from consumer.events import (
    MAX_EVENT_BYTES,
    EventType,
    InboundEvent,
    OrderCancelled,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    decode_event,
)

EVENT_ID = "7d9f0c1e-1111-4f6e-9d5c-0a7c2b8f9e01"
ORDER_ID = "0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10"
KEY = ORDER_ID.encode()
OCCURRED_AT = "2026-11-24T10:15:00Z"

PAYLOADS: dict[str, dict[str, Any]] = {
    "OrderPlaced": {
        "customer": {"email": "a@example.com", "name": "Ada"},
        "currency": "EUR",
        "lines": [
            {"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"},
            {"sku": "SKU-2", "quantity": 1, "unit_price": "0.10"},
        ],
    },
    "OrderPaid": {"payment_id": "pay_1", "amount": "25.10"},
    "OrderShipped": {"carrier": "DHL", "tracking_number": "TRK123"},
    "OrderDelivered": {},
    "OrderCancelled": {"reason": "customer changed their mind"},
}

#: Marks a field to delete in :func:`mutated`.
DELETE = object()
#: Placeholder replaced by a raw JSON number in :func:`with_raw_number`.
PLACEHOLDER = "__RAW_NUMBER__"


def document(event_type: str = "OrderPaid", **envelope: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "event_id": EVENT_ID,
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": OCCURRED_AT,
        "order_id": ORDER_ID,
        "payload": copy.deepcopy(PAYLOADS.get(event_type, {})),
    }
    doc.update(envelope)
    return doc


def encode(doc: Any) -> bytes:
    return orjson.dumps(doc)


def mutated(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with the field at ``path`` set to ``value`` (or deleted)."""
    result = copy.deepcopy(doc)
    parent: Any = result
    for step in path[:-1]:
        parent = parent[step]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return result


def with_raw_number(doc: dict[str, Any], path: tuple[str | int, ...], number: str) -> bytes:
    """``doc`` encoded with the field at ``path`` as the JSON number text ``number``."""
    text = encode(mutated(doc, path, PLACEHOLDER))
    assert text.count(f'"{PLACEHOLDER}"'.encode()) == 1
    return text.replace(f'"{PLACEHOLDER}"'.encode(), number.encode())


def json_path(path: tuple[str | int, ...]) -> str:
    text = "$"
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else f".{step}"
    return text


def rejected(
    expected: type[RejectedEvent], value: bytes | None, key: bytes | None = KEY
) -> RejectedEvent:
    """Decode, expect exactly ``expected`` with its contract reason, and return the error."""
    with pytest.raises(RejectedEvent) as excinfo:
        decode_event(key, value)
    error = excinfo.value
    assert type(error) is expected, f"{type(error).__name__}: {error}"
    assert error.reason is expected.reason
    assert error.message == str(error)
    assert error.message.strip(), "the rejection must carry a human-readable message"
    assert "\n" not in error.message
    return error


# --- the reasons themselves -------------------------------------------------------------------


def test_dead_letter_reasons_are_exactly_the_contracts() -> None:
    assert {reason.value for reason in DeadLetterReason} == {
        "malformed_json",
        "schema_violation",
        "unknown_event_type",
        "unknown_order",
        "duplicate_order",
        "invalid_transition",
        "amount_mismatch",
    }


@pytest.mark.parametrize(
    ("error_class", "reason"),
    [
        (MalformedJson, "malformed_json"),
        (SchemaViolation, "schema_violation"),
        (UnknownEventType, "unknown_event_type"),
        (UnknownOrder, "unknown_order"),
        (DuplicateOrder, "duplicate_order"),
        (InvalidTransition, "invalid_transition"),
        (AmountMismatch, "amount_mismatch"),
    ],
)
def test_each_rejection_carries_its_reason(error_class: type[RejectedEvent], reason: str) -> None:
    error = error_class("something is wrong")
    assert isinstance(error, RejectedEvent)
    assert error.reason == reason
    assert error.reason is DeadLetterReason(reason)
    assert error.message == "something is wrong"


# --- valid events -----------------------------------------------------------------------------


def test_order_placed_decodes() -> None:
    event = decode_event(KEY, encode(document("OrderPlaced")))
    assert isinstance(event, InboundEvent)
    assert event.event_id == uuid.UUID(EVENT_ID)
    assert event.event_type is EventType.ORDER_PLACED
    assert event.order_id == uuid.UUID(ORDER_ID)
    assert event.occurred_at == datetime(2026, 11, 24, 10, 15, tzinfo=UTC)
    assert event.occurred_at.utcoffset() == timedelta(0)
    payload = event.payload
    assert isinstance(payload, OrderPlaced)
    assert payload.customer.email == "a@example.com"
    assert payload.customer.name == "Ada"
    assert payload.currency == "EUR"
    assert [(line.sku, line.quantity) for line in payload.lines] == [("SKU-1", 2), ("SKU-2", 1)]
    assert [line.unit_price for line in payload.lines] == [Decimal("12.50"), Decimal("0.10")]
    assert all(type(line.unit_price) is Decimal for line in payload.lines)
    assert str(payload.lines[0].unit_price) == "12.50"


def test_order_paid_decodes() -> None:
    event = decode_event(KEY, encode(document("OrderPaid")))
    assert event.event_type is EventType.ORDER_PAID
    assert event.payload == OrderPaid(payment_id="pay_1", amount=Decimal("25.10"))
    assert isinstance(event.payload, OrderPaid)
    assert str(event.payload.amount) == "25.10"


def test_order_shipped_decodes() -> None:
    event = decode_event(KEY, encode(document("OrderShipped")))
    assert event.event_type is EventType.ORDER_SHIPPED
    assert event.payload == OrderShipped(carrier="DHL", tracking_number="TRK123")


def test_order_delivered_decodes() -> None:
    event = decode_event(KEY, encode(document("OrderDelivered")))
    assert event.event_type is EventType.ORDER_DELIVERED
    assert event.payload == OrderDelivered()


def test_order_cancelled_decodes() -> None:
    event = decode_event(KEY, encode(document("OrderCancelled")))
    assert event.event_type is EventType.ORDER_CANCELLED
    assert event.payload == OrderCancelled(reason="customer changed their mind")


@pytest.mark.parametrize("event_type", list(PAYLOADS))
def test_key_none_is_accepted(event_type: str) -> None:
    event = decode_event(None, encode(document(event_type)))
    assert event.event_type == event_type
    assert event.order_id == uuid.UUID(ORDER_ID)


def test_occurred_at_with_offset_keeps_the_instant() -> None:
    event = decode_event(KEY, encode(document(occurred_at="2026-11-24T12:15:00+02:00")))
    assert event.occurred_at == datetime(2026, 11, 24, 10, 15, tzinfo=UTC)


def test_surrounding_whitespace_is_valid_json() -> None:
    event = decode_event(KEY, b" \n" + encode(document()) + b"\n")
    assert event.event_type is EventType.ORDER_PAID


MONEY_TEXTS = ["12.50", "0.1", "0", "0.10", "1.2345", "7", "99999999999999.9999", "1e2"]


@pytest.mark.parametrize("text", MONEY_TEXTS)
def test_amount_as_json_string_is_exact(text: str) -> None:
    doc = mutated(document("OrderPaid"), ("payload", "amount"), text)
    payload = decode_event(KEY, encode(doc)).payload
    assert isinstance(payload, OrderPaid)
    assert type(payload.amount) is Decimal
    assert payload.amount.as_tuple() == Decimal(text).as_tuple()


@pytest.mark.parametrize("text", MONEY_TEXTS)
def test_amount_as_json_number_is_exact(text: str) -> None:
    value = with_raw_number(document("OrderPaid"), ("payload", "amount"), text)
    payload = decode_event(KEY, value).payload
    assert isinstance(payload, OrderPaid)
    assert type(payload.amount) is Decimal
    # Exactly the JSON text, never through a binary float (0.1 stays 0.1, 12.50 keeps its 0).
    assert payload.amount.as_tuple() == Decimal(text).as_tuple()


@pytest.mark.parametrize("text", MONEY_TEXTS)
def test_unit_price_as_json_number_is_exact(text: str) -> None:
    value = with_raw_number(document("OrderPlaced"), ("payload", "lines", 1, "unit_price"), text)
    payload = decode_event(KEY, value).payload
    assert isinstance(payload, OrderPlaced)
    assert payload.lines[1].unit_price.as_tuple() == Decimal(text).as_tuple()
    assert payload.lines[0].unit_price.as_tuple() == Decimal("12.50").as_tuple()


def test_money_numbers_are_not_floats() -> None:
    value = with_raw_number(document("OrderPaid"), ("payload", "amount"), "0.1")
    payload = decode_event(KEY, value).payload
    assert isinstance(payload, OrderPaid)
    assert payload.amount == Decimal("0.1")
    assert payload.amount != Decimal.from_float(0.1)  # the binary float 0.1 is not 0.1


@pytest.mark.parametrize(
    "path",
    [
        ("trace_id",),
        ("payload", "note"),
        ("payload", "customer", "loyalty_tier"),
        ("payload", "lines", 0, "discount"),
    ],
    ids=json_path,
)
def test_unknown_fields_are_ignored(path: tuple[str | int, ...]) -> None:
    extra = {"nested": [1, {"deep": None}], "text": "x"}
    doc = mutated(document("OrderPlaced"), path, extra)
    event = decode_event(KEY, encode(doc))
    assert event == decode_event(KEY, encode(document("OrderPlaced")))


@pytest.mark.parametrize("event_type", list(PAYLOADS))
def test_unknown_fields_are_ignored_for_every_type(event_type: str) -> None:
    doc = document(event_type, producer="upstream/2.0", headers={"a": 1})
    doc["payload"]["added_later"] = {"x": [1, 2, 3]}
    event = decode_event(KEY, encode(doc))
    assert event == decode_event(KEY, encode(document(event_type)))


# --- malformed bytes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(encode(document())[:-7], id="truncated"),
        pytest.param(encode(document())[:1], id="just-a-brace"),
        pytest.param(b'{"event_id": "oops", "event_type": ', id="truncated-bad-first-field"),
        pytest.param(b'{"event_id": 42, "order_id": [', id="truncated-wrong-type-first"),
        pytest.param(b'{"schema_version": "x"', id="truncated-after-bad-field"),
        pytest.param(b"\xff\xfe\x00{", id="invalid-utf8"),
        pytest.param(b"", id="empty"),
        pytest.param(b"   ", id="whitespace"),
        pytest.param(b"\xef\xbb\xbf" + encode(document()), id="utf8-bom"),
        pytest.param(encode(document()) + b"x", id="trailing-garbage"),
        pytest.param(encode(document()) * 2, id="two-objects"),
        pytest.param(b"{'event_id': 'single quotes'}", id="single-quotes"),
        pytest.param(b"not json at all", id="text"),
        pytest.param(encode(document()).replace(b"}", b",}", 1), id="trailing-comma"),
    ],
)
def test_malformed_bytes_are_malformed_json(value: bytes) -> None:
    error = rejected(MalformedJson, value)
    assert "JSON" in error.message


def test_null_value_is_malformed_json() -> None:
    error = rejected(MalformedJson, None)
    assert "null" in error.message or "no value" in error.message


@pytest.mark.parametrize(
    ("event_type", "text"),
    [
        ("OrderPaid", b"pay_1"),
        ("OrderShipped", b"DHL"),
        ("OrderCancelled", b"customer changed their mind"),
        ("OrderPaid", b"OrderPaid"),
    ],
    ids=["payment_id", "carrier", "reason", "event_type"],
)
def test_invalid_utf8_in_a_decoded_field_is_malformed_json(event_type: str, text: bytes) -> None:
    value = encode(document(event_type)).replace(b'"' + text + b'"', b'"\xff' + text + b'"')
    rejected(MalformedJson, value)


def test_invalid_utf8_in_an_ignored_field_is_malformed_json() -> None:
    value = encode(document(comment="PLACEHOLDER")).replace(b"PLACEHOLDER", b"\xff\xfe")
    rejected(MalformedJson, value)


# --- schema violations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "got"),
    [
        (b"[]", "array"),
        (b"[" + encode(document()) + b"]", "array"),
        (b'"OrderPlaced"', "str"),
        (b"42", "int"),
        (b"true", "bool"),
        (b"null", "null"),
    ],
)
def test_top_level_not_an_object_is_a_schema_violation(value: bytes, got: str) -> None:
    error = rejected(SchemaViolation, value)
    assert "object" in error.message
    assert got in error.message


ENVELOPE_FIELDS = ["event_id", "event_type", "schema_version", "occurred_at", "order_id", "payload"]


@pytest.mark.parametrize("field", ENVELOPE_FIELDS)
def test_missing_envelope_field_is_a_schema_violation(field: str) -> None:
    doc = mutated(document(), (field,), DELETE)
    error = rejected(SchemaViolation, encode(doc))
    assert f"`{field}`" in error.message
    assert "missing" in error.message


MISSING_PAYLOAD_FIELDS = [
    ("OrderPlaced", ("payload", "customer")),
    ("OrderPlaced", ("payload", "currency")),
    ("OrderPlaced", ("payload", "lines")),
    ("OrderPlaced", ("payload", "customer", "email")),
    ("OrderPlaced", ("payload", "customer", "name")),
    ("OrderPlaced", ("payload", "lines", 0, "sku")),
    ("OrderPlaced", ("payload", "lines", 0, "quantity")),
    ("OrderPlaced", ("payload", "lines", 1, "unit_price")),
    ("OrderPaid", ("payload", "payment_id")),
    ("OrderPaid", ("payload", "amount")),
    ("OrderShipped", ("payload", "carrier")),
    ("OrderShipped", ("payload", "tracking_number")),
    ("OrderCancelled", ("payload", "reason")),
]


@pytest.mark.parametrize(
    ("event_type", "path"),
    MISSING_PAYLOAD_FIELDS,
    ids=[f"{t}-{json_path(p)}" for t, p in MISSING_PAYLOAD_FIELDS],
)
def test_missing_payload_field_is_a_schema_violation(
    event_type: str, path: tuple[str | int, ...]
) -> None:
    doc = mutated(document(event_type), path, DELETE)
    error = rejected(SchemaViolation, encode(doc))
    assert f"`{path[-1]}`" in error.message
    assert "missing" in error.message
    assert event_type in error.message
    if len(path) > 2:  # nested: the message names where the object is
        assert f"`{json_path(path[:-1])}`" in error.message


WRONG_TYPES: list[tuple[str, tuple[str | int, ...], Any]] = [
    ("OrderPaid", ("event_id",), "not-a-uuid"),
    ("OrderPaid", ("event_id",), 42),
    ("OrderPaid", ("event_id",), None),
    ("OrderPaid", ("order_id",), "0b6c6a53-2222"),
    ("OrderPaid", ("order_id",), 12345),
    ("OrderPaid", ("event_type",), 5),
    ("OrderPaid", ("event_type",), None),
    ("OrderPaid", ("schema_version",), "1"),
    ("OrderPaid", ("schema_version",), True),
    ("OrderPaid", ("schema_version",), 1.5),
    ("OrderPaid", ("occurred_at",), "yesterday"),
    ("OrderPaid", ("occurred_at",), "2026-11-24"),
    ("OrderPaid", ("occurred_at",), "2026-13-45T10:15:00Z"),
    ("OrderPaid", ("occurred_at",), 1_790_000_000),
    ("OrderPlaced", ("payload", "lines", 0, "quantity"), "2"),
    ("OrderPlaced", ("payload", "lines", 0, "quantity"), True),
    ("OrderPlaced", ("payload", "lines", 0, "quantity"), 2.5),
    ("OrderPlaced", ("payload", "lines", 0, "quantity"), None),
    ("OrderPlaced", ("payload", "lines", 0, "unit_price"), {"amount": "12.50"}),
    ("OrderPlaced", ("payload", "lines", 0, "unit_price"), "twelve"),
    ("OrderPlaced", ("payload", "lines", 0, "sku"), 17),
    ("OrderPlaced", ("payload", "lines", 0, "sku"), ""),
    ("OrderPlaced", ("payload", "lines", 0), "SKU-1 x2"),
    ("OrderPlaced", ("payload", "lines"), {"sku": "SKU-1"}),
    ("OrderPlaced", ("payload", "customer"), "Ada"),
    ("OrderPlaced", ("payload", "customer", "email"), "not-an-email"),
    ("OrderPlaced", ("payload", "customer", "name"), ""),
    ("OrderPlaced", ("payload", "customer", "name"), ["Ada"]),
    ("OrderPlaced", ("payload", "currency"), 978),
    ("OrderPaid", ("payload", "amount"), {"value": "25.10"}),
    ("OrderPaid", ("payload", "amount"), ["25.10"]),
    ("OrderPaid", ("payload", "amount"), True),
    ("OrderPaid", ("payload", "amount"), None),
    ("OrderPaid", ("payload", "amount"), ""),
    ("OrderPaid", ("payload", "payment_id"), 42),
    ("OrderPaid", ("payload", "payment_id"), ""),
    ("OrderShipped", ("payload", "carrier"), None),
    ("OrderShipped", ("payload", "tracking_number"), 123),
    ("OrderCancelled", ("payload", "reason"), 42),
]


@pytest.mark.parametrize(
    ("event_type", "path", "value"),
    WRONG_TYPES,
    ids=[f"{t}-{json_path(p)}={v!r}" for t, p, v in WRONG_TYPES],
)
def test_mistyped_field_is_a_schema_violation_naming_its_path(
    event_type: str, path: tuple[str | int, ...], value: Any
) -> None:
    doc = mutated(document(event_type), path, value)
    error = rejected(SchemaViolation, encode(doc))
    assert f"`{json_path(path)}`" in error.message


@pytest.mark.parametrize("payload", [None, [], "x", 1])
def test_payload_not_an_object_is_a_schema_violation(payload: Any) -> None:
    error = rejected(SchemaViolation, encode(document("OrderPaid", payload=payload)))
    assert "OrderPaid" in error.message
    assert "object" in error.message


@pytest.mark.parametrize(
    "occurred_at", ["2026-11-24T10:15:00", "2026-11-24T10:15:00.123456", "2026-11-24 10:15:00"]
)
def test_occurred_at_without_time_zone_is_a_schema_violation(occurred_at: str) -> None:
    error = rejected(SchemaViolation, encode(document(occurred_at=occurred_at)))
    assert "`$.occurred_at`" in error.message


@pytest.mark.parametrize("quantity", [0, -1, -1000, 1_000_001])
def test_quantity_out_of_range_is_a_schema_violation(quantity: int) -> None:
    doc = mutated(document("OrderPlaced"), ("payload", "lines", 1, "quantity"), quantity)
    error = rejected(SchemaViolation, encode(doc))
    assert "`$.payload.lines[1].quantity`" in error.message


def test_quantity_bounds_are_accepted() -> None:
    doc = mutated(document("OrderPlaced"), ("payload", "lines", 0, "quantity"), 1)
    doc = mutated(doc, ("payload", "lines", 1, "quantity"), 1_000_000)
    payload = decode_event(KEY, encode(doc)).payload
    assert isinstance(payload, OrderPlaced)
    assert [line.quantity for line in payload.lines] == [1, 1_000_000]


def test_empty_lines_is_a_schema_violation() -> None:
    doc = mutated(document("OrderPlaced"), ("payload", "lines"), [])
    error = rejected(SchemaViolation, encode(doc))
    assert "`$.payload.lines`" in error.message


@pytest.mark.parametrize("currency", ["eur", "EURO", "EU", "", "E1R", " EUR", "Eur"])
def test_bad_currency_is_a_schema_violation(currency: str) -> None:
    doc = mutated(document("OrderPlaced"), ("payload", "currency"), currency)
    error = rejected(SchemaViolation, encode(doc))
    assert "`$.payload.currency`" in error.message


@pytest.mark.parametrize("currency", ["EUR", "USD", "JPY", "CHF"])
def test_iso_currency_is_accepted(currency: str) -> None:
    doc = mutated(document("OrderPlaced"), ("payload", "currency"), currency)
    payload = decode_event(KEY, encode(doc)).payload
    assert isinstance(payload, OrderPlaced)
    assert payload.currency == currency


BAD_MONEY = [
    pytest.param("-0.01", "negative", id="negative"),
    pytest.param("-12.50", "negative", id="negative-2"),
    pytest.param("NaN", "finite", id="nan"),
    pytest.param("sNaN", "finite", id="snan"),
    pytest.param("Infinity", "finite", id="infinity"),
    pytest.param("-Infinity", "finite", id="minus-infinity"),
    pytest.param("1.00001", "decimal places", id="five-decimals"),
    pytest.param("0.12345678", "decimal places", id="eight-decimals"),
    pytest.param("100000000000000", "below", id="ten-to-fourteen"),
    pytest.param("1E+20", "below", id="exponent"),
]


@pytest.mark.parametrize(("text", "words"), BAD_MONEY)
def test_bad_amount_is_a_schema_violation(text: str, words: str) -> None:
    doc = mutated(document("OrderPaid"), ("payload", "amount"), text)
    error = rejected(SchemaViolation, encode(doc))
    assert "`$.payload.amount`" in error.message
    assert words in error.message


@pytest.mark.parametrize(("text", "words"), BAD_MONEY)
def test_bad_unit_price_is_a_schema_violation(text: str, words: str) -> None:
    doc = mutated(document("OrderPlaced"), ("payload", "lines", 1, "unit_price"), text)
    error = rejected(SchemaViolation, encode(doc))
    assert "`$.payload.lines[1].unit_price`" in error.message
    assert words in error.message


@pytest.mark.parametrize(
    ("number", "words"),
    [("-1", "negative"), ("-0.5", "negative"), ("1.00001", "decimal places"), ("1e400", "below")],
)
def test_bad_amount_as_json_number_is_a_schema_violation(number: str, words: str) -> None:
    value = with_raw_number(document("OrderPaid"), ("payload", "amount"), number)
    error = rejected(SchemaViolation, value)
    assert "`$.payload.amount`" in error.message
    assert words in error.message


@pytest.mark.parametrize("event_type", ["OrderTeleported", "orderplaced", "ORDER_PLACED", ""])
def test_unknown_event_type(event_type: str) -> None:
    error = rejected(UnknownEventType, encode(document(event_type, payload={})))
    assert repr(event_type) in error.message
    assert "OrderPlaced" in error.message  # lists the known ones


@pytest.mark.parametrize("version", [0, 2, -1, 100])
def test_unsupported_schema_version_is_a_schema_violation(version: int) -> None:
    error = rejected(SchemaViolation, encode(document(schema_version=version)))
    assert "schema_version" in error.message
    assert str(version) in error.message


def test_key_different_from_order_id_is_a_schema_violation() -> None:
    other = "11111111-2222-4333-8444-555555555555"
    error = rejected(SchemaViolation, encode(document()), key=other.encode())
    assert "key" in error.message
    assert other in error.message
    assert ORDER_ID in error.message


@pytest.mark.parametrize("key", [b"", b"order-1", b"\xff\xfe", ORDER_ID.encode() + b" "])
def test_garbage_key_is_a_schema_violation(key: bytes) -> None:
    error = rejected(SchemaViolation, encode(document()), key=key)
    assert "key" in error.message


def test_key_equal_to_the_order_id_text_is_accepted_whatever_its_case() -> None:
    upper = ORDER_ID.upper()
    event = decode_event(upper.encode(), encode(document(order_id=upper)))
    assert event.order_id == uuid.UUID(ORDER_ID)


def test_oversized_value_is_a_schema_violation_without_parsing() -> None:
    # Not JSON at all: it would be malformed_json if it were parsed.
    error = rejected(SchemaViolation, b"\xff" * (MAX_EVENT_BYTES + 1))
    assert error.message == (
        f"message is {MAX_EVENT_BYTES + 1:,} bytes; the limit is {MAX_EVENT_BYTES:,} "
        "(ORDERFLOW_MAX_MESSAGE_BYTES)"
    )


def test_oversized_valid_event_is_a_schema_violation() -> None:
    value = encode(document())
    padded = b" " * (MAX_EVENT_BYTES + 1 - len(value)) + value
    assert len(padded) == MAX_EVENT_BYTES + 1
    rejected(SchemaViolation, padded)


def test_event_of_exactly_the_limit_is_accepted() -> None:
    value = encode(document())
    padded = b" " * (MAX_EVENT_BYTES - len(value)) + value
    assert len(padded) == MAX_EVENT_BYTES
    assert decode_event(KEY, padded).event_type is EventType.ORDER_PAID
