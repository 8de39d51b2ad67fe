"""A partition's lane bounds its transactions and its buffer by bytes as well as by count,
so a run of large records can't pile up in memory or in one transaction."""

from __future__ import annotations

from aiokafka import TopicPartition

from consumer.apply import InboundMessage
from consumer.intake import _Lane


def message(offset: int, size: int, key: bytes | None = b"k") -> InboundMessage:
    return InboundMessage("t", 0, offset, key, b"x" * size)


def lane_with(*sizes: int) -> _Lane:
    lane = _Lane(TopicPartition("t", 0))
    lane.add(message(offset, size) for offset, size in enumerate(sizes))
    return lane


def test_size_counts_keys_and_values() -> None:
    lane = lane_with(10, 20, 30)
    assert lane.size == 60 + 3
    lane.add([InboundMessage("t", 0, 3, None, None)])
    assert lane.size == 63


def test_take_stops_at_the_byte_budget_in_offset_order() -> None:
    lane = lane_with(*[999] * 10)  # 1,000 bytes each with the key
    taken = lane.take(500, 3_500)
    assert [m.offset for m in taken] == [0, 1, 2]
    assert lane.size == 7_000
    assert [m.offset for m in lane.take(500, 10**9)] == [3, 4, 5, 6, 7, 8, 9]
    assert lane.size == 0


def test_take_always_takes_one_record_however_large() -> None:
    lane = lane_with(5_000_000, 10)
    (first,) = lane.take(500, 1_000)
    assert first.offset == 0
    assert lane.size == 11


def test_take_still_stops_at_the_count() -> None:
    lane = lane_with(*[1] * 10)
    assert len(lane.take(4, 10**9)) == 4
    assert lane.size == 12


def test_drop_forgets_records_and_bytes() -> None:
    lane = lane_with(100, 100)
    lane.drop()
    assert (len(lane.records), lane.size) == (0, 0)
