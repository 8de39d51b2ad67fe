"""Consumer throughput: orderflow against a hand-written asyncpg baseline and a naive ORM loop.

    python benchmarks/consumer.py [--events N] [--partitions P] [--profile]

Uses ``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS`` when set, otherwise starts an embedded
PostgreSQL (durable: fsync on, as in production) and an embedded Tansu broker. One inbound
topic is loaded once with N realistic events (``SampleStream``, no faults); then, one after
the other, each variant reads the whole topic with its own consumer group into its own
fresh, migrated database on the same server:

* baseline  -- hand-written asyncpg, ``orjson.loads`` only, 500 events per transaction,
               multi-row (``unnest``) statements; the same rows per event as orderflow;
* naive     -- the SQLAlchemy async "tutorial" pattern: one session and one commit per
               event, ORM objects, ``session.get`` for the order (min(N, 3000) events);
* orderflow -- ``orderflow.runtime.services.run_consumer`` in this process, default settings;
* shuffled  -- the same, on a second topic where every 10th order comes from racing
               producers (two of its events swapped): the cost of parking and releasing.

Each variant is timed from the moment its first transaction has committed until the
last event it applies has committed (the events of that first commit are not counted):
process start, group join, assignment and the first fetch are left out for all three
alike. The last line of output is machine-readable (``RESULT ...``).
"""

# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file is named like
# the project's ``consumer`` package: put the project root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import contextlib
import io
import logging
import os
import subprocess
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import joinedload, selectinload

from benchmarks.support import Services, admin, create_database, provide_services, say
from consumer.intake import OrderConsumer
from consumer.models import ConsumerOffset, Customer, Order, OrderLine, ProcessedEvent
from orderflow.runtime.services import run_consumer
from orderflow.runtime.settings import Settings, async_database_url
from orderflow.runtime.topics import ensure_topics
from orderflow.runtime.wiring import create_consumer, create_producer
from orderflow.tools.samples import SampleStream
from outbox.models import OutboxRecord

SEED = 20260101
BATCH_EVENTS = 500
NAIVE_MAX_EVENTS = 3000
POLL_SECONDS = 0.005
#: A variant that applies nothing for this long has failed.
STALL_SECONDS = 120.0
SHARDS = 64
STATUS_AFTER = {
    "OrderPaid": "paid",
    "OrderShipped": "shipped",
    "OrderDelivered": "delivered",
    "OrderCancelled": "cancelled",
}
_UPDATE_NAMESPACE = uuid.UUID("5b0c1d52-8f57-4f0e-9a52-61c1c0a3f1d7")


async def fetch_counts(url: str) -> tuple[int, int, int]:
    """(processed events, outbox messages, parked events)."""
    connection = await asyncpg.connect(url)
    try:
        events = await connection.fetchval("SELECT count(*) FROM processed_events")
        outbox = await connection.fetchval("SELECT count(*) FROM outbox_messages")
        parked = await connection.fetchval("SELECT count(*) FROM parked_events")
    finally:
        await connection.close()
    return int(events), int(outbox), int(parked)


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    name: str
    target: int
    started: float = 0.0  # variant started (before connecting / joining the group)
    first_at: float | None = None  # first commit observed
    first_count: int = 0
    done_at: float | None = None
    note: str = ""

    @property
    def counted(self) -> int:
        return self.target - self.first_count

    @property
    def window(self) -> float:
        assert self.first_at is not None
        assert self.done_at is not None
        return self.done_at - self.first_at

    @property
    def total(self) -> float:
        assert self.done_at is not None
        return self.done_at - self.started

    @property
    def eps(self) -> float:
        if self.counted > 0 and self.window > 0:
            return self.counted / self.window
        # Everything landed in the first commit: fall back to the time including start-up.
        return self.target / self.total


async def watch(
    measurement: Measurement, applied: Callable[[], int], task: asyncio.Future[Any]
) -> None:
    """Poll the variant's own applied-events counter until it reaches the target."""
    last_count, last_change = 0, time.perf_counter()
    while True:
        count = applied()
        now = time.perf_counter()
        if count and measurement.first_at is None:
            measurement.first_at, measurement.first_count = now, count
        if count >= measurement.target:
            measurement.done_at = now
            return
        if count != last_count:
            last_count, last_change = count, now
        if task.done():
            task.result()  # raises the variant's error, if any
            raise RuntimeError(
                f"{measurement.name} stopped after {count} of {measurement.target} events"
            )
        if now - last_change > STALL_SECONDS:
            raise RuntimeError(
                f"{measurement.name} applied nothing for {STALL_SECONDS:.0f} s "
                f"({count} of {measurement.target} events)"
            )
        await asyncio.sleep(POLL_SECONDS)


@dataclass
class Counter:
    applied: int = 0


# --------------------------------------------------------------------------- shared bits


def timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def update_payload(
    *,
    causation_id: str,
    change: str,
    order_id: str,
    status: str,
    version: int,
    currency: str,
    total: str,
    email: str,
    name: str,
    lines: list[tuple[str, int, str]],
    created_at: str,
    updated_at: str,
) -> tuple[str, bytes]:
    """An ``OrderUpdated``-shaped document (same fields and size as orderflow's)."""
    event_id = str(uuid.uuid5(_UPDATE_NAMESPACE, causation_id))
    document = {
        "event_id": event_id,
        "event_type": "OrderUpdated",
        "schema_version": 1,
        "occurred_at": updated_at,
        "causation_id": causation_id,
        "order_id": order_id,
        "order_version": version,
        "change": change,
        "order": {
            "id": order_id,
            "status": status,
            "currency": currency,
            "total": total,
            "customer": {"email": email, "name": name},
            "lines": [
                {"sku": sku, "quantity": quantity, "unit_price": price}
                for sku, quantity, price in lines
            ],
            "created_at": created_at,
            "updated_at": updated_at,
        },
    }
    return event_id, orjson.dumps(document)


def update_headers(event_id: str) -> list[list[str]]:
    return [
        ["event_id", event_id],
        ["event_type", "OrderUpdated"],
        ["content-type", "application/json"],
    ]


def placed_lines(payload: dict[str, Any]) -> tuple[list[tuple[str, int, str]], Decimal]:
    lines = [
        (line["sku"], int(line["quantity"]), str(line["unit_price"])) for line in payload["lines"]
    ]
    total = sum((Decimal(price) * quantity for _, quantity, price in lines), Decimal(0))
    return lines, total


def kafka_settings(services: Services, topic: str, group: str, database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        kafka_bootstrap_servers=services.bootstrap_servers,
        inbound_topic=topic,
        outbound_topic=f"{topic}.updates",
        dlq_topic=f"{topic}.dlq",
        consumer_group=group,
        kafka_idempotence=services.kafka_idempotence,
        kafka_session_timeout_ms=services.session_timeout_ms,
    )


async def poll(
    consumer: AIOKafkaConsumer, most: int
) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    """Up to ``most`` records: waits for the first ones, then takes what is already there."""
    batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
    taken = 0
    while taken < most:
        got = await consumer.getmany(timeout_ms=0 if taken else 500, max_records=most - taken)
        if not got:
            if taken:
                break
            continue
        for partition, records in got.items():
            batches.setdefault(partition, []).extend(records)
            taken += len(records)
    return batches


# --------------------------------------------------------------------------- (a) baseline

_STATE_SQL = """
SELECT o.id, o.status, o.version, o.currency, o.total::text, o.created_at, c.email, c.name,
       (SELECT coalesce(json_agg(json_build_array(l.sku, l.quantity, l.unit_price::text)
                                 ORDER BY l.position), '[]')
          FROM order_lines l WHERE l.order_id = o.id) AS lines
  FROM orders o JOIN customers c ON c.id = o.customer_id
 WHERE o.id = ANY($1::uuid[])
   FOR UPDATE OF o
"""
_CUSTOMERS_SQL = """
INSERT INTO customers (id, email, name)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
ON CONFLICT (email) DO UPDATE SET name = excluded.name, updated_at = now()
RETURNING id, email
"""
_ORDERS_SQL = """
INSERT INTO orders (id, customer_id, status, currency, total, version, created_at, updated_at)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::numeric[],
                     $6::int[], $7::timestamptz[], $8::timestamptz[])
"""
_LINES_SQL = """
INSERT INTO order_lines (order_id, position, sku, quantity, unit_price)
SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::int[], $5::numeric[])
"""
_UPDATE_SQL = """
UPDATE orders o SET status = u.status, version = o.version + u.n, updated_at = u.at
  FROM unnest($1::uuid[], $2::text[], $3::int[], $4::timestamptz[]) AS u(id, status, n, at)
 WHERE o.id = u.id
"""
_INBOX_SQL = """
INSERT INTO processed_events (event_id, order_id, event_type, topic, partition, "offset")
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::bigint[])
"""
_OUTBOX_SQL = """
INSERT INTO outbox_messages (topic, key, payload, headers, shard)
SELECT t, k, p, h::jsonb, s FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::text[],
                                        $5::smallint[]) AS m(t, k, p, h, s)
"""
_OFFSETS_SQL = """
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
SELECT $1, $2, * FROM unnest($3::int[], $4::bigint[])
ON CONFLICT (group_id, topic, partition)
DO UPDATE SET next_offset = excluded.next_offset, updated_at = now()
"""


@dataclass
class _OrderRow:
    status: str
    version: int
    currency: str
    total: str
    email: str
    name: str
    lines: list[tuple[str, int, str]]
    created_at: str
    updated_at: str = ""
    updates: int = 0  # applied in this batch, for an order from an earlier batch
    new: bool = False


async def apply_baseline_batch(
    connection: asyncpg.Connection,
    records: list[ConsumerRecord[bytes, bytes]],
    *,
    group: str,
    topic: str,
    outbound: str,
) -> None:
    now = datetime.now(UTC)
    now_text = timestamp(now)
    events = [(record, orjson.loads(record.value or b"")) for record in records]
    placed = {doc["order_id"] for _, doc in events if doc["event_type"] == "OrderPlaced"}
    earlier = sorted({doc["order_id"] for _, doc in events} - placed)
    async with connection.transaction():
        orders: dict[str, _OrderRow] = {}
        if earlier:
            for row in await connection.fetch(_STATE_SQL, earlier):
                orders[str(row["id"])] = _OrderRow(
                    status=row["status"],
                    version=row["version"],
                    currency=row["currency"],
                    total=row["total"],
                    email=row["email"],
                    name=row["name"],
                    lines=[(sku, q, p) for sku, q, p in orjson.loads(row["lines"])],
                    created_at=timestamp(row["created_at"]),
                )
        customers: dict[str, str] = {}
        for _, doc in events:
            if doc["event_type"] == "OrderPlaced":
                customers[doc["payload"]["customer"]["email"]] = doc["payload"]["customer"]["name"]
        customer_ids: dict[str, uuid.UUID] = {}
        if customers:
            emails = sorted(customers)
            rows = await connection.fetch(
                _CUSTOMERS_SQL,
                [uuid.uuid4() for _ in emails],
                emails,
                [customers[email] for email in emails],
            )
            customer_ids = {row["email"]: row["id"] for row in rows}

        inbox: list[list[Any]] = [[], [], [], [], [], []]
        outbox: list[list[Any]] = [[], [], [], [], []]
        for record, doc in events:
            order_id, event_type = doc["order_id"], doc["event_type"]
            if event_type == "OrderPlaced":
                payload = doc["payload"]
                lines, total = placed_lines(payload)
                order = orders[order_id] = _OrderRow(
                    status="pending",
                    version=1,
                    currency=payload["currency"],
                    total=str(total),
                    email=payload["customer"]["email"],
                    name=payload["customer"]["name"],
                    lines=lines,
                    created_at=now_text,
                    new=True,
                )
            else:
                order = orders[order_id]
                order.status = STATUS_AFTER[event_type]
                order.version += 1
                order.updates += 1
            order.updated_at = now_text
            event_id, body = update_payload(
                causation_id=doc["event_id"],
                change=event_type,
                order_id=order_id,
                status=order.status,
                version=order.version,
                currency=order.currency,
                total=order.total,
                email=order.email,
                name=order.name,
                lines=order.lines,
                created_at=order.created_at,
                updated_at=order.updated_at,
            )
            for column, value in zip(
                inbox,
                (
                    doc["event_id"],
                    order_id,
                    event_type,
                    record.topic,
                    record.partition,
                    record.offset,
                ),
                strict=True,
            ):
                column.append(value)
            key = order_id.encode()
            for column, value in zip(
                outbox,
                (
                    outbound,
                    key,
                    body,
                    orjson.dumps(update_headers(event_id)).decode(),
                    zlib.crc32(key) % SHARDS,
                ),
                strict=True,
            ):
                column.append(value)

        new = [(order_id, o) for order_id, o in orders.items() if o.new]
        if new:
            # Orders placed in this batch are inserted in their final state of the batch.
            await connection.execute(
                _ORDERS_SQL,
                [order_id for order_id, _ in new],
                [customer_ids[o.email] for _, o in new],
                [o.status for _, o in new],
                [o.currency for _, o in new],
                [Decimal(o.total) for _, o in new],
                [o.version for _, o in new],
                [now for _ in new],
                [now for _ in new],
            )
            line_rows = [
                (order_id, position, sku, quantity, Decimal(price))
                for order_id, o in new
                for position, (sku, quantity, price) in enumerate(o.lines, start=1)
            ]
            await connection.execute(
                _LINES_SQL, *(list(column) for column in zip(*line_rows, strict=True))
            )
        changed = [(order_id, o) for order_id, o in orders.items() if o.updates]
        if changed:
            await connection.execute(
                _UPDATE_SQL,
                [order_id for order_id, _ in changed],
                [o.status for _, o in changed],
                [o.updates for _, o in changed],
                [now for _ in changed],
            )
        await connection.execute(_INBOX_SQL, *inbox)
        await connection.execute(_OUTBOX_SQL, *outbox)
        positions: dict[int, int] = {}
        for record, _ in events:
            positions[record.partition] = record.offset + 1
        await connection.execute(
            _OFFSETS_SQL, group, topic, list(positions), list(positions.values())
        )


async def run_baseline(
    services: Services, database_url: str, topic: str, group: str, target: int, counter: Counter
) -> None:
    settings = kafka_settings(services, topic, group, database_url)
    connection = await asyncpg.connect(database_url)
    consumer = create_consumer(settings)
    consumer.subscribe([topic])
    try:
        await consumer.start()
        while counter.applied < target:
            batches = await poll(consumer, BATCH_EVENTS)
            records = [record for records in batches.values() for record in records]
            await apply_baseline_batch(
                connection, records, group=group, topic=topic, outbound=settings.outbound_topic
            )
            counter.applied += len(records)
            await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
    finally:
        await consumer.stop()
        await connection.close()


# --------------------------------------------------------------------------- (b) naive


async def apply_naive_event(
    session_factory: async_sessionmaker[AsyncSession],
    record: ConsumerRecord[bytes, bytes],
    *,
    group: str,
    outbound: str,
) -> None:
    """One event, one session, one commit: the pattern of the async tutorials."""
    async with session_factory() as session:
        doc = orjson.loads(record.value or b"")
        order_id = uuid.UUID(doc["order_id"])
        event_type = doc["event_type"]
        now = datetime.now(UTC)
        session.add(
            ProcessedEvent(
                event_id=uuid.UUID(doc["event_id"]),
                order_id=order_id,
                event_type=event_type,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
        )
        if event_type == "OrderPlaced":
            payload = doc["payload"]
            email, name = payload["customer"]["email"], payload["customer"]["name"]
            result = await session.execute(select(Customer).where(Customer.email == email))
            customer = result.scalar_one_or_none()
            if customer is None:
                customer = Customer(id=uuid.uuid4(), email=email, name=name)
                session.add(customer)
            else:
                customer.name = name
            lines, total = placed_lines(payload)
            order = Order(
                id=order_id,
                customer_id=customer.id,
                status="pending",
                currency=payload["currency"],
                total=total,
                version=1,
                created_at=now,
                updated_at=now,
                lines=[
                    OrderLine(position=i, sku=sku, quantity=q, unit_price=Decimal(p))
                    for i, (sku, q, p) in enumerate(lines, start=1)
                ],
            )
            session.add(order)
        else:
            loaded = await session.get(
                Order, order_id, options=[selectinload(Order.lines), joinedload(Order.customer)]
            )
            assert loaded is not None, f"unknown order {order_id}"
            order, customer = loaded, loaded.customer
            lines = [(line.sku, line.quantity, str(line.unit_price)) for line in order.lines]
            order.status = STATUS_AFTER[event_type]
            order.version += 1
            order.updated_at = now
        event_id, body = update_payload(
            causation_id=doc["event_id"],
            change=event_type,
            order_id=str(order_id),
            status=order.status,
            version=order.version,
            currency=order.currency,
            total=str(order.total),
            email=customer.email,
            name=customer.name,
            lines=lines,
            created_at=timestamp(order.created_at),
            updated_at=timestamp(now),
        )
        key = str(order_id).encode()
        session.add(
            OutboxRecord(
                topic=outbound,
                key=key,
                payload=body,
                headers=update_headers(event_id),
                shard=zlib.crc32(key) % SHARDS,
            )
        )
        await session.merge(
            ConsumerOffset(
                group_id=group,
                topic=record.topic,
                partition=record.partition,
                next_offset=record.offset + 1,
            )
        )
        await session.commit()


async def run_naive(
    services: Services, database_url: str, topic: str, group: str, target: int, counter: Counter
) -> None:
    settings = kafka_settings(services, topic, group, database_url)
    # The engine and session factory exactly as the notes set them up.
    engine = create_async_engine(
        async_database_url(database_url), pool_size=10, max_overflow=20, pool_pre_ping=True
    )
    sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
    consumer = create_consumer(settings)
    consumer.subscribe([topic])
    try:
        await consumer.start()
        while counter.applied < target:
            batches = await poll(consumer, BATCH_EVENTS)
            done: dict[TopicPartition, int] = {}
            for partition, records in batches.items():
                for record in records:
                    if counter.applied >= target:
                        break
                    await apply_naive_event(
                        sessions, record, group=group, outbound=settings.outbound_topic
                    )
                    counter.applied += 1
                    done[partition] = record.offset + 1
            if done:
                await consumer.commit(done)
    finally:
        await consumer.stop()
        await engine.dispose()


# --------------------------------------------------------------------------- (c) orderflow


async def run_orderflow(
    settings: Settings, stop: asyncio.Event, found: asyncio.Future[OrderConsumer]
) -> None:
    def ready(order_consumer: OrderConsumer) -> None:
        found.set_result(order_consumer)

    await run_consumer(settings, stop, ready=ready)


# --------------------------------------------------------------------------- tracing sink

#: An OTLP/HTTP endpoint that answers every request and keeps nothing, in a process of its
#: own (its work is not the consumer's).
_SINK = """
import socket, sys, threading
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(16)
print(server.getsockname()[1], flush=True)
def serve(connection):
    with connection:
        buffer = b""
        while True:
            while b"\\r\\n\\r\\n" not in buffer:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\\r\\n\\r\\n")
            length = 0
            for line in head.split(b"\\r\\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[length:]
            connection.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
while True:
    connection, _ = server.accept()
    threading.Thread(target=serve, args=(connection,), daemon=True).start()
"""


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """The endpoint of a sink process for OTLP/HTTP exports."""
    process = subprocess.Popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- driver


@dataclass
class Run:
    services: Services
    topic: str
    events: int
    suffix: str
    databases: list[str] = field(default_factory=list)
    shuffled_topic: str = ""

    def group(self, variant: str) -> str:
        return f"bench-{variant}-{self.suffix}"

    async def database(self, variant: str) -> str:
        name = f"orderflow_bench_{variant}_{self.suffix}"
        self.databases.append(name)
        return await create_database(self.services, name)


#: In the shuffled variant, one order in this many has two events the wrong way round.
RACE_EVERY = 10


async def load_topic(
    services: Services, topic: str, events: int, partitions: int, *, race_every: int = 0
) -> None:
    settings = Settings(
        database_url=None,
        kafka_bootstrap_servers=services.bootstrap_servers,
        kafka_idempotence=services.kafka_idempotence,
    )
    await ensure_topics(settings, [topic], partitions=partitions)
    producer = create_producer(settings)
    await producer.start()
    try:
        stream = SampleStream(seed=SEED, fault_every=0, race_every=race_every)
        sent = []
        for _ in range(events):
            message = next(stream)
            sent.append(await producer.send(topic, key=message.key, value=message.value))
        await producer.flush()
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def measure_variant(
    run: Run,
    name: str,
    target: int,
    start: Callable[[str, str], Awaitable[tuple[asyncio.Task[None], Callable[[], int]]]],
    finish: Callable[[], None] | None = None,
    label: str | None = None,
) -> tuple[Measurement, str]:
    url = await run.database(label or name)
    measurement = Measurement(name, target, started=time.perf_counter())
    task, applied = await start(url, run.group(label or name))
    try:
        await watch(measurement, applied, task)
        if finish is not None:
            finish()
        await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return measurement, url


async def check(name: str, url: str, expected: int) -> None:
    """Every event applied, or (the last orders' early events, whose partner the stream
    ends before) still parked; one outbox row per applied event."""
    events, outbox, parked = await fetch_counts(url)
    verdict = "ok" if events + parked == expected and outbox == events else "MISMATCH"
    say(
        f"  {name}: processed_events={events} outbox_messages={outbox} parked={parked} "
        f"expected={expected} {verdict}"
    )
    if verdict != "ok":
        raise RuntimeError(f"{name}: wrong row counts ({events} events, {outbox} outbox rows)")


async def benchmark(services: Services, args: argparse.Namespace) -> list[Measurement]:
    suffix = uuid.uuid4().hex[:10]
    run = Run(services, f"bench.orders.events.{suffix}", args.events, suffix)
    run.shuffled_topic = f"bench.orders.shuffled.{suffix}"
    try:
        return await _benchmark(run, args)
    finally:
        await cleanup(run)


async def _benchmark(run: Run, args: argparse.Namespace) -> list[Measurement]:
    services, topic, events = run.services, run.topic, run.events
    say(f"services: {services.origin}")
    began = time.perf_counter()
    await load_topic(services, topic, events, args.partitions)
    await load_topic(services, run.shuffled_topic, events, args.partitions, race_every=RACE_EVERY)
    say(
        f"loaded {events} events into {topic} and into {run.shuffled_topic} (every "
        f"{RACE_EVERY}th order shuffled; {args.partitions} partitions each) "
        f"in {time.perf_counter() - began:.1f} s"
    )
    results: list[Measurement] = []

    # (a) baseline and (c) orderflow alternate for --rounds rounds; the best of each counts
    # (the machine's noise only ever slows a run down).
    async def measure_baseline(round_number: int) -> Measurement:
        say(f"running baseline (asyncpg, 500 events per transaction), round {round_number} ...")
        baseline_counter = Counter()

        async def start_baseline(
            url: str, group: str
        ) -> tuple[asyncio.Task[None], Callable[[], int]]:
            task = asyncio.create_task(
                run_baseline(services, url, topic, group, events, baseline_counter)
            )
            return task, lambda: baseline_counter.applied

        measurement, url = await measure_variant(
            run, "baseline", events, start_baseline, label=f"baseline{round_number}"
        )
        await check("baseline", url, events)
        return measurement

    # (b) naive
    naive_target = min(events, NAIVE_MAX_EVENTS)
    say(f"running naive (ORM, one commit per event) on the first {naive_target} events ...")
    naive_counter = Counter()

    async def start_naive(url: str, group: str) -> tuple[asyncio.Task[None], Callable[[], int]]:
        task = asyncio.create_task(
            run_naive(services, url, topic, group, naive_target, naive_counter)
        )
        return task, lambda: naive_counter.applied

    measurement, url = await measure_variant(run, "naive", naive_target, start_naive)
    if naive_target < events:
        measurement.note = f"first {naive_target} of {events} events"
    results.append(measurement)
    await check("naive", url, naive_target)

    async def measure_orderflow(
        round_number: int, profile: bool, *, shuffled: bool = False, traced: str | None = None
    ) -> Measurement:
        name = "shuffled" if shuffled else "traced" if traced else "orderflow"
        source = run.shuffled_topic if shuffled else topic
        say(f"running {name} (run_consumer, in-process, {source}), round {round_number} ...")
        stop = asyncio.Event()
        profiler = None
        if profile:
            try:
                from pyinstrument import Profiler
            except ImportError:
                print(
                    "--profile: pyinstrument is not installed; running without it", file=sys.stderr
                )
            else:
                profiler = Profiler(interval=0.001, async_mode="disabled")

        async def start_orderflow(
            url: str, group: str
        ) -> tuple[asyncio.Task[None], Callable[[], int]]:
            settings = kafka_settings(services, source, group, url)
            found: asyncio.Future[OrderConsumer] = asyncio.get_running_loop().create_future()
            if profiler is not None:
                profiler.start()
            task = asyncio.create_task(run_orderflow(settings, stop, found))

            def applied() -> int:
                if not found.done():
                    return 0
                stats = found.result().stats
                return stats.applied + stats.waiting  # what waits at the end counts as done

            return task, applied

        saved = dict(os.environ)
        if traced is not None:  # every span exported over OTLP/HTTP to a sink process
            os.environ.update(
                {"OTEL_EXPORTER_OTLP_ENDPOINT": traced, "OTEL_TRACES_SAMPLER": "always_on"}
            )
        try:
            measurement, url = await measure_variant(
                run,
                name,
                events,
                start_orderflow,
                finish=stop.set,
                label=f"{name}{round_number}",
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)
            if profiler is not None and profiler.is_running:
                profiler.stop()
        if profiler is not None:
            measurement.note = "under pyinstrument"
            print(profiler.output_text(unicode=True, color=False), file=sys.stderr)
        await check(name, url, events)
        return measurement

    baselines: list[Measurement] = []
    orderflows: list[Measurement] = []
    shuffleds: list[Measurement] = []
    traceds: list[Measurement] = []
    with otlp_sink() if args.tracing else contextlib.nullcontext() as sink:
        for round_number in range(1, args.rounds + 1):
            baselines.append(await measure_baseline(round_number))
            profile = args.profile and round_number == 1
            orderflows.append(await measure_orderflow(round_number, profile))
            shuffleds.append(await measure_orderflow(round_number, False, shuffled=True))
            if sink is not None:
                traceds.append(await measure_orderflow(round_number, False, traced=sink))
    for measurements in (baselines, orderflows, shuffleds, traceds):
        if not measurements:
            continue
        best = max(measurements, key=lambda m: m.eps)
        if args.rounds > 1:
            rates = ", ".join(f"{m.eps:.0f}" for m in measurements)
            best.note = (best.note + "; " if best.note else "") + f"best of {rates}"
        results.append(best)
    return results


async def cleanup(run: Run) -> None:
    for name in run.databases:
        with contextlib.suppress(Exception):
            await admin(run.services, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    client = AIOKafkaAdminClient(
        bootstrap_servers=run.services.bootstrap_servers, request_timeout_ms=15000
    )
    with contextlib.suppress(Exception):
        await client.start()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                client.delete_consumer_groups(
                    [
                        run.group(f"{variant}{round_number}")
                        for variant in ("baseline", "orderflow", "shuffled")
                        for round_number in range(1, 10)
                    ]
                    + [run.group("naive")]
                ),
                10,
            )
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.delete_topics([run.topic, run.shuffled_topic]), 10)
    with contextlib.suppress(Exception):
        await client.close()


def report(results: list[Measurement]) -> str:
    by_name = {m.name: m for m in results}
    consumer_eps = by_name["orderflow"].eps
    baseline_eps = by_name["baseline"].eps
    naive_eps = by_name["naive"].eps
    shuffled_eps = by_name["shuffled"].eps
    traced = by_name.get("traced")
    out = io.StringIO()
    out.write(
        f"\n{'variant':<10} {'events':>7} {'timed':>7} {'window s':>9} {'total s':>8} "
        f"{'events/s':>9} {'orderflow/this':>14}  note\n"
    )
    for m in results:
        out.write(
            f"{m.name:<10} {m.target:>7} {m.counted:>7} {m.window:>9.2f} {m.total:>8.2f} "
            f"{m.eps:>9.0f} {consumer_eps / m.eps:>14.2f}  {m.note}\n"
        )
    out.write(
        "\ntimed: events after the first commit; window: first commit to last commit;"
        " total: includes connecting, group join and the first batch.\n"
    )
    short = [m.name for m in results if m.counted < 1000 or m.window < 0.2]
    if short:
        out.write(
            f"WARNING: too few events timed for {', '.join(short)} to mean much "
            "(a variant whose first commit holds every event is timed from its start); "
            "use --events 5000 or more.\n"
        )
    out.write(
        f"orderflow is {consumer_eps / baseline_eps:.2f}x the asyncpg baseline "
        f"and {consumer_eps / naive_eps:.2f}x the naive ORM loop; with every "
        f"{RACE_EVERY}th order shuffled it runs at {shuffled_eps / consumer_eps:.2f}x its "
        "in-order speed"
        + (
            f"; tracing every event (100% sampled, OTLP/HTTP) at {traced.eps / consumer_eps:.2f}x"
            if traced is not None
            else ""
        )
        + ".\n\n"
    )
    out.write(
        f"RESULT consumer_eps={consumer_eps:.0f} baseline_eps={baseline_eps:.0f} "
        f"naive_eps={naive_eps:.0f} ratio_vs_baseline={consumer_eps / baseline_eps:.2f} "
        f"ratio_vs_naive={consumer_eps / naive_eps:.2f} shuffled_eps={shuffled_eps:.0f} "
        f"ratio_shuffled_vs_in_order={shuffled_eps / consumer_eps:.2f}"
        + (
            f" traced_eps={traced.eps:.0f} ratio_traced_vs_untraced={traced.eps / consumer_eps:.2f}"
            if traced is not None
            else ""
        )
    )
    return out.getvalue()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20000, help="inbound events (default 20000)")
    parser.add_argument("--partitions", type=int, default=3, help="inbound partitions (default 3)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of baseline and orderflow, alternating; the best of each counts (default 3)",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also run orderflow with tracing on, every event sampled, spans exported over "
        "OTLP/HTTP to a sink process; report its ratio to the untraced run",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the orderflow variant with pyinstrument (if installed); text to stderr",
    )
    args = parser.parse_args(argv)
    if args.events < 1 or args.partitions < 1 or args.rounds < 1:
        parser.error("--events, --partitions and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    began = time.perf_counter()
    with provide_services() as services:
        results = asyncio.run(benchmark(services, args))
    say(f"(whole run: {time.perf_counter() - began:.1f} s)")
    say(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
