"""``orderflow replay outbox`` and ``orderflow replay topic``.

**replay outbox** publishes retained, already published outbox rows again (chosen by when
they were written to the outbox, ``created_at``), straight to the broker with its own
producer (the outbox table is only read): same key, value bytes and headers, so the same
``event_id``s, in id order, which is per-order publication order. Nothing is re-queued
through the relay, so live traffic is neither delayed behind a replay nor interleaved
with copies inside the outbox. On the topic, replayed messages interleave with live ones:
an order may show version 3 (replayed) after version 5 (live). A subscriber that drops
repeated ``event_id``s, or keeps each order's highest ``order_version``, is unaffected;
one that lost data gets it back.

**replay topic** re-reads a range of the inbound topic and runs it through the consumer's
normal path (:class:`consumer.intake.OrderConsumer` and ``apply_batch``) under a separate
group id: the inbox skips what was applied already, what was dead-lettered before is tried
again (a fix may make it apply; if it still fails it is dead-lettered again, once). The
replay's start is seeded into ``consumer_offsets`` for its group, so the consumer starts
exactly there, and its end (the high watermarks when it starts, or ``--to-timestamp``) is
enforced on every fetch, so it stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import ColumnElement, delete, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from consumer.bulk import execute_bulk
from consumer.errors import RejectedEvent
from consumer.events import decode_event
from consumer.intake import OrderConsumer
from consumer.models import ConsumerOffset, ProcessedEvent
from orderflow.runtime.services import consumer_config
from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import kafka_common, session_factory, start_kafka_client
from orderflow.tools.progress import RateLimiter
from orderflow.tools.ranges import (
    PartitionRange,
    Record,
    ReplayError,
    create_reader,
    end_offsets,
    offsets_at_time,
    read_ranges,
    stop_client,
    topic_partitions,
)
from outbox.models import OutboxPending, OutboxRecord

log = logging.getLogger("orderflow.replay")

#: First key of the advisory lock that keeps two replays of one group apart ("ofrp").
REPLAY_LOCK_NAMESPACE: Final = 0x6F667270
#: How often a running topic replay looks at its progress.
PROGRESS_INTERVAL_SECONDS: Final = 0.2


# --------------------------------------------------------------------------- outbox


@dataclass(frozen=True, slots=True)
class OutboxReplayRequest:
    #: Published outbox messages written at or after this instant...
    since: datetime
    #: ... and before this one (``None``: up to now).
    until: datetime | None
    #: Only messages of this topic (the outbound topic, or the dead-letter topic).
    topic: str
    #: Publish to this topic instead of the original one.
    destination: str | None = None
    order_ids: tuple[uuid.UUID, ...] = ()
    rate: float | None = None
    batch: int = 500
    dry_run: bool = False


@dataclass(slots=True)
class OutboxReplayOutcome:
    matched: int
    #: When the oldest retained published message was written (None: none retained).
    oldest_retained: datetime | None
    published: int = 0
    interrupted: bool = False


def _published() -> ColumnElement[bool]:
    """The message was published: its id is no longer pending."""
    return ~select(OutboxPending.id).where(OutboxPending.id == OutboxRecord.id).exists()


def _outbox_conditions(request: OutboxReplayRequest) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        OutboxRecord.topic == request.topic,
        OutboxRecord.created_at >= request.since,
        _published(),
    ]
    if request.until is not None:
        conditions.append(OutboxRecord.created_at < request.until)
    if request.order_ids:
        conditions.append(
            OutboxRecord.key.in_([str(order_id).encode() for order_id in request.order_ids])
        )
    return conditions


async def replay_outbox(
    sessions: async_sessionmaker[AsyncSession],
    producer: AIOKafkaProducer | None,
    request: OutboxReplayRequest,
    *,
    stop: asyncio.Event,
    on_start: Callable[[OutboxReplayOutcome], None] | None = None,
    on_published: Callable[[int], None] | None = None,
) -> OutboxReplayOutcome:
    """Publish the matching messages again in id order; ``producer`` may be None for a dry run.

    Every batch's acks are awaited before the next batch is read, and ``stop`` is honoured
    between messages (what was sent is still awaited).
    """
    conditions = _outbox_conditions(request)
    async with sessions() as session:
        matched = int(
            (
                await session.execute(
                    select(func.count()).select_from(OutboxRecord).where(*conditions)
                )
            ).scalar_one()
        )
        oldest = (
            await session.execute(
                select(func.min(OutboxRecord.created_at)).where(
                    OutboxRecord.topic == request.topic, _published()
                )
            )
        ).scalar_one_or_none()
    outcome = OutboxReplayOutcome(matched=matched, oldest_retained=oldest)
    if on_start is not None:
        on_start(outcome)
    if request.dry_run or matched == 0:
        return outcome
    if producer is None:
        raise ValueError("replay_outbox needs a producer unless it is a dry run")

    limiter = RateLimiter(request.rate)
    after = 0
    while not stop.is_set():
        async with sessions() as session:
            rows = (
                await session.execute(
                    select(
                        OutboxRecord.id,
                        OutboxRecord.topic,
                        OutboxRecord.key,
                        OutboxRecord.payload,
                        OutboxRecord.headers,
                    )
                    .where(*conditions, OutboxRecord.id > after)
                    .order_by(OutboxRecord.id)
                    .limit(request.batch)
                )
            ).all()
        if not rows:
            break
        deliveries = []
        for row in rows:
            if stop.is_set():
                break
            await limiter.acquire()
            deliveries.append(
                await producer.send(
                    request.destination or row.topic,
                    value=row.payload,
                    key=row.key,
                    headers=[(str(name), str(value).encode()) for name, value in row.headers],
                )
            )
            after = row.id
        await asyncio.gather(*deliveries)
        outcome.published += len(deliveries)
        if on_published is not None:
            on_published(len(deliveries))
        if len(rows) < request.batch:
            break
    outcome.interrupted = stop.is_set() and outcome.published < outcome.matched
    return outcome


# --------------------------------------------------------------------------- topic


@dataclass(frozen=True, slots=True)
class TopicReplayRequest:
    group: str
    from_timestamp: datetime | None = None
    #: partition -> first offset (only these partitions are replayed).
    from_offsets: Mapping[int, int] = field(default_factory=dict)
    to_timestamp: datetime | None = None
    dry_run: bool = False


@dataclass(slots=True)
class TopicReplayOutcome:
    ranges: list[PartitionRange]
    applied: int = 0
    skipped: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    #: Dry run: events not in the inbox (they would be applied or dead-lettered).
    to_process: int = 0
    #: Dry run: messages that can't be decoded (they would be dead-lettered).
    undecodable: int = 0
    interrupted: bool = False

    @property
    def total(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def dead_lettered(self) -> int:
        return sum(self.dead_letters.values())


async def plan_topic_replay(
    reader: AIOKafkaConsumer, topic: str, request: TopicReplayRequest
) -> list[PartitionRange]:
    """The offset range of each partition to replay, validated against the topic."""
    partitions = await topic_partitions(reader, topic)
    begins = await reader.beginning_offsets(partitions)
    ends = await end_offsets(reader, partitions)
    bounds = {partition: (begins[partition], ends[partition]) for partition in partitions}
    by_number = {partition.partition: partition for partition in partitions}

    starts: dict[TopicPartition, int] = {}
    if request.from_offsets:
        for number, offset in sorted(request.from_offsets.items()):
            partition = by_number.get(number)
            if partition is None:
                raise ReplayError(
                    f"partition {number} does not exist: {topic} has partitions 0-{max(by_number)}"
                )
            begin, end = bounds[partition]
            if not begin <= offset <= end:
                raise ReplayError(
                    f"offset {offset} is outside partition {number} of {topic}, "
                    f"which holds offsets {begin} to {end - 1}"
                    + (" (earlier ones were deleted by retention)" if offset < begin else "")
                )
            starts[partition] = offset
    elif request.from_timestamp is not None:
        starts = await offsets_at_time(reader, request.from_timestamp, bounds)
    else:
        raise ReplayError("give a start: --from-timestamp or --from-offset")

    stops = {partition: bounds[partition][1] for partition in starts}
    if request.to_timestamp is not None:
        at_time = await offsets_at_time(
            reader, request.to_timestamp, {p: bounds[p] for p in starts}
        )
        stops = {partition: min(stops[partition], at_time[partition]) for partition in starts}
    return [
        PartitionRange(partition.partition, start, max(start, stops[partition]))
        for partition, start in sorted(starts.items())
    ]


class _BoundedConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """A consumer whose fetches never hand out a record at or past its partition's end.

    A partition whose position reached its end is paused (and resumed if the consumer
    seeks it back). ``last_handed`` tells the replay which offset must be applied before
    the partition is done.
    """

    def __init__(self, ends: Mapping[TopicPartition, int], **options: Any) -> None:
        super().__init__(**options)
        self._ends = dict(ends)
        self.drained: set[TopicPartition] = set()
        self.last_handed: dict[TopicPartition, int] = {}

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Record]]:
        fetched: dict[TopicPartition, list[Record]] = await super().getmany(
            *partitions, timeout_ms=timeout_ms, max_records=max_records
        )
        bounded: dict[TopicPartition, list[Record]] = {}
        for partition, records in fetched.items():
            end = self._ends.get(partition, 0)
            kept = [record for record in records if record.offset < end]
            if kept:
                bounded[partition] = kept
                self.last_handed[partition] = kept[-1].offset
        for partition, end in self._ends.items():
            if partition not in self.drained and await self.position(partition) >= end:
                self.drained.add(partition)
                self.pause(partition)
        return bounded

    def seek(self, partition: TopicPartition, offset: int) -> None:
        super().seek(partition, offset)
        if offset < self._ends.get(partition, 0) and partition in self.drained:
            self.drained.discard(partition)
            self.resume(partition)


async def replay_topic(
    settings: Settings,
    engine: AsyncEngine,
    request: TopicReplayRequest,
    *,
    stop: asyncio.Event,
    on_plan: Callable[[TopicReplayOutcome], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> TopicReplayOutcome:
    """Replay the planned ranges of the inbound topic through the consumer, then stop.

    ``on_progress`` receives the number of offsets covered so far.
    """
    if request.group == settings.consumer_group:
        raise ReplayError(
            f"--group {request.group!r} is the live consumer group: a replay needs a group "
            "of its own (its stored offsets are rewritten)"
        )
    topic = settings.inbound_topic
    reader = create_reader(settings)
    await start_kafka_client(reader, settings)
    try:
        ranges = await plan_topic_replay(reader, topic, request)
        outcome = TopicReplayOutcome(ranges=ranges)
        if on_plan is not None:
            on_plan(outcome)
        if request.dry_run:
            await _dry_run(reader, topic, session_factory(engine), outcome, on_progress, stop)
            return outcome
    finally:
        await stop_client(reader)

    work = [r for r in ranges if r.size > 0]
    if not work:
        return outcome
    async with engine.connect() as guard:
        await _lock_group(guard, request.group)
        try:
            await _run_bounded(settings, engine, request.group, work, outcome, stop, on_progress)
        finally:
            async with engine.begin() as connection:
                await connection.execute(
                    delete(ConsumerOffset).where(ConsumerOffset.group_id == request.group)
                )
            await guard.execute(
                text("SELECT pg_advisory_unlock(:namespace, :key)"),
                {"namespace": REPLAY_LOCK_NAMESPACE, "key": group_lock_key(request.group)},
            )
    return outcome


def group_lock_key(group: str) -> int:
    """The second key of the advisory lock a replay of ``group`` holds (signed 32 bits)."""
    return zlib.crc32(group.encode()) - 2**31


async def _lock_group(connection: AsyncConnection, group: str) -> None:
    locked = (
        await connection.execute(
            text("SELECT pg_try_advisory_lock(:namespace, :key)"),
            {"namespace": REPLAY_LOCK_NAMESPACE, "key": group_lock_key(group)},
        )
    ).scalar_one()
    await connection.commit()
    if not locked:
        raise ReplayError(
            f"another replay with group {group!r} is running; wait for it or pass another --group"
        )


async def _run_bounded(
    settings: Settings,
    engine: AsyncEngine,
    group: str,
    work: list[PartitionRange],
    outcome: TopicReplayOutcome,
    stop: asyncio.Event,
    on_progress: Callable[[int], None] | None,
) -> None:
    topic = settings.inbound_topic
    sessions = session_factory(engine)
    # The consumer starts where consumer_offsets says: seed the group's rows there.
    async with sessions() as session, session.begin():
        await execute_bulk(session, delete(ConsumerOffset).where(ConsumerOffset.group_id == group))
        await session.execute(
            pg_insert(ConsumerOffset).values(
                [
                    {
                        "group_id": group,
                        "topic": topic,
                        "partition": r.partition,
                        "next_offset": r.start,
                    }
                    for r in work
                ]
            )
        )
    ends = {TopicPartition(topic, r.partition): r.end for r in work}
    starts = {TopicPartition(topic, r.partition): r.start for r in work}
    kafka = _BoundedConsumer(
        ends,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
        **kafka_common(settings),
    )
    # The live consumer's configuration (limits, destinations), under the replay's group.
    config = consumer_config(settings)
    # A replay ends, and no member of its group stays to release or expire what it would
    # park: it parks nothing (what can't apply is dead-lettered, and its summary says so).
    # What it applies releases what the live consumers parked, as any applied event does.
    config = dataclasses.replace(
        config,
        group_id=group,
        concurrency=max(1, min(config.concurrency, len(work))),
        park_timeout=0.0,
    )
    order_consumer = OrderConsumer(kafka, sessions, config)
    await start_kafka_client(kafka, settings)
    consumer_stop = asyncio.Event()
    try:
        kafka.assign(list(ends))
        for partition, start in starts.items():
            kafka.seek(partition, start)
        running = asyncio.create_task(order_consumer.run(consumer_stop))
        try:
            while True:
                stored = await _stored_offsets(sessions, group, topic)
                covered = sum(
                    min(stored.get(p.partition, starts[p]), ends[p]) - starts[p] for p in ends
                )
                if on_progress is not None:
                    on_progress(covered)
                if all(_partition_done(kafka, p, stored.get(p.partition)) for p in ends):
                    break
                if running.done():
                    running.result()  # raises what stopped the consumer
                    raise RuntimeError("the replay's consumer stopped before the end")
                if stop.is_set():
                    outcome.interrupted = True
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), PROGRESS_INTERVAL_SECONDS)
        finally:
            consumer_stop.set()
            await running
    finally:
        await stop_client(kafka)
    outcome.applied = order_consumer.stats.applied
    outcome.skipped = order_consumer.stats.duplicates
    outcome.dead_letters = Counter(
        {reason.value: count for reason, count in order_consumer.stats.dead_letters.items()}
    )


def _partition_done(kafka: _BoundedConsumer, partition: TopicPartition, stored: int | None) -> bool:
    if partition not in kafka.drained:
        return False
    last = kafka.last_handed.get(partition)
    return last is None or (stored is not None and stored > last)


async def _stored_offsets(
    sessions: async_sessionmaker[AsyncSession], group: str, topic: str
) -> dict[int, int]:
    async with sessions() as session:
        rows = await session.execute(
            select(ConsumerOffset.partition, ConsumerOffset.next_offset).where(
                ConsumerOffset.group_id == group, ConsumerOffset.topic == topic
            )
        )
        return {int(partition): int(offset) for partition, offset in rows}


async def _dry_run(
    reader: AIOKafkaConsumer,
    topic: str,
    sessions: async_sessionmaker[AsyncSession],
    outcome: TopicReplayOutcome,
    on_progress: Callable[[int], None] | None,
    stop: asyncio.Event,
) -> None:
    """Read the ranges and sort each event: in the inbox (skipped), to process, undecodable."""
    pending: list[uuid.UUID] = []
    covered = 0

    async def flush() -> None:
        if not pending:
            return
        async with sessions() as session:
            known = set(
                (
                    await session.execute(
                        select(ProcessedEvent.event_id).where(ProcessedEvent.event_id.in_(pending))
                    )
                ).scalars()
            )
        outcome.skipped += sum(1 for event_id in pending if event_id in known)
        outcome.to_process += sum(1 for event_id in pending if event_id not in known)
        pending.clear()

    async for record in read_ranges(reader, topic, outcome.ranges):
        covered += 1
        try:
            pending.append(decode_event(record.key, record.value).event_id)
        except RejectedEvent:
            outcome.undecodable += 1
        if len(pending) >= 1000:
            await flush()
        if on_progress is not None and covered % 100 == 0:
            on_progress(covered)
        if stop.is_set():
            outcome.interrupted = True
            break
    await flush()
    if on_progress is not None:
        on_progress(covered)
