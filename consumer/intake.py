"""The consume loop: aiokafka group member, offsets from the database, retries, clean stop.

Kafka delivers at least once; the database makes it exactly once. One fetch loop feeds a
*lane* per partition; each lane applies its partition's records in transactions of at most
``max_batch`` records (see :mod:`consumer.apply`), strictly in offset order, while lanes of
different partitions run concurrently (bounded by the connection pool). A lane whose
backlog grows pauses its partition's fetching, so memory stays bounded.

Offsets: the database holds the truth. After an assignment (or a fence) a lane re-reads
the stored offset and seeks there. The Kafka commit that follows database commits runs in
the background and exists for lag tools only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from consumer.apply import BatchOutcome, Destinations, apply_batch
from consumer.errors import DeadLetterReason, OffsetConflict, RejectedEvent, SchemaViolation
from consumer.events import MAX_EVENT_BYTES
from consumer.messages import InboundMessage
from consumer.observe import NO_CONSUMER_OBSERVER, ConsumerObserver
from consumer.offsets import load_offset
from consumer.parking import Expired, due_partitions, expire_parked
from consumer.tracing import NO_TRACING, Tracing, trace_headers, trace_id
from outbox.faults import Backoff, is_data_error, is_transient

log = logging.getLogger("orderflow.consumer")

#: At stop, how long the last Kafka offset commit may take. It only feeds lag tools (the
#: database holds the offsets), so an unreachable broker must not hold up the exit.
KAFKA_COMMIT_GRACE_SECONDS = 3.0
#: Kafka commits go at most this often (the positions in between are merged): one
#: request per transaction would cost the broker and this process for no reader's gain.
KAFKA_COMMIT_INTERVAL_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    group_id: str
    inbound_topic: str
    destinations: Destinations
    #: Most records per transaction (one partition's records, in offset order).
    max_batch: int = 500
    #: Partitions applied at once; keep it at or below the database pool size.
    concurrency: int = 8
    poll_timeout_ms: int = 500
    #: Inbound values larger than this are dead-lettered unparsed.
    max_message_bytes: int = MAX_EVENT_BYTES
    #: Most bytes (keys and values) per transaction: a batch of large records ends early.
    #: A lane holding twice this pauses its partition's fetching, so memory stays bounded
    #: however large the records are.
    max_batch_bytes: int = 8 * 1024 * 1024
    #: Seconds an event that cannot apply yet waits (parked) for the events it needs before
    #: it is dead-lettered; 0: no parking, such events are dead-lettered at once (and any
    #: still parked are dead-lettered at the next sweep).
    park_timeout: float = 0.0

    @property
    def parking(self) -> bool:
        return self.park_timeout > 0

    @property
    def sweep_interval(self) -> float:
        """How often the partitions are checked for parked events that waited long enough:
        a tenth of the timeout, between 0.1 s and 5 s (parking off: every 5 s, for what
        was parked before it was turned off)."""
        if not self.parking:
            return 5.0
        return min(5.0, max(0.1, self.park_timeout / 10))


@dataclass(slots=True)
class ConsumerStats:
    """Running totals since start, for logs, ``orderflow dev`` and metrics."""

    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_letters: Counter[DeadLetterReason] = field(default_factory=Counter)
    retries: int = 0
    fenced: int = 0
    #: Parked events by event type: parked, released (applied later), expired, and
    #: abandoned (dead-lettered once their order moved on to where they can't apply).
    parked: Counter[str] = field(default_factory=Counter)
    released: Counter[str] = field(default_factory=Counter)
    expired: Counter[str] = field(default_factory=Counter)
    abandoned: Counter[str] = field(default_factory=Counter)

    @property
    def waiting(self) -> int:
        """Events this member parked that have not left (some may have left through
        another member, or an operator)."""
        left = self.released.total() + self.expired.total() + self.abandoned.total()
        return self.parked.total() - left

    def add(self, outcome: BatchOutcome) -> None:
        self.batches += 1
        self.applied += outcome.applied
        self.duplicates += outcome.duplicates
        self.dead_letters.update(outcome.dead_letters)
        self.parked.update(outcome.parked)
        self.released.update(outcome.released)
        self.abandoned.update(outcome.abandoned)

    def add_expired(self, outcome: Expired) -> None:
        self.expired.update(outcome.expired)
        self.dead_letters.update(outcome.dead_letters)


class _Abandon(Exception):
    """Drop the rest of a partition's fetched records: it was sought elsewhere, or we stop.

    Nothing is lost: the partition's next fetch starts at the stored offset.
    """


def _inbound(record: ConsumerRecord[bytes, bytes], fetched_at: float) -> InboundMessage:
    return InboundMessage(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        trace=trace_headers(record.headers),
        fetched_at=fetched_at,
    )


class _Lane:
    """One partition's fetched records, waiting for that partition's worker."""

    def __init__(self, partition: TopicPartition) -> None:
        self.partition = partition
        self.records: deque[InboundMessage] = deque()
        self.arrived = asyncio.Event()
        self.closed = False
        self.paused = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None
        #: Bytes of the keys and values in ``records``.
        self.size = 0
        #: Parked events of this partition have waited long enough: expire them next.
        self.expiry_due = False

    def add(self, messages: Iterable[InboundMessage]) -> None:
        arrived = list(messages)
        self.records.extend(arrived)
        self.size += sum(map(_size, arrived))

    def take(self, limit: int, max_bytes: int) -> list[InboundMessage]:
        """Up to ``limit`` records and (beyond the first) ``max_bytes``, in offset order."""
        taken: list[InboundMessage] = []
        size = 0
        while self.records and len(taken) < limit:
            message_size = _size(self.records[0])
            if taken and size + message_size > max_bytes:
                break
            taken.append(self.records.popleft())
            size += message_size
        self.size -= size
        return taken

    def drop(self) -> None:
        self.records.clear()
        self.size = 0


def _size(message: InboundMessage) -> int:
    return len(message.value or b"") + len(message.key or b"")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands partitions over at batch boundaries: a revoked partition's lane finishes the
    batch in flight and closes before the rebalance goes on. (The compare-and-set on the
    stored offset covers a member that misses the rebalance altogether.)"""

    def __init__(self, owner: OrderConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._owner.assigned = frozenset()  # none is surely ours until the new assignment
        await self._owner.close_lanes(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        partitions = frozenset(assigned)
        self._owner.forget_offsets(partitions)
        self._owner.assigned = partitions
        self._owner.observer.partitions_assigned(partitions)


class OrderConsumer:
    """Runs one consumer-group member until ``stop`` is set."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        session_factory: async_sessionmaker[AsyncSession],
        config: ConsumerConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        observer: ConsumerObserver = NO_CONSUMER_OBSERVER,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._consumer = consumer
        self.observer = observer
        self._tracing = tracing
        self._sessions = session_factory
        self._config = config
        self._clock = clock
        self._listener = _Rebalance(self)
        self._slots = asyncio.Semaphore(config.concurrency)
        #: The stored next offset of each partition as this member knows it; a partition
        #: missing here is re-read from the database before its next batch.
        self._known: dict[TopicPartition, int | None] = {}
        #: Partitions just sought: their next fetch may start past the stored offset
        #: (compacted or transactional topics leave offset gaps).
        self._sought: set[TopicPartition] = set()
        self._lanes: dict[TopicPartition, _Lane] = {}
        self._group: asyncio.TaskGroup | None = None
        self._to_commit: dict[TopicPartition, int] = {}
        self._commit_task: asyncio.Task[None] | None = None
        #: The partitions of the last assignment (empty while a rebalance is under way).
        self.assigned: frozenset[TopicPartition] = frozenset()
        self.stats = ConsumerStats()

    @property
    def config(self) -> ConsumerConfig:
        return self._config

    def subscribe(self) -> None:
        self._consumer.subscribe([self._config.inbound_topic], listener=self._listener)

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and apply until ``stop`` is set; each lane finishes its batch in flight."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                sweeper = group.create_task(self._sweep_parked(stop))
                while not stop.is_set():
                    for partition, records in (await self._poll(stop)).items():
                        self._feed(partition, records, stop)
                for lane in self._lanes.values():
                    lane.arrived.set()  # wake idle lanes: they see stop and return
                sweeper.cancel()
        finally:
            self._group = None
            await self._finish_commits()

    async def _finish_commits(self) -> None:
        """Give the last Kafka commit a moment; never wait for an unreachable broker."""
        task = self._commit_task
        if task is None or task.done():
            return
        await asyncio.wait({task}, timeout=KAFKA_COMMIT_GRACE_SECONDS)
        if not task.done():
            log.warning("kafka offset commit still pending at stop; skipped (lag tools only)")
            task.cancel()
            await asyncio.wait({task})

    def _lane(self, partition: TopicPartition, stop: asyncio.Event) -> _Lane:
        lane = self._lanes.get(partition)
        if lane is None or lane.closed:
            assert self._group is not None
            lane = _Lane(partition)
            self._lanes[partition] = lane
            lane.task = self._group.create_task(self._work(lane, stop))
        return lane

    def _feed(
        self,
        partition: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        stop: asyncio.Event,
    ) -> None:
        lane = self._lane(partition, stop)
        fetched_at = time.monotonic()
        lane.add(_inbound(record, fetched_at) for record in records)
        lane.arrived.set()
        self.observer.fetched(len(records))
        full = (
            len(lane.records) >= 2 * self._config.max_batch
            or lane.size >= 2 * self._config.max_batch_bytes
        )
        if full and not lane.paused:
            with contextlib.suppress(IllegalStateError):
                self._consumer.pause(partition)
                lane.paused = True

    async def _work(self, lane: _Lane, stop: asyncio.Event) -> None:
        """A partition's worker: its records, in order, one transaction per chunk."""
        while not stop.is_set() and not lane.closed:
            if lane.expiry_due:
                lane.expiry_due = False
                lane.idle.clear()
                try:
                    await self._expire(lane.partition, stop)
                finally:
                    lane.idle.set()
                continue
            if not lane.records:
                lane.arrived.clear()
                await lane.arrived.wait()
                continue
            lane.idle.clear()
            try:
                chunk = lane.take(self._config.max_batch, self._config.max_batch_bytes)
                position = await self._process_batch(lane.partition, chunk, stop)
                if position is not None:
                    self._commit_to_kafka_soon({lane.partition: position})
            except _Abandon:
                lane.drop()  # they are fetched again from where we sought
            finally:
                lane.idle.set()
            if (
                lane.paused
                and len(lane.records) < self._config.max_batch
                and lane.size < self._config.max_batch_bytes
            ):
                with contextlib.suppress(IllegalStateError):
                    self._consumer.resume(lane.partition)
                lane.paused = False

    async def close_lanes(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop the lanes of ``partitions`` once their batch in flight is done."""
        partitions = list(partitions)
        closing = [lane for p in partitions if (lane := self._lanes.pop(p, None)) is not None]
        for lane in closing:
            lane.closed = True
            lane.drop()
            lane.arrived.set()
        for lane in closing:
            await lane.idle.wait()
        self.forget_offsets(partitions)

    async def _sweep_parked(self, stop: asyncio.Event) -> None:
        """Every ``sweep_interval``: hand each owned partition with parked events that
        waited the timeout to its lane, which expires them between two of its batches
        (so even a partition that receives nothing more expires what waits in it)."""
        config = self._config
        older_than = timedelta(seconds=config.park_timeout)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=config.sweep_interval)
            if stop.is_set():
                return
            owned = sorted(
                partition.partition
                for partition in self.assigned
                if partition.topic == config.inbound_topic
            )
            try:
                due = await due_partitions(
                    self._sessions,
                    group_id=config.group_id,
                    topic=config.inbound_topic,
                    partitions=owned,
                    older_than=older_than,
                )
            except Exception as error:
                if not is_transient(error):
                    raise
                log.warning("checking for expired parked events failed: %s", _one_line(error))
                continue
            for number in due:
                partition = TopicPartition(config.inbound_topic, number)
                if partition not in self.assigned:  # revoked meanwhile
                    continue
                lane = self._lane(partition, stop)
                lane.expiry_due = True
                lane.arrived.set()

    async def _expire(self, partition: TopicPartition, stop: asyncio.Event) -> None:
        """Dead-letter the partition's parked events that waited the timeout (fenced like a
        batch: only while the stored offset is the one this member expects)."""
        config = self._config
        async with self._slots:
            backoff = Backoff()
            while not stop.is_set():
                try:
                    if partition not in self._known:
                        async with self._sessions() as session:
                            self._known[partition] = await load_offset(
                                session, config.group_id, partition.topic, partition.partition
                            )
                    expected = self._known[partition]
                    if expected is None:
                        return  # nothing was ever applied here, so nothing is parked
                    expired = await expire_parked(
                        self._sessions,
                        group_id=config.group_id,
                        topic=partition.topic,
                        partition=partition.partition,
                        expected_offset=expected,
                        older_than=timedelta(seconds=config.park_timeout),
                        dead_letter_topic=config.destinations.dead_letter_topic,
                        now=self._clock(),
                    )
                except OffsetConflict as conflict:
                    self.stats.fenced += 1
                    log.warning("%s; not expiring its parked events", conflict)
                    self._resync(partition, conflict.stored)
                    return
                except Exception as error:
                    if not is_transient(error):
                        raise
                    self.stats.retries += 1
                    log.warning(
                        "transient fault expiring parked events of %s[%d], retrying: %s",
                        partition.topic,
                        partition.partition,
                        _one_line(error),
                    )
                    await backoff.sleep(stop)
                    continue
                if expired.count:
                    self.stats.add_expired(expired)
                    self.observer.parked_expired(expired)
                    log.info(
                        "parked events expired",
                        extra={
                            **_where(partition, expected),
                            "expired": dict(expired.expired),
                        },
                    )
                return

    def next_offsets(self) -> dict[TopicPartition, int]:
        """The stored next offset of each partition this member has read or advanced (what
        it applies next; the broker's end offset minus this is the partition's lag)."""
        return {
            partition: offset for partition, offset in self._known.items() if offset is not None
        }

    def forget_offsets(self, partitions: Iterable[TopicPartition]) -> None:
        for partition in partitions:
            self._known.pop(partition, None)
            self._sought.discard(partition)
            # A commit for a partition no longer held would fail the whole merged commit.
            self._to_commit.pop(partition, None)

    async def _poll(
        self, stop: asyncio.Event
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        fetch = asyncio.ensure_future(
            self._consumer.getmany(
                timeout_ms=self._config.poll_timeout_ms,
                max_records=self._config.max_batch * max(1, len(self._consumer.assignment())),
            )
        )
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not fetch.done():
            # Stopping: nothing fetched is lost, the next owner reads from the stored offset.
            fetch.cancel()
            await asyncio.wait({fetch})
            return {}
        records: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = fetch.result()
        return records

    def _commit_to_kafka_soon(self, positions: dict[TopicPartition, int]) -> None:
        """Commit to Kafka in the background: its copy of the offsets only feeds lag tools,
        so the next batch need not wait for the broker's answer."""
        self._to_commit.update(positions)
        if self._to_commit and (self._commit_task is None or self._commit_task.done()):
            self._commit_task = asyncio.create_task(self._flush_commits())

    async def _flush_commits(self) -> None:
        while self._to_commit:
            positions, self._to_commit = self._to_commit, {}
            try:
                await self._consumer.commit(
                    {
                        partition: OffsetAndMetadata(offset, "")
                        for partition, offset in positions.items()
                    }
                )
            except KafkaError as error:
                # The database holds the offsets; Kafka's copy only feeds lag tools.
                log.debug("kafka offset commit skipped: %s", error)
            await asyncio.sleep(KAFKA_COMMIT_INTERVAL_SECONDS)

    async def _process_batch(
        self, partition: TopicPartition, messages: Sequence[InboundMessage], stop: asyncio.Event
    ) -> int | None:
        async with self._slots:
            backoff = Backoff()
            while True:
                try:
                    return await self._apply(partition, messages)
                except _Abandon:
                    raise
                except OffsetConflict as conflict:
                    self.stats.fenced += 1
                    log.warning("%s; re-reading it from the database", conflict)
                    self._resync(partition, conflict.stored)
                    raise _Abandon from conflict
                except Exception as error:
                    if is_data_error(error):
                        return await self._apply_isolated(partition, messages, stop)
                    if not is_transient(error):
                        raise
                    if stop.is_set():
                        log.warning(
                            "stopping with %s[%d] uncommitted after a transient fault: %s",
                            partition.topic,
                            partition.partition,
                            _one_line(error),
                            extra=_where(partition, messages[0].offset),
                        )
                        raise _Abandon from error
                    self.stats.retries += 1
                    log.warning(
                        "transient fault applying %s[%d] at offset %d, retrying: %s",
                        partition.topic,
                        partition.partition,
                        messages[0].offset,
                        _one_line(error),
                        extra=_where(partition, messages[0].offset),
                    )
                    await backoff.sleep(stop)

    def _resync(self, partition: TopicPartition, stored: int | None) -> None:
        self._known[partition] = stored
        if stored is not None:
            self._seek(partition, stored)

    def _seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(partition, offset)
        self._sought.add(partition)

    async def _known_offset(self, partition: TopicPartition, first: int) -> tuple[bool, int | None]:
        """(ready, expected): load the stored offset on first use and seek there if needed."""
        if partition in self._known:
            expected = self._known[partition]
            if expected is not None and first > expected and partition not in self._sought:
                # The fetch skipped ahead of what is stored: go back (a gap after a seek
                # is legitimate, e.g. a transaction marker; one before it is not).
                log.info(
                    "seeking %s[%d] back to stored offset %d (fetch is at %d)",
                    partition.topic,
                    partition.partition,
                    expected,
                    first,
                )
                self._seek(partition, expected)
                return False, expected
            return True, expected
        async with self._sessions() as session:
            stored = await load_offset(
                session, self._config.group_id, partition.topic, partition.partition
            )
        self._known[partition] = stored
        if stored is not None and first != stored:
            log.info(
                "seeking %s[%d] to stored offset %d (fetch started at %d)",
                partition.topic,
                partition.partition,
                stored,
                first,
            )
            self._seek(partition, stored)
            return False, stored
        return True, stored

    async def _apply(
        self,
        partition: TopicPartition,
        messages: Sequence[InboundMessage],
        rejected: dict[int, RejectedEvent] | None = None,
    ) -> int | None:
        ready, expected = await self._known_offset(partition, messages[0].offset)
        if not ready:
            raise _Abandon  # sought to the stored offset: these records come again
        # Records below the stored offset were applied already (a re-fetch after a seek).
        pending = [m for m in messages if expected is None or m.offset >= expected]
        if not pending:
            return None
        # How long the oldest record has waited since its fetch (for the lane's previous
        # batch, for a core, for tries that failed).
        queued = time.monotonic() - pending[0].fetched_at if pending[0].fetched_at else None
        started = time.perf_counter()
        outcome = await apply_batch(
            self._sessions,
            group_id=self._config.group_id,
            destinations=self._config.destinations,
            messages=pending,
            expected_offset=expected,
            now=self._clock(),
            rejected=rejected,
            max_message_bytes=self._config.max_message_bytes,
            park=self._config.parking,
            tracing=self._tracing,
        )
        self._known[partition] = outcome.next_offset
        self._sought.discard(partition)
        self.stats.add(outcome)
        seconds = time.perf_counter() - started
        self.observer.batch_committed(outcome, size=len(pending), seconds=seconds, queued=queued)
        _log_batch(partition, pending, outcome, seconds, queued)
        return outcome.next_offset

    async def _apply_isolated(
        self, partition: TopicPartition, messages: Sequence[InboundMessage], stop: asyncio.Event
    ) -> int | None:
        """The database refused the batch: apply message by message, dead-letter the refused one."""
        position: int | None = None
        for message in messages:
            backoff = Backoff()
            rejected: dict[int, RejectedEvent] = {}
            while True:
                try:
                    position = await self._apply(partition, [message], rejected) or position
                    break
                except _Abandon:
                    raise
                except OffsetConflict as conflict:
                    self.stats.fenced += 1
                    self._resync(partition, conflict.stored)
                    raise _Abandon from conflict
                except Exception as error:
                    if is_transient(error):
                        if stop.is_set():
                            raise _Abandon from error
                        self.stats.retries += 1
                        await backoff.sleep(stop)
                        continue
                    if rejected or not is_data_error(error):
                        raise  # a bug, not bad data: fail loudly rather than hide events
                    log.error(
                        "database refused the event at %s[%d]@%d; dead-lettering it: %s",
                        message.topic,
                        message.partition,
                        message.offset,
                        _one_line(error),
                        extra=_where(partition, message.offset),
                    )
                    rejected = {
                        message.offset: SchemaViolation(
                            f"the database refused the event: {_one_line(error)}"
                        )
                    }
        return position


#: Dead letters whose offsets the batch line lists (the DLQ holds them all).
_LOGGED_DEAD_LETTER_OFFSETS = 10


def _where(partition: TopicPartition, offset: int) -> dict[str, object]:
    return {
        "component": "consumer",
        "topic": partition.topic,
        "partition": partition.partition,
        "offset": offset,
    }


def _log_batch(
    partition: TopicPartition,
    messages: Sequence[InboundMessage],
    outcome: BatchOutcome,
    seconds: float,
    queued: float | None = None,
) -> None:
    """One info line per committed batch; each dead letter in detail only at debug level
    (they are all on the dead-letter topic, with their reason and source offset)."""
    fields: dict[str, object] = {
        "component": "consumer",
        "topic": partition.topic,
        "partition": partition.partition,
        "first_offset": messages[0].offset,
        "last_offset": messages[-1].offset,
        "applied": outcome.applied,
        "duplicates": outcome.duplicates,
        "dead_lettered": outcome.dead_lettered,
        "duration_ms": round(seconds * 1000, 1),
    }
    if queued is not None:
        fields["queued_ms"] = round(queued * 1000, 1)
    if outcome.trace_id is not None:
        fields["trace_id"] = outcome.trace_id
    if outcome.dead_letters:
        fields["dead_letter_reasons"] = {
            reason.value: count for reason, count in outcome.dead_letters.items()
        }
        fields["dead_letter_offsets"] = [
            message.offset for message, _, _ in outcome.rejections[:_LOGGED_DEAD_LETTER_OFFSETS]
        ]
    log.info("batch applied", extra=fields)
    if not outcome.rejections or not log.isEnabledFor(logging.DEBUG):
        return
    for message, error, event in outcome.rejections:
        event_id, order_id = (
            (str(event.event_id), str(event.order_id)) if event else _identity(message.value)
        )
        details: dict[str, object] = {
            **_where(partition, message.offset),
            "reason": error.reason.value,
            "error": error.message,
            "event_id": event_id,
            "order_id": order_id,
        }
        inbound_trace = trace_id(message.trace)
        if inbound_trace is not None:
            details["trace_id"] = inbound_trace
        log.debug("event dead-lettered", extra=details)


def _identity(value: bytes | None) -> tuple[str | None, str | None]:
    """Best effort: the event_id and order_id of a value that did not decode (for logs)."""
    try:
        document = msgspec.json.decode(value or b"")
    except (msgspec.DecodeError, RecursionError):
        return None, None
    if not isinstance(document, dict):
        return None, None

    def text(name: str) -> str | None:
        item = document.get(name)
        return item[:100] if isinstance(item, str) else None

    return text("event_id"), text("order_id")


def _one_line(error: BaseException) -> str:
    if isinstance(error, DBAPIError) and error.orig is not None:
        error = error.orig
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
