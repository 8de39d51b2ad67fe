"""The relay on a real PostgreSQL and a real broker: the outbound contract, dead letters,
publish-then-mark, NOTIFY wake-up, shard ownership and takeover, pruning, per-order order."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias, cast

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import (
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    TopicAuthorizationFailedError,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderflow.runtime import services
from orderflow.runtime.services import run_relay
from orderflow.runtime.wiring import ServiceError, create_engine, create_producer, kafka_common
from orderflow.tools.samples import SampleStream
from outbox import OutboxMessage, add_messages, shard_of
from outbox import relay as relay_module
from outbox.enqueue import SHARD_COUNT
from outbox.relay import ADVISORY_LOCK_NAMESPACE, ProducerBroken, Relay, RelayConfig
from tests.events import cancelled, delivered, key, paid, placed, shipped
from tests.helpers import (
    TestEnv,
    decode_json,
    eventually,
    expected_outcome,
    header_map,
    mark_published,
    outbox_rows,
    pending_ids,
    produce,
    read_topic,
    running_consumer,
    running_relay,
)

pytestmark = pytest.mark.integration

Record: TypeAlias = ConsumerRecord[bytes, bytes]
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
ALL_SHARDS = frozenset(range(SHARD_COUNT))
TOP_LEVEL_KEYS = {
    "event_id",
    "event_type",
    "schema_version",
    "occurred_at",
    "causation_id",
    "order_id",
    "order_version",
    "change",
    "order",
}
ORDER_KEYS = {"id", "status", "currency", "total", "customer", "lines", "created_at", "updated_at"}


# -- helpers ------------------------------------------------------------------------------


@dataclass
class DirectRelay:
    """A ``Relay`` run in a task with its own engine (one connection) and producer."""

    relay: Relay
    engine: AsyncEngine
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def halt(self) -> None:
        """Set the stop event and wait for ``run`` to return (the engine stays alive)."""
        self.stop.set()
        await asyncio.wait_for(self.task, timeout=15)

    async def shut_down(self) -> None:
        """Stop as ``orderflow relay`` does: ``run`` returns, then the engine is disposed."""
        await self.halt()
        await self.engine.dispose()


@contextlib.asynccontextmanager
async def direct_relay(
    env: TestEnv, config: RelayConfig, producer: Any = None
) -> AsyncIterator[DirectRelay]:
    engine = create_engine(env.settings, pool_size=1)
    kafka = create_producer(env.settings)
    await kafka.start()
    try:
        relay = Relay(engine, producer(kafka) if producer else kafka, config)
        stop = asyncio.Event()
        running = DirectRelay(relay, engine, stop, asyncio.create_task(relay.run(stop)))
        try:
            yield running
        finally:
            await running.halt()
    finally:
        await kafka.stop()
        await engine.dispose()


async def insert_messages(env: TestEnv, messages: Iterable[OutboxMessage]) -> list[int]:
    """Add ``messages`` in one committed transaction; their row ids, in insertion order."""
    async with env.sessions() as session, session.begin():
        before = await session.execute(text("SELECT coalesce(max(id), 0) FROM outbox_messages"))
        floor = before.scalar_one()
        await add_messages(session, list(messages))
        ids = await session.execute(
            text("SELECT id FROM outbox_messages WHERE id > :floor ORDER BY id"), {"floor": floor}
        )
        return list(ids.scalars())


def message(topic: str, name: str) -> OutboxMessage:
    return OutboxMessage(
        topic=topic,
        key=name.encode(),
        payload=f'{{"name": "{name}"}}'.encode(),
        headers=(("event_id", str(uuid.uuid4())), ("content-type", "application/json")),
    )


async def wait_all_published(env: TestEnv, *, within: float = 30.0) -> None:
    async def check() -> None:
        assert await outbox_rows(env.sessions), "no outbox rows"
        assert await pending_ids(env.sessions) == []

    await eventually(check, within=within)


def in_topic_order(records: list[Record]) -> list[Record]:
    return sorted(records, key=lambda record: (record.partition, record.offset))


def timestamp(value: object) -> datetime:
    assert isinstance(value, str), value
    assert RFC3339_UTC.match(value), value
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0)
    return moment


async def advisory_shard_locks(env: TestEnv) -> list[tuple[int, int]]:
    """(pid, shard) of every granted shard lock in this test's database."""
    async with env.engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT pid, objid::int FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objsubid = 2 AND classid = CAST(:namespace AS oid) AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"namespace": ADVISORY_LOCK_NAMESPACE},
        )
        return [(int(pid), int(shard)) for pid, shard in rows]


# -- 1. the outbound contract -------------------------------------------------------------


async def test_relay_output_matches_the_contract_field_by_field(env: TestEnv) -> None:
    lifecycle, short = uuid.uuid4(), uuid.uuid4()
    steps = [
        (lifecycle, placed(lifecycle), "OrderPlaced", "pending"),
        (short, placed(short), "OrderPlaced", "pending"),
        (lifecycle, paid(lifecycle), "OrderPaid", "paid"),
        (short, cancelled(short), "OrderCancelled", "cancelled"),
        (lifecycle, shipped(lifecycle), "OrderShipped", "shipped"),
        (lifecycle, delivered(lifecycle), "OrderDelivered", "delivered"),
    ]
    inbound_ids = {decode_json(value)["event_id"] for _, (_, value), _, _ in steps}
    await produce(env.settings, [m for _, m, _, _ in steps])

    async with running_consumer(env.settings), running_relay(env.settings):
        records = await read_topic(env.settings, env.settings.outbound_topic, len(steps))
    assert len(records) == len(steps)  # one update per applied event, no extra

    expected_by_order: dict[uuid.UUID, list[tuple[str, str, str]]] = {}
    for order_id, (_, value), change, status in steps:
        cause = decode_json(value)["event_id"]
        expected_by_order.setdefault(order_id, []).append((cause, change, status))

    seen_by_order: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for record in in_topic_order(records):
        document = decode_json(record.value)
        order_id = uuid.UUID(document["order_id"])
        assert record.key == key(order_id)
        assert record.headers is not None
        assert sorted(name for name, _ in record.headers) == [
            "content-type",
            "event_id",
            "event_type",
        ]
        assert header_map(record.headers) == {
            "event_id": document["event_id"],
            "event_type": "OrderUpdated",
            "content-type": "application/json",
        }
        assert set(document) == TOP_LEVEL_KEYS
        assert set(document["order"]) == ORDER_KEYS
        assert document["event_type"] == "OrderUpdated"
        assert document["schema_version"] == 1
        assert uuid.UUID(document["event_id"]) != uuid.UUID(document["causation_id"])
        assert document["causation_id"] in inbound_ids
        seen_by_order.setdefault(order_id, []).append(document)

    assert set(seen_by_order) == {lifecycle, short}
    for order_id, documents in seen_by_order.items():
        expected = expected_by_order[order_id]
        assert [d["order_version"] for d in documents] == list(range(1, len(expected) + 1))
        assert [(d["causation_id"], d["change"], d["order"]["status"]) for d in documents] == (
            expected
        )
        created = {timestamp(d["order"]["created_at"]) for d in documents}
        assert len(created) == 1
        updated = [timestamp(d["order"]["updated_at"]) for d in documents]
        assert updated == sorted(updated)
        assert min(updated) >= created.pop()
        for document in documents:
            timestamp(document["occurred_at"])
            assert document["order"] | {"status": None, "created_at": None, "updated_at": None} == {
                "id": str(order_id),
                "status": None,
                "currency": "EUR",
                "total": "25.00",
                "customer": {"email": "ada@example.com", "name": "Ada"},
                "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
                "created_at": None,
                "updated_at": None,
            }
    event_ids = [decode_json(r.value)["event_id"] for r in records]
    assert len(set(event_ids)) == len(event_ids)
    assert await read_topic(env.settings, env.settings.dlq_topic, 0) == []


# -- 2. dead letters ------------------------------------------------------------------------


async def test_dead_letters_reach_the_dlq_topic_with_original_bytes_and_source(
    env: TestEnv,
) -> None:
    order_id = uuid.uuid4()
    placed_value = placed(order_id)[1]
    assert placed_value is not None
    unknown_type = (key(order_id), placed_value.replace(b"OrderPlaced", b"OrderLost"))
    poison = {
        b'{"event_id": "x", ': ("malformed_json", key(order_id)),
        b"\xff\xfe not utf-8": ("malformed_json", b"\x00\x01binary-key"),
        unknown_type[1]: ("unknown_event_type", unknown_type[0]),
        shipped(order_id)[1]: ("invalid_transition", key(order_id)),
    }
    stream = [
        placed(order_id),
        *((k, value) for value, (_, k) in poison.items()),
        paid(order_id),
    ]
    producer = create_producer(env.settings)
    await producer.start()
    try:
        deliveries = [
            await producer.send(env.settings.inbound_topic, key=k, value=value)
            for k, value in stream
        ]
        positions = {
            value: (metadata.partition, metadata.offset)
            for (_, value), metadata in zip(stream, await asyncio.gather(*deliveries), strict=True)
        }
    finally:
        await producer.stop()

    async with running_consumer(env.settings), running_relay(env.settings):
        dead = await read_topic(env.settings, env.settings.dlq_topic, len(poison))
        updates = await read_topic(env.settings, env.settings.outbound_topic, 2)
    assert len(dead) == len(poison)
    assert Counter(record.value for record in dead) == Counter(list(poison))
    for record in dead:
        assert record.value is not None
        reason, original_key = poison[record.value]
        assert record.key == original_key
        assert record.headers is not None
        headers = header_map(record.headers)
        assert {
            "error.reason",
            "error.message",
            "source.topic",
            "source.partition",
            "source.offset",
        } <= set(headers)
        assert headers["error.reason"] == reason
        assert headers["error.message"].strip()
        assert headers["source.topic"] == env.settings.inbound_topic
        partition, offset = positions[record.value]
        assert (int(headers["source.partition"]), int(headers["source.offset"])) == (
            partition,
            offset,
        )
    # Consumption went on past the poison: placed and paid were applied and relayed.
    assert [decode_json(r.value)["change"] for r in in_topic_order(updates)] == [
        "OrderPlaced",
        "OrderPaid",
    ]


# -- 3. publish, then mark; exactly once with one relay ----------------------------------


async def test_every_row_is_published_once_and_marked_after_publishing(env: TestEnv) -> None:
    stream = SampleStream(seed=3, fault_every=10)
    messages = [(m.key, m.value) for m in (next(stream) for _ in range(300))]
    expected = expected_outcome(messages)
    update_count = len(expected.applied)
    dead_count = sum(expected.dead_letters.values())
    await produce(env.settings, messages)

    async with running_consumer(env.settings):

        async def all_applied() -> None:
            assert len(await outbox_rows(env.sessions)) == update_count + dead_count

        await eventually(all_applied)
    rows = await outbox_rows(env.sessions)
    assert await pending_ids(env.sessions) == [row.id for row in rows]

    async with running_relay(env.settings) as relay:
        await wait_all_published(env)
        updates = await read_topic(env.settings, env.settings.outbound_topic, update_count)
        dead = await read_topic(env.settings, env.settings.dlq_topic, dead_count)
        assert relay.stats.published == len(rows)

    assert len(updates) == update_count
    assert len(dead) == dead_count
    for topic, records in ((env.settings.outbound_topic, updates), (env.settings.dlq_topic, dead)):
        topic_rows = [row for row in rows if row.topic == topic]
        assert Counter((r.key, r.value) for r in records) == Counter(
            (row.key, row.payload) for row in topic_rows
        )
    update_ids = [decode_json(r.value)["event_id"] for r in updates]
    assert len(set(update_ids)) == len(update_ids)
    published = await outbox_rows(env.sessions)
    assert [row.id for row in published] == [row.id for row in rows]
    assert await pending_ids(env.sessions) == []


class FailingAcks:
    """A producer whose sends fail (as a broker timeout would) until ``healthy`` is set."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self.healthy = False
        self.failed_sends = 0

    def create_batch(self) -> Any:
        return self._producer.create_batch()

    async def partitions_for(self, topic: str) -> set[int]:
        partitions: set[int] = await self._producer.partitions_for(topic)
        return partitions

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        if self.healthy:
            delivery: asyncio.Future[Any] = await self._producer.send_batch(
                batch, topic, partition=partition
            )
            return delivery
        self.failed_sends += 1
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(KafkaTimeoutError("no ack (test)"))
        return failed


async def test_record_batches_go_out_whole_without_waiting_for_the_linger(env: TestEnv) -> None:
    """The relay builds each record batch whole, so the producer must not hold it back for
    more records: with a ten-minute linger, a batch still goes out at once."""
    topic = env.settings.outbound_topic
    lingering = AIOKafkaProducer(
        acks="all",
        enable_idempotence=env.settings.kafka_idempotence,
        linger_ms=600_000,
        **kafka_common(env.settings),
    )
    await lingering.start()
    try:
        ids = await insert_messages(env, [message(topic, f"whole{i}") for i in range(3)])
        async with direct_relay(env, RelayConfig(), producer=lambda _: lingering) as running:
            await wait_all_published(env)

            async def counted() -> None:  # a moment after the mark is visible
                assert running.relay.stats.published == len(ids)

            await eventually(counted)
        records = await read_topic(env.settings, topic, len(ids))
    finally:
        await lingering.stop()
    assert sorted(r.key for r in records) == sorted(f"whole{i}".encode() for i in range(3))


async def test_a_batch_the_broker_does_not_ack_stays_unpublished_and_is_retried(
    env: TestEnv,
) -> None:
    topic = env.settings.outbound_topic
    ids = await insert_messages(env, [message(topic, f"k{i}") for i in range(5)])
    wrappers: list[FailingAcks] = []

    def wrap(producer: AIOKafkaProducer) -> FailingAcks:
        wrappers.append(FailingAcks(producer))
        return wrappers[-1]

    async with direct_relay(env, RelayConfig(claim_interval=0.2), producer=wrap) as running:

        async def retried() -> None:
            # A second failed attempt means the rows were fetched again: not marked.
            assert running.relay.stats.failures >= 2

        await eventually(retried)
        assert [row.id for row in await outbox_rows(env.sessions)] == ids
        assert await pending_ids(env.sessions) == ids
        assert running.relay.stats.published == 0

        wrappers[0].healthy = True
        await wait_all_published(env)
        records = await read_topic(env.settings, topic, len(ids))
    assert sorted(r.key for r in records) == sorted(f"k{i}".encode() for i in range(5))


def fail_for_good(producer: AIOKafkaProducer) -> None:
    """What aiokafka does when its sender dies of a fatal error (out of sequence, fenced):
    every batch, and every later send, fails with it."""
    producer._message_accumulator.fail_all(OutOfOrderSequenceNumber())


async def test_a_producer_that_can_never_send_again_ends_the_run_and_frees_the_shards(
    env: TestEnv,
) -> None:
    """A relay that only retried would hold its shards for ever and publish nothing."""
    ids = await insert_messages(env, [message(env.settings.outbound_topic, "stuck")])
    engine = create_engine(env.settings, pool_size=1)
    kafka = create_producer(env.settings)
    await kafka.start()
    try:
        fail_for_good(kafka)
        relay = Relay(engine, kafka, RelayConfig(claim_interval=0.2))
        with pytest.raises(ProducerBroken, match="OutOfOrderSequenceNumber"):
            await asyncio.wait_for(relay.run(asyncio.Event()), timeout=15)
        assert relay.owned_shards == frozenset()
        assert await advisory_shard_locks(env) == []
        assert [row.id for row in await outbox_rows(env.sessions)] == ids
        assert await pending_ids(env.sessions) == ids
    finally:
        await kafka.stop()
        await engine.dispose()


async def test_a_producer_whose_sender_died_of_any_error_ends_the_run(env: TestEnv) -> None:
    """aiokafka's sender dies of an error it does not name ("Unexpected error during batch
    delivery") and fails every later send with it: the relay must not take it for a
    passing failure."""
    await insert_messages(env, [message(env.settings.outbound_topic, "stuck")])
    engine = create_engine(env.settings, pool_size=1)
    kafka = create_producer(env.settings)
    await kafka.start()

    async def crash(*_: object) -> None:
        raise RuntimeError("a bug in the sender (test)")

    kafka._sender._send_produce_req = crash  # type: ignore[method-assign]
    try:
        relay = Relay(engine, kafka, RelayConfig(claim_interval=0.2))
        with pytest.raises(ProducerBroken, match="Unexpected error during batch delivery"):
            await asyncio.wait_for(relay.run(asyncio.Event()), timeout=15)
        assert await advisory_shard_locks(env) == []
    finally:
        await kafka.stop()
        await engine.dispose()


async def test_a_session_setting_the_server_refuses_is_gone_without(
    env: TestEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some servers refuse a setting they know (client_connection_check_interval where the
    platform can't tell a closed socket): the relay runs without it, not not at all."""
    monkeypatch.setattr(
        relay_module,
        "SESSION_SETTINGS",
        (("client_connection_check_interval", "not a duration"), *relay_module.SESSION_SETTINGS),
    )
    await insert_messages(env, [message(env.settings.outbound_topic, "configured")])
    async with direct_relay(env, RelayConfig(claim_interval=0.2)):
        await wait_all_published(env)


async def test_the_relays_marks_do_not_wait_for_the_disk(env: TestEnv) -> None:
    """A mark the server loses in a crash only publishes its rows again (repeats, after the
    copies already sent); waiting for each mark's WAL flush would cost every batch a disk
    round trip on the relay's one connection."""
    engine = create_engine(env.settings, pool_size=1)
    try:
        async with engine.connect() as connection:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await Relay(engine, cast(Any, None))._configure(connection)
            setting = await connection.execute(text("SHOW synchronous_commit"))
            assert setting.scalar_one() == "off"
    finally:
        await engine.dispose()


async def test_orderflow_relay_replaces_a_producer_that_failed_for_good(env: TestEnv) -> None:
    topic = env.settings.outbound_topic
    async with running_relay(env.settings) as relay:

        async def owns_all() -> None:
            assert relay.owned_shards == ALL_SHARDS

        await eventually(owns_all)
        broken = relay.producer
        assert isinstance(broken, AIOKafkaProducer)
        fail_for_good(broken)
        await insert_messages(env, [message(topic, f"after-{i}") for i in range(5)])
        await wait_all_published(env)
        assert relay.producer is not broken
    records = await read_topic(env.settings, topic, 5)
    assert sorted(record.key for record in records) == [f"after-{i}".encode() for i in range(5)]


class NeverStarts(FailingAcks):
    """A producer whose start never returns (waiting for a producer id, say)."""

    async def start(self) -> None:
        await asyncio.Event().wait()

    async def stop(self) -> None:
        await self._producer.stop()


async def test_a_stop_while_a_new_producer_starts_ends_the_relay_at_once(
    env: TestEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[Any] = []

    def create(settings: Any) -> Any:
        producer = create_producer(settings)
        created.append(producer if not created else NeverStarts(producer))
        return created[-1]

    monkeypatch.setattr(services, "create_producer", create)
    stop = asyncio.Event()
    started: asyncio.Future[Relay] = asyncio.get_running_loop().create_future()
    running = asyncio.create_task(run_relay(env.settings, stop, ready=started.set_result))
    relay = await asyncio.wait_for(started, timeout=30)

    async def owns_all() -> None:
        assert relay.owned_shards == ALL_SHARDS

    await eventually(owns_all)
    fail_for_good(relay.producer)  # type: ignore[arg-type]
    await insert_messages(env, [message(env.settings.outbound_topic, "waits")])

    async def replacing() -> None:
        assert len(created) == 2

    await eventually(replacing, within=30)
    stop.set()
    await asyncio.wait_for(running, timeout=10)  # returns, and without an error


class Forbidden(FailingAcks):
    """A producer the broker refuses to serve: every send fails with an authorization
    error. Starts and stops as the producer it wraps."""

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[Any]:
        refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused.set_exception(TopicAuthorizationFailedError(topic))
        return refused


async def test_orderflow_relay_stops_with_one_line_when_the_broker_refuses_its_messages(
    env: TestEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        services, "create_producer", lambda settings: Forbidden(create_producer(settings))
    )
    await insert_messages(env, [message(env.settings.outbound_topic, "refused")])
    with pytest.raises(ServiceError) as raised:
        await asyncio.wait_for(run_relay(env.settings, asyncio.Event()), timeout=15)
    assert str(raised.value).startswith("the Kafka broker refuses the relay's messages")
    assert f"allow this client to write to {env.settings.outbound_topic}" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert await advisory_shard_locks(env) == []


async def test_keys_land_on_the_partitions_the_producer_itself_would_choose(
    env: TestEnv,
) -> None:
    """The relay builds its own record batches; it must partition as ``send`` does
    (murmur2 of the key), or a subscriber mixing sources would see a key on two partitions."""
    names = [f"order-{i}" for i in range(40)]
    await insert_messages(env, [message(env.settings.outbound_topic, name) for name in names])
    async with direct_relay(env, RelayConfig(claim_interval=0.2)):
        await wait_all_published(env)
    relayed = await read_topic(env.settings, env.settings.outbound_topic, len(names))

    # The same keys through the producer's own partitioner, to a topic of as many partitions.
    producer = create_producer(env.settings)
    await producer.start()
    try:
        sent = [
            await (await producer.send(env.settings.dlq_topic, key=name.encode(), value=b"{}"))
            for name in names
        ]
    finally:
        await producer.stop()
    assert len({record.partition for record in relayed}) > 1, "one partition proves nothing"
    assert {record.key: record.partition for record in relayed} == {
        name.encode(): metadata.partition for name, metadata in zip(names, sent, strict=True)
    }


# -- 4. NOTIFY wake-up -----------------------------------------------------------------------


async def test_a_commit_wakes_the_relay_long_before_its_poll_interval(env: TestEnv) -> None:
    topic = env.settings.outbound_topic
    # Neither the poll nor the claim round may wake it within the test: only NOTIFY can.
    config = RelayConfig(poll_interval=30, claim_interval=30, prune_interval=600)
    async with direct_relay(env, config) as running:

        async def owns_all() -> None:
            assert running.relay.owned_shards == ALL_SHARDS

        await eventually(owns_all, within=10)
        await insert_messages(env, [message(topic, "first")])

        async def published(count: int) -> None:
            assert running.relay.stats.published == count

        await eventually(lambda: published(1), within=10)
        # The relay is now waiting (its poll is 30 s away): a commit must wake it.
        started = time.monotonic()
        await insert_messages(env, [message(topic, "second")])
        await eventually(lambda: published(2), within=10)
        assert time.monotonic() - started < 10
        records = await read_topic(env.settings, topic, 2)
    assert sorted(r.key for r in records) == [b"first", b"second"]


# -- 5. standby and takeover -----------------------------------------------------------------


TAKEOVER_CONFIG = RelayConfig(claim_interval=0.2, poll_interval=0.5)


@contextlib.asynccontextmanager
async def two_relays(env: TestEnv) -> AsyncIterator[tuple[DirectRelay, DirectRelay]]:
    """Two relays: the first owns every shard before the second starts."""
    async with direct_relay(env, TAKEOVER_CONFIG) as first:

        async def first_owns_all() -> None:
            assert first.relay.owned_shards == ALL_SHARDS

        await eventually(first_owns_all, within=10)
        async with direct_relay(env, TAKEOVER_CONFIG) as second:
            yield first, second


async def assert_shards_split_fairly(
    env: TestEnv, first: DirectRelay, second: DirectRelay
) -> list[int]:
    """The second relay gets half the shards from the first; together they publish all."""

    async def split() -> None:
        assert (
            len(first.relay.owned_shards) == len(second.relay.owned_shards) == len(ALL_SHARDS) // 2
        )
        assert first.relay.owned_shards | second.relay.owned_shards == ALL_SHARDS

    await eventually(split, within=10)
    locks = await advisory_shard_locks(env)
    assert sorted(shard for _, shard in locks) == sorted(ALL_SHARDS)  # each shard held once
    assert len({pid for pid, _ in locks}) == 2
    ids = await insert_messages(
        env, [message(env.settings.outbound_topic, f"a{i}") for i in range(40)]
    )
    await wait_all_published(env)

    async def counted() -> None:  # each relay counts a moment after its mark is visible
        assert first.relay.stats.published + second.relay.stats.published == len(ids)
        assert first.relay.stats.published > 0
        assert second.relay.stats.published > 0

    await eventually(counted)
    return ids


async def test_two_relays_share_the_shards_and_one_takes_over_when_the_other_stops(
    env: TestEnv,
) -> None:
    topic = env.settings.outbound_topic
    async with two_relays(env) as (first, second):
        before = await assert_shards_split_fairly(env, first, second)
        await first.shut_down()

        async def second_owns_all() -> None:
            assert second.relay.owned_shards == ALL_SHARDS

        await eventually(second_owns_all, within=5)
        published_before = second.relay.stats.published
        after = await insert_messages(env, [message(topic, f"b{i}") for i in range(10)])
        await wait_all_published(env, within=10)

        async def counted() -> None:  # a moment after the mark is visible
            assert second.relay.stats.published - published_before == len(after)

        await eventually(counted)
        records = await read_topic(env.settings, topic, len(before) + len(after))
    assert sorted(r.key for r in records) == sorted(
        [f"a{i}".encode() for i in range(40)] + [f"b{i}".encode() for i in range(10)]
    )


async def test_a_relay_whose_run_returned_no_longer_holds_its_shards(env: TestEnv) -> None:
    async with two_relays(env) as (first, second):
        await assert_shards_split_fairly(env, first, second)
        await first.halt()  # run() returned; its engine (and pool) still alive
        assert first.task.done()

        async def second_owns_all() -> None:
            assert second.relay.owned_shards == ALL_SHARDS

        await eventually(second_owns_all, within=3)


# -- 6. pruning ------------------------------------------------------------------------------


async def test_published_rows_past_the_retention_are_pruned_and_nothing_else(
    env: TestEnv,
) -> None:
    topic = env.settings.outbound_topic
    held_key = b"held-back"
    old = await insert_messages(env, [message(topic, f"old{i}") for i in range(11)])
    recent = await insert_messages(env, [message(topic, f"recent{i}") for i in range(3)])
    held = await insert_messages(env, [OutboxMessage(topic, held_key, b"{}", ()) for _ in range(3)])
    # Retention counts from when a message was written: published and written two days
    # ago (past the retention), or ten minutes ago (not yet).
    await mark_published(env.sessions, old, written_ago=timedelta(days=2))
    await mark_published(env.sessions, recent, written_ago=timedelta(minutes=10))
    async with env.engine.begin() as connection:
        # Unpublished but old: must never be pruned, whatever its age.
        await connection.execute(
            text(
                "UPDATE outbox_messages SET created_at = now() - interval '30 days' "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": held},
        )

    # Keep the held rows unpublished: the test owns their shard, so no relay may take it.
    url = env.settings.require_database().set(drivername="postgresql")
    holder = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        assert await holder.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", ADVISORY_LOCK_NAMESPACE, shard_of(held_key)
        )
        config = RelayConfig(
            retention=timedelta(hours=1), prune_interval=0.2, prune_batch=3, claim_interval=0.2
        )
        async with direct_relay(env, config) as running:

            async def pruned() -> None:
                assert [row.id for row in await outbox_rows(env.sessions)] == recent + held

            await eventually(pruned, within=15)

            async def counted() -> None:  # a moment after the delete is visible
                assert running.relay.stats.pruned == len(old)

            await eventually(counted)
            assert running.relay.owned_shards == ALL_SHARDS - {shard_of(held_key)}
            # The held rows are still unpublished, the recent ones still published.
            assert await pending_ids(env.sessions) == held
    finally:
        await holder.close()


async def test_throughput_counts_older_than_an_hour_are_pruned(env: TestEnv) -> None:
    """The per-second counts behind ``outbox stats`` would grow by a row per relay and
    second for ever."""
    async with env.engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO outbox_throughput (second, relay, topic, published) VALUES "
                "(date_trunc('second', now() - interval '61 minutes'), 1, 't', 5), "
                "(date_trunc('second', now() - interval '59 minutes'), 1, 't', 7)"
            )
        )
    async with direct_relay(env, RelayConfig(prune_interval=0.2)):

        async def pruned() -> None:
            async with env.engine.connect() as connection:
                kept = await connection.execute(text("SELECT published FROM outbox_throughput"))
                assert list(kept.scalars()) == [7]

        await eventually(pruned)


async def test_publishing_goes_on_while_a_long_history_is_pruned(env: TestEnv) -> None:
    """History past its retention goes a batch a round, with publishing in between: a
    message committed while the pruning has far to go is published before it ends (a
    relay that pruned until done would publish nothing meanwhile)."""
    topic = env.settings.outbound_topic
    old = await insert_messages(env, [message(topic, f"old{i}") for i in range(3000)])
    await mark_published(env.sessions, old, written_ago=timedelta(days=8))
    config = RelayConfig(retention=timedelta(days=7), prune_batch=50, claim_interval=0.2)
    async with direct_relay(env, config) as running:

        async def pruning() -> None:
            assert running.relay.stats.pruned > 0

        await eventually(pruning)
        [fresh] = await insert_messages(env, [message(topic, "fresh")])

        async def published() -> int:
            rows = {row.id for row in await outbox_rows(env.sessions)}
            assert fresh in rows
            assert fresh not in await pending_ids(env.sessions)
            return sum(1 for i in old if i in rows)

        left = await eventually(published)
        assert left > 0, "the message waited until the whole history was pruned"

        async def all_pruned() -> None:
            assert running.relay.stats.pruned == len(old)

        await eventually(all_pruned, within=60)


# -- 7. per-order order on the topic ---------------------------------------------------------


async def test_each_orders_updates_reach_the_topic_in_version_order(env: TestEnv) -> None:
    stream = SampleStream(seed=21, fault_every=15)
    messages = [(m.key, m.value) for m in (next(stream) for _ in range(1500))]
    expected = expected_outcome(messages)
    update_count = sum(len(versions) for versions in expected.updates.values())
    await produce(env.settings, messages)

    async with running_consumer(env.settings), running_relay(env.settings):
        records = await read_topic(env.settings, env.settings.outbound_topic, update_count)

    partitions_used = {record.partition for record in records}
    assert len(partitions_used) > 1, "the test needs several partitions to mean anything"
    raw: dict[uuid.UUID, list[int]] = {}
    deduplicated: dict[uuid.UUID, list[int]] = {}
    seen: set[str] = set()
    partition_of: dict[uuid.UUID, int] = {}
    for record in in_topic_order(records):
        document = decode_json(record.value)
        order_id = uuid.UUID(document["order_id"])
        assert record.key == key(order_id)
        assert partition_of.setdefault(order_id, record.partition) == record.partition
        raw.setdefault(order_id, []).append(document["order_version"])
        if document["event_id"] not in seen:
            seen.add(document["event_id"])
            deduplicated.setdefault(order_id, []).append(document["order_version"])
    for order_id, versions in raw.items():
        assert all(a < b for a, b in itertools.pairwise(versions)), (
            order_id,
            versions,
        )
    assert deduplicated == expected.updates
    assert all(v == list(range(1, len(v) + 1)) for v in deduplicated.values())


async def test_the_scan_floor_stops_below_a_row_whose_transaction_is_still_open(
    env: TestEnv,
) -> None:
    """Rows commit out of id order. The relay's scan floor moves past published rows, but
    not past a row whose transaction is still open: once it commits, it is published, and
    before the next message of its key."""
    topic = env.settings.outbound_topic
    config = RelayConfig(floor_interval=0.05, poll_interval=0.1)

    def keyed(name: str) -> OutboxMessage:
        return OutboxMessage(topic=topic, key=b"late", payload=name.encode())

    async with direct_relay(env, config) as running:
        early = await insert_messages(env, [message(topic, f"early-{i}") for i in range(20)])
        await wait_all_published(env)

        async def floor_passed_the_early_rows() -> None:
            assert running.relay.scan_floor > max(early)

        await eventually(floor_passed_the_early_rows)

        async with env.sessions() as late, late.begin():
            await add_messages(late, [keyed("first")])
            late_id = (await late.execute(text("SELECT max(id) FROM outbox_messages"))).scalar_one()
            others: list[int] = []
            for batch in range(5):
                others += await insert_messages(
                    env, [message(topic, f"other-{batch}-{i}") for i in range(20)]
                )
            assert min(others) > late_id
            await wait_all_published(env)  # every committed row: the open one is unseen
            await asyncio.sleep(20 * config.floor_interval)  # many chances to move on
            assert max(early) < running.relay.scan_floor <= late_id
        await insert_messages(env, [keyed("second")])
        await wait_all_published(env)

        async def floor_passed_everything() -> None:
            rows = await outbox_rows(env.sessions)
            assert running.relay.scan_floor > max(row.id for row in rows)

        await eventually(floor_passed_everything)

    records = await read_topic(env.settings, topic, len(early) + len(others) + 2)
    late_values = [record.value for record in in_topic_order(records) if record.key == b"late"]
    assert late_values == [b"first", b"second"]


async def test_add_messages_as_a_transactions_first_statement_joins_that_transaction(
    env: TestEnv,
) -> None:
    topic = env.settings.outbound_topic

    class Abandon(Exception):
        pass

    async def add_then_abandon() -> None:
        async with env.sessions() as session, session.begin():
            await add_messages(session, [message(topic, "rolled-back")])
            raise Abandon

    with pytest.raises(Abandon):
        await add_then_abandon()
    assert await outbox_rows(env.sessions) == []

    async with env.sessions() as session, session.begin():
        await add_messages(session, [message(topic, "committed")])
    assert [row.key for row in await outbox_rows(env.sessions)] == [b"committed"]
