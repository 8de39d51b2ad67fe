"""Shared test helpers: produce, read topics, wait with deadlines, run components, serve the
read API, an oracle."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import for_code
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.memory_records import MemoryRecords
from fastapi import FastAPI
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from consumer.errors import InvalidTransition, RejectedEvent, UnknownOrder
from consumer.events import InboundEvent, decode_event
from consumer.intake import OrderConsumer
from consumer.models import Customer, Order, OrderLine, ProcessedEvent
from consumer.state_machine import OrderState, can_apply_later, transition
from orderflow.api import Database
from orderflow.runtime.services import run_consumer, run_relay
from orderflow.runtime.settings import Settings
from outbox.models import OutboxPending, OutboxRecord
from outbox.relay import Relay

T = TypeVar("T")


@dataclass
class TestEnv:
    """One test's private database, topics and consumer group."""

    __test__ = False  # not a test class

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    def with_settings(self, **overrides: Any) -> Settings:
        return self.settings.with_overrides(**overrides)


async def eventually(
    check: Callable[[], Awaitable[T]], *, within: float = 30.0, interval: float = 0.05
) -> T:
    """Call ``check`` until it returns without AssertionError, or fail with its last error."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


async def lock_waits(env: TestEnv, locktype: str, count: int) -> None:
    """Until exactly ``count`` lock requests of ``locktype`` (``advisory``,
    ``transactionid`` for a row another transaction holds, ...) wait, in sessions of the
    test's database: another test's sessions on the same server don't count."""

    async def check() -> None:
        async with env.sessions() as session:
            waiting = await session.scalar(
                text(
                    "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) "
                    "WHERE datname = current_database() AND NOT granted "
                    "AND locktype = :locktype"
                ),
                {"locktype": locktype},
            )
        assert waiting == count, f"{waiting} {locktype} lock requests wait, not {count}"

    await eventually(check)


async def produce(
    settings: Settings,
    messages: Iterable[tuple[bytes | None, bytes | None]],
    topic: str | None = None,
) -> int:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.require_kafka(),
        enable_idempotence=settings.kafka_idempotence,
        acks="all",
        linger_ms=5,
    )
    await producer.start()
    count = 0
    try:
        deliveries = []
        for key, value in messages:
            deliveries.append(
                await producer.send(topic or settings.inbound_topic, value=value, key=key)
            )
            count += 1
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()
    return count


async def read_topic(
    settings: Settings, topic: str, count: int, *, within: float = 60.0, settle: float = 0.5
) -> list[ConsumerRecord[bytes, bytes]]:
    """All records of ``topic`` from offset 0, once at least ``count`` arrived.

    After ``count`` records it keeps reading for ``settle`` seconds, so that extra records
    (duplicates) show up in the result instead of going unnoticed. It reads each partition
    from offset 0 rather than from the offset the broker lists as its earliest: Tansu can
    list a later record batch's (see docs/broker-notes.md).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.require_kafka(),
        auto_offset_reset="none",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        await consumer.topics()  # metadata, to know the partitions
        partitions = [
            TopicPartition(topic, partition)
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        assert partitions, f"topic {topic} has no partitions"
        consumer.assign(partitions)
        for partition in partitions:
            consumer.seek(partition, 0)
        deadline = time.monotonic() + within
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if settle_until is not None and now >= settle_until:
                break
            if now > deadline:
                raise AssertionError(f"read {len(records)} records from {topic}, expected {count}")
            batch = await consumer.getmany(timeout_ms=200)
            for partition_records in batch.values():
                records.extend(partition_records)
            if settle_until is None and len(records) >= count:
                settle_until = time.monotonic() + settle
    finally:
        await consumer.stop()
    return records


@dataclass(frozen=True)
class LoggedRecord:
    """A record as a broker's log holds it."""

    partition: int
    offset: int
    #: Milliseconds since the epoch (the producer's create time, unless the topic says
    #: log-append time).
    timestamp: int
    key: bytes | None
    value: bytes | None


async def broker_log(port: int, topic: str, *, host: str = "127.0.0.1") -> list[LoggedRecord]:
    """Every record of ``topic`` on the broker at ``host:port`` itself, partition by partition.

    Asks that very address, on a connection of its own, for the topic's partitions and
    fetches each from offset 0: the address the broker advertises (a proxy's, say) plays no
    part. Reads until a fetch returns nothing more rather than trusting list-offsets (whose
    answers some brokers, Tansu among them, get wrong). For one broker holding every
    partition, as the tests' do.
    """
    connection = await create_conn(host, port, client_id="orderflow-tests")
    records: list[LoggedRecord] = []
    try:
        metadata = await connection.send(MetadataRequest([topic], allow_auto_topic_creation=False))
        partitions: list[int] = []
        for answer in metadata.to_object()["topics"]:
            if answer["error_code"]:
                raise for_code(answer["error_code"])(f"the partitions of {topic}")
            partitions += sorted(entry["partition"] for entry in answer["partitions"])
        for partition in partitions:
            offset = 0
            while True:
                request = FetchRequest(
                    max_wait_time=100,
                    min_bytes=1,
                    max_bytes=1024 * 1024,
                    isolation_level=0,
                    topics=[(topic, [(partition, offset, 1024 * 1024)])],
                )
                response = await connection.send(request)
                data = b""
                for _, answers in response.topics:  # no topic at all: nothing to return
                    for answer in answers:
                        error_code, data = answer[1], answer[-1] or b""
                        if error_code:
                            error = for_code(error_code)
                            raise error(f"fetching {topic}[{partition}] from offset {offset}")
                fetched = 0
                batches = MemoryRecords(data)
                while (batch := batches.next_batch()) is not None:
                    for record in batch:
                        if record.offset < offset:
                            continue  # a batch begins before the offset asked for
                        records.append(
                            LoggedRecord(
                                partition,
                                record.offset,
                                record.timestamp,
                                record.key,
                                record.value,
                            )
                        )
                        offset = record.offset + 1
                        fetched += 1
                if not fetched:
                    break
    finally:
        connection.close()
    return records


@contextlib.asynccontextmanager
async def running_consumer(settings: Settings) -> AsyncIterator[OrderConsumer]:
    async with _running(run_consumer, settings) as consumer:
        yield consumer


@contextlib.asynccontextmanager
async def running_relay(settings: Settings) -> AsyncIterator[Relay]:
    async with _running(run_relay, settings) as relay:
        yield relay


@contextlib.asynccontextmanager
async def _running(run: Callable[..., Awaitable[None]], settings: Settings) -> AsyncIterator[Any]:
    """Run a component (``run_consumer`` / ``run_relay``) until the block ends; yield it."""
    stop = asyncio.Event()
    started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(settings, stop, ready=started.set_result))
    await _wait_started(task, started)
    try:
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=40)


async def _wait_started(task: asyncio.Task[None], started: asyncio.Future[Any]) -> None:
    await asyncio.wait({task, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the start-up error
        raise AssertionError("component stopped before it started")
    assert started.done(), "component did not start within 60 s"


async def applied_count(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return int(
            (await session.execute(select(func.count()).select_from(ProcessedEvent))).scalar_one()
        )


async def outbox_rows(
    sessions: async_sessionmaker[AsyncSession], topic: str | None = None
) -> list[OutboxRecord]:
    async with sessions() as session:
        statement = select(OutboxRecord).order_by(OutboxRecord.id)
        if topic is not None:
            statement = statement.where(OutboxRecord.topic == topic)
        return list((await session.execute(statement)).scalars())


async def pending_ids(sessions: async_sessionmaker[AsyncSession]) -> list[int]:
    """The ids of the unpublished messages (those in ``outbox_pending``), in id order."""
    async with sessions() as session:
        statement = select(OutboxPending.id).order_by(OutboxPending.id)
        return list((await session.execute(statement)).scalars())


async def mark_published(
    sessions: async_sessionmaker[AsyncSession],
    ids: Sequence[int],
    *,
    written_ago: timedelta | None = None,
) -> None:
    """Publish the messages ``ids`` as the relay's mark does (their ids leave
    ``outbox_pending``), in one transaction; with ``written_ago``, they were also written
    (``created_at``, which retention counts from) that long before now."""
    async with sessions() as session, session.begin():
        if written_ago is not None:
            await session.execute(
                text(
                    "UPDATE outbox_messages SET created_at = now() - CAST(:ago AS interval) "
                    "WHERE id = ANY(:ids)"
                ),
                {"ago": written_ago, "ids": list(ids)},
            )
        deleted = await session.execute(
            text("DELETE FROM outbox_pending WHERE id = ANY(:ids)"), {"ids": list(ids)}
        )
        assert getattr(deleted, "rowcount", None) == len(set(ids)), "not all of them pending"


async def orders_by_id(sessions: async_sessionmaker[AsyncSession]) -> dict[uuid.UUID, Order]:
    async with sessions() as session:
        return {order.id: order for order in (await session.execute(select(Order))).scalars()}


def header_map(headers: Sequence[tuple[str, bytes]] | Sequence[list[str]]) -> dict[str, str]:
    return {name: value.decode() if isinstance(value, bytes) else value for name, value in headers}


@dataclass
class Expected:
    """What a correct consumer makes of a stream (computed with the pure core)."""

    orders: dict[uuid.UUID, OrderState] = field(default_factory=dict)
    applied: list[uuid.UUID] = field(default_factory=list)
    duplicates: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    #: (order id, version) of every update, in per-order order.
    updates: dict[uuid.UUID, list[int]] = field(default_factory=dict)
    #: With parking: events parked, released (applied later), expired at the end.
    parked: int = 0
    released: int = 0
    expired: int = 0
    #: Without expiry: the event ids still parked at the end.
    waiting: list[uuid.UUID] = field(default_factory=list)


def expected_outcome(
    messages: Iterable[tuple[bytes | None, bytes | None]],
    *,
    park: bool = False,
    expire: bool = True,
) -> Expected:
    """Replay ``messages`` (in per-key order) through decode + transition: the exact end state.

    With ``park``, as the contract's "Resequencing and parking" says: an event that can't
    apply yet waits, and is applied right after the event it needed (the earliest arrival
    first, until none applies); one that can never apply any more is dead-lettered then;
    what still waits at the end is dead-lettered when it expires, with the reason it
    arrived with (``expired`` counts those) — or, without ``expire``, still waits
    (``waiting``: the event ids, as the parked events table holds them).
    """
    expected = Expected()
    seen: set[uuid.UUID] = set()
    waiting: dict[uuid.UUID, list[tuple[InboundEvent, RejectedEvent]]] = {}
    now = datetime.now(UTC)

    def apply(event: InboundEvent, state: OrderState) -> None:
        expected.orders[event.order_id] = state
        expected.applied.append(event.event_id)
        expected.updates.setdefault(event.order_id, []).append(state.version)

    def release(order_id: uuid.UUID) -> None:
        queue = waiting.get(order_id, [])
        progressed = True
        while progressed:
            progressed = False
            for item in queue:
                parked, _ = item
                current = expected.orders.get(order_id)
                try:
                    state = transition(current, parked, at=now)
                except RejectedEvent as error:
                    if can_apply_later(current, parked):
                        continue
                    queue.remove(item)
                    seen.discard(parked.event_id)  # dead-lettered: its copy may apply
                    expected.dead_letters[error.reason.value] += 1
                    progressed = True
                    break
                queue.remove(item)
                expected.released += 1
                apply(parked, state)
                progressed = True
                break

    for key, value in messages:
        try:
            event = decode_event(key, value)
        except RejectedEvent as error:
            expected.dead_letters[error.reason.value] += 1
            continue
        if event.event_id in seen:
            expected.duplicates += 1
            continue
        current = expected.orders.get(event.order_id)
        try:
            state = transition(current, event, at=now)
        except RejectedEvent as error:
            if (
                park
                and isinstance(error, UnknownOrder | InvalidTransition)
                and can_apply_later(current, event)
            ):
                seen.add(event.event_id)
                waiting.setdefault(event.order_id, []).append((event, error))
                expected.parked += 1
                continue
            expected.dead_letters[error.reason.value] += 1
            continue
        seen.add(event.event_id)
        apply(event, state)
        release(event.order_id)
    for queue in waiting.values():
        for parked_event, error in queue:
            if expire:
                expected.dead_letters[error.reason.value] += 1
                expected.expired += 1
            else:
                expected.waiting.append(parked_event.event_id)
    return expected


def decode_json(value: bytes | None) -> dict[str, Any]:
    assert value is not None
    document = orjson.loads(value)
    assert isinstance(document, dict)
    return document


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient

    @property
    def database(self) -> Database:
        database: Database = self.app.state.database
        return database

    def statements(self) -> contextlib.AbstractContextManager[list[str]]:
        """Every SQL statement the app sends while the block runs."""
        return statements(self.database.engine)


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement ``engine`` sends while the block runs."""
    seen: list[str] = []

    def record(_conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    sqlalchemy_event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sqlalchemy_event.remove(engine.sync_engine, "before_cursor_execute", record)


@asynccontextmanager
async def serve_api(app: FastAPI, *, raise_app_exceptions: bool = True) -> AsyncIterator[Api]:
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions),
            base_url="http://orderflow.test",
        ) as client,
    ):
        yield Api(app, client)


@dataclass(frozen=True)
class Placed:
    id: uuid.UUID
    created_at: datetime
    status: str
    email: str


async def insert_orders(env: TestEnv, specs: list[tuple[datetime, str, str]]) -> list[Placed]:
    """One order per (created_at, status, customer email), each with three lines."""
    placed: list[Placed] = []
    async with env.sessions() as session, session.begin():
        customers: dict[str, Customer] = {}
        for email in sorted({email for _, _, email in specs}):
            customers[email] = Customer(id=uuid.uuid4(), email=email, name=email.split("@")[0])
            session.add(customers[email])
        await session.flush()
        for created_at, status, email in specs:
            order_id = uuid.uuid4()
            lines = [
                OrderLine(
                    position=position,
                    sku=f"SKU-{position}",
                    quantity=position + 1,
                    unit_price=Decimal("1.50"),
                )
                for position in range(3)
            ]
            session.add(
                Order(
                    id=order_id,
                    customer_id=customers[email].id,
                    status=status,
                    currency="EUR",
                    total=sum((line.quantity * line.unit_price for line in lines), Decimal(0)),
                    version=1,
                    created_at=created_at,
                    updated_at=created_at,
                    lines=lines,
                )
            )
            placed.append(Placed(order_id, created_at, status, email))
    return placed


async def invoke_cli(
    settings: Settings, *arguments: str, extra_env: dict[str, str] | None = None
) -> Any:
    """Run the real ``orderflow`` CLI configured as ``settings`` (in a thread: it runs its
    own event loop), ``extra_env`` added to its environment; the CliRunner result."""
    from typer.testing import CliRunner

    from orderflow.cli.main import app
    from tests.e2e.processes import process_env

    environment = {
        name: value
        for name, value in process_env(settings, **(extra_env or {})).items()
        if os.environ.get(name) != value
    }
    return await asyncio.to_thread(
        CliRunner().invoke, app, list(arguments), env=environment, catch_exceptions=False
    )
