"""Reading bounded offset ranges of a topic, shared by the replays and the dead-letter tools.

A reader outside any group; a topic's partitions, their end offsets and the first offset
at or after an instant, each checked against the records themselves (some brokers'
answers do not hold); and the records of ``[start, end)`` ranges, which ends even while
producers keep appending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeAlias

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import kafka_common

Record: TypeAlias = ConsumerRecord[bytes, bytes]
# The replays' logger: these lines were always logged under it.
log = logging.getLogger("orderflow.replay")

#: The longest a single fetch while locating an offset by time may take.
PROBE_TIMEOUT_SECONDS: Final = 10.0


class ReplayError(Exception):
    """A request that can't be carried out; the message is the one line to print."""


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one partition."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def create_reader(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer outside any group, for reading exact offset ranges."""
    options: dict[str, Any] = {
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": 100,
        **kafka_common(settings),
    }
    options.update(overrides)
    return AIOKafkaConsumer(**options)


#: How long closing a Kafka client may take before it is abandoned.
CLIENT_STOP_SECONDS: Final = 10.0


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a Kafka client, bounded: aiokafka's stop() can hang on an unreachable broker,
    and a command that has done its work must still exit."""
    closing = asyncio.ensure_future(client.stop())
    done, _ = await asyncio.wait({closing}, timeout=CLIENT_STOP_SECONDS)
    if not done:
        closing.cancel()
        await asyncio.wait({closing})
        log.warning("a Kafka client did not close within %.0f s", CLIENT_STOP_SECONDS)
    elif not closing.cancelled() and closing.exception() is not None:
        log.warning("a Kafka client did not close cleanly: %s", closing.exception())


async def topic_partitions(reader: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    partitions = reader.partitions_for_topic(topic)
    if not partitions:
        await reader.topics()  # refresh the metadata once
        partitions = reader.partitions_for_topic(topic)
    if not partitions:
        raise ReplayError(f"topic {topic!r} does not exist (or has no partitions)")
    return [TopicPartition(topic, partition) for partition in sorted(partitions)]


async def end_offsets(
    reader: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
) -> dict[TopicPartition, int]:
    """Each partition's end (the offset the next record will get), as of now.

    The high watermark of a fetch response is taken as well as the ListOffsets answer,
    and the larger wins: some brokers (Tansu) answer ListOffsets with the last record
    batch's base offset + 1, short of the real end. ``reader`` must not be in a group.
    """
    reported: dict[TopicPartition, int] = await reader.end_offsets(list(partitions))
    _assign(reader, partitions)
    try:
        for partition in partitions:
            reader.seek(partition, max(0, reported[partition] - 1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROBE_TIMEOUT_SECONDS
        unknown = set(partitions)
        while unknown and loop.time() < deadline:
            await reader.getmany(*unknown, timeout_ms=200, max_records=1)
            unknown = {p for p in unknown if reader.highwater(p) is None}
        return {
            partition: max(reported[partition], reader.highwater(partition) or 0)
            for partition in partitions
        }
    finally:
        reader.pause(*partitions)


async def offsets_at_time(
    reader: AIOKafkaConsumer,
    timestamp: datetime,
    bounds: Mapping[TopicPartition, tuple[int, int]],
) -> dict[TopicPartition, int]:
    """Per partition, the first offset whose record is timestamped at or after ``timestamp``
    (the end offset when there is none). ``bounds`` holds each partition's (begin, end).

    The broker's time index answers first, and the answer is checked against the records
    around it. A broker whose answer does not hold (Tansu answers offset 0 whatever the
    time) is searched instead: a binary search over the record timestamps, which assumes
    they grow with the offset, as the broker's own time index does. ``reader`` must not
    be in a group.
    """
    moment = int(timestamp.timestamp() * 1000)
    answer = await reader.offsets_for_times({partition: moment for partition in bounds})
    _assign(reader, list(bounds))
    found: dict[TopicPartition, int] = {}
    try:
        for partition, (begin, end) in bounds.items():
            located = answer.get(partition)
            offset = end if located is None else min(max(located.offset, begin), end)
            if not await _is_first_at(reader, partition, moment, offset, begin, end):
                offset = await _search_by_time(reader, partition, moment, begin, end)
            found[partition] = offset
    finally:
        reader.pause(*bounds)
    return found


def _assign(reader: AIOKafkaConsumer, partitions: Sequence[TopicPartition]) -> None:
    """Make ``partitions`` assigned and fetchable. (Probes leave them paused rather than
    unassigned: unassigning while a fetch is in flight can leave aiokafka's stop() hanging.)
    """
    if not set(partitions) <= reader.assignment():
        reader.assign(sorted(reader.assignment() | set(partitions)))
    reader.resume(*partitions)


async def _is_first_at(
    reader: AIOKafkaConsumer,
    partition: TopicPartition,
    moment: int,
    offset: int,
    begin: int,
    end: int,
) -> bool:
    """Whether ``offset`` is the first one timestamped at or after ``moment``."""
    if offset < end:
        record = await _first_record_from(reader, partition, offset, end)
        if record is None or record.timestamp < moment:
            return False
    if offset > begin:
        before = await _first_record_from(reader, partition, offset - 1, end)
        if before is not None and before.offset < offset and before.timestamp >= moment:
            return False
    return True


async def _search_by_time(
    reader: AIOKafkaConsumer, partition: TopicPartition, moment: int, begin: int, end: int
) -> int:
    low, high = begin, end
    while low < high:
        middle = (low + high) // 2
        record = await _first_record_from(reader, partition, middle, high)
        if record is None or record.timestamp >= moment:
            high = middle
        else:
            low = max(middle, record.offset) + 1
    return low


async def _first_record_from(
    reader: AIOKafkaConsumer, partition: TopicPartition, offset: int, end: int
) -> Record | None:
    """The first record at or after ``offset`` and before ``end``, if any."""
    reader.seek(partition, offset)
    reader.resume(partition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_TIMEOUT_SECONDS
    while loop.time() < deadline:
        fetched = await reader.getmany(partition, timeout_ms=500, max_records=1)
        for record in fetched.get(partition, []):
            return record if record.offset < end else None
        if await reader.position(partition) >= end:
            return None
    raise ReplayError(
        f"no answer from {partition.topic}[{partition.partition}] at offset {offset} "
        f"within {PROBE_TIMEOUT_SECONDS:.0f} s"
    )


async def read_ranges(
    reader: AIOKafkaConsumer, topic: str, ranges: Sequence[PartitionRange]
) -> AsyncIterator[Record]:
    """Every record in ``ranges`` (and nothing after them), per partition in offset order.

    Stops once each partition's position reached its end, so it terminates even while
    producers keep appending, and across offset gaps (transaction markers, compaction).
    """
    pending = {TopicPartition(topic, r.partition): r.end for r in ranges if r.end > r.start}
    if not pending:
        return
    _assign(reader, list(pending))
    for partition in pending:
        reader.seek(partition, next(r.start for r in ranges if r.partition == partition.partition))
    while pending:
        fetched = await reader.getmany(*pending, timeout_ms=500)
        for partition, records in fetched.items():
            end = pending.get(partition)
            if end is None:
                continue
            for record in records:
                if record.offset >= end:
                    break
                yield record
        for partition in list(pending):
            if await reader.position(partition) >= pending[partition]:
                del pending[partition]
                reader.pause(partition)
