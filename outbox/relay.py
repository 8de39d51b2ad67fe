"""The relay: unpublished outbox rows -> Kafka, in order per key, at least once.

Ordering with several relays: every row carries a ``shard`` (a hash of its key), and a
relay publishes only the shards it owns. It owns a shard by holding a session-level
PostgreSQL advisory lock on it, on the one connection it also reads and marks through.
If the relay dies or its connection drops, PostgreSQL releases the locks at once and a
live relay claims the shards on its next claim round. Relays share the shards fairly:
each counts the live relays (every relay holds a membership lock) and, between batches,
claims free shards up to ceil(shards / relays) or releases its surplus.

One owner per shard at a time, publishing in id order, and sending a batch only once
every message of the batch before it is acknowledged: so each key's messages reach the
topic in the order they were committed, and a failed batch is retried before anything
newer goes out. A batch carries at most one record batch per partition (a record batch is
appended whole or not at all), so no part of a partition's share can land while an
earlier part failed. The database, the broker and the relay still work at the same time:
while batch N is on its way, the relay reads batch N+1 (N's rows excluded); once N is
acknowledged, the server marks N while the relay builds N+1's record batches.

Fenced: a batch is handed to the producer only right after the relay's session answered
a round trip sent after the batch was built, so a relay whose session has died (and whose
shards another relay may own from then on) starts no new batch. What the producer
already held when the session died (a batch on its way, a record batch queued behind an
older one of its partition) may still land after the new owner's copies: the new owner
starts at the oldest unmarked message, so each key's first copies stay in order; only
repeats can come late. The session's TCP keepalives are short, so that the server notices
a relay whose host vanished, and frees its shards, within seconds (``SESSION_SETTINGS``).

Marking rewrites no message: a message is unpublished while its id is in
``outbox_pending`` (written by an insert trigger in the inserting transaction), and the
mark deletes the batch's ids from there. The messages stay in ``outbox_messages``,
unchanged, until retention prunes them.

Throughput: the relay builds one record batch per partition itself (partitioned as the
producer's own ``send`` would: murmur2 of the key) instead of handing the producer one
message at a time, and reads and marks rows on the driver connection directly.

At least once: rows are marked published only after the broker acknowledged them, and
the next batch goes out only after that mark. A crash of the relay repeats at most the one
batch sent but not marked yet, with the same bytes (and so the same ``event_id`` headers
and payload ids); a crash of the database server may also repeat the batches marked in its
last moments (marks don't wait for the disk: see ``SESSION_SETTINGS``).

Failures: a failed batch is retried with backoff (so is a lost database session, after
which the relay reconnects and claims shards anew). A producer that can never send again
(fenced, out of sequence, its sender dead) ends ``run`` with :class:`ProducerBroken`, and
one the broker refuses to serve (authorization) with :class:`PublishForbidden`: either
way the relay's session goes, and its shards with it, instead of holding them while it
stalls. A row the producer cannot place (its topic unknown to the broker) fails its
batch like a refused one: retried, not a crash.

Latency: an insert trigger sends ``NOTIFY`` once per committing transaction; the relay
``LISTEN``s and wakes at once. A slow poll covers a lost notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Protocol

import orjson
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    OutOfOrderSequenceNumber,
    ProducerClosed,
    ProducerFenced,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownProducerId,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outbox.enqueue import SHARD_COUNT
from outbox.faults import Backoff, is_data_error, is_transient
from outbox.models import NOTIFY_CHANNEL
from outbox.observe import NO_RELAY_OBSERVER, RelayObserver
from outbox.tracing import NO_RELAY_TRACING, PublishTrace, RelayTracing

log = logging.getLogger("orderflow.relay")

#: At stop, how long a batch on its way may take to be acknowledged (and then marked).
SETTLE_SECONDS: Final = 5.0
#: How long the round trip that fences a batch may take before the session counts as lost.
PROBE_TIMEOUT_SECONDS: Final = 10.0
#: While pruning has more to delete, the pause after a prune round, in multiples of the
#: round's duration (so pruning takes at most a fifth of the relay's time), and at least.
PRUNE_PAUSE: Final = 4.0
PRUNE_PAUSE_MINIMUM: Final = 0.05
#: First key of the two-key advisory locks that mark shard ownership ("oflw").
ADVISORY_LOCK_NAMESPACE: Final = 0x6F666C77
#: First key of the advisory lock each live relay holds, to count relays ("ofmb").
MEMBER_LOCK_NAMESPACE: Final = 0x6F666D62
#: Server settings of the relay's session. A relay whose host vanishes sends no FIN: its
#: session, and with it its shard locks, lives on until the server gives up on the
#: connection. With these, the server probes an idle session after 3 s and drops it once
#: 6 s have passed without an answer; data it sent (a NOTIFY to the relay, say) that stays
#: unacknowledged for 6 s drops it too. So the shards are free about 6 s after the host
#: vanished, at worst about 12 s (a NOTIFY sent just before the probes gave up restarts
#: the count), and another relay claims them at its next claim round. (Over a Unix socket
#: they don't apply, and aren't needed.) A setting the server lacks is skipped.
SESSION_SETTINGS: Final = (
    ("tcp_keepalives_idle", "3"),
    ("tcp_keepalives_interval", "1"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "6000"),
    # PostgreSQL 14 and newer, where the platform can tell: a statement notices a
    # vanished client within 2 s too.
    ("client_connection_check_interval", "2000"),
    # The relay's writes (marks, prunes) don't wait for their WAL to reach the disk. A
    # mark the server loses in a crash of its own (the last few hundred milliseconds'
    # worth at most) only makes its rows unpublished again: they go out once more, as
    # repeats, after the copies already sent (so each key's first copies stay in order).
    # Commits are still applied in order, so a later batch's mark is never kept while an
    # earlier one's is lost. Against a fsync'ing server this saves a WAL flush per batch.
    ("synchronous_commit", "off"),
)
#: Errors after which an ``AIOKafkaProducer`` fails every later send (or every send to
#: the partition, for a producer id the broker forgot): it must be replaced.
_BROKEN_PRODUCER: Final = (
    ProducerFenced,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    TransactionalIdAuthorizationFailed,
    ProducerClosed,
)
#: Errors no retry can cure: the broker refuses this client.
_FORBIDDEN: Final = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError)


class Producer(Protocol):
    """The part of ``aiokafka.AIOKafkaProducer`` the relay uses: batches it builds itself."""

    def create_batch(self) -> BatchBuilder: ...

    async def send_batch(
        self, batch: BatchBuilder, topic: str, *, partition: int
    ) -> asyncio.Future[Any]: ...

    async def partitions_for(self, topic: str) -> set[int]: ...


class ProducerBroken(RuntimeError):
    """The producer fails every send for good: ``run`` ended (shards released); run it
    again with a new producer."""


class PublishForbidden(RuntimeError):
    """The broker refuses the relay's messages (authorization): ``run`` ended (shards
    released); retrying cannot help until an operator acts."""


@dataclass(frozen=True, slots=True)
class RelayConfig:
    batch_size: int = 500
    #: Fallback poll when no notification arrives (notifications are the normal wake-up).
    poll_interval: float = 1.0
    #: How often a relay tries to claim shards that nobody owns.
    claim_interval: float = 2.0
    #: How often the relay moves its scan floor past rows already published.
    floor_interval: float = 0.25
    #: Published rows are kept this long (for resend), then pruned in batches (one batch
    #: a round, publishing in between, until no more are due; then every prune_interval).
    retention: timedelta = timedelta(days=7)
    prune_interval: float = 60.0
    prune_batch: int = 5000


@dataclass(slots=True)
class RelayStats:
    published: int = 0
    batches: int = 0
    failures: int = 0
    pruned: int = 0
    owned_shards: int = 0


@dataclass(frozen=True, slots=True)
class _FloorCandidate:
    """The newest committed outbox id, and a transaction id taken after it was read."""

    newest: int
    xid: str


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    topic: str
    key: bytes | None
    payload: bytes | None
    headers: list[tuple[str, bytes]]
    #: Seconds from insertion to this read, by the database's clock (for latency metrics).
    age: float


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A batch's rows, as record batches: at most one per topic partition."""

    rows: list[_Row]
    record_batches: list[tuple[str, int, BatchBuilder]]
    trace: PublishTrace
    #: Why the batch can't be sent at all (the producer could not place a row): it then
    #: fails as a batch the broker refused would.
    refused: Exception | None = None


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A batch handed to the producer whose acks are awaited."""

    rows: list[_Row]
    ids: list[int]
    deliveries: asyncio.Future[None]
    #: Loop time when the batch was handed to the producer.
    started: float
    trace: PublishTrace


# Run on the driver connection itself (asyncpg, prepared once): the statements of every
# batch skip SQLAlchemy's result machinery, which costs more than the query. The age is
# ``date_part``'s double: ``EXTRACT`` computes in numeric (PostgreSQL 14 and newer), which
# cost a fifth of the whole read on PostgreSQL 15.
#
# The first pending ids of the owned shards in id order (from the floor, $4), and then
# their messages by primary key: the limit applies to the narrow table first, so the
# read never walks retained messages however the planner would have joined the two.
_SELECT_BATCH: Final = """
    SELECT id, topic, key, payload, CAST(headers AS text) AS headers,
           date_part('epoch', statement_timestamp() - created_at) AS age
    FROM outbox_messages
    WHERE id = ANY(ARRAY(
        SELECT id FROM outbox_pending
        WHERE shard = ANY($1::int[]) AND id >= $4 AND id <> ALL($2::bigint[])
        ORDER BY id
        LIMIT $3
    ))
    ORDER BY id
"""
# The scan floor (see ``Relay._advance_floor``), in one round trip: whether every
# transaction older than the candidate's transaction id ($1) has ended (the oldest one
# still running, this statement's snapshot's xmin, is younger); if so, the lowest
# unpublished id of the owned shards ($2) from the current floor ($3) up to the
# candidate's newest id ($4); and the next candidate: the newest committed id, and a
# transaction id taken after this statement's snapshot (this statement's own).
_ADVANCE_FLOOR: Final = """
    WITH candidate AS (
        SELECT pg_snapshot_xmin(pg_current_snapshot()) > CAST(CAST($1 AS text) AS xid8)
               AS settled
    )
    SELECT settled,
           CASE WHEN settled THEN (
               SELECT min(id) FROM outbox_pending
               WHERE shard = ANY($2::int[]) AND id >= $3 AND id <= $4
           ) END AS lowest,
           (SELECT max(id) FROM outbox_messages) AS newest,
           CAST(pg_current_xact_id() AS text) AS xid
    FROM candidate
"""
# The mark: the ids leave ``outbox_pending`` (the messages themselves are not rewritten),
# and the session's count for this second and each topic ($2, $3) goes up.
_MARK_PUBLISHED: Final = """
    WITH published AS (DELETE FROM outbox_pending WHERE id = ANY($1::bigint[]))
    INSERT INTO outbox_throughput AS t (second, relay, topic, published)
    SELECT date_trunc('second', now()), pg_backend_pid(), topic, count
    FROM unnest($2::text[], $3::bigint[]) AS counts(topic, count)
    ON CONFLICT (second, relay, topic) DO UPDATE SET published = t.published + excluded.published
"""
# Messages that waited since before schema revision 0005 also get ``published_at``, which
# relays of the previous version read (``outbox_messages_marked`` then removes their ids
# from ``outbox_pending``); the partial index holds only those, so this costs nothing
# once they are gone. ``_LEGACY_NEWEST`` is the newest of them still unmarked: no new ones
# appear (``published_at`` defaults to ``'infinity'``), so any answer stays an upper bound.
_MARK_LEGACY: Final = (
    "UPDATE outbox_messages SET published_at = now() "
    "WHERE published_at IS NULL AND id = ANY($1::bigint[])"
)
_LEGACY_NEWEST: Final = "SELECT max(id) FROM outbox_messages WHERE published_at IS NULL"
_PROBE: Final = "SELECT 1"
_CONFIGURE_SESSION: Final = text(
    "SELECT set_config(CAST(:name AS text), CAST(:setting AS text), false) "
    "WHERE EXISTS (SELECT FROM pg_settings WHERE name = CAST(:name AS text))"
)
# The executor evaluates the WHERE clause row by row and stops at the LIMIT, so no more
# than :wanted locks are taken (a surplus would only be released on the next round).
_CLAIM: Final = text(
    "SELECT shard FROM unnest(CAST(:shards AS int[])) AS shard "
    "WHERE pg_try_advisory_lock(:namespace, shard) LIMIT :wanted"
)
_RELEASE: Final = text(
    "SELECT pg_advisory_unlock(:namespace, shard) FROM unnest(CAST(:shards AS int[])) AS shard"
)
#: Every relay holds one membership lock (keyed by its backend pid) while it is connected.
_JOIN: Final = text("SELECT pg_advisory_lock(:namespace, pg_backend_pid())")
_LIVE_RELAYS: Final = text(
    """
    SELECT count(*) FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND objsubid = 2
      AND classid = CAST(:namespace AS oid)
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    """
)
# Published messages written longer than the retention ago, oldest first (deleted by
# primary key: ``IN`` may become a semi join over the whole table); and the throughput
# counts older than an hour.
_PRUNE: Final = text(
    """
    DELETE FROM outbox_messages WHERE id = ANY(ARRAY(
        SELECT id FROM outbox_messages AS m
        WHERE created_at < now() - CAST(:retention AS interval)
          AND NOT EXISTS (SELECT FROM outbox_pending AS p WHERE p.id = m.id)
        ORDER BY created_at
        LIMIT :limit
    ))
    """
)
_PRUNE_THROUGHPUT: Final = text(
    "DELETE FROM outbox_throughput WHERE second < now() - CAST(:kept AS interval)"
)
THROUGHPUT_KEPT: Final = timedelta(hours=1)


class Relay:
    """Runs one relay until ``stop`` is set. Safe to run as many instances as you like."""

    def __init__(
        self,
        engine: AsyncEngine,
        producer: Producer,
        config: RelayConfig | None = None,
        *,
        observer: RelayObserver = NO_RELAY_OBSERVER,
        tracing: RelayTracing = NO_RELAY_TRACING,
    ) -> None:
        self._engine = engine
        self._observer = observer
        self._tracing = tracing
        self._partitioner = DefaultPartitioner()
        self.producer = producer
        self._config = config or RelayConfig()
        self._wake = asyncio.Event()
        self._owned: set[int] = set()
        self._floor = 0
        self._candidate: _FloorCandidate | None = None
        #: The session's connection and the asyncpg connection under it (see ``_driver``).
        self._drivers: tuple[AsyncConnection, Any] | None = None
        #: Where a claim round starts looking for free shards (see ``_claim``).
        self._random = random.Random()
        #: The newest message waiting since before schema revision 0005, at most (see
        #: ``_MARK_LEGACY``); looked up at every claim round.
        self._legacy_newest: int | None = None
        self.stats = RelayStats()

    @property
    def owned_shards(self) -> frozenset[int]:
        return frozenset(self._owned)

    @property
    def scan_floor(self) -> int:
        """No unpublished row of the owned shards has a lower id (see ``_advance_floor``)."""
        return self._floor

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set. Database faults are retried (reconnecting); a
        producer that can't publish any more ends it with :class:`ProducerBroken` or
        :class:`PublishForbidden`, its session (and so its shards) released."""
        backoff = Backoff(maximum=10.0)
        while not stop.is_set():
            try:
                async with self._engine.connect() as connection:
                    try:
                        connection = await connection.execution_options(
                            isolation_level="AUTOCOMMIT"
                        )
                        await self._configure(connection)
                        await self._listen(connection)
                        await connection.execute(_JOIN, {"namespace": MEMBER_LOCK_NAMESPACE})
                        self._observer.joined()
                        backoff.reset()
                        await self._serve(connection, stop, backoff)
                    finally:
                        # Close it rather than return it to the pool: the shard locks
                        # must go with it, so that another relay can take over at once.
                        await connection.invalidate()
            except Exception as error:
                if not is_transient(error):
                    raise
                self.stats.failures += 1
                log.warning("relay lost the database, reconnecting: %s", _one_line(error))
            finally:
                # The locks went with the connection (or will, when it is closed).
                self._drivers = None
                self._owned.clear()
                self._reset_floor()
                self.stats.owned_shards = 0
                self._observer.left()
            if not stop.is_set():
                await self._sleep(stop, backoff.next_delay())

    async def _configure(self, connection: AsyncConnection) -> None:
        """Apply ``SESSION_SETTINGS``: those the server knows and takes."""
        for name, setting in SESSION_SETTINGS:
            try:
                await connection.execute(_CONFIGURE_SESSION, {"name": name, "setting": setting})
            except Exception as error:
                if not is_data_error(error):  # the server refused the value: go without
                    raise
                log.info("relay session: %s not set: %s", name, _one_line(error))

    async def _listen(self, connection: AsyncConnection) -> None:
        driver = await self._driver(connection)

        def notified(*_: object) -> None:
            self._wake.set()

        await driver.add_listener(NOTIFY_CHANNEL, notified)

    async def _serve(
        self, connection: AsyncConnection, stop: asyncio.Event, backoff: Backoff
    ) -> None:
        """Fetch, publish and mark, with the database and the broker working at once.

        While batch N is on its way to the broker, the relay fetches batch N+1 (rows of N
        excluded: they are still unmarked); once N is acknowledged, it marks N and builds
        N+1 at the same time. N+1 is sent only once every message of N is acknowledged,
        so a failure in N is retried before anything newer of its keys goes out; when N
        fails, the fetched N+1 is dropped unsent.
        """
        next_claim = 0.0
        next_prune = self._now() + 1.0
        next_floor = 0.0
        in_flight: _InFlight | None = None
        full = False
        try:
            while not stop.is_set():
                now = self._now()
                housekeeping = now >= next_claim or now >= next_prune
                if housekeeping and in_flight is None:
                    # Shards change hands only with nothing in flight.
                    if now >= next_claim:
                        await self._claim(connection)
                        next_claim = now + self._config.claim_interval
                    if now >= next_prune:
                        next_prune = await self._prune(connection)
                    housekeeping = False

                if self._owned and now >= next_floor:
                    await self._advance_floor(connection)
                    next_floor = now + self._config.floor_interval

                # Read ahead while a batch is in flight only if there may be more to read:
                # the last read filled a batch, or a commit was notified since.
                worth_reading = in_flight is None or full or self._wake.is_set()
                self._wake.clear()
                rows: list[_Row] = []
                if self._owned and not housekeeping and worth_reading:
                    # (With housekeeping due, the batch in flight finishes first.)
                    rows = await self._fetch(connection, in_flight.ids if in_flight else ())
                    full = len(rows) == self._config.batch_size
                acknowledged: _InFlight | None = None
                if in_flight is not None:
                    if not await self._acknowledged(in_flight):
                        in_flight = None
                        await self._sleep(stop, backoff.next_delay())
                        continue  # what was fetched is dropped unsent, and read again
                    acknowledged, in_flight = in_flight, None
                # The next batch is built while the server marks the one acknowledged (CPU
                # here beside the server's work); what did not fit is read again later.
                outgoing = await self._mark_while(connection, acknowledged, rows)
                if acknowledged is not None:
                    backoff.reset()
                if outgoing is not None:
                    full = full or len(outgoing.rows) < len(rows)
                    if not stop.is_set():  # stopping: it waits for later
                        # The fence: the session, and so the shard locks, is alive now.
                        await self._probe(connection)
                        in_flight = await self._send(outgoing)
                if in_flight is None:
                    due = min(next_claim, next_prune) - self._now()
                    await self._wait(stop, min(self._config.poll_interval, max(0.0, due)))
        except BaseException:
            # Failing (the database, most likely): nothing more is marked on this
            # connection, so no later batch is marked while an earlier one is not. What is
            # in flight is published again by whoever owns its shards next.
            if in_flight is not None:
                in_flight.deliveries.add_done_callback(_retrieve)
                in_flight.deliveries.add_done_callback(_ending(in_flight.trace))
            raise
        if in_flight is not None:
            await self._settle(connection, in_flight)

    async def _settle(self, connection: AsyncConnection, batch: _InFlight) -> None:
        """Stopping with a batch on its way: mark it if its acks come soon, so that a clean
        stop repeats nothing; otherwise it is published again later."""
        batch.deliveries.add_done_callback(_ending(batch.trace))
        try:
            # Not settled in time, or failed: the rows stay unmarked and go out again.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(batch.deliveries), SETTLE_SECONDS)
                if not connection.closed:
                    await self._mark(connection, batch)
        finally:
            batch.deliveries.cancel()

    async def _mark_while(
        self, connection: AsyncConnection, acknowledged: _InFlight | None, rows: list[_Row]
    ) -> _Outgoing | None:
        """Mark ``acknowledged`` (if any) and, while the server does, build the record
        batches of ``rows`` (if any).

        (The mark's answer is no fence for them: it may wait unread while they are built,
        the session ending meanwhile.)"""
        if acknowledged is None:
            return await self._prepare(rows) if rows else None
        marking = asyncio.ensure_future(self._mark(connection, acknowledged))
        try:
            if rows:
                await asyncio.sleep(0)  # the mark's statement goes out first
                return await self._prepare(rows)
            return None
        finally:
            await marking

    async def _prepare(self, rows: list[_Row]) -> _Outgoing:
        """The record batches for ``rows``, one per topic partition, each in id order.

        Partitions as the producer's own ``send`` would (the default partitioner: murmur2
        of the key), so a key lands where any Kafka client would put it. When a
        partition's record batch is full, the batch ends before the row that did not fit:
        a second record batch of that partition could be appended while the first failed,
        newer messages of its keys before older ones.
        """
        producer = self.producer
        trace = self._tracing.publish()
        builders: dict[tuple[str, int], BatchBuilder] = {}
        partitions: dict[tuple[str, bytes | None], int] = {}
        topic_partitions: dict[str, list[int]] = {}
        taken = 0
        for row in rows:
            partition = partitions.get((row.topic, row.key))
            if partition is None:
                every = topic_partitions.get(row.topic)
                if every is None:
                    try:
                        every = topic_partitions[row.topic] = sorted(
                            await producer.partitions_for(row.topic)
                        )
                    except Exception as error:  # an unknown topic, say; retried later
                        return _Outgoing(rows, [], trace, refused=error)
                partition = self._partitioner(row.key, every, every)
                if row.key is not None:
                    partitions[(row.topic, row.key)] = partition
            builder = builders.get((row.topic, partition))
            if builder is None:
                builder = builders[(row.topic, partition)] = producer.create_batch()
            headers = trace.headers(row.topic, partition, row.headers)
            # A builder takes its first record whatever its size: only a partition
            # that already has records here can be full.
            if (
                builder.append(timestamp=None, key=row.key, value=row.payload, headers=headers)
                is None
            ):
                trace.drop_last()
                break
            taken += 1
        return _Outgoing(
            rows[:taken],
            [
                (topic, partition, builder)
                for (topic, partition), builder in builders.items()
                if builder.record_count()
            ],
            trace,
        )

    async def _send(self, outgoing: _Outgoing) -> _InFlight:
        """Hand the record batches to the producer; the acks arrive later."""
        started = asyncio.get_running_loop().time()
        deliveries: list[asyncio.Future[Any]] = []
        refused = outgoing.refused
        try:
            for topic, partition, builder in outgoing.record_batches:
                # Complete: a closed record batch goes out at once (an open one would wait
                # for the producer's linger, for records that will never come).
                builder.close()
                deliveries.append(
                    await self.producer.send_batch(builder, topic, partition=partition)
                )
        except Exception as error:
            refused = error
        return _InFlight(
            rows=outgoing.rows,
            ids=[row.id for row in outgoing.rows],
            deliveries=asyncio.ensure_future(_settled(deliveries, refused)),
            started=started,
            trace=outgoing.trace,
        )

    async def _acknowledged(self, batch: _InFlight) -> bool:
        """Wait for every ack of ``batch``; False (nothing to mark) on any failure."""
        try:
            await batch.deliveries
        except Exception as error:
            batch.trace.end(error)
            self.stats.failures += 1
            if isinstance(error, _BROKEN_PRODUCER) or _sender_died(self.producer):
                raise ProducerBroken(f"the Kafka producer failed for good: {error!r}") from error
            if isinstance(error, _FORBIDDEN):
                raise PublishForbidden(
                    f"the Kafka broker refuses the relay's messages: {error!r}"
                ) from error
            log.warning(
                "publishing %d outbox messages failed, will retry: %s",
                len(batch.rows),
                _one_line(error),
            )
            return False
        batch.trace.end()
        waited = asyncio.get_running_loop().time() - batch.started
        self._observer.published(batch.rows, waited=waited)
        log.info(
            "batch published",
            extra={
                "component": "relay",
                "messages": len(batch.rows),
                "first_id": batch.ids[0],
                "last_id": batch.ids[-1],
                "owned_shards": len(self._owned),
                "duration_ms": round(waited * 1000, 1),
            },
        )
        return True

    async def _probe(self, connection: AsyncConnection) -> None:
        """One round trip: the session is alive, so it still holds its shard locks."""
        driver = await self._driver(connection)
        await driver.fetchval(_PROBE, timeout=PROBE_TIMEOUT_SECONDS)

    async def _mark(self, connection: AsyncConnection, batch: _InFlight) -> None:
        driver = await self._driver(connection)
        if self._legacy_newest is not None and batch.ids[0] <= self._legacy_newest:
            await driver.execute(_MARK_LEGACY, batch.ids)
        counts: dict[str, int] = {}
        for row in batch.rows:
            counts[row.topic] = counts.get(row.topic, 0) + 1
        await driver.execute(_MARK_PUBLISHED, batch.ids, list(counts), list(counts.values()))
        self.stats.published += len(batch.rows)
        self.stats.batches += 1

    async def _driver(self, connection: AsyncConnection) -> Any:
        """The asyncpg connection under ``connection`` (in autocommit mode: no transaction),
        looked up once per session: SQLAlchemy finds it in a greenlet, which cost a few
        percent of the relay's CPU when it did so for every statement."""
        known = self._drivers
        if known is not None and known[0] is connection:
            return known[1]
        raw = await connection.get_raw_connection()
        self._drivers = (connection, raw.driver_connection)
        return raw.driver_connection

    def _now(self) -> float:
        """The clock the relay's rounds (claim, floor, prune) are timed by."""
        return asyncio.get_running_loop().time()

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        """Wait up to ``seconds`` for a notification or ``stop``."""
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        """Wait ``seconds`` (a backoff), or less if ``stop`` is set meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)

    async def _claim(self, connection: AsyncConnection) -> None:
        """Move towards a fair share: ceil(shards / live relays) each.

        Runs between batches, so a released shard has nothing in flight: every row this
        relay published from it is already marked, and the next owner starts after them.
        """
        self._legacy_newest = await (await self._driver(connection)).fetchval(_LEGACY_NEWEST)
        live = await connection.execute(_LIVE_RELAYS, {"namespace": MEMBER_LOCK_NAMESPACE})
        target = -(-SHARD_COUNT // max(1, int(live.scalar_one())))
        before = len(self._owned)
        if len(self._owned) > target:
            surplus = sorted(self._owned)[target:]
            await connection.execute(
                _RELEASE, {"shards": surplus, "namespace": ADVISORY_LOCK_NAMESPACE}
            )
            self._owned.difference_update(surplus)
        elif len(self._owned) < target:
            free = [shard for shard in range(SHARD_COUNT) if shard not in self._owned]
            # Start at a different place in each relay, so that relays joining together
            # don't all try the same shards first.
            start = self._random.randrange(len(free))
            result = await connection.execute(
                _CLAIM,
                {
                    "shards": free[start:] + free[:start],
                    "namespace": ADVISORY_LOCK_NAMESPACE,
                    "wanted": target - len(self._owned),
                },
            )
            claimed = set(result.scalars())
            if claimed:
                # Rows of the new shards may lie below the floor: start from the bottom.
                self._reset_floor()
            self._owned.update(claimed)
        self.stats.owned_shards = len(self._owned)
        if len(self._owned) != before:
            log.info(
                "relay owns %d of %d shards (fair share %d)", len(self._owned), SHARD_COUNT, target
            )

    def _reset_floor(self) -> None:
        self._floor = 0
        self._candidate = None

    async def _advance_floor(self, connection: AsyncConnection) -> None:
        """Move the scan floor up past published rows, so that a fetch need not walk the
        index entries of every row published since the last vacuum (it would cost more
        and more as a long backlog drains).

        Rows commit out of id order, so the floor may not pass a row whose transaction
        is still running. A candidate is the newest committed id, and a transaction id
        taken after it was read. Every writer of an id up to the candidate took its own
        transaction id before that id (``add_messages`` makes sure of it), and so before
        the candidate's: once the oldest transaction still running is younger than the
        candidate's, all of them have ended, and every row up to the candidate is
        committed (or gone). The floor then moves to the lowest of them still unpublished
        in the owned shards (rows in flight included), or past them all.

        (A snapshot's list of running transactions would not do: it lists only those
        below its ``xmax``, one past the newest *completed* transaction, so a writer that
        took its id after that is running but not listed.)
        """
        candidate = self._candidate
        driver = await self._driver(connection)
        record = await driver.fetchrow(
            _ADVANCE_FLOOR,
            candidate.xid if candidate else None,
            sorted(self._owned),
            self._floor,
            candidate.newest if candidate else -1,
        )
        if candidate is not None:
            if not record["settled"]:
                return  # wait for the older transactions
            lowest = record["lowest"]
            self._floor = candidate.newest + 1 if lowest is None else lowest
        newest = record["newest"]
        self._candidate = None if newest is None else _FloorCandidate(newest, record["xid"])

    async def _fetch(self, connection: AsyncConnection, in_flight: Sequence[int]) -> list[_Row]:
        driver = await self._driver(connection)
        records = await driver.fetch(
            _SELECT_BATCH,
            sorted(self._owned),
            list(in_flight),
            self._config.batch_size,
            self._floor,
        )
        return [
            _Row(
                id=record[0],
                topic=record[1],
                key=record[2],
                payload=record[3],
                headers=_headers(record[4]),
                age=record[5],
            )
            for record in records
        ]

    async def _prune(self, connection: AsyncConnection) -> float:
        """Delete one batch of published rows written longer than the retention ago (and
        the throughput counts older than ``THROUGHPUT_KEPT``); when the next prune round is
        due.

        One batch a round, so that publishing goes on between them: while there is more
        to delete, the next round comes ``PRUNE_PAUSE`` times this round's duration later,
        so pruning a long history takes at most about a fifth of the relay's time."""
        began = self._now()
        result = await connection.execute(
            _PRUNE, {"retention": self._config.retention, "limit": self._config.prune_batch}
        )
        deleted = int(getattr(result, "rowcount", 0) or 0)
        await connection.execute(_PRUNE_THROUGHPUT, {"kept": THROUGHPUT_KEPT})
        self.stats.pruned += deleted
        now = self._now()
        if deleted < self._config.prune_batch:
            return now + self._config.prune_interval
        return now + max(PRUNE_PAUSE_MINIMUM, PRUNE_PAUSE * (now - began))


async def _settled(deliveries: Sequence[asyncio.Future[Any]], refused: Exception | None) -> None:
    """Every part of a batch settles (delivered, or failed for good) before the batch
    counts as failed: nothing of it may still reach the broker after its shards could
    have moved to another relay. Then the first failure, if any, is the batch's."""
    outcomes = await asyncio.gather(*deliveries, return_exceptions=True)
    if refused is not None:
        raise refused
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _sender_died(producer: Producer) -> bool:
    """An ``AIOKafkaProducer`` whose background sender died (of an error it does not
    name, ``Unexpected error during batch delivery``) keeps the error and fails every
    later send with it. Other producers don't tell: False."""
    task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    return isinstance(task, asyncio.Future) and task.done()


def _headers(document: str) -> list[tuple[str, bytes]]:
    """Kafka headers from the stored JSON list of ``[name, value]`` text pairs (parsed
    here rather than by the driver's JSON codec, a Python wrapper that costs more)."""
    return [
        (str(name), value.encode() if type(value) is str else str(value).encode())
        for name, value in orjson.loads(document)
    ]


def _ending(trace: PublishTrace) -> Callable[[asyncio.Future[None]], None]:
    """A callback that ends ``trace`` once the batch it traces has settled."""

    def end(future: asyncio.Future[None]) -> None:
        trace.end(asyncio.CancelledError() if future.cancelled() else future.exception())

    return end


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's failure as seen (it was dealt with by not marking its rows)."""
    if not future.cancelled():
        future.exception()


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
