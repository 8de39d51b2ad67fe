"""build_update: the outbound OrderUpdated document, exactly as the contract shows it."""

import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest

from consumer.events import Customer, EventType, InboundEvent, Line, OrderPlaced
from consumer.state_machine import LineState, OrderState, OrderStatus, transition
from consumer.updates import (
    SNAPSHOT_CHANGE,
    UPDATE_EVENT_TYPE,
    build_update,
    format_timestamp,
    money_text,
    update_event_id,
)

ORDER_ID = uuid.UUID("0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10")
CAUSATION_ID = uuid.UUID("7d9f0c1e-1111-4f6e-9d5c-0a7c2b8f9e01")
CREATED = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)
UPDATED = datetime(2026, 11, 24, 10, 20, 5, 123456, tzinfo=UTC)
OCCURRED = datetime(2026, 11, 24, 10, 20, 5, 654321, tzinfo=UTC)
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
MONEY = re.compile(r"^\d+(\.\d+)?$")


def order_state(
    *,
    total: str = "25.00",
    prices: tuple[str, ...] = ("12.50",),
    status: OrderStatus = OrderStatus.PAID,
    version: int = 2,
) -> OrderState:
    return OrderState(
        id=ORDER_ID,
        status=status,
        currency="EUR",
        total=Decimal(total),
        version=version,
        customer_email="a@example.com",
        customer_name="Ada",
        lines=tuple(
            LineState(sku=f"SKU-{index}", quantity=2, unit_price=Decimal(price))
            for index, price in enumerate(prices, 1)
        ),
        created_at=CREATED,
        updated_at=UPDATED,
    )


def build(
    state: OrderState | None = None,
    *,
    causation_id: uuid.UUID | None = CAUSATION_ID,
    change: str = "OrderPaid",
    occurred_at: datetime = OCCURRED,
) -> dict:
    event_id = update_event_id(causation_id) if causation_id else uuid.UUID(int=1, version=4)
    raw = build_update(
        state or order_state(),
        event_id=event_id,
        change=change,
        causation_id=causation_id,
        occurred_at=occurred_at,
    )
    assert isinstance(raw, bytes)
    raw.decode("utf-8")  # UTF-8 JSON
    document = orjson.loads(raw)
    assert isinstance(document, dict)
    return document


def test_document_has_exactly_the_contract_fields() -> None:
    document = build()
    assert set(document) == {
        "event_id",
        "event_type",
        "schema_version",
        "occurred_at",
        "causation_id",
        "order_id",
        "order_version",
        "change",
        "order",
    }
    assert set(document["order"]) == {
        "id",
        "status",
        "currency",
        "total",
        "customer",
        "lines",
        "created_at",
        "updated_at",
    }
    assert set(document["order"]["customer"]) == {"email", "name"}
    assert all(
        set(line) == {"sku", "quantity", "unit_price"} for line in document["order"]["lines"]
    )


def test_document_values() -> None:
    document = build()
    assert document == {
        "event_id": str(update_event_id(CAUSATION_ID)),
        "event_type": "OrderUpdated",
        "schema_version": 1,
        "occurred_at": "2026-11-24T10:20:05.654321Z",
        "causation_id": str(CAUSATION_ID),
        "order_id": str(ORDER_ID),
        "order_version": 2,
        "change": "OrderPaid",
        "order": {
            "id": str(ORDER_ID),
            "status": "paid",
            "currency": "EUR",
            "total": "25.00",
            "customer": {"email": "a@example.com", "name": "Ada"},
            "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
            "created_at": "2026-11-24T10:15:00.000000Z",
            "updated_at": "2026-11-24T10:20:05.123456Z",
        },
    }
    assert UPDATE_EVENT_TYPE == "OrderUpdated"
    assert type(document["schema_version"]) is int
    assert type(document["order_version"]) is int
    assert type(document["order"]["lines"][0]["quantity"]) is int


def test_after_order_placed_the_version_is_one() -> None:
    placed = InboundEvent(
        event_id=CAUSATION_ID,
        event_type=EventType.ORDER_PLACED,
        occurred_at=CREATED,
        order_id=ORDER_ID,
        payload=OrderPlaced(
            customer=Customer(email="a@example.com", name="Ada"),
            currency="EUR",
            lines=(Line(sku="SKU-1", quantity=2, unit_price=Decimal("12.50")),),
        ),
    )
    state = transition(None, placed, at=CREATED)
    document = build(state, change="OrderPlaced")
    assert document["order_version"] == 1
    assert document["change"] == "OrderPlaced"
    assert document["order"]["status"] == "pending"
    assert document["order"]["total"] == "25.00"
    assert document["order"]["lines"] == [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}]


@pytest.mark.parametrize("status", list(OrderStatus))
def test_status_is_the_contract_word(status: OrderStatus) -> None:
    assert build(order_state(status=status))["order"]["status"] == status.value


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("25.00", "25.00"),
        ("2.5E+1", "25"),
        ("1E+2", "100"),
        ("0.1", "0.1"),
        ("0", "0"),
        ("0.00", "0.00"),
        ("1E-4", "0.0001"),
        ("99999999999999.9999", "99999999999999.9999"),
        ("1.2345E+13", "12345000000000"),
    ],
)
def test_money_is_plain_decimal_text(amount: str, text: str) -> None:
    assert money_text(Decimal(amount)) == text
    document = build(order_state(total=amount, prices=(amount, "12.50")))
    assert document["order"]["total"] == text
    assert document["order"]["lines"][0]["unit_price"] == text
    assert document["order"]["lines"][1]["unit_price"] == "12.50"
    for value in [document["order"]["total"], document["order"]["lines"][0]["unit_price"]]:
        assert isinstance(value, str)
        assert MONEY.match(value), value
        assert "E" not in value.upper()
        assert Decimal(value) == Decimal(amount)


def test_causation_id_null_for_a_snapshot() -> None:
    document = build(causation_id=None, change=SNAPSHOT_CHANGE)
    assert document["causation_id"] is None
    assert "causation_id" in document
    assert document["change"] == "Snapshot"
    assert document["order_version"] == 2  # the order's current version


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2026, 11, 24, 10, 15, tzinfo=UTC), "2026-11-24T10:15:00.000000Z"),
        (datetime(2026, 11, 24, 10, 15, 0, 123456, tzinfo=UTC), "2026-11-24T10:15:00.123456Z"),
        (datetime(2026, 11, 24, 10, 15, 0, 5, tzinfo=UTC), "2026-11-24T10:15:00.000005Z"),
        (
            datetime(2026, 11, 24, 12, 15, tzinfo=timezone(timedelta(hours=2))),
            "2026-11-24T10:15:00.000000Z",
        ),
        (
            datetime(2026, 11, 23, 23, 30, tzinfo=timezone(timedelta(hours=-11))),
            "2026-11-24T10:30:00.000000Z",
        ),
        (datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC), "1999-01-02T03:04:05.000000Z"),
    ],
)
def test_timestamps_are_utc_with_microseconds_and_z(moment: datetime, text: str) -> None:
    assert format_timestamp(moment) == text
    document = build(occurred_at=moment)
    assert document["occurred_at"] == text
    for value in [
        document["occurred_at"],
        *(document["order"][k] for k in ("created_at", "updated_at")),
    ]:
        assert TIMESTAMP.match(value), value
        assert datetime.fromisoformat(value) == datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_occurred_at_is_parseable_back_to_the_same_instant() -> None:
    document = build()
    assert datetime.fromisoformat(document["occurred_at"]) == OCCURRED
    assert datetime.fromisoformat(document["order"]["updated_at"]) == UPDATED
    assert datetime.fromisoformat(document["order"]["created_at"]) == CREATED


def test_update_event_id_is_deterministic() -> None:
    assert update_event_id(CAUSATION_ID) == update_event_id(uuid.UUID(str(CAUSATION_ID)))
    other = uuid.UUID("7d9f0c1e-1111-4f6e-9d5c-0a7c2b8f9e02")
    assert update_event_id(CAUSATION_ID) != update_event_id(other)
    assert update_event_id(CAUSATION_ID) != CAUSATION_ID


def test_update_event_ids_are_distinct_across_many_causes() -> None:
    causes = [uuid.UUID(int=n, version=4) for n in range(1_000)]
    ids = {update_event_id(cause) for cause in causes}
    assert len(ids) == len(causes)
    assert not ids & set(causes)


def test_same_inputs_give_the_same_bytes() -> None:
    state = order_state()
    first = build_update(
        state, event_id=update_event_id(CAUSATION_ID), change="OrderPaid",
        causation_id=CAUSATION_ID, occurred_at=OCCURRED,
    )  # fmt: skip
    second = build_update(
        state, event_id=update_event_id(CAUSATION_ID), change="OrderPaid",
        causation_id=CAUSATION_ID, occurred_at=OCCURRED,
    )  # fmt: skip
    assert first == second


def test_event_id_is_the_one_given() -> None:
    given = uuid.UUID("c1a00000-0000-4000-8000-000000000001")
    raw = build_update(
        order_state(), event_id=given, change="OrderShipped", causation_id=CAUSATION_ID,
        occurred_at=OCCURRED,
    )  # fmt: skip
    document = orjson.loads(raw)
    assert document["event_id"] == str(given)
    assert document["causation_id"] == str(CAUSATION_ID)
    assert document["change"] == "OrderShipped"


def test_non_ascii_text_survives() -> None:
    state = replace(order_state(), customer_name="Zoë Ñandú")
    document = build(state)
    assert document["order"]["customer"]["name"] == "Zoë Ñandú"


def test_several_lines_keep_their_order() -> None:
    document = build(order_state(prices=("1.00", "2.00", "3.00"), total="12.00"))
    assert [line["sku"] for line in document["order"]["lines"]] == ["SKU-1", "SKU-2", "SKU-3"]
    assert [line["unit_price"] for line in document["order"]["lines"]] == ["1.00", "2.00", "3.00"]
