"""The relay under chosen and random interleavings (see ``tests.relay_harness``).

The scan floor reasons about transaction ids, which belong to the whole server, not to one
database: other sessions' transactions would change what a schedule does (a commit
elsewhere can hide the hole the floor test looks for, a long transaction elsewhere holds
the floor still). So these tests run on a PostgreSQL server of their own, where the only
transactions are the schedule's.

``ORDERFLOW_SCHEDULES`` (default 200) sets how many random schedules run, from seed
``ORDERFLOW_SCHEDULE_SEED`` (default 1), each ``ORDERFLOW_SCHEDULE_STEPS`` steps long
(default 80) before its drain: e.g. ``ORDERFLOW_SCHEDULES=2000 scripts/test
tests/integration/test_relay_interleavings.py -k random`` for a long search.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import TopicAuthorizationFailedError, UnknownTopicOrPartitionError

from orderflow.devstand.embedded import EmbeddedPostgres
from orderflow.runtime.migrate import upgrade
from orderflow.runtime.settings import Settings
from orderflow.runtime.topics import ensure_topics
from outbox.relay import PublishForbidden, RelayConfig
from tests.relay_harness import Harness, HarnessError, harness_for, kafka_for, run_schedules
from tests.services import Services

pytestmark = pytest.mark.integration

TEMPLATE = "orderflow_harness_template"


@pytest.fixture(scope="module")
def private_server() -> Iterator[str]:
    """A PostgreSQL server for this module alone, with a migrated template database."""
    with EmbeddedPostgres(durable=False) as postgres:
        asyncio.run(_admin(postgres.url, f'CREATE DATABASE "{TEMPLATE}"'))
        upgrade(postgres.url.rsplit("/", 1)[0] + f"/{TEMPLATE}")
        yield postgres.url


async def _admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
def settings(private_server: str, services: Services) -> Iterator[Settings]:
    """A fresh database on the private server, and a fresh topic on the test broker."""
    suffix = uuid.uuid4().hex[:10]
    database = f"harness_{suffix}"
    asyncio.run(_admin(private_server, f'CREATE DATABASE "{database}" TEMPLATE "{TEMPLATE}"'))
    settings = Settings(
        database_url=private_server.rsplit("/", 1)[0] + f"/{database}",
        kafka_bootstrap_servers=services.bootstrap_servers,
        outbound_topic=f"orders.updates.{suffix}",
        kafka_idempotence=False,
    )
    asyncio.run(ensure_topics(settings, [settings.outbound_topic], partitions=3))
    yield settings
    asyncio.run(_admin(private_server, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


@dataclass
class Bench:
    harness: Harness
    reader: AIOKafkaConsumer
    start: dict[int, int]

    async def finish(self) -> list[str]:
        """Stop the relays, read what reached the topic, and return every violation."""
        await self.harness.stop_relays()
        await self.harness.check_topic(self.reader, self.start)
        return self.harness.violations


@pytest.fixture
async def bench(settings: Settings) -> AsyncIterator[Bench]:
    topic = settings.outbound_topic
    async with (
        kafka_for(settings, topic) as (kafka, reader),
        harness_for(settings, kafka, topic, {}) as harness,
    ):
        yield Bench(harness, reader, {})


CONFIG = RelayConfig(batch_size=10, prune_interval=10.0**9)


async def idle_relay(harness: Harness, config: RelayConfig = CONFIG) -> None:
    """One relay, connected, owning every shard, waiting for work."""
    relay = harness.add_relay(config)
    await harness.run_until(relay, "idle")
    assert len(relay.owned_shards) == 64


async def test_the_floor_waits_for_a_writer_whose_transaction_id_is_newer_than_every_commit(
    bench: Bench,
) -> None:
    """X takes transaction id a; Y takes b > a and writes row i; X writes j > i and commits.
    A snapshot taken now lists only running transactions below one past the newest
    *completed* id (a + 1), so Y is not in it: a floor judged by that list passes i while Y
    is still open, and i is never read again (or goes out after newer messages of its
    key). The floor must wait for Y."""
    harness = bench.harness
    await idle_relay(harness)
    [relay] = harness.relays
    x, y = harness.begin(), harness.begin()
    await harness.take_xid(x)
    await harness.take_xid(y)
    [late] = await harness.insert(y, [b"late"])
    [other] = await harness.insert(x, [b"other"])
    assert other.id > late.id
    await harness.commit(x)

    # A floor round takes its candidate (the newest committed id: j); the relay publishes
    # and marks j (a mark is a transaction too, but after the candidate).
    harness.clock.now += 0.3
    await harness.release(relay)
    await harness.run_until(relay, "floor")
    await harness.release(relay)
    await harness.run_until(relay, "idle")
    assert relay.stats.published == 1
    # Rounds later, Y is still open: the floor has not passed its row.
    for _ in range(3):
        harness.clock.now += 0.3
        await harness.release(relay)
        await harness.run_until(relay, "idle")
    assert relay.scan_floor <= late.id

    await harness.commit(y)
    z = harness.begin()
    await harness.insert(z, [b"late"])
    await harness.commit(z)
    await harness.drain()
    assert await bench.finish() == []
    assert relay.stats.published == 3


async def test_a_partitions_share_goes_out_as_one_record_batch_so_no_later_part_lands_first(
    bench: Bench,
) -> None:
    """Four rows of one key fill two record batches. Sent together, the first can fail
    while the second is appended: the key's newer messages reach the topic before the
    older ones. The relay ends its batch where the partition's record batch is full."""
    harness = bench.harness
    await idle_relay(harness)
    [relay] = harness.relays
    writer = harness.begin()
    rows = await harness.insert(writer, [b"split"] * 4)
    await harness.commit(writer)
    await harness.release(relay)
    await harness.run_until(relay, "ack")
    first = harness.heads()[0]
    assert first.ids[0] == rows[0].id
    await harness.settle(first, "failed")
    while harness.held:  # whatever else the relay sent with it
        await harness.settle(harness.held[0], "delivered")
    await harness.drain()
    assert await bench.finish() == []


async def test_a_relay_whose_session_ended_sends_nothing_more(bench: Bench) -> None:
    """With batch N in flight and N+1 already read, the relay's session ends (its shards
    are free for another relay from that instant). N's ack arrives: N+1 must not be sent
    by this relay, whose session no longer holds the shards."""
    harness = bench.harness
    await idle_relay(harness, RelayConfig(batch_size=1, prune_interval=10.0**9))
    [relay] = harness.relays
    writer = harness.begin()
    first, _ = await harness.insert(writer, [b"fenced", b"fenced"])
    await harness.commit(writer)
    await harness.release(relay)
    await harness.run_until(relay, "ack")  # N sent, N+1 read ahead (N filled a batch)
    [held] = harness.held
    assert held.ids == [first.id]
    await harness.end_session(relay)
    await harness.settle(held, "delivered")
    await harness.release(relay)  # N acknowledged; N+1 would go next
    assert harness.held == [], "N+1 was handed to the producer"
    await harness.drain()
    assert await bench.finish() == []
    assert relay.stats.failures >= 1  # it lost its session, reconnected and went on


async def test_a_relay_whose_session_ended_after_a_mark_sends_nothing(bench: Bench) -> None:
    """N acknowledged and marked while N+1 was built; then the session ends, before N+1 is
    handed over. The mark's answer came before the end: only the probe can stop N+1."""
    harness = bench.harness
    await idle_relay(harness, RelayConfig(batch_size=1, prune_interval=10.0**9))
    [relay] = harness.relays
    writer = harness.begin()
    first, _ = await harness.insert(writer, [b"fenced", b"fenced"])
    await harness.commit(writer)
    await harness.release(relay)
    await harness.run_until(relay, "ack")  # N sent, N+1 read ahead
    [held] = harness.held
    assert held.ids == [first.id]
    await harness.settle(held, "delivered")
    await harness.run_until(relay, "probe")  # N marked, N+1 built
    await harness.end_session(relay)
    await harness.release(relay)
    assert harness.held == [], "N+1 was handed to the producer"
    await harness.drain()
    assert await bench.finish() == []


async def test_a_relay_whose_session_ended_after_its_read_sends_nothing(bench: Bench) -> None:
    """Nothing in flight, so no mark answers for the session: the relay reads a batch,
    and its session ends before the batch is handed over. The probe must stop it."""
    harness = bench.harness
    await idle_relay(harness, RelayConfig(prune_interval=10.0**9))
    [relay] = harness.relays
    writer = harness.begin()
    await harness.insert(writer, [b"fenced"])
    await harness.commit(writer)
    await harness.release(relay)
    await harness.run_until(relay, "probe")  # read, built, about to be handed over
    await harness.end_session(relay)
    await harness.release(relay)
    assert harness.held == [], "the batch was handed to the producer"
    await harness.drain()
    assert await bench.finish() == []
    assert relay.stats.failures >= 1


async def test_a_topic_the_producer_cannot_place_fails_the_batch_and_is_retried(
    bench: Bench,
) -> None:
    """The producer does not know the topic (not created yet, auto-creation off): the batch
    fails like one the broker refused, and goes out once the topic is there."""
    harness = bench.harness
    await idle_relay(harness)
    [relay] = harness.relays
    harness.unplaceable[harness.topic] = UnknownTopicOrPartitionError(harness.topic)
    writer = harness.begin()
    await harness.insert(writer, [b"early"])
    await harness.commit(writer)
    await harness.release(relay)
    await harness.run_until(relay, "backoff")
    assert relay.running
    assert relay.stats.failures == 1
    del harness.unplaceable[harness.topic]
    await harness.drain()
    assert await bench.finish() == []


async def test_a_topic_the_broker_refuses_to_describe_ends_the_run(bench: Bench) -> None:
    harness = bench.harness
    await idle_relay(harness)
    [relay] = harness.relays
    harness.unplaceable[harness.topic] = TopicAuthorizationFailedError(harness.topic)
    writer = harness.begin()
    await harness.insert(writer, [b"refused"])
    await harness.commit(writer)
    with pytest.raises(HarnessError) as failed:
        await harness.run_until(relay, "backoff")
    assert isinstance(failed.value.__cause__, PublishForbidden)


@pytest.mark.timeout(1800)
async def test_random_schedules_keep_every_guarantee(settings: Settings) -> None:
    count = int(os.environ.get("ORDERFLOW_SCHEDULES", "200"))
    first = int(os.environ.get("ORDERFLOW_SCHEDULE_SEED", "1"))
    steps = int(os.environ.get("ORDERFLOW_SCHEDULE_STEPS", "80"))
    failed = await run_schedules(
        settings, settings.outbound_topic, range(first, first + count), steps=steps
    )
    assert not failed, (
        "\n\n".join(
            f"seed {outcome.seed} ({outcome.steps} steps):\n  " + "\n  ".join(outcome.violations)
            for outcome in failed[:3]
        )
        + f"\n\n{len(failed)} of {count} schedules failed"
    )
