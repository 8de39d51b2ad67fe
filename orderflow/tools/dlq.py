"""``orderflow dlq list`` and ``orderflow dlq redrive``: inspect dead letters, send chosen
ones back to the inbound topic.

Both read the dead-letter topic up to its end offsets as they were when the command
started, so they terminate, and a redrive never reads a dead letter it caused itself: a
redriven event that fails again is dead-lettered again (once per redrive), never looped.

The consumer records only *applied* events in the inbox (``processed_events``), never
dead-lettered ones, so a redriven event that now applies (its order arrived meanwhile,
or a fix was deployed) is applied; redriving it a second time finds it in the inbox and
skips it as a duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from orderflow.tools.progress import RateLimiter
from orderflow.tools.ranges import (
    PartitionRange,
    Record,
    end_offsets,
    offsets_at_time,
    read_ranges,
    topic_partitions,
)

#: Header naming the dead letter a redriven message came from: ``topic:partition:offset``.
REDRIVE_HEADER: Final = "orderflow.redrive.source"
PREVIEW_CHARACTERS: Final = 120
#: Sends awaited together during a redrive.
REDRIVE_ACK_BATCH: Final = 500


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, with the contract's headers read."""

    topic: str
    partition: int
    offset: int
    timestamp: datetime
    key: bytes | None
    value: bytes | None
    reason: str | None
    message: str | None
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    redriven_from: str | None

    @property
    def position(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"

    @property
    def source(self) -> str:
        if self.source_topic is None:
            return "?"
        return f"{self.source_topic}:{self.source_partition}:{self.source_offset}"

    def preview(self, characters: int = PREVIEW_CHARACTERS) -> str:
        """The value on one line, at most ``characters`` long."""
        if self.value is None:
            return "(no value)"
        text = self.value.decode("utf-8", errors="replace")
        text = "".join(c if c.isprintable() else " " for c in text)
        return text if len(text) <= characters else text[: characters - 1] + "…"

    def as_json(self) -> dict[str, Any]:
        return {
            "dlq_topic": self.topic,
            "dlq_partition": self.partition,
            "dlq_offset": self.offset,
            "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
            "reason": self.reason,
            "message": self.message,
            "source_topic": self.source_topic,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
            "redriven_from": self.redriven_from,
            "key": None if self.key is None else self.key.decode("utf-8", errors="replace"),
            "value": None if self.value is None else self.value.decode("utf-8", errors="replace"),
        }


def parse_dead_letter(record: Record) -> DeadLetter:
    headers = {name: value.decode("utf-8", errors="replace") for name, value in record.headers}
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp=datetime.fromtimestamp(record.timestamp / 1000, UTC),
        key=record.key,
        value=record.value,
        reason=headers.get("error.reason"),
        message=headers.get("error.message"),
        source_topic=headers.get("source.topic"),
        source_partition=_integer(headers.get("source.partition")),
        source_offset=_integer(headers.get("source.offset")),
        redriven_from=headers.get(REDRIVE_HEADER),
    )


def _integer(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters a command handles (every one when empty)."""

    reasons: frozenset[str] = frozenset()
    since: datetime | None = None
    #: Exact (partition, offset) positions in the dead-letter topic.
    positions: frozenset[tuple[int, int]] = frozenset()

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.since is not None and letter.timestamp < self.since:
            return False
        return not self.positions or (letter.partition, letter.offset) in self.positions


@dataclass(slots=True)
class DeadLetterScan:
    """Reads the dead-letter topic up to the end offsets seen by :meth:`plan`."""

    reader: AIOKafkaConsumer
    topic: str
    filters: DeadLetterFilter
    ranges: list[PartitionRange] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)

    async def plan(self) -> list[PartitionRange]:
        partitions = await topic_partitions(self.reader, self.topic)
        begins = await self.reader.beginning_offsets(partitions)
        ends = await end_offsets(self.reader, partitions)
        bounds = {p: (begins[p], ends[p]) for p in partitions}
        starts = {p: begins[p] for p in partitions}
        if self.filters.since is not None:
            starts = await offsets_at_time(self.reader, self.filters.since, bounds)
        ranges = [PartitionRange(p.partition, starts[p], ends[p]) for p in partitions]
        if self.filters.positions:
            wanted: dict[int, list[int]] = {}
            for partition, offset in self.filters.positions:
                wanted.setdefault(partition, []).append(offset)
            ranges = [
                PartitionRange(
                    r.partition,
                    max(r.start, min(wanted[r.partition])),
                    min(r.end, max(wanted[r.partition]) + 1),
                )
                for r in ranges
                if r.partition in wanted
            ]
        self.ranges = [r for r in ranges if r.size > 0]
        return self.ranges

    async def __aiter__(self) -> AsyncIterator[tuple[DeadLetter, bool]]:
        """Every dead letter in the ranges, with whether it matches the filters."""
        async for record in read_ranges(self.reader, self.topic, self.ranges):
            letter = parse_dead_letter(record)
            yield letter, self.filters.matches(letter)


@dataclass(slots=True)
class RedriveOutcome:
    scanned: int = 0
    matched: int = 0
    published: int = 0
    interrupted: bool = False


async def redrive(
    scan: DeadLetterScan,
    producer: AIOKafkaProducer | None,
    *,
    inbound_topic: str,
    rate: float | None,
    stop: asyncio.Event,
    dry_run: bool = False,
    on_scanned: Callable[[DeadLetter, bool], None] | None = None,
) -> RedriveOutcome:
    """Send every matching dead letter (original key and value bytes) to ``inbound_topic``.

    Sent in dead-letter-topic order per partition; one order's dead letters share a
    partition (the key is the order id), so they go back in the order they failed.
    Every send is acknowledged before this returns.
    """
    if producer is None and not dry_run:
        raise ValueError("redrive needs a producer unless it is a dry run")
    outcome = RedriveOutcome()
    limiter = RateLimiter(rate)
    deliveries: list[asyncio.Future[Any]] = []
    try:
        async for letter, matched in scan:
            outcome.scanned += 1
            if matched:
                outcome.matched += 1
                if not dry_run:
                    assert producer is not None
                    await limiter.acquire()
                    deliveries.append(
                        await producer.send(
                            inbound_topic,
                            value=letter.value,
                            key=letter.key,
                            headers=[(REDRIVE_HEADER, letter.position.encode())],
                        )
                    )
                    if len(deliveries) >= REDRIVE_ACK_BATCH:
                        await asyncio.gather(*deliveries)
                        outcome.published += len(deliveries)
                        deliveries.clear()
            if on_scanned is not None:
                on_scanned(letter, matched)
            if stop.is_set():
                outcome.interrupted = True
                break
    finally:
        if deliveries:
            await asyncio.gather(*deliveries)
            outcome.published += len(deliveries)
    return outcome
