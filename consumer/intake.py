"""The consume loop: aiokafka group member, offsets from the database, retries, clean stop.

Kafka delivers at least once; the database makes it exactly once. Each partition's fetched
records are applied as one transaction (see :mod:`consumer.apply`), partitions run
concurrently (bounded by the connection pool), and each partition stays strictly in
offset order because its next batch starts only after the previous one committed.

Offsets: the database holds the truth. After an assignment the first batch of a partition
re-reads the stored offset and, if the fetch started elsewhere, seeks there. The Kafka
commit that follows each database commit exists for lag tools only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from consumer.apply import BatchOutcome, Destinations, InboundMessage, apply_batch
from consumer.errors import DeadLetterReason, OffsetConflict, RejectedEvent, SchemaViolation
from consumer.offsets import load_offset
from outbox.faults import Backoff, is_data_error, is_transient

log = logging.getLogger("orderflow.consumer")


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    group_id: str
    inbound_topic: str
    destinations: Destinations
    #: Most records fetched per poll, across partitions (each partition's share is one transaction).
    max_batch: int = 500
    #: Partitions applied at once; keep it at or below the database pool size.
    concurrency: int = 8
    poll_timeout_ms: int = 500


@dataclass(slots=True)
class ConsumerStats:
    """Running totals since start, for logs, ``orderflow dev`` and metrics."""

    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_letters: Counter[DeadLetterReason] = field(default_factory=Counter)
    retries: int = 0
    fenced: int = 0

    def add(self, outcome: BatchOutcome) -> None:
        self.batches += 1
        self.applied += outcome.applied
        self.duplicates += outcome.duplicates
        self.dead_letters.update(outcome.dead_letters)


class _Offsets(ConsumerRebalanceListener):  # type: ignore[misc]
    """What this member knows of its partitions' stored offsets.

    A partition missing from ``known`` must be re-read from the database before its next
    batch. Revocation waits for the batch in flight, so a partition is normally handed
    over at a batch boundary; the compare-and-set in the database covers the rest.
    """

    def __init__(self, processing: asyncio.Lock) -> None:
        self.known: dict[TopicPartition, int | None] = {}
        self._processing = processing

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        async with self._processing:
            for partition in revoked:
                self.known.pop(partition, None)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        for partition in assigned:
            self.known.pop(partition, None)


class _Abandon(Exception):
    """Drop the rest of a partition's fetched records: it was sought elsewhere, or we stop.

    Nothing is lost: the partition's next fetch starts at the stored offset.
    """


def _inbound(record: ConsumerRecord[bytes, bytes]) -> InboundMessage:
    return InboundMessage(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
    )


class OrderConsumer:
    """Runs one consumer-group member until ``stop`` is set."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        session_factory: async_sessionmaker[AsyncSession],
        config: ConsumerConfig,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._consumer = consumer
        self._sessions = session_factory
        self._config = config
        self._clock = clock
        self._processing = asyncio.Lock()
        self._offsets = _Offsets(self._processing)
        self._slots = asyncio.Semaphore(config.concurrency)
        self.stats = ConsumerStats()

    @property
    def rebalance_listener(self) -> ConsumerRebalanceListener:
        return self._offsets

    def subscribe(self) -> None:
        self._consumer.subscribe([self._config.inbound_topic], listener=self._offsets)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll, apply, commit; return once ``stop`` is set and the batch in flight is done."""
        while not stop.is_set():
            batches = await self._poll(stop)
            if not batches:
                continue
            async with self._processing:
                positions = await asyncio.gather(
                    *(
                        self._process_partition(partition, [_inbound(r) for r in records], stop)
                        for partition, records in batches.items()
                    )
                )
            await self._commit_to_kafka(
                {
                    partition: position
                    for partition, position in zip(batches, positions, strict=True)
                    if position is not None
                }
            )

    async def _poll(
        self, stop: asyncio.Event
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        fetch = asyncio.ensure_future(
            self._consumer.getmany(
                timeout_ms=self._config.poll_timeout_ms,
                # Room for a full batch per partition; each partition's share is cut into
                # transactions of at most max_batch records.
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

    async def _commit_to_kafka(self, positions: dict[TopicPartition, int]) -> None:
        if not positions:
            return
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

    async def _process_partition(
        self, partition: TopicPartition, messages: Sequence[InboundMessage], stop: asyncio.Event
    ) -> int | None:
        """Apply one partition's records, in transactions of at most ``max_batch`` records.

        Returns the new stored offset, or None if nothing was committed.
        """
        position: int | None = None
        size = self._config.max_batch
        try:
            for start in range(0, len(messages), size):
                chunk = messages[start : start + size]
                position = await self._process_batch(partition, chunk, stop) or position
        except _Abandon:
            pass  # the partition was sought elsewhere (or we are stopping): drop the rest
        return position

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
                            error,
                        )
                        raise _Abandon from error
                    self.stats.retries += 1
                    log.warning(
                        "transient fault applying %s[%d] at offset %d, retrying: %s",
                        partition.topic,
                        partition.partition,
                        messages[0].offset,
                        _one_line(error),
                    )
                    await backoff.sleep(stop)

    def _resync(self, partition: TopicPartition, stored: int | None) -> None:
        self._offsets.known[partition] = stored
        if stored is not None:
            self._consumer.seek(partition, stored)

    async def _known_offset(self, partition: TopicPartition, first: int) -> tuple[bool, int | None]:
        """(ready, expected): load the stored offset on first use and seek there if needed."""
        if partition in self._offsets.known:
            return True, self._offsets.known[partition]
        async with self._sessions() as session:
            stored = await load_offset(
                session, self._config.group_id, partition.topic, partition.partition
            )
        self._offsets.known[partition] = stored
        if stored is not None and first != stored:
            log.info(
                "seeking %s[%d] to stored offset %d (fetch started at %d)",
                partition.topic,
                partition.partition,
                stored,
                first,
            )
            self._consumer.seek(partition, stored)
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
        outcome = await apply_batch(
            self._sessions,
            group_id=self._config.group_id,
            destinations=self._config.destinations,
            messages=pending,
            expected_offset=expected,
            now=self._clock(),
            rejected=rejected,
        )
        self._offsets.known[partition] = outcome.next_offset
        self.stats.add(outcome)
        log.info(
            "batch applied",
            extra={
                "topic": partition.topic,
                "partition": partition.partition,
                "first_offset": pending[0].offset,
                "next_offset": outcome.next_offset,
                "applied": outcome.applied,
                "duplicates": outcome.duplicates,
                "dead_lettered": outcome.dead_lettered,
            },
        )
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
                    )
                    rejected = {
                        message.offset: SchemaViolation(
                            f"the database refused the event: {_one_line(error)}"
                        )
                    }
        return position


def _one_line(error: BaseException) -> str:
    if isinstance(error, DBAPIError) and error.orig is not None:
        error = error.orig
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


async def run_until_stopped(
    consumer: AIOKafkaConsumer,
    order_consumer: OrderConsumer,
    stop: asyncio.Event,
    on_started: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Start the Kafka client, run, and always stop it (it leaves the group cleanly)."""
    order_consumer.subscribe()
    await consumer.start()
    try:
        if on_started is not None:
            await on_started()
        await order_consumer.run(stop)
    finally:
        await consumer.stop()
