"""Schema revision 0005 carries a live outbox over: rows waiting, writers writing, a relay
of the previous version publishing, and then this version's relays taking over, with
every message on the topic exactly once and each key's messages in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator

import asyncpg
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection

from orderflow.runtime.migrate import alembic_config
from orderflow.runtime.wiring import create_engine, create_producer
from outbox import OutboxMessage, add_messages
from outbox.enqueue import SHARD_COUNT
from outbox.relay import (
    ADVISORY_LOCK_NAMESPACE,
    MEMBER_LOCK_NAMESPACE,
    Relay,
    RelayConfig,
)
from tests.helpers import TestEnv, eventually, read_topic

KEYS = 12


def _plain_url(env: TestEnv) -> str:
    url = env.settings.require_database().set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _migrate(env: TestEnv, revision: str) -> None:
    """``orderflow migrate`` (or a downgrade to ``revision``) beside the running system,
    on a connection of its own."""

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        if revision == "head":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)

    engine = create_engine(env.settings, pool_size=1)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


class PreviousRelay:
    """A relay of schema revision 0004, with its own statements: it owns shards (the shard
    locks), reads ``published_at IS NULL`` in id order from its shards, reads the next
    batch while one is on its way (that one's ids excluded), marks ``published_at`` once
    the broker acknowledged a batch, prunes what it marked past its retention (here:
    everything it marked), and hands half its shards over between batches, as its claim
    round does when a second relay joins."""

    SELECT = (
        "SELECT id, topic, key, payload FROM outbox_messages "
        "WHERE published_at IS NULL AND shard = ANY($1::int[]) AND id >= $4 "
        "AND id <> ALL($2::bigint[]) ORDER BY id LIMIT $3"
    )
    MARK = (
        "UPDATE outbox_messages SET published_at = now() "
        "WHERE id = ANY($1::bigint[]) AND published_at IS NULL"
    )
    PRUNE = (
        "DELETE FROM outbox_messages WHERE id IN (SELECT id FROM outbox_messages "
        "WHERE published_at IS NOT NULL AND published_at < now() - interval '0 s' LIMIT 1000)"
    )

    def __init__(self, env: TestEnv, batch: int) -> None:
        self._env = env
        self._batch = batch
        #: The ids of each batch published, in order.
        self.batches: list[list[int]] = []
        self.hand_over = asyncio.Event()
        self.stop = asyncio.Event()

    @property
    def published(self) -> int:
        return sum(len(batch) for batch in self.batches)

    async def run(self) -> None:
        connection = await asyncpg.connect(_plain_url(self._env))
        producer = create_producer(self._env.settings)
        await producer.start()
        owned = list(range(SHARD_COUNT))
        in_flight: tuple[list[int], asyncio.Future[list[object]]] | None = None
        try:
            await connection.execute(
                "SELECT pg_advisory_lock($1, pg_backend_pid())", MEMBER_LOCK_NAMESPACE
            )
            for shard in owned:
                assert await connection.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_NAMESPACE, shard
                )
            while True:
                if in_flight is None and self.stop.is_set():
                    break
                if in_flight is None and self.hand_over.is_set() and len(owned) == SHARD_COUNT:
                    surplus, owned = owned[SHARD_COUNT // 2 :], owned[: SHARD_COUNT // 2]
                    await connection.execute(
                        "SELECT pg_advisory_unlock($1, shard) FROM unnest($2::int[]) shard",
                        ADVISORY_LOCK_NAMESPACE,
                        surplus,
                    )
                    await connection.execute(self.PRUNE)
                # Housekeeping due (a hand-over): the batch in flight finishes first.
                handing_over = self.hand_over.is_set() and len(owned) == SHARD_COUNT
                rows = []
                if not self.stop.is_set() and not handing_over:
                    rows = await connection.fetch(
                        self.SELECT, owned, in_flight[0] if in_flight else [], self._batch, 0
                    )
                if in_flight is not None:
                    ids, deliveries = in_flight
                    await deliveries
                    await connection.execute(self.MARK, ids)
                    self.batches.append(ids)
                    in_flight = None
                if rows:
                    sent = [
                        await producer.send(row["topic"], key=row["key"], value=row["payload"])
                        for row in rows
                    ]
                    in_flight = ([row["id"] for row in rows], asyncio.gather(*sent))
                await asyncio.sleep(0.05)
        finally:
            await producer.stop()
            await connection.close()


async def _write(env: TestEnv, stop: asyncio.Event, written: list[int]) -> None:
    """Commit one message per key per transaction, numbered, until ``stop``."""
    number = len(written)
    while not stop.is_set():
        async with env.sessions() as session, session.begin():
            await add_messages(
                session,
                [
                    OutboxMessage(
                        env.settings.outbound_topic, f"k{key}".encode(), f"{number + key}".encode()
                    )
                    for key in range(KEYS)
                ],
            )
        written.extend(range(number, number + KEYS))
        number += KEYS
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _task(coroutine: object) -> AsyncIterator[asyncio.Task[None]]:
    task: asyncio.Task[None] = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_migration_carries_a_live_outbox_over_without_loss_or_repeat(
    env: TestEnv,
) -> None:
    await _migrate(env, "0004")
    await env.engine.dispose()
    written: list[int] = []
    # Rows waiting before anything publishes.
    await _write_once(env, written, rounds=100)

    previous = PreviousRelay(env, batch=10)
    stop_writing = asyncio.Event()
    async with (
        _task(previous.run()) as previous_task,
        _task(_write(env, stop_writing, written)) as writer,
    ):

        async def previous_publishing() -> None:
            assert previous.published > 0

        await eventually(previous_publishing)
        await _migrate(env, "head")
        async with env.engine.connect() as connection:
            # Every row written before the migration is NULL or a time; newer: infinity.
            older = await connection.execute(
                text(
                    "SELECT max(id) FROM outbox_messages "
                    "WHERE published_at IS DISTINCT FROM 'infinity'"
                )
            )
            newest_older = older.scalar_one()
            waiting = await connection.execute(text("SELECT count(*) FROM outbox_pending"))
            assert waiting.scalar_one() > 100, "too little left to publish for the test"

        engine = create_engine(env.settings, pool_size=1)
        kafka = create_producer(env.settings)
        await kafka.start()
        stop = asyncio.Event()
        relay = Relay(engine, kafka, RelayConfig(claim_interval=0.1, poll_interval=0.1))
        try:
            async with _task(relay.run(stop)) as relay_task:
                previous.hand_over.set()

                async def took_half() -> None:  # its fair share beside the previous one
                    assert len(relay.owned_shards) == SHARD_COUNT // 2
                    assert relay.stats.published > 0

                await eventually(took_half, within=15)
                previous.stop.set()
                await previous_task

                async def took_all() -> None:
                    assert len(relay.owned_shards) == SHARD_COUNT

                await eventually(took_all, within=15)
                stop_writing.set()
                await writer

                async def drained() -> None:
                    async with env.engine.connect() as connection:
                        waiting = await connection.execute(
                            text("SELECT count(*) FROM outbox_pending")
                        )
                        assert waiting.scalar_one() == 0

                await eventually(drained, within=30)
                # The previous relay published only rows from before the migration, and
                # this one published some of those too, and stamped them for the other.
                assert max(max(batch) for batch in previous.batches) <= newest_older
                assert previous.published < newest_older
                async with env.engine.connect() as connection:
                    unstamped = await connection.execute(
                        text("SELECT count(*) FROM outbox_messages WHERE published_at IS NULL")
                    )
                    assert unstamped.scalar_one() == 0
                stop.set()
                await relay_task
        finally:
            await kafka.stop()
            await engine.dispose()

    records = await read_topic(env.settings, env.settings.outbound_topic, len(written))
    values = [int(record.value or b"-1") for record in records]
    repeated = [value for value, count in Counter(values).items() if count > 1]
    assert repeated == []
    assert sorted(values) == sorted(written)
    by_key: dict[bytes | None, list[tuple[int, int, int]]] = defaultdict(list)
    for record in records:
        by_key[record.key].append((record.partition, record.offset, int(record.value or b"-1")))
    for key, placed in by_key.items():
        assert len({partition for partition, _, _ in placed}) == 1
        numbers = [number for _, _, number in sorted(placed)]
        assert numbers == sorted(numbers), f"{key!r} out of order"
    assert previous.published + relay.stats.published == len(written)


async def _write_once(env: TestEnv, written: list[int], *, rounds: int) -> None:
    """Commit ``rounds`` messages per key in one transaction."""
    number = len(written)
    async with env.sessions() as session, session.begin():
        await add_messages(
            session,
            [
                OutboxMessage(
                    env.settings.outbound_topic, f"k{i % KEYS}".encode(), f"{number + i}".encode()
                )
                for i in range(rounds * KEYS)
            ],
        )
    written.extend(range(number, number + rounds * KEYS))


async def test_a_downgrade_keeps_published_what_was_published(env: TestEnv) -> None:
    """After a downgrade, a relay of the previous version publishes exactly what this
    version left pending: the rest is stamped ``published_at``."""
    topic = env.settings.outbound_topic
    async with env.sessions() as session, session.begin():
        await add_messages(session, [OutboxMessage(topic, b"k", str(i).encode()) for i in range(6)])
    async with env.engine.begin() as connection:
        await connection.execute(
            text(
                "DELETE FROM outbox_pending WHERE id IN "
                "(SELECT id FROM outbox_messages ORDER BY id LIMIT 4)"
            )
        )
        ids = list(
            (await connection.execute(text("SELECT id FROM outbox_messages ORDER BY id"))).scalars()
        )
    await env.engine.dispose()
    await _migrate(env, "0004")
    async with env.engine.connect() as connection:
        unmarked = await connection.execute(
            text("SELECT id FROM outbox_messages WHERE published_at IS NULL ORDER BY id")
        )
        assert list(unmarked.scalars()) == ids[4:]
    await _migrate(env, "head")
    async with env.engine.connect() as connection:
        pending = await connection.execute(text("SELECT id FROM outbox_pending ORDER BY id"))
        assert list(pending.scalars()) == ids[4:]
