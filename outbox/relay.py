"""The relay: unpublished outbox rows -> Kafka, in order per key, at least once.

Ordering with several relays: every row carries a ``shard`` (a hash of its key), and a
relay publishes only the shards it owns. It owns a shard by holding a session-level
PostgreSQL advisory lock on it, on the one connection it also reads and marks through.
If the relay dies or its connection drops, PostgreSQL releases the locks at once and a
live relay claims the shards on its next claim round. Relays share the shards fairly:
each counts the live relays (every relay holds a membership lock) and, between batches,
claims free shards up to ceil(shards / relays) or releases its surplus.

One owner per shard at a time, publishing in id order, waiting for the broker's acks
before marking and before reading the next batch: so each key's messages reach the topic
in the order they were committed.

At least once: rows are marked published only after the broker acknowledged them. A
crash between the ack and the mark repeats at most that batch, with the same bytes (and
so the same ``event_id`` headers and payload ids).

Latency: an insert trigger sends ``NOTIFY`` once per committing transaction; the relay
``LISTEN``s and wakes at once. A slow poll covers a lost notification.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from outbox.enqueue import SHARD_COUNT
from outbox.faults import Backoff, is_transient
from outbox.models import NOTIFY_CHANNEL

log = logging.getLogger("orderflow.relay")

#: First key of the two-key advisory locks that mark shard ownership ("oflw").
ADVISORY_LOCK_NAMESPACE: Final = 0x6F666C77
#: First key of the advisory lock each live relay holds, to count relays ("ofmb").
MEMBER_LOCK_NAMESPACE: Final = 0x6F666D62


class Producer(Protocol):
    """The part of ``aiokafka.AIOKafkaProducer`` the relay uses."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]: ...


@dataclass(frozen=True, slots=True)
class RelayConfig:
    batch_size: int = 500
    #: Fallback poll when no notification arrives (notifications are the normal wake-up).
    poll_interval: float = 1.0
    #: How often a relay tries to claim shards that nobody owns.
    claim_interval: float = 2.0
    #: Published rows are kept this long (for resend), then pruned in batches.
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
class _Row:
    id: int
    topic: str
    key: bytes | None
    payload: bytes | None
    headers: list[tuple[str, bytes]]


_SELECT_BATCH: Final = text(
    """
    SELECT id, topic, key, payload, headers
    FROM outbox_messages
    WHERE published_at IS NULL AND shard = ANY(:shards)
    ORDER BY id
    LIMIT :limit
    """
)
_MARK_PUBLISHED: Final = text(
    "UPDATE outbox_messages SET published_at = now() WHERE id = ANY(:ids) AND published_at IS NULL"
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
_PRUNE: Final = text(
    """
    DELETE FROM outbox_messages WHERE id IN (
        SELECT id FROM outbox_messages
        WHERE published_at IS NOT NULL AND published_at < now() - CAST(:retention AS interval)
        LIMIT :limit
    )
    """
)


class Relay:
    """Runs one relay until ``stop`` is set. Safe to run as many instances as you like."""

    def __init__(
        self,
        engine: AsyncEngine,
        producer: Producer,
        config: RelayConfig | None = None,
    ) -> None:
        self._engine = engine
        self._producer = producer
        self._config = config or RelayConfig()
        self._wake = asyncio.Event()
        self._owned: set[int] = set()
        self.stats = RelayStats()

    @property
    def owned_shards(self) -> frozenset[int]:
        return frozenset(self._owned)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(maximum=10.0)
        while not stop.is_set():
            try:
                async with self._engine.connect() as connection:
                    try:
                        connection = await connection.execution_options(
                            isolation_level="AUTOCOMMIT"
                        )
                        await self._listen(connection)
                        await connection.execute(_JOIN, {"namespace": MEMBER_LOCK_NAMESPACE})
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
                self._owned.clear()
                self.stats.owned_shards = 0
            if not stop.is_set():
                await backoff.sleep(stop)

    async def _listen(self, connection: AsyncConnection) -> None:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None

        def notified(*_: object) -> None:
            self._wake.set()

        await driver.add_listener(NOTIFY_CHANNEL, notified)

    async def _serve(
        self, connection: AsyncConnection, stop: asyncio.Event, backoff: Backoff
    ) -> None:
        loop = asyncio.get_running_loop()
        next_claim = 0.0
        next_prune = loop.time() + 1.0
        while not stop.is_set():
            now = loop.time()
            if now >= next_claim:
                await self._claim(connection)
                next_claim = now + self._config.claim_interval
            if now >= next_prune:
                await self._prune(connection)
                next_prune = now + self._config.prune_interval

            self._wake.clear()
            rows = await self._fetch(connection) if self._owned else []
            if rows:
                if await self._publish(rows):
                    await connection.execute(_MARK_PUBLISHED, {"ids": [row.id for row in rows]})
                    self.stats.published += len(rows)
                    self.stats.batches += 1
                    backoff.reset()
                    if len(rows) == self._config.batch_size:
                        continue  # a backlog: drain without waiting
                else:
                    await backoff.sleep(stop)
                    continue
            await self._wait(
                stop, min(self._config.poll_interval, max(0.0, next_claim - loop.time()))
            )

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _claim(self, connection: AsyncConnection) -> None:
        """Move towards a fair share: ceil(shards / live relays) each.

        Runs between batches, so a released shard has nothing in flight: every row this
        relay published from it is already marked, and the next owner starts after them.
        """
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
            start = random.randrange(len(free))
            result = await connection.execute(
                _CLAIM,
                {
                    "shards": free[start:] + free[:start],
                    "namespace": ADVISORY_LOCK_NAMESPACE,
                    "wanted": target - len(self._owned),
                },
            )
            self._owned.update(result.scalars())
        self.stats.owned_shards = len(self._owned)
        if len(self._owned) != before:
            log.info(
                "relay owns %d of %d shards (fair share %d)", len(self._owned), SHARD_COUNT, target
            )

    async def _fetch(self, connection: AsyncConnection) -> list[_Row]:
        result = await connection.execute(
            _SELECT_BATCH, {"shards": sorted(self._owned), "limit": self._config.batch_size}
        )
        return [
            _Row(
                id=row.id,
                topic=row.topic,
                key=row.key,
                payload=row.payload,
                headers=[(str(name), str(value).encode()) for name, value in row.headers],
            )
            for row in result
        ]

    async def _publish(self, rows: Sequence[_Row]) -> bool:
        """Send in id order and wait for every ack; False (nothing marked) on any failure."""
        try:
            deliveries = [
                await self._producer.send(
                    row.topic, value=row.payload, key=row.key, headers=row.headers
                )
                for row in rows
            ]
            await asyncio.gather(*deliveries)
        except Exception as error:
            self.stats.failures += 1
            log.warning(
                "publishing %d outbox messages failed, will retry: %s", len(rows), _one_line(error)
            )
            return False
        return True

    async def _prune(self, connection: AsyncConnection) -> None:
        while True:
            result = await connection.execute(
                _PRUNE, {"retention": self._config.retention, "limit": self._config.prune_batch}
            )
            deleted = int(getattr(result, "rowcount", 0) or 0)
            self.stats.pruned += deleted
            if deleted < self._config.prune_batch:
                return


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
