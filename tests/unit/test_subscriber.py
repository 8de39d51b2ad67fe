"""The example subscriber: tolerant decoding, repeats and stale versions dropped, gaps seen."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from consumer.state_machine import LineState, OrderState, OrderStatus
from consumer.updates import build_update, update_event_id
from orderflow.cli.teams import describe
from orderflow.subscriber import (
    LatestOrders,
    Outcome,
    Subscriber,
    UnreadableUpdate,
    Verdict,
    decode_update,
)

ORDER = uuid.UUID("0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10")
OTHER = uuid.UUID("1c7d7b64-3333-4b68-9f55-7e2c2d0f3b21")
AT = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)
STATUSES = [OrderStatus.PENDING, OrderStatus.PAID, OrderStatus.SHIPPED, OrderStatus.DELIVERED]
CHANGES = ["OrderPlaced", "OrderPaid", "OrderShipped", "OrderDelivered"]


def update(version: int, *, order: uuid.UUID = ORDER, event_id: uuid.UUID | None = None) -> bytes:
    state = OrderState(
        id=order,
        status=STATUSES[version - 1],
        currency="EUR",
        total=Decimal("25.00"),
        version=version,
        customer_email="a@example.com",
        customer_name="Ada",
        lines=(LineState("SKU-1", 2, Decimal("12.50")),),
        created_at=AT,
        updated_at=AT,
    )
    cause = uuid.uuid5(order, str(version))
    return build_update(
        state,
        event_id=event_id or update_event_id(cause),
        change=CHANGES[version - 1],
        causation_id=cause,
        occurred_at=AT,
    )


def edited(value: bytes, **fields: Any) -> bytes:
    document = orjson.loads(value)
    document.update(fields)
    return orjson.dumps(document)


def test_decoding_ignores_unknown_fields_and_unknown_changes() -> None:
    value = edited(update(1), loyalty_points=12, change="OrderGiftWrapped")
    decoded = decode_update(value)
    assert decoded.order_version == 1
    assert decoded.change == "OrderGiftWrapped"
    assert decoded.order.total == Decimal("25.00")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (edited(update(1), schema_version=2), "schema_version 2 is not understood"),
        (b"{not json", "not JSON"),
        (edited(update(1), order_version="one"), "not a valid OrderUpdated"),
        (None, "no value"),
    ],
)
def test_what_it_cannot_read_is_refused_with_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(UnreadableUpdate, match=reason):
        decode_update(value)


def test_repeats_and_stale_versions_are_dropped_and_gaps_counted() -> None:
    latest = LatestOrders()
    verdicts = [
        latest.offer(decode_update(value))
        for value in [
            update(1),
            update(2),
            update(2),  # delivered again: same event_id
            update(1, event_id=uuid.uuid4()),  # an old snapshot: a new id, an old version
            update(4),  # version 3 never came
            update(1, order=OTHER),
        ]
    ]
    assert [outcome.verdict for outcome in verdicts] == [
        Verdict.NEW,
        Verdict.NEW,
        Verdict.REPEATED,
        Verdict.STALE,
        Verdict.NEW,
        Verdict.NEW,
    ]
    assert verdicts[4].missed == 1
    assert latest.versions == {ORDER: 4, OTHER: 1}


def test_a_bounded_memory_of_event_ids_still_drops_old_repeats_by_version() -> None:
    latest = LatestOrders(remember_event_ids=1)
    first = decode_update(update(1))
    assert latest.offer(first).verdict is Verdict.NEW
    assert latest.offer(decode_update(update(2))).verdict is Verdict.NEW
    assert latest.offer(first).verdict is Verdict.STALE  # its id was forgotten


def record(value: bytes | None, key: bytes | None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="orders.updates",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=(),
    )


def test_a_subscriber_for_some_orders_skips_the_others_and_reports_unreadable() -> None:
    shown: list[Outcome] = []
    unreadable: list[str] = []
    subscriber = Subscriber(
        on_update=lambda outcome, _: shown.append(outcome),
        on_unreadable=lambda _, reason: unreadable.append(reason),
        orders=[OTHER],
    )
    for value, key in [
        (update(1), str(ORDER).encode()),
        (update(1, order=OTHER), str(OTHER).encode()),
        (update(1, order=ORDER), None),  # no key: decided by the value's order_id
        (b"garbage", str(OTHER).encode()),
    ]:
        subscriber.handle(record(value, key))
    assert [outcome.update.order_id for outcome in shown] == [OTHER]
    assert len(unreadable) == 1
    assert subscriber.stats.other_orders == 2
    assert subscriber.stats.new == 1


def test_a_new_version_prints_as_one_line_with_the_latest_state() -> None:
    latest = LatestOrders()
    latest.offer(decode_update(update(1)))
    line = describe(latest.offer(decode_update(update(3))))
    assert line.split() == [
        "2026-11-24",
        "10:15:00",
        str(ORDER),
        "v3",
        "shipped",
        "25.00",
        "EUR",
        "OrderShipped",
        "(missed",
        "1",
        "earlier",
        "version)",
    ]
