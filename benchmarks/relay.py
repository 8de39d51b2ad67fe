"""Relay throughput: orderflow's outbox relay against the raw aiokafka producer.

    python benchmarks/relay.py [--rows N] [--relays 1,2,3] [--partitions P] [--profile]
                               [--loops L] [--raw-producers K]
    python benchmarks/relay.py --drain-check [--rows N]      # slow: 1,000,000 rows by default

Uses ``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS`` when set, otherwise starts an embedded
PostgreSQL (durable: fsync on, as in production) and an embedded Tansu broker. A fresh,
migrated database gets N outbox rows (default 200000) of ``OrderUpdated``-sized payloads
(about 650 bytes, the same fields as orderflow's) keyed by N/4 order ids, loaded with one
binary ``COPY`` per chunk (shard = ``outbox.enqueue.shard_of(key)``) and vacuumed and
analysed; then, one after the other, each to its own fresh topic:

* baseline  -- the raw aiokafka producer (acks=all, linger and batch size as
               ``orderflow.runtime.wiring.create_producer``, idempotence per the services:
               off for Tansu) sends the same keys, values and headers, read from the table
               into memory beforehand, and awaits every ack; only the sending is timed;
* relay K=k -- k ``outbox.relay.Relay``s in this process, each with its own engine
               (pool_size=1) and its own producer, drain the table: timed from their start
               until no unpublished row is left. Every 20 ms the relays' own counts of rows
               marked give the progress; once they add up to N, a separate connection
               confirms it (``SELECT count(*) FROM outbox_pending``, the ids still
               unpublished; polling that all along would load the database more than the
               relays do). The tables are truncated and reloaded before each k.

After each stage its topic is checked record by record (``benchmarks/ledger.py``). Every
producer, the relays' included, records each record batch it hands over and the base
offset it was acked at; per partition the acked ranges must be pairwise disjoint and
cover the log from 0 to its end; the topic is read back from offset 0 (partitions
assigned, no group, no offset reset) and every offset read is compared with the acks:
acked offsets missing, offsets read twice, a record other than the one acked there,
records no ack covers. Then against the outbox: after a relay stage every row is
published, no row is marked without an ack carrying its ``event_id``, and every row's
``event_id`` is on the topic. Anything wrong is printed as ``PROBLEM`` with the acked
batches concerned (producer, partition, offsets, when handed over and acked) and what
the broker returns when read from their base offsets; the run ends with exit status 1.
The broker is also asked for each partition's earliest offset: Tansu can list a later
batch's (see docs/broker-notes.md), which would make a reader starting "from the
beginning" skip records; that is printed as ``BROKER`` and does not fail the run.
The remaining-count samples also give the drain rate of the first and of the last 10% of
the rows (each measured from a sample to a sample, so start-up is not counted): the last
10% must not be slower, however many published rows the table already holds.

``--drain-check`` runs only that check, at scale: one relay (or ``--relays``), no
baseline, 1,000,000 rows unless ``--rows`` says otherwise, and a rate per tenth of the
rows. It is slow (minutes: loading alone writes about 1 GB).

The default run takes about 1.5 minutes on a 2-core machine. ``--profile`` runs the first
relay count under pyinstrument (text to stderr; it slows the relay down).

``--loops L`` runs each relay count L times, each on a fresh topic with the table
reloaded, and checks each. ``--raw-producers K`` adds a stage per loop with K raw
aiokafka producers sending at once to the same partitions (no relay; the messages are
read from the table beforehand), record batches built as the relay builds them
(``create_batch``, ``send_batch``, 500 messages per chunk, one chunk in flight each), with
the same checks: whether the broker keeps concurrent batches apart without orderflow.

The last line of output is machine-readable (``RESULT ...``).
"""

# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and the sibling
# ``consumer.py`` benchmark would shadow the project's ``consumer`` package: put the
# project root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import contextlib
import io
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from benchmarks.ledger import (
    SHOWN,
    Audit,
    Ledger,
    RecordingProducer,
    audit,
    event_id_of,
)
from benchmarks.support import Services, admin, cpu_by_role, create_database, provide_services, say
from orderflow.runtime.services import relay_config
from orderflow.runtime.settings import Settings
from orderflow.runtime.topics import ensure_topics
from orderflow.runtime.wiring import create_engine, create_producer
from orderflow.tools.samples import CUSTOMERS, PRODUCTS
from outbox.enqueue import shard_of
from outbox.relay import Relay

SEED = 20260101
#: Rows per ``COPY`` while loading (and per generated chunk).
LOAD_CHUNK = 20000
#: Outbox rows per order id: placed, paid, shipped, delivered.
ROWS_PER_ORDER = 4
POLL_SECONDS = 0.020
#: A drain that publishes nothing for this long has failed.
STALL_SECONDS = 30.0
DRAIN_CHECK_ROWS = 1_000_000
COUNT_UNPUBLISHED = "SELECT count(*) FROM outbox_pending"
COLUMNS = ["topic", "key", "payload", "headers", "shard"]
CHANGES = ["OrderPlaced", "OrderPaid", "OrderShipped", "OrderDelivered"]
STATUSES = ["placed", "paid", "shipped", "delivered"]


def kafka_settings(services: Services, database_url: str | None = None) -> Settings:
    return Settings(
        database_url=database_url,
        kafka_bootstrap_servers=services.bootstrap_servers,
        kafka_idempotence=services.kafka_idempotence,
    )


# --------------------------------------------------------------------------- the rows


def timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


#: Generated outbox rows: (key, payload, headers as JSON text, shard).
Chunk = list[tuple[bytes, bytes, str, int]]


@dataclass
class _Order:
    id: str
    email: str
    name: str
    lines: list[dict[str, Any]]
    total: str
    created_at: str
    version: int = 0


def outbox_rows(count: int, seed: int = SEED) -> Iterator[Chunk]:
    """``count`` rows of (key, payload, headers JSON text, shard), in chunks; deterministic.

    The payloads are ``OrderUpdated`` documents with the same fields, value formats and
    so size as ``consumer.updates.build_update``'s; rows of many orders interleave, each
    order's versions in order.
    """
    rng = random.Random(seed)
    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    orders: list[_Order] = []
    target_orders = max(1, count // ROWS_PER_ORDER)
    made = 0
    chunk: Chunk = []
    for n in range(count):
        if (len(orders) < 64 and made < target_orders) or not orders:
            chosen = [
                (sku, price, rng.randint(1, 3))
                for sku, price in rng.sample(PRODUCTS, rng.randint(1, 3))
            ]
            email, name = rng.choice(CUSTOMERS)
            orders.append(
                _Order(
                    id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    email=email,
                    name=name,
                    lines=[
                        {"sku": sku, "quantity": quantity, "unit_price": str(price)}
                        for sku, price, quantity in chosen
                    ],
                    total=str(sum((p * q for _, p, q in chosen), Decimal(0))),
                    created_at=timestamp(epoch + timedelta(seconds=n)),
                )
            )
            made += 1
        lane = rng.randrange(len(orders))
        order = orders[lane]
        step = order.version
        order.version += 1
        if order.version == ROWS_PER_ORDER:
            orders.pop(lane)
        causation_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        document = {
            "event_id": event_id,
            "event_type": "OrderUpdated",
            "schema_version": 1,
            "occurred_at": timestamp(epoch + timedelta(seconds=n, microseconds=n % 999983)),
            "causation_id": causation_id,
            "order_id": order.id,
            "order_version": order.version,
            "change": CHANGES[step],
            "order": {
                "id": order.id,
                "status": STATUSES[step],
                "currency": "EUR",
                "total": order.total,
                "customer": {"email": order.email, "name": order.name},
                "lines": order.lines,
                "created_at": order.created_at,
                "updated_at": timestamp(epoch + timedelta(seconds=n)),
            },
        }
        key = order.id.encode()
        headers = orjson.dumps(
            [
                ["event_id", event_id],
                ["event_type", "OrderUpdated"],
                ["content-type", "application/json"],
            ]
        ).decode()
        chunk.append((key, orjson.dumps(document), headers, shard_of(key)))
        if len(chunk) == LOAD_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def load_outbox(
    url: str, topic: str, rows: int, cached: list[Chunk] | None = None
) -> tuple[float, int]:
    """Empty the outbox and fill it with ``rows`` rows for ``topic``; (seconds, payload bytes).

    ``cached``: the rows, already generated (the same ones ``outbox_rows(rows)`` yields).
    """
    began = time.perf_counter()
    payload_bytes = 0
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "TRUNCATE outbox_messages, outbox_pending, outbox_throughput RESTART IDENTITY"
        )
        for chunk in cached if cached is not None else outbox_rows(rows):
            payload_bytes += sum(len(payload) for _, payload, _, _ in chunk)
            await connection.copy_records_to_table(
                "outbox_messages",
                columns=COLUMNS,
                records=[
                    (topic, key, payload, headers, shard) for key, payload, headers, shard in chunk
                ],
            )
        # Vacuumed too: otherwise autovacuum would start on the freshly loaded rows (and
        # their pending ids, which the insert trigger wrote) in the middle of the drain, and
        # be counted against whichever variant runs then.
        await connection.execute("VACUUM (ANALYZE) outbox_messages, outbox_pending")
    finally:
        await connection.close()
    return time.perf_counter() - began, payload_bytes


Message = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


async def read_messages(url: str) -> list[Message]:
    """The table's messages in id order, as the relay would send them."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT key, payload, headers::text AS headers FROM outbox_messages ORDER BY id"
        )
    finally:
        await connection.close()
    return [
        (
            row["key"],
            row["payload"],
            [(str(name), str(value).encode()) for name, value in orjson.loads(row["headers"])],
        )
        for row in rows
    ]


async def outbox_event_ids(url: str) -> tuple[set[bytes], set[bytes]]:
    """The ``event_id`` headers of the outbox's rows: (published, unpublished)."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT headers::text AS headers, "
            "NOT EXISTS (SELECT FROM outbox_pending AS p WHERE p.id = m.id) AS published "
            "FROM outbox_messages AS m"
        )
    finally:
        await connection.close()
    published: set[bytes] = set()
    unpublished: set[bytes] = set()
    for row in rows:
        event_id = event_id_of(
            (str(name), str(value).encode()) for name, value in orjson.loads(row["headers"])
        )
        if event_id is not None:
            (published if row["published"] else unpublished).add(event_id)
    return published, unpublished


async def outbox_state(url: str) -> tuple[int, int]:
    """(unpublished rows, all rows) of the outbox."""
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM outbox_pending) AS unpublished, "
            "(SELECT count(*) FROM outbox_messages) AS total"
        )
    finally:
        await connection.close()
    assert row is not None
    return int(row["unpublished"]), int(row["total"])


# --------------------------------------------------------------------------- measuring


@dataclass
class Measurement:
    name: str
    rows: int
    seconds: float
    note: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)
    #: CPU seconds each role used while it ran (see ``benchmarks.support.cpu_by_role``).
    cpu: Counter[str] = field(default_factory=Counter)
    #: Every record batch the run handed to a producer, and its ack (see ``ledger``).
    ledger: Ledger = field(default_factory=Ledger)

    @property
    def eps(self) -> float:
        return self.rows / self.seconds


def window_rate(samples: list[tuple[float, int]], total: int, low: float, high: float) -> float:
    """Rows/s while the published share went from ``low`` to ``high`` (fractions of ``total``).

    Measured between two samples: from the first one at or past ``low`` (past 0 for the
    first window: the first sample that shows progress, so start-up is not counted) to the
    first one at or past ``high``.
    """
    start = next((s for s in samples if (total - s[1]) > 0 and (total - s[1]) >= low * total), None)
    end = next((s for s in samples if (total - s[1]) >= high * total), None)
    if start is None or end is None or end[0] <= start[0]:
        return float("nan")
    return (start[1] - end[1]) / (end[0] - start[0])


@dataclass
class Drain:
    first_eps: float
    last_eps: float

    @property
    def ratio(self) -> float:
        return self.last_eps / self.first_eps


def drain_rates(measurement: Measurement) -> Drain:
    return Drain(
        first_eps=window_rate(measurement.samples, measurement.rows, 0.0, 0.1),
        last_eps=window_rate(measurement.samples, measurement.rows, 0.9, 1.0),
    )


async def run_baseline(services: Services, url: str, topic: str) -> Measurement:
    messages = await read_messages(url)
    producer = create_producer(kafka_settings(services))
    ledger = Ledger()
    await producer.start()
    try:
        cpu_before = cpu_by_role()
        began = time.perf_counter()
        deliveries = [
            await producer.send(topic, value=value, key=key, headers=headers)
            for key, value, headers in messages
        ]
        acks = await asyncio.gather(*deliveries)
        seconds = time.perf_counter() - began
        cpu = cpu_by_role() - cpu_before
    finally:
        await producer.stop()
    # Recorded after the timing: each message is its own ack (one offset each).
    for (_, _, headers), ack in zip(messages, acks, strict=True):
        ledger.add_ack("baseline", topic, ack.partition, ack.offset, [event_id_of(headers)])
    return Measurement(
        "baseline", len(messages), seconds, note="aiokafka, all in flight", cpu=cpu, ledger=ledger
    )


async def send_chunk(
    producer: RecordingProducer,
    topic: str,
    messages: list[Message],
    every: list[int],
    partitioner: DefaultPartitioner,
) -> list[asyncio.Future[Any]]:
    """One chunk as the relay hands over a batch (``outbox.relay.Relay._prepare`` and
    ``_send``): one record batch per partition (murmur2 of the key), a new one when it is
    full, each closed before it is handed over (so it does not wait for the linger)."""
    builders: dict[int, Any] = {}
    deliveries: list[asyncio.Future[Any]] = []
    for key, value, headers in messages:
        partition = partitioner(key, every, every)
        builder = builders.get(partition)
        if builder is None:
            builder = builders[partition] = producer.create_batch()
        if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
            deliveries.append(await producer.send_batch(builder, topic, partition=partition))
            builder = builders[partition] = producer.create_batch()
            if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                raise RuntimeError("a message does not fit an empty record batch")
    for partition, builder in builders.items():
        builder.close()
        deliveries.append(await producer.send_batch(builder, topic, partition=partition))
    return deliveries


async def run_raw_producers(
    services: Services, url: str, topic: str, producers: int, batch_rows: int
) -> Measurement:
    """``producers`` raw aiokafka producers, no relay and no database while sending, on
    the same partitions at once: each sends its share of the keys (by shard, as relays
    split them) in chunks of ``batch_rows`` messages built as the relay builds them, the
    next chunk once every ack of the last one is in (as a relay does)."""
    messages = await read_messages(url)
    shares: list[list[Message]] = [[] for _ in range(producers)]
    for message in messages:
        key = message[0]
        shares[shard_of(key) % producers if key is not None else 0].append(message)
    settings = kafka_settings(services)
    ledger = Ledger()
    clients = [create_producer(settings) for _ in range(producers)]

    async def send_share(producer: RecordingProducer, share: list[Message]) -> None:
        partitioner = DefaultPartitioner()
        every = sorted(await producer.partitions_for(topic))
        for start in range(0, len(share), batch_rows):
            chunk = share[start : start + batch_rows]
            await asyncio.gather(*await send_chunk(producer, topic, chunk, every, partitioner))

    try:
        for client in clients:
            await client.start()
        recording = [
            RecordingProducer(client, ledger, f"raw producer {n + 1}")
            for n, client in enumerate(clients)
        ]
        cpu_before = cpu_by_role()
        began = time.perf_counter()
        pairs = zip(recording, shares, strict=True)
        await asyncio.gather(*(send_share(producer, share) for producer, share in pairs))
        seconds = time.perf_counter() - began
        cpu = cpu_by_role() - cpu_before
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.stop()
    return Measurement(
        f"raw K={producers}",
        len(messages),
        seconds,
        note=f"send_batch, {batch_rows} per chunk, one chunk in flight per producer",
        cpu=cpu,
        ledger=ledger,
    )


async def run_relays(
    services: Services,
    url: str,
    relays: int,
    rows: int,
    *,
    profile: bool = False,
    retention_hours: float | None = None,
) -> Measurement:
    """``relays`` relays drain the ``rows`` unpublished rows (``retention_hours``: how long
    they keep published rows, else the default)."""
    settings = kafka_settings(services, url)
    if retention_hours is not None:
        settings = settings.with_overrides(outbox_retention_hours=retention_hours)
    engines = [create_engine(settings, pool_size=1) for _ in range(relays)]
    producers = [create_producer(settings) for _ in range(relays)]
    ledger = Ledger()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    watcher = await asyncpg.connect(url)
    profiler = None
    if profile:
        try:
            from pyinstrument import Profiler
        except ImportError:
            print("--profile: pyinstrument is not installed; running without it", file=sys.stderr)
        else:
            profiler = Profiler(interval=0.001, async_mode="disabled")
    try:
        for producer in producers:
            await producer.start()
        # Each relay's producer records every record batch handed to it and its ack.
        instances = [
            Relay(
                engine,
                RecordingProducer(producer, ledger, f"relay {n + 1}"),
                relay_config(settings),
            )
            for n, (engine, producer) in enumerate(zip(engines, producers, strict=True))
        ]
        if profiler is not None:
            profiler.start()
        cpu_before = cpu_by_role()
        began = time.perf_counter()
        tasks = [asyncio.create_task(relay.run(stop)) for relay in instances]
        samples = [(0.0, rows)]
        last_change, last_remaining = began, rows
        tick = began
        while True:
            moment = time.perf_counter()
            # Progress from the relays' own counts (rows marked): polling the table for it
            # would cost the database more than the relays' own statements.
            remaining = max(0, rows - sum(relay.stats.published for relay in instances))
            if remaining == 0:
                # The table decides when the drain is over.
                remaining = int(await watcher.fetchval(COUNT_UNPUBLISHED))
            samples.append((moment - began, remaining))
            if remaining == 0:
                seconds = moment - began
                cpu = cpu_by_role() - cpu_before
                owned = [len(relay.owned_shards) for relay in instances]
                break
            if remaining != last_remaining:
                last_change, last_remaining = moment, remaining
            for task in tasks:
                if task.done():
                    task.result()
                    raise RuntimeError(f"a relay stopped with {remaining} rows unpublished")
            if moment - last_change > STALL_SECONDS:
                owned = ", ".join(str(relay.stats.owned_shards) for relay in instances)
                raise RuntimeError(
                    f"relays published nothing for {STALL_SECONDS:.0f} s ({remaining} left; "
                    f"shards owned per relay: {owned})"
                )
            tick += POLL_SECONDS
            await asyncio.sleep(max(0.0, tick - time.perf_counter()))
        if profiler is not None:
            profiler.stop()
    finally:
        stop.set()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            if not task.done():
                task.cancel()
        for producer in producers:
            with contextlib.suppress(Exception):
                await producer.stop()
        for engine in engines:
            await engine.dispose()
        await watcher.close()
        if profiler is not None and profiler.is_running:
            profiler.stop()
    measurement = Measurement(
        f"relay K={relays}", rows, seconds, samples=samples, cpu=cpu, ledger=ledger
    )
    measurement.note = "; ".join(
        f"{relay.stats.published} rows/{relay.stats.batches} batches/{shards} shards"
        for relay, shards in zip(instances, owned, strict=True)
    )
    if profiler is not None:
        measurement.note += "; under pyinstrument"
        print(profiler.output_text(unicode=True, color=False), file=sys.stderr)
    return measurement


# --------------------------------------------------------------------------- driver


@dataclass
class Run:
    services: Services
    suffix: str
    topics: list[str] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)

    async def topic(self, variant: str, partitions: int) -> str:
        name = f"bench.relay.{variant}.{self.suffix}"
        self.topics.append(name)
        await ensure_topics(kafka_settings(self.services), [name], partitions=partitions)
        return name


@dataclass
class Checked:
    """One stage's topic against its acks and the outbox; ``problems`` empty when sound."""

    name: str
    audit: Audit
    problems: list[str]


async def check(
    services: Services,
    url: str,
    measurement: Measurement,
    topic: str,
    rows: int,
    partitions: int,
    *,
    marks: bool,
) -> Checked:
    """Check a stage's topic record by record (``benchmarks.ledger.audit``: acked ranges
    disjoint and covering each partition, the log read back offset by offset against
    them) and against the outbox: every row's ``event_id`` on the topic, and (``marks``:
    the relays' stages) every row published, none of them without an ack."""
    name = measurement.name
    found = await audit(
        name, services.bootstrap_servers, measurement.ledger, topic, range(partitions)
    )
    published, unpublished = await outbox_event_ids(url)
    expected = published | unpublished
    in_log = found.log.event_ids()
    acked = {event_id for produce in found.acked for event_id in produce.event_ids}
    problems = list(found.findings.problems)
    if len(expected) != rows:
        problems.append(f"the outbox holds {len(expected)} distinct event_ids, not {rows}")
    if marks and unpublished:
        problems.append(f"{len(unpublished)} outbox rows were left unpublished")
    never_acked = published - acked if marks else set()
    if never_acked:
        problems.append(
            f"ORDERFLOW: {len(never_acked)} rows were marked published but no ack carried "
            f"their event_id (e.g. {_ids(never_acked)})"
        )
    absent = expected - in_log
    if absent:
        lost = absent & acked
        problems.append(
            f"{len(absent)} of the outbox's {len(expected)} event_ids are not on the topic: "
            f"{len(lost)} of them were acked (see the offsets above: lost by the broker or "
            f"skipped by the reader), {len(absent - acked)} never were"
        )
    say(
        f"  {name}: outbox rows={len(expected)} unpublished={len(unpublished)} topic "
        f"records={found.log.count} (distinct event_ids={len(in_log & expected)}) "
        f"expected {rows} {'ok' if not problems else 'MISMATCH'}"
    )
    say(found.summary())
    checked = Checked(name, found, problems)
    if problems or found.findings.broker or found.findings.notes:
        say(details(checked))
    return checked


def details(checked: Checked) -> str:
    lines = [f"  {checked.name} on {checked.audit.topic}:"]
    lines += [f"    PROBLEM {problem}" for problem in checked.problems]
    lines += [f"    BROKER {answer}" for answer in checked.audit.findings.broker]
    lines += [f"    note: {note}" for note in checked.audit.findings.notes]
    lines += [f"    {line}" for line in checked.audit.reread]
    return "\n".join(lines)


def _ids(event_ids: set[bytes]) -> str:
    shown = sorted(event_ids)[:SHOWN]
    return ", ".join(e.decode(errors="replace") for e in shown) + (
        ", ..." if len(event_ids) > SHOWN else ""
    )


async def delete_topic(services: Services, topic: str) -> None:
    """Free the broker's memory (Tansu keeps it all in RAM) once a variant is checked."""
    client = AIOKafkaAdminClient(
        bootstrap_servers=services.bootstrap_servers, request_timeout_ms=15000
    )
    with contextlib.suppress(Exception):
        await client.start()
        await asyncio.wait_for(client.delete_topics([topic]), 10)
    with contextlib.suppress(Exception):
        await client.close()


@dataclass
class Outcome:
    results: list[Measurement]
    payload_bytes: int
    checked: list[Checked] = field(default_factory=list)

    @property
    def failed(self) -> list[Checked]:
        return [c for c in self.checked if c.problems]


async def benchmark(services: Services, args: argparse.Namespace) -> Outcome:
    run = Run(services, uuid.uuid4().hex[:10])
    try:
        return await _benchmark(run, args)
    finally:
        await cleanup(run)


async def _benchmark(run: Run, args: argparse.Namespace) -> Outcome:
    services, rows = run.services, args.rows
    say(f"services: {services.origin}")
    name = f"orderflow_bench_relay_{run.suffix}"
    run.databases.append(name)
    url = await create_database(services, name)
    outcome = Outcome([], 0)
    stages = args.loops * (len(args.relays) + (1 if args.raw_producers else 0))
    loads = stages + (0 if args.drain_check else 1)
    # Generating the rows takes a few seconds per 200000: do it once when they are reused.
    cached = list(outbox_rows(rows)) if loads > 1 else None

    async def finish(measurement: Measurement, topic: str, *, marks: bool) -> None:
        outcome.checked.append(
            await check(services, url, measurement, topic, rows, args.partitions, marks=marks)
        )
        await delete_topic(services, topic)

    if not args.drain_check:
        topic = await run.topic("baseline", args.partitions)
        seconds, outcome.payload_bytes = await load_outbox(url, topic, rows, cached)
        say(
            f"loaded {rows} outbox rows ({outcome.payload_bytes / rows:.0f} payload bytes on "
            f"average) in {seconds:.1f} s"
        )
        say("running baseline (raw aiokafka producer, every message in flight) ...")
        measurement = await run_baseline(services, url, topic)
        outcome.results.append(measurement)
        say(f"  {measurement.eps:.0f} events/s")
        await finish(measurement, topic, marks=False)

    for loop in range(args.loops):
        lap = f" (loop {loop + 1} of {args.loops})" if args.loops > 1 else ""
        for relays in args.relays:
            topic = await run.topic(f"k{relays}.{loop}", args.partitions)
            seconds, outcome.payload_bytes = await load_outbox(url, topic, rows, cached)
            say(f"loaded {rows} outbox rows for K={relays} in {seconds:.1f} s")
            say(f"running {relays} relay(s) (in-process, own engine and producer each){lap} ...")
            measurement = await run_relays(
                services,
                url,
                relays,
                rows,
                profile=args.profile and relays == args.relays[0] and loop == 0,
            )
            outcome.results.append(measurement)
            drain = drain_rates(measurement)
            say(
                f"  {measurement.eps:.0f} events/s; drain: first 10% {drain.first_eps:.0f} "
                f"rows/s, last 10% {drain.last_eps:.0f} rows/s (last/first {drain.ratio:.2f})"
            )
            if args.drain_check:
                say(deciles(measurement))
            await finish(measurement, topic, marks=True)
        if args.raw_producers:
            k = args.raw_producers
            topic = await run.topic(f"raw{k}.{loop}", args.partitions)
            await load_outbox(url, topic, rows, cached)
            say(f"running {k} raw producers (send_batch, same partitions at once){lap} ...")
            measurement = await run_raw_producers(
                services, url, topic, k, kafka_settings(services).relay_batch_size
            )
            outcome.results.append(measurement)
            say(f"  {measurement.eps:.0f} events/s")
            await finish(measurement, topic, marks=False)
    return outcome


def deciles(measurement: Measurement) -> str:
    out = io.StringIO()
    out.write(f"  {'published':>12} {'at s':>8} {'rows/s':>9}\n")
    for tenth in range(10):
        rate = window_rate(measurement.samples, measurement.rows, tenth / 10, (tenth + 1) / 10)
        reached = next(
            (
                t
                for t, remaining in measurement.samples
                if measurement.rows - remaining >= (tenth + 1) / 10 * measurement.rows
            ),
            float("nan"),
        )
        out.write(f"  {tenth * 10:>4}-{(tenth + 1) * 10:>3} % {reached:>8.2f} {rate:>9.0f}\n")
    return out.getvalue().rstrip()


async def cleanup(run: Run) -> None:
    for name in run.databases:
        with contextlib.suppress(Exception):
            await admin(run.services, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    client = AIOKafkaAdminClient(
        bootstrap_servers=run.services.bootstrap_servers, request_timeout_ms=15000
    )
    with contextlib.suppress(Exception):
        await client.start()
        existing = set(await asyncio.wait_for(client.list_topics(), 10))
        leftover = [topic for topic in run.topics if topic in existing]
        if leftover:
            await asyncio.wait_for(client.delete_topics(leftover), 10)
    with contextlib.suppress(Exception):
        await client.close()


def checks(outcome: Outcome) -> str:
    """Every stage's checks in one place: what was acked and read back, and what failed."""
    out = io.StringIO()
    acked = sum(c.audit.acked_records for c in outcome.checked)
    read = sum(c.audit.log.count for c in outcome.checked)
    batches = sum(len(c.audit.acked) for c in outcome.checked)
    failed = outcome.failed
    misled = [c for c in outcome.checked if c.audit.findings.broker and not c.problems]
    out.write(
        f"\nchecks: {len(outcome.checked)} stages; {batches} acked batches, {acked} acked "
        f"records, {read} records read back; "
        f"{'all sound' if not failed else f'{len(failed)} FAILED'}\n"
    )
    if misled:
        out.write(
            f"{len(misled)} stages sound, but the broker listed a wrong earliest offset "
            "(a reader starting from the beginning would have missed records; this one "
            "reads from offset 0):\n"
        )
    for checked in failed + misled:
        out.write(details(checked) + "\n")
    return out.getvalue().rstrip()


def report(results: list[Measurement], args: argparse.Namespace) -> str:
    by_name = {m.name: m for m in results}
    baseline = by_name.get("baseline")
    relays = [m for m in results if m.name.startswith("relay")]
    one = relays[0]
    out = io.StringIO()
    out.write(
        f"\n{'variant':<11} {'rows':>8} {'seconds':>8} {'events/s':>9} {'vs baseline':>11} "
        f"{'vs K=' + str(args.relays[0]):>8} {'last/first 10%':>14}  note\n"
    )
    for m in results:
        versus = f"{m.eps / baseline.eps:.2f}" if baseline else "-"
        scale = f"{m.eps / one.eps:.2f}" if m in relays else "-"
        drain = f"{drain_rates(m).ratio:.2f}" if m in relays else "-"
        out.write(
            f"{m.name:<11} {m.rows:>8} {m.seconds:>8.2f} {m.eps:>9.0f} {versus:>11} "
            f"{scale:>8} {drain:>14}  {m.note}\n"
        )
    out.write(
        "\nrelay: from the relays' start (connect, LISTEN, claim) until no unpublished row is "
        "left; baseline: from the first send to the last ack.\n"
    )
    out.write(
        "\nCPU per row (µs, user + system, from /proc; benchmark = this process: the producer"
    )
    out.write(" or the relays, and the watcher):\n")
    for m in results:
        roles = ", ".join(
            f"{role} {seconds / m.rows * 1e6:,.1f}" for role, seconds in m.cpu.most_common()
        )
        total = sum(m.cpu.values())
        out.write(f"  {m.name:<11} {roles}; all {total / m.rows * 1e6:,.1f}\n")
    if len(relays) > 1:
        steps = ", ".join(f"{m.name} {m.eps / one.eps:.2f}x" for m in relays[1:])
        out.write(f"scaling against {one.name}: {steps}\n")
    first = drain_rates(one)
    out.write(
        f"draining ({one.name}): first 10% {first.first_eps:.0f} rows/s, last 10% "
        f"{first.last_eps:.0f} rows/s, last/first {first.ratio:.2f}\n\n"
    )
    if baseline is None:
        out.write(
            f"RESULT relay_eps={one.eps:.0f} drain_first_eps={first.first_eps:.0f} "
            f"drain_last_eps={first.last_eps:.0f} drain_ratio={first.ratio:.2f}"
        )
    else:
        out.write(
            f"RESULT relay_eps={one.eps:.0f} baseline_eps={baseline.eps:.0f} "
            f"ratio={one.eps / baseline.eps:.2f}"
        )
    return out.getvalue()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help=f"outbox rows (default 200000; {DRAIN_CHECK_ROWS} with --drain-check)",
    )
    parser.add_argument(
        "--relays",
        default=None,
        help="comma-separated relay counts to measure (default 1,2,3; 1 with --drain-check)",
    )
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions of each topic (default 3)"
    )
    parser.add_argument(
        "--drain-check",
        action="store_true",
        help="only check that the last 10%% drain as fast as the first (slow: 1M rows)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the first relay run with pyinstrument (if installed); text to stderr",
    )
    parser.add_argument(
        "--loops",
        type=int,
        default=1,
        help="run each relay count (and --raw-producers) this many times, each on a fresh "
        "topic and a reloaded table, and check each (default 1)",
    )
    parser.add_argument(
        "--raw-producers",
        type=int,
        default=0,
        metavar="K",
        help="also run K raw aiokafka producers at once (no relay, no database) on the same "
        "partitions, batches built as the relay builds them, with the same checks",
    )
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = DRAIN_CHECK_ROWS if args.drain_check else 200000
    try:
        args.relays = [
            int(k) for k in (args.relays or ("1" if args.drain_check else "1,2,3")).split(",")
        ]
    except ValueError:
        parser.error("--relays must be comma-separated whole numbers, e.g. 1,2,3")
    if args.rows < 10 or args.partitions < 1 or min(args.relays) < 1:
        parser.error("--rows must be at least 10; --partitions and --relays at least 1")
    if args.loops < 1 or args.raw_producers < 0:
        parser.error("--loops must be at least 1, --raw-producers at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    began = time.perf_counter()
    with provide_services() as services:
        outcome = asyncio.run(benchmark(services, args))
    say(f"(whole run: {time.perf_counter() - began:.1f} s)")
    say(checks(outcome))
    say(report(outcome.results, args))
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
