"""decode_event never lets anything but a RejectedEvent escape, whatever the bytes.

Every inbound message must end as applied, duplicate or a dead letter with a contract
reason; an exception of any other kind would stop the consumer on that message (and on
every restart), so it would be a stuck partition. Hypothesis throws arbitrary bytes,
arbitrary JSON, and envelopes that are nearly valid (right keys, wrong types, huge
numbers, NaN-like strings, deep nesting, unicode, lone surrogates) at the decoder.
"""

from __future__ import annotations

import copy
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumer.errors import DeadLetterReason, RejectedEvent, SchemaViolation
from consumer.events import (
    MAX_EVENT_BYTES,
    MONEY_MAX_SCALE,
    InboundEvent,
    OrderPaid,
    OrderPlaced,
    decode_event,
)

#: The reasons decoding alone may give (the others need the order's state).
DECODE_REASONS = {
    DeadLetterReason.MALFORMED_JSON,
    DeadLetterReason.SCHEMA_VIOLATION,
    DeadLetterReason.UNKNOWN_EVENT_TYPE,
}

PROPERTY = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

EVENT_ID = "7d9f0c1e-1111-4f6e-9d5c-0a7c2b8f9e01"
ORDER_ID = "0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10"
VALID: dict[str, dict[str, Any]] = {
    "OrderPlaced": {
        "customer": {"email": "a@example.com", "name": "Ada"},
        "currency": "EUR",
        "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
    },
    "OrderPaid": {"payment_id": "pay_1", "amount": "25.00"},
    "OrderShipped": {"carrier": "DHL", "tracking_number": "TRK123"},
    "OrderDelivered": {},
    "OrderCancelled": {"reason": "changed their mind"},
}


def envelope(event_type: str) -> dict[str, Any]:
    return {
        "event_id": EVENT_ID,
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": "2026-11-24T10:15:00Z",
        "order_id": ORDER_ID,
        "payload": copy.deepcopy(VALID[event_type]),
    }


def outcome(key: bytes | None, value: bytes | None) -> InboundEvent | RejectedEvent:
    """The decoder's verdict; any exception but a RejectedEvent fails the test."""
    try:
        event = decode_event(key, value)
    except RejectedEvent as error:
        check_rejection(error)
        return error
    assert isinstance(event, InboundEvent)
    check_invariants(event)
    return event


def check_rejection(error: RejectedEvent) -> None:
    assert error.reason in DECODE_REASONS
    message = error.message
    assert isinstance(message, str)
    assert message.strip(), "a dead letter needs a human-readable message"
    # The message becomes the error.message header: JSONB in the outbox (no NUL) and
    # UTF-8 bytes on the wire (no lone surrogates).
    assert "\x00" not in message
    message.encode("utf-8")


def check_invariants(event: InboundEvent) -> None:
    """What the rest of the consumer relies on in an accepted event."""
    assert event.occurred_at.tzinfo is not None
    amounts: list[Decimal] = []
    if isinstance(event.payload, OrderPlaced):
        assert event.payload.lines
        amounts = [line.unit_price for line in event.payload.lines]
        assert all(line.quantity >= 1 for line in event.payload.lines)
    elif isinstance(event.payload, OrderPaid):
        amounts = [event.payload.amount]
    for amount in amounts:
        assert amount.is_finite()
        assert amount >= 0
        exponent = amount.as_tuple().exponent
        assert isinstance(exponent, int)
        assert -exponent <= MONEY_MAX_SCALE


# --- strategies -------------------------------------------------------------------------------

#: Strings that look like numbers or special values to a lenient parser.
TRICKY_STRINGS = st.sampled_from(
    [
        "NaN", "nan", "-NaN", "sNaN", "Infinity", "-Infinity", "inf", "1e999999999",
        "-0", "0e-99999", "1E+400", "12.5000000001", "0x1F", "١٢٣", "", " ", "\u0000",
        "\ud800", "\udfff", "😀", "ß", "İ", "\u202e", "null", "true", "{}", "[]",
        "2026-11-24T10:15:00", "2026-02-30T10:15:00Z", "9999-12-31T23:59:59+14:00",
        "0000-01-01T00:00:00Z", EVENT_ID.upper(), "{" + EVENT_ID + "}", EVENT_ID.replace("-", ""),
    ]
)  # fmt: skip
HUGE_INTEGERS = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.integers(min_value=-(2**64) - 2, max_value=-(2**63) + 2),
    st.integers(min_value=10**30, max_value=10**80),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    HUGE_INTEGERS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    TRICKY_STRINGS,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=20,
)

#: Valid JSON only: no NaN or Infinity, no lone surrogates.
STRICT_JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        HUGE_INTEGERS,
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.text(st.characters(exclude_categories=["Cs"]), max_size=12), children, max_size=4
        ),
    ),
    max_leaves=20,
)


def dumps(value: Any, *, ascii_only: bool) -> bytes:
    """JSON text by the standard library: big integers, NaN and Infinity literals (which
    JSON does not allow), and lone surrogates (escaped, or as invalid UTF-8 bytes)."""
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", errors="surrogatepass")


@st.composite
def nearly_valid(draw: st.DrawFn) -> bytes:
    """A valid event with a few fields (envelope or payload, at any depth) replaced by
    arbitrary values, deleted, or joined by unknown fields."""
    event_type = draw(st.sampled_from(sorted(VALID)))
    document = envelope(event_type)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        target: Any = document
        path: list[str | int] = []
        while isinstance(target, dict | list) and target and draw(st.booleans()):
            key: str | int = (
                draw(st.sampled_from(sorted(target)))
                if isinstance(target, dict)
                else draw(st.integers(min_value=0, max_value=len(target) - 1))
            )
            if not isinstance(target[key], dict | list):
                break
            path.append(key)
            target = target[key]
        if isinstance(target, dict):
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "add" or not target:
                target[draw(st.text(max_size=12))] = draw(JSON_VALUES)
            elif action == "delete":
                del target[draw(st.sampled_from(sorted(target)))]
            else:
                target[draw(st.sampled_from(sorted(target)))] = draw(JSON_VALUES)
        elif isinstance(target, list):
            target.append(draw(JSON_VALUES))
    return dumps(document, ascii_only=draw(st.booleans()))


@st.composite
def raw_numbers(draw: st.DrawFn) -> bytes:
    """Money and counts as raw JSON number text no float can hold exactly."""
    number = draw(
        st.one_of(
            st.sampled_from(
                [
                    "1e400", "-1e400", "1e-400", "123456789012345678901234567890.123456789",
                    "0.00001", "1E+2", "-0.0", "0", "99999999999999.9999", "100000000000000",
                    "1" + "0" * 5000, "0." + "0" * 5000 + "1",
                ]
            ),
            st.decimals(allow_nan=False, allow_infinity=False).map(str),
        )
    )  # fmt: skip
    event_type = draw(st.sampled_from(["OrderPlaced", "OrderPaid"]))
    document = envelope(event_type)
    marker = "__NUMBER__"
    field = draw(st.sampled_from(["money", "quantity", "schema_version"]))
    if field == "schema_version":
        document["schema_version"] = marker
    elif event_type == "OrderPaid":
        document["payload"]["amount"] = marker
    elif field == "money":
        document["payload"]["lines"][0]["unit_price"] = marker
    else:
        document["payload"]["lines"][0]["quantity"] = marker
    return json.dumps(document).replace(f'"{marker}"', number).encode()


def deeply_nested(depth: int, where: str) -> bytes:
    inner = "[" * depth + "]" * depth
    if where == "top":
        return inner.encode()
    document = envelope("OrderCancelled")
    marker = "__NESTED__"
    if where == "payload":
        document["payload"]["reason"] = marker
    else:
        document["extra"] = marker
    return json.dumps(document).replace(f'"{marker}"', inner).encode()


KEYS = st.one_of(
    st.none(),
    st.just(ORDER_ID.encode()),
    st.just(ORDER_ID.upper().encode()),
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda text: text.encode("utf-8", errors="surrogatepass")),
)


# --- properties -------------------------------------------------------------------------------


@PROPERTY
@given(key=KEYS, value=st.binary(max_size=2000))
@example(key=None, value=b"")
@example(key=None, value=b"\xef\xbb\xbf{}")  # a byte-order mark
@example(key=None, value=b'"\\ud800"')
def test_arbitrary_bytes(key: bytes | None, value: bytes) -> None:
    outcome(key, value)


@PROPERTY
@given(key=KEYS, value=JSON_VALUES, ascii_only=st.booleans())
def test_arbitrary_json(key: bytes | None, value: Any, ascii_only: bool) -> None:
    outcome(key, dumps(value, ascii_only=ascii_only))


@PROPERTY
@given(key=KEYS, value=nearly_valid())
def test_nearly_valid_envelopes(key: bytes | None, value: bytes) -> None:
    outcome(key, value)


@PROPERTY
@given(value=raw_numbers())
def test_numbers_no_float_can_hold(value: bytes) -> None:
    outcome(ORDER_ID.encode(), value)


@PROPERTY
@given(
    depth=st.one_of(st.integers(min_value=1, max_value=300), st.sampled_from([5_000, 100_000])),
    where=st.sampled_from(["top", "payload", "unknown field"]),
)
def test_deep_nesting(depth: int, where: str) -> None:
    result = outcome(ORDER_ID.encode(), deeply_nested(depth, where))
    if depth >= 5_000:
        assert isinstance(result, RejectedEvent)


def test_nesting_too_deep_is_a_schema_violation() -> None:
    result = outcome(None, deeply_nested(100_000, "top"))
    assert isinstance(result, RejectedEvent)
    assert result.reason is DeadLetterReason.SCHEMA_VIOLATION
    assert "nested too deeply" in result.message


@PROPERTY
@given(
    event_type=st.sampled_from(sorted(VALID)),
    ids=st.tuples(st.uuids(), st.uuids()),
    unknown=st.dictionaries(
        st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12),
        STRICT_JSON_VALUES,
        max_size=3,
    ),
)
def test_valid_events_with_unknown_fields_are_accepted(
    event_type: str, ids: tuple[uuid.UUID, uuid.UUID], unknown: dict[str, Any]
) -> None:
    document = envelope(event_type)
    document["event_id"], document["order_id"] = (str(ids[0]), str(ids[1]))
    for name, value in unknown.items():
        document.setdefault(name, value)  # never overwrite a known field
    result = outcome(str(ids[1]).encode(), dumps(document, ascii_only=False))
    assert isinstance(result, InboundEvent), result
    assert (result.event_id, result.order_id) == ids


@given(size=st.integers(min_value=MAX_EVENT_BYTES + 1, max_value=MAX_EVENT_BYTES + 5))
@settings(max_examples=5, deadline=None)
def test_oversized_values_are_rejected_before_parsing(size: int) -> None:
    result = outcome(None, b"\xff" * size)  # not even UTF-8: it is never parsed
    assert isinstance(result, RejectedEvent)
    assert result.reason is DeadLetterReason.SCHEMA_VIOLATION
    assert "(ORDERFLOW_MAX_MESSAGE_BYTES)" in result.message


def test_the_limit_is_the_callers() -> None:
    value = json.dumps(envelope("OrderDelivered")).encode()
    with pytest.raises(SchemaViolation) as excinfo:
        decode_event(ORDER_ID.encode(), value, max_bytes=len(value) - 1)
    assert excinfo.value.message == (
        f"message is {len(value):,} bytes; the limit is {len(value) - 1:,} "
        "(ORDERFLOW_MAX_MESSAGE_BYTES)"
    )
    assert isinstance(decode_event(ORDER_ID.encode(), value, max_bytes=len(value)), InboundEvent)
