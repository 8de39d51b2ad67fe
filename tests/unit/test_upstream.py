"""Reading JSON Lines, reporting rejections, and shaping generated load (pure parts)."""

from __future__ import annotations

import io
from collections import Counter

import orjson
import pytest

from consumer.errors import RejectedEvent
from consumer.events import decode_event
from orderflow.tools.upstream import (
    Line,
    LoadCounts,
    Rejection,
    explain,
    order_lifecycles,
    read_lines,
    sample_stream,
    validate_line,
)


def test_lines_are_numbered_as_an_editor_shows_them() -> None:
    data = b'\xef\xbb\xbf{"a": 1}\r\n\n   \n  {"b": 2}  \n{"c": 3}'
    lines = list(read_lines(io.BytesIO(data), 1000))
    assert [(line.number, line.value) for line in lines] == [
        (1, b'{"a": 1}'),
        (4, b'{"b": 2}'),
        (5, b'{"c": 3}'),
    ]


def test_a_line_over_the_limit_is_skipped_not_kept_and_counting_goes_on() -> None:
    assert validate_line(Line(7, b'{"a": "' + b"x" * 20 + b'"}'), 20) == Rejection(
        7, "schema_violation", "message is 29 bytes; the limit is 20 (ORDERFLOW_MAX_MESSAGE_BYTES)"
    )
    data = b"x" * 5000 + b"\n" + b"y" * 11 + b"\n" + b"z" * 10 + b"\n"
    lines = list(read_lines(io.BytesIO(data), 10))
    assert [(line.number, line.value) for line in lines] == [(1, None), (2, None), (3, b"z" * 10)]
    rejection = validate_line(lines[0], 10)
    assert isinstance(rejection, Rejection)
    assert rejection.render() == (
        "line 1: the line is over the limit of 10 bytes (ORDERFLOW_MAX_MESSAGE_BYTES) "
        "(schema_violation)"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            b'{"event_id": "7d9f0c1e-1111-4f6e-9d5c-0a7c2b8f9e01", "event_type": "OrderPlaced",'
            b' "schema_version": 1, "occurred_at": "2026-11-24T10:15:00Z",'
            b' "order_id": "0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10", "payload": {"customer":'
            b' {"email": "a@b", "name": "A"}, "currency": "EUR",'
            b' "lines": [{"sku": "S", "quantity": 0, "unit_price": "1"}]}}',
            "$.payload.lines[0].quantity: Expected `int` >= 1",
        ),
        (b'{"event_id": 7}', "$.event_id: Expected `uuid`, got `int`"),
        (b"[1, 2", "the value is not valid UTF-8 JSON: Input data was truncated"),
    ],
)
def test_a_rejection_names_the_json_path_first(value: bytes, expected: str) -> None:
    with pytest.raises(RejectedEvent) as error:
        decode_event(None, value)
    assert explain(error.value) == expected


@pytest.mark.parametrize("orders", [1, 7, 40])
def test_load_runs_exactly_the_asked_orders_through_their_whole_lifecycle(orders: int) -> None:
    counts = LoadCounts()
    messages = list(order_lifecycles(sample_stream(5, orders=orders, faults=0), orders, counts))
    by_order: dict[str, list[str]] = {}
    for message in messages:
        assert message.expect == "event"
        event = decode_event(message.key, message.value)
        by_order.setdefault(str(event.order_id), []).append(event.event_type.value)
    assert len(by_order) == orders == counts.orders
    assert counts.events == len(messages)
    for lifecycle in by_order.values():
        assert lifecycle[0] == "OrderPlaced"
        assert lifecycle[-1] in {"OrderDelivered", "OrderCancelled"}


def test_load_with_faults_counts_the_mistakes_it_sends() -> None:
    counts = LoadCounts()
    messages = list(order_lifecycles(sample_stream(9, orders=30, faults=5), 30, counts))
    kinds = Counter(message.expect for message in messages)
    assert kinds["event"] == counts.events
    assert kinds["duplicate"] == counts.duplicates
    assert sum(kinds.values()) - kinds["event"] - kinds["duplicate"] == counts.poison
    assert counts.poison > 0
    assert counts.duplicates > 0
    placed = {
        orjson.loads(message.value)["order_id"]
        for message in messages
        if message.expect == "event" and message.value and b'"OrderPlaced"' in message.value
    }
    assert len(placed) == counts.orders == 30
