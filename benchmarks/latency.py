"""End-to-end latency: an inbound order event until its ``OrderUpdated`` reaches a subscriber.

    python benchmarks/latency.py [--rate 500] [--seconds 20] [--partitions P]

Uses ``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS`` when set, otherwise starts an embedded
PostgreSQL (durable: fsync on, as in production) and an embedded Tansu broker. In this one
process (or its children), against a fresh migrated database and fresh topics:

* the real consumer and relay: ``orderflow consume`` and ``orderflow relay`` processes
  (``--in-process``: ``run_consumer`` and ``run_relay`` as tasks of this process instead);
  for Tansu with idempotence off and a 3 s session timeout;
* an upstream producer (linger_ms=0, so that it adds no wait of its own) sending a steady
  ``--rate`` of sample events per second (``SampleStream``, no faults) for ``--seconds``,
  paced on a monotonic schedule (the i-th send is due at start + i/rate: no drift); the
  moment just before each ``send`` call is recorded by ``event_id``;
* a subscriber reading the fresh outbound topic from its beginning (no group) that takes,
  for each ``OrderUpdated``, its receive time minus the send time of its ``causation_id``.

Baseline, measured first in the same run with the same stream, producer and subscriber:
a bare forwarder process (this file run with ``--forward``) in place of consume and relay,
which consumes the inbound topic as the consumer does (a group; fetches wait at most 20 ms)
and produces each record straight to an outbound topic, without linger or database: what
the two trips through the broker cost on this machine at this rate.

Floor, measured second, the same way: the outbox pattern at its barest (this file run with
``--floor``): each fetch written with its offsets in one statement that commits and
notifies, and a relay that reads what is new and produces it, with no locks, duplicate
check or mark (see ``floor``). No outbox design can beat it, so it splits orderflow's
distance from the forwarder into the pattern's own cost (floor - forwarder) and
orderflow's (orderflow - floor).

Each stream is primed first (one event, end to end: the consumer has joined its group and
the relay owns its shards), and events sent in the first 2 s of the stream are not counted
(warm-up). Every counted event must come back. Afterwards the database's own timestamps
and the consumer's and relay's logs split each latency into stages (same clock: this
machine's): send -> the consumer's transaction start (``processed_at``; for the first
record of each batch also: send -> the consumer has it from the broker -> its batch starts,
from the batch's ``queued_ms``), -> its commit, -> the relay hands the batch to the
producer, -> every ack, -> the subscriber.

On Tansu, mind that a fetch is answered only after part of its ``fetch_max_wait_ms`` even
when records are waiting (Apache Kafka answers at once); the consumer waits at most 20 ms,
the subscriber here at most 10 ms.

The last line of output is machine-readable (``RESULT p50_ms=... p99_ms=... max_ms=...
baseline_p50_ms=... baseline_p99_ms=... floor_p50_ms=... floor_p99_ms=...``).
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
import bisect
import contextlib
import io
import logging
import math
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from benchmarks.support import (
    Services,
    admin,
    cpu_by_role,
    create_database,
    plain_url,
    provide_services,
    say,
)
from orderflow.runtime.services import run_consumer, run_relay
from orderflow.runtime.settings import Settings
from orderflow.runtime.topics import ensure_topics
from orderflow.tools.samples import SampleStream

T = TypeVar("T")
SEED = 20260102
WARM_UP_SECONDS = 2.0
#: The first (priming) event must come back within this long: group join, claims.
PRIME_TIMEOUT_SECONDS = 60.0
#: After the last send, every counted event must come back within this long.
DRAIN_TIMEOUT_SECONDS = 30.0
#: An embedded PostgreSQL keeps each transaction's commit time (for the stages).
COMMIT_TIMESTAMPS = (("track_commit_timestamp", "on"),)


# --------------------------------------------------------------------------- measuring


@dataclass
class Flow:
    """Send and receive times (``time.perf_counter``) by inbound ``event_id``."""

    sent: dict[str, float] = field(default_factory=dict)
    received: dict[str, float] = field(default_factory=dict)
    repeats: int = 0
    #: Sends that left more than 2 ms after their due time.
    late: int = 0
    #: ``time.time() - time.perf_counter()``: turns our times into the database's clock.
    wall_offset: float = field(default_factory=lambda: time.time() - time.perf_counter())
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(values)))
    return values[rank - 1]


async def subscribe(reader: AIOKafkaConsumer, flow: Flow, stop: asyncio.Event) -> None:
    while not stop.is_set():
        batches = await reader.getmany(timeout_ms=100)
        now = time.perf_counter()
        for records in batches.values():
            for record in records:
                update = orjson.loads(record.value or b"{}")
                causation_id = update.get("causation_id")
                if causation_id is None:
                    continue
                if causation_id in flow.received:
                    flow.repeats += 1
                    continue
                flow.received[causation_id] = now
        if batches:
            flow.arrived.set()


async def produce(
    producer: AIOKafkaProducer,
    topic: str,
    stream: SampleStream,
    flow: Flow,
    *,
    rate: float,
    seconds: float,
) -> tuple[float, int]:
    """Send ``rate`` events per second for ``seconds``; (start time, events sent).

    The i-th send is due at start + i/rate: a late send never delays the ones after it.
    """
    deliveries: list[asyncio.Future[object]] = []
    total = int(rate * seconds)
    began = time.perf_counter()
    for i in range(total):
        due = began + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        message = next(stream)
        event_id = orjson.loads(message.value or b"{}")["event_id"]
        flow.sent[event_id] = now = time.perf_counter()
        if now - due > 0.002:
            flow.late += 1
        deliveries.append(await producer.send(topic, key=message.key, value=message.value))
    await asyncio.gather(*deliveries)
    return began, total


async def until_received(flow: Flow, event_ids: list[str], seconds: float) -> None:
    """Until the updates of all ``event_ids`` arrived, or ``seconds`` passed."""
    pending = set(event_ids)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while pending := {event_id for event_id in pending if event_id not in flow.received}:
                flow.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flow.arrived.wait(), 0.5)


@dataclass
class Stages:
    """Per-event stage durations (ms): the database's timestamps, the consumer's and the
    relay's logs."""

    #: send -> the consumer's transaction starts (``processed_at``).
    to_consumer: list[float] = field(default_factory=list)
    #: Of that, for the first record of each of the consumer's batches (its log): send ->
    #: the consumer has it from the broker ...
    to_fetched: list[float] = field(default_factory=list)
    #: ... -> its batch starts (``queued_ms``: for the lane's previous batch, for a core).
    queued: list[float] = field(default_factory=list)
    #: -> the transaction commits (its commit timestamp; empty without
    #: ``track_commit_timestamp``, and the next stage then starts at the transaction start).
    transaction: list[float] = field(default_factory=list)
    #: -> the relay hands the message's batch to the producer.
    to_relay_send: list[float] = field(default_factory=list)
    #: -> the relay has every ack of that batch.
    produce: list[float] = field(default_factory=list)
    #: -> the subscriber receives it.
    to_subscriber: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RelayBatch:
    """One ``batch published`` line of the relay's log (times: seconds since the epoch)."""

    first_id: int
    last_id: int
    sent: float
    acked: float


@dataclass(frozen=True)
class ConsumerBatch:
    """One ``batch applied`` line of the consumer's log (times: seconds since the epoch)."""

    partition: int
    first_offset: int
    #: When the batch started, and when its first record had arrived from the broker.
    started: float
    fetched: float


#: A log line's fields, and when it was written (seconds since the epoch).
Logged = tuple[dict[str, Any], float]


class LoggedLines(logging.Handler):
    """Collects the in-process consumer's or relay's lines of one event."""

    def __init__(self, event: str) -> None:
        super().__init__(logging.INFO)
        self.event = event
        self.lines: list[Logged] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.event:
            self.lines.append((record.__dict__, record.created))


def logged_lines(path: Path, event: str) -> list[Logged]:
    """The lines of one event in a consumer's or relay's JSON log."""
    lines = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict) and entry.get("event") == event:
                lines.append((entry, datetime.fromisoformat(entry["timestamp"]).timestamp()))
    return lines


def relay_batch_times(lines: list[Logged]) -> list[RelayBatch]:
    """``batch published`` lines: logged once the batch's acks are in."""
    return [
        RelayBatch(
            int(fields["first_id"]),
            int(fields["last_id"]),
            logged - float(fields["duration_ms"]) / 1000,
            logged,
        )
        for fields, logged in lines
        if "first_id" in fields
    ]


def consumer_batch_times(lines: list[Logged]) -> list[ConsumerBatch]:
    """``batch applied`` lines: logged once the batch has committed."""
    batches = []
    for fields, logged in lines:
        if "queued_ms" in fields:
            started = logged - float(fields["duration_ms"]) / 1000
            fetched = started - float(fields["queued_ms"]) / 1000
            partition, first_offset = int(fields["partition"]), int(fields["first_offset"])
            batches.append(ConsumerBatch(partition, first_offset, started, fetched))
    return batches


async def stages(
    url: str,
    flow: Flow,
    counted: list[str],
    batches: list[RelayBatch],
    consumer_batches: list[ConsumerBatch],
) -> tuple[Stages, bool]:
    """The stages of every counted event, and whether commit timestamps were on."""
    connection = await asyncpg.connect(url)
    try:
        committing = await connection.fetchval("SHOW track_commit_timestamp") == "on"
        rows = await connection.fetch(
            f"""
            SELECT p.event_id::text AS event_id, o.id AS outbox_id, p.partition, p."offset",
                   extract(epoch FROM p.processed_at) AS processed,
                   {
                "extract(epoch FROM pg_xact_commit_timestamp(p.xmin))" if committing else "NULL"
            } AS committed
            FROM processed_events p
            JOIN outbox_messages o
              ON (convert_from(o.payload, 'UTF8')::jsonb ->> 'causation_id') = p.event_id::text
            WHERE p.event_id = ANY($1::uuid[])
            """,
            counted,
        )
    finally:
        await connection.close()
    # One relay, reading in id order: each batch covers an id range of its own.
    ordered = sorted(batches, key=lambda batch: batch.first_id)
    firsts = [batch.first_id for batch in ordered]
    # A batch that was tried again (after a transient fault) is logged once: the last try.
    first_records = {(batch.partition, batch.first_offset): batch for batch in consumer_batches}
    result = Stages()
    for row in rows:
        event_id = row["event_id"]
        sent = flow.sent[event_id] + flow.wall_offset
        received = flow.received[event_id] + flow.wall_offset
        processed = float(row["processed"])
        result.to_consumer.append((processed - sent) * 1000)
        consumed = first_records.get((row["partition"], row["offset"]))
        if consumed is not None:
            result.to_fetched.append((consumed.fetched - sent) * 1000)
            result.queued.append((consumed.started - consumed.fetched) * 1000)
        ready = processed
        if row["committed"] is not None:
            ready = float(row["committed"])
            result.transaction.append((ready - processed) * 1000)
        at = bisect.bisect_right(firsts, row["outbox_id"]) - 1
        if at < 0 or ordered[at].last_id < row["outbox_id"]:
            continue  # no batch line names it (cannot happen with one relay)
        batch = ordered[at]
        result.to_relay_send.append((batch.sent - ready) * 1000)
        result.produce.append((batch.acked - batch.sent) * 1000)
        result.to_subscriber.append((received - batch.acked) * 1000)
    return result, committing


# --------------------------------------------------------------------------- driver


@dataclass
class Measured:
    """One stream's send-to-subscriber latencies and the CPU spent meanwhile."""

    latencies_ms: list[float]
    sent: int
    counted: list[str]
    flow: Flow
    cpu_seconds: dict[str, float]
    cpu_window: float


@dataclass
class Outcome:
    latencies_ms: list[float]
    sent: int
    counted: int
    repeats: int
    stages: Stages
    #: Whether the server keeps commit timestamps (the transaction stage needs them).
    commit_timestamps: bool
    consumer_batches: int
    applied: int
    relay_batches: int
    published: int
    late_sends: int
    #: CPU seconds each role used during the measured traffic (see ``cpu_by_role``).
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: Wall seconds those were measured over.
    cpu_window: float = 0.0
    #: The same stream through a bare forwarder (no database), measured first.
    baseline: Measured | None = None
    #: The same stream through the outbox pattern at its barest (see ``floor``), second.
    floor: Measured | None = None


async def benchmark(services: Services, args: argparse.Namespace) -> Outcome:
    suffix = uuid.uuid4().hex[:10]
    database = f"orderflow_bench_latency_{suffix}"
    inbound = f"bench.latency.{suffix}"
    settings = Settings(
        database_url=None,
        kafka_bootstrap_servers=services.bootstrap_servers,
        inbound_topic=inbound,
        outbound_topic=f"{inbound}.updates",
        dlq_topic=f"{inbound}.dlq",
        consumer_group=f"bench-latency-{suffix}",
        kafka_idempotence=services.kafka_idempotence,
        kafka_session_timeout_ms=services.session_timeout_ms,
    )
    bare = settings.with_overrides(
        inbound_topic=f"{inbound}.bare",
        outbound_topic=f"{inbound}.bare.out",
        dlq_topic=f"{inbound}.bare.dlq",
        consumer_group=f"bench-latency-bare-{suffix}",
    )
    lowest = settings.with_overrides(
        inbound_topic=f"{inbound}.floor",
        outbound_topic=f"{inbound}.floor.out",
        dlq_topic=f"{inbound}.floor.dlq",
        consumer_group=f"bench-latency-floor-{suffix}",
    )
    try:
        url = await create_database(services, database)
        settings = settings.with_overrides(database_url=url)
        for topics in (settings, bare, lowest):
            await ensure_topics(topics, partitions=args.partitions)
        say(f"services: {services.origin}")
        say("baseline: the same stream through a bare forwarder (consume, produce; no database)")
        baseline = await measure(
            services,
            bare,
            args,
            lambda stop: ([], [start_middle(bare, "--forward")]),
        )
        say(f"  p50 {percentile(baseline.latencies_ms, 0.5):.1f} ms")
        say("floor: the outbox pattern at its barest (one statement a fetch, a relay that reads)")
        floored = await measure(
            services,
            lowest,
            args,
            lambda stop: ([], [start_middle(lowest.with_overrides(database_url=url), "--floor")]),
        )
        say(f"  p50 {percentile(floored.latencies_ms, 0.5):.1f} ms")
        say("orderflow: `orderflow consume` and `orderflow relay`")
        outcome = await _benchmark(services, settings, url, args)
        outcome.baseline = baseline
        outcome.floor = floored
        return outcome
    finally:
        await cleanup(services, settings, database)
        await cleanup(services, bare, None)
        await cleanup(services, lowest, None)


def eager_producer(bootstrap_servers: str | list[str], idempotence: bool) -> AIOKafkaProducer:
    """A producer that adds no wait of its own (linger_ms=0), acks from all replicas."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        linger_ms=0,
        enable_idempotence=idempotence,
    )


#: Starts what lies between the producer and the subscriber: (tasks, processes).
Starter = Callable[[asyncio.Event], tuple[list[asyncio.Task[None]], list[subprocess.Popen[bytes]]]]


async def measure(
    services: Services, settings: Settings, args: argparse.Namespace, start: Starter
) -> Measured:
    """Send the sample stream to ``settings.inbound_topic`` and time each event until its
    update (an outbound record whose ``causation_id`` is the event's id) reaches a
    subscriber of ``settings.outbound_topic``; ``start`` starts what lies in between."""
    stop = asyncio.Event()
    flow = Flow()
    reader = AIOKafkaConsumer(
        settings.outbound_topic,
        bootstrap_servers=services.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",  # a fresh topic: its beginning is where we start
        enable_auto_commit=False,
        fetch_max_wait_ms=10,  # the measuring end must not wait for more data
    )
    producer = eager_producer(services.bootstrap_servers, services.kafka_idempotence)
    await reader.start()
    await producer.start()
    tasks: list[asyncio.Task[None]] = []
    processes: list[subprocess.Popen[bytes]] = []
    try:
        tasks, processes = start(stop)
        tasks = [*tasks, *(asyncio.create_task(until_exit(process)) for process in processes)]
        tasks.append(asyncio.create_task(subscribe(reader, flow, stop)))
        stream = SampleStream(seed=SEED, fault_every=0, clock=lambda: datetime.now(UTC))

        # Prime: one event all the way through (group joined, shards claimed).
        began = time.perf_counter()
        await produce(producer, settings.inbound_topic, stream, flow, rate=1, seconds=1)
        first = next(iter(flow.sent))
        await watch(tasks, until_received(flow, [first], PRIME_TIMEOUT_SECONDS))
        if first not in flow.received:
            raise RuntimeError(f"no update came back within {PRIME_TIMEOUT_SECONDS:.0f} s")
        say(f"  ready after {time.perf_counter() - began:.1f} s (first event round trip)")

        say(f"  sending {args.rate:g} events/s for {args.seconds:g} s ...")
        primed = set(flow.sent)
        flow.late = 0
        cpu_before, window_began = cpu_by_role(), time.perf_counter()
        started, total = await watch(
            tasks,
            produce(
                producer,
                settings.inbound_topic,
                stream,
                flow,
                rate=args.rate,
                seconds=args.seconds,
            ),
        )
        counted = [
            event_id
            for event_id, at in flow.sent.items()
            if event_id not in primed and at >= started + WARM_UP_SECONDS
        ]
        await watch(tasks, until_received(flow, counted, DRAIN_TIMEOUT_SECONDS))
        cpu_after, window = cpu_by_role(), time.perf_counter() - window_began
        cpu_seconds = {role: cpu_after[role] - cpu_before.get(role, 0.0) for role in cpu_after}
        missing = [event_id for event_id in counted if event_id not in flow.received]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(counted)} counted events got no update within "
                f"{DRAIN_TIMEOUT_SECONDS:.0f} s of the last send"
            )
    finally:
        stop.set()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        if tasks:
            await asyncio.wait(tasks, timeout=40)
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for task in tasks:
            if not task.done():
                task.cancel()
        await producer.stop()
        await reader.stop()
    return Measured(
        latencies_ms=sorted((flow.received[e] - flow.sent[e]) * 1000 for e in counted),
        sent=total,
        counted=counted,
        flow=flow,
        cpu_seconds=cpu_seconds,
        cpu_window=window,
    )


async def _benchmark(
    services: Services, settings: Settings, url: str, args: argparse.Namespace
) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="orderflow-latency-") as scratch:
        relay_log, consumer_log = Path(scratch) / "relay.log", Path(scratch) / "consume.log"
        publish_lines, apply_lines = LoggedLines("batch published"), LoggedLines("batch applied")
        relay_logger = logging.getLogger("orderflow.relay")
        consumer_logger = logging.getLogger("orderflow.consumer")

        def start(
            stop: asyncio.Event,
        ) -> tuple[list[asyncio.Task[None]], list[subprocess.Popen[bytes]]]:
            if args.in_process:
                relay_logger.setLevel(logging.INFO)
                relay_logger.addHandler(publish_lines)
                consumer_logger.setLevel(logging.INFO)
                consumer_logger.addHandler(apply_lines)
                return [
                    asyncio.create_task(run_consumer(settings, stop)),
                    asyncio.create_task(run_relay(settings, stop)),
                ], []
            return [], [
                # Both at INFO (their default), in JSON, one line a batch: the consumer's
                # "batch applied" lines tell when each batch started and how long its first
                # record had waited since its fetch; the relay's "batch published" lines
                # time each batch's send and acks.
                start_process("consume", settings, log=consumer_log),
                start_process("relay", settings, log=relay_log),
            ]

        try:
            measured = await measure(services, settings, args, start)
        finally:
            relay_logger.removeHandler(publish_lines)
            consumer_logger.removeHandler(apply_lines)
        if not args.in_process:
            publish_lines.lines = logged_lines(relay_log, publish_lines.event)
            apply_lines.lines = logged_lines(consumer_log, apply_lines.event)
    # Read after the stop: the relay's last batch is marked (and counted) by then.
    consumer_batches, applied, published = await counts(url)
    relay_batches = relay_batch_times(publish_lines.lines)
    stage, commit_timestamps = await stages(
        url,
        measured.flow,
        measured.counted,
        relay_batches,
        consumer_batch_times(apply_lines.lines),
    )
    return Outcome(
        latencies_ms=measured.latencies_ms,
        sent=measured.sent,
        counted=len(measured.counted),
        repeats=measured.flow.repeats,
        stages=stage,
        commit_timestamps=commit_timestamps,
        consumer_batches=consumer_batches,
        applied=applied,
        # The relay logs each batch once its acks are in, right before its mark.
        relay_batches=len(relay_batches),
        published=published,
        late_sends=measured.flow.late,
        cpu_seconds=measured.cpu_seconds,
        cpu_window=measured.cpu_window,
    )


def group_consumer(settings: Settings) -> AIOKafkaConsumer:
    """The baselines' consumer of the inbound topic: as ``orderflow consume``'s (a group,
    fetches waiting at most 20 ms)."""
    return AIOKafkaConsumer(
        settings.inbound_topic,
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.consumer_group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=20,
        session_timeout_ms=settings.kafka_session_timeout_ms,
    )


async def forward(settings: Settings, stop: asyncio.Event) -> None:
    """The baseline's middle: every inbound record straight to the outbound topic (same
    key, an update naming it as its cause), no database. Consumes as ``orderflow
    consume`` does (a group, fetches waiting at most 20 ms) and produces without linger."""
    consumer = group_consumer(settings)
    producer = eager_producer(settings.require_kafka(), settings.kafka_idempotence)
    await consumer.start()
    await producer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    event_id = orjson.loads(record.value or b"{}").get("event_id")
                    update = orjson.dumps({"causation_id": event_id})
                    await producer.send(settings.outbound_topic, key=record.key, value=update)
    finally:
        await producer.stop()
        await consumer.stop()


#: The floor's tables: an outbox of finished messages, and the inbound offsets.
FLOOR_SCHEMA = """
    CREATE TABLE IF NOT EXISTS floor_outbox (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key bytea,
        payload bytea NOT NULL
    );
    CREATE TABLE IF NOT EXISTS floor_offsets (
        topic text NOT NULL,
        partition int NOT NULL,
        next_offset bigint NOT NULL,
        PRIMARY KEY (topic, partition)
    )
"""
#: One fetch's records and offsets, and the relay's wake-up: one statement, so one
#: round trip and one (fsync'ed) commit.
FLOOR_APPLY = """
    WITH written AS (
        INSERT INTO floor_outbox (key, payload)
        SELECT * FROM unnest(CAST($1 AS bytea[]), CAST($2 AS bytea[]))
    ), advanced AS (
        INSERT INTO floor_offsets (topic, partition, next_offset)
        SELECT $3, * FROM unnest(CAST($4 AS int[]), CAST($5 AS bigint[]))
        ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset
    )
    SELECT pg_notify('floor_outbox', '')
"""
FLOOR_FETCH = "SELECT id, key, payload FROM floor_outbox WHERE id > $1 ORDER BY id"


async def floor(settings: Settings, stop: asyncio.Event) -> None:
    """The floor's middle: the outbox pattern with nothing but its unavoidable steps. Each
    fetch (consumed as the forwarder consumes) is written with its offsets in one
    statement, one committing transaction, which notifies; a relay on its own connection
    wakes, reads what is new in id order, produces it as the forwarder does and awaits
    the acks before it reads again. No per-order reads or locks, no duplicate check, no
    mark: the relay keeps its position in memory. (Only one writer, so ids commit in
    order and that position skips nothing.) Whatever a real outbox adds to this can only
    make it slower: no outbox design on this machine beats what this achieves."""
    url = plain_url(settings.database_url or "")
    writer = await asyncpg.connect(url)
    reader = await asyncpg.connect(url)
    consumer = group_consumer(settings)
    producer = eager_producer(settings.require_kafka(), settings.kafka_idempotence)
    await writer.execute(FLOOR_SCHEMA)
    await consumer.start()
    await producer.start()
    relaying = asyncio.create_task(floor_relay(reader, producer, settings.outbound_topic, stop))
    try:
        while not stop.is_set() and not relaying.done():
            batches = await consumer.getmany(timeout_ms=100)
            if not batches:
                continue
            keys: list[bytes | None] = []
            values: list[bytes] = []
            for records in batches.values():
                for record in records:
                    event_id = orjson.loads(record.value or b"{}").get("event_id")
                    keys.append(record.key)
                    values.append(orjson.dumps({"causation_id": event_id}))
            await writer.execute(
                FLOOR_APPLY,
                keys,
                values,
                settings.inbound_topic,
                [partition.partition for partition in batches],
                [records[-1].offset + 1 for records in batches.values()],
            )
    finally:
        stop.set()
        await asyncio.wait({relaying}, timeout=5)
        await producer.stop()
        await consumer.stop()
        await writer.close()
        await reader.close()
    relaying.result()


async def floor_relay(
    connection: asyncpg.Connection, producer: AIOKafkaProducer, topic: str, stop: asyncio.Event
) -> None:
    woken = asyncio.Event()
    await connection.add_listener("floor_outbox", lambda *_: woken.set())
    position = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), 0.5)
        woken.clear()
        rows = await connection.fetch(FLOOR_FETCH, position)
        if not rows:
            continue
        acks = [await producer.send(topic, key=row[1], value=row[2]) for row in rows]
        await asyncio.gather(*acks)
        position = rows[-1][0]


def run_middle(middle: Callable[[Settings, asyncio.Event], Awaitable[None]]) -> int:
    """``latency.py --forward`` / ``--floor``: that process, configured by the environment."""
    settings = Settings.from_env()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await middle(settings, stop)

    asyncio.run(serve())
    return 0


def start_middle(settings: Settings, which: str) -> subprocess.Popen[bytes]:
    """This file run as ``--forward`` or ``--floor``, configured as ``settings``."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), which],
        env=service_environment(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def service_environment(settings: Settings) -> dict[str, str]:
    """The environment that configures a service as ``settings``."""
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url or "",
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
        "ORDERFLOW_INBOUND_TOPIC": settings.inbound_topic,
        "ORDERFLOW_OUTBOUND_TOPIC": settings.outbound_topic,
        "ORDERFLOW_DLQ_TOPIC": settings.dlq_topic,
        "ORDERFLOW_CONSUMER_GROUP": settings.consumer_group,
        "ORDERFLOW_KAFKA_IDEMPOTENCE": "true" if settings.kafka_idempotence else "false",
        "ORDERFLOW_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
    }


def start_process(
    command: str, settings: Settings, *, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``orderflow <command>`` configured as ``settings``: warnings to our stderr, or
    everything from INFO up, as JSON lines, to ``log``."""
    environment = service_environment(settings)
    level = "WARNING"
    stderr: int | io.BufferedWriter | None = None
    if log is not None:
        environment["ORDERFLOW_LOG_FORMAT"] = "json"
        level = "INFO"
        stderr = log.open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "orderflow", command, "--log-level", level],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    finally:
        if stderr is not None:
            stderr.close()


async def until_exit(process: subprocess.Popen[bytes]) -> None:
    await asyncio.to_thread(process.wait)
    if process.returncode != 0:
        raise RuntimeError(f"{process.args} exited with code {process.returncode}")


async def counts(url: str) -> tuple[int, int, int]:
    """(consumer transactions, applied, published), from the database: rows of one
    transaction share their ``now()``; a published message's id is no longer pending."""
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(
            """
            SELECT (SELECT count(DISTINCT processed_at) FROM processed_events) AS transactions,
                   (SELECT count(*) FROM processed_events) AS applied,
                   (SELECT count(*) FROM outbox_messages AS m
                    WHERE NOT EXISTS (SELECT FROM outbox_pending AS p WHERE p.id = m.id))
                       AS published
            """
        )
    finally:
        await connection.close()
    assert row is not None
    return row["transactions"], row["applied"], row["published"]


async def watch(tasks: list[asyncio.Task[None]], work: Awaitable[T]) -> T:
    """Await ``work``; fail at once if one of the services' ``tasks`` ends meanwhile."""
    job = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({job, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            if job in done:
                return job.result()
            for task in done:
                task.result()  # raises the service's error, if any
                raise RuntimeError("a service stopped before the measurement ended")
    finally:
        if not job.done():
            job.cancel()


async def cleanup(services: Services, settings: Settings, database: str | None) -> None:
    if database is not None:
        with contextlib.suppress(Exception):
            await admin(services, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    client = AIOKafkaAdminClient(
        bootstrap_servers=services.bootstrap_servers, request_timeout_ms=15000
    )
    with contextlib.suppress(Exception):
        await client.start()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.delete_consumer_groups([settings.consumer_group]), 10)
        with contextlib.suppress(Exception):
            existing = set(await asyncio.wait_for(client.list_topics(), 10))
            topics = [settings.inbound_topic, settings.outbound_topic, settings.dlq_topic]
            await asyncio.wait_for(client.delete_topics([t for t in topics if t in existing]), 10)
    with contextlib.suppress(Exception):
        await client.close()


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return (
        f"p50 {percentile(ordered, 0.5):7.1f}  p90 {percentile(ordered, 0.9):7.1f}  "
        f"p99 {percentile(ordered, 0.99):7.1f}  max {ordered[-1]:7.1f}"
    )


def report(outcome: Outcome, args: argparse.Namespace) -> str:
    values = outcome.latencies_ms
    p50, p90 = percentile(values, 0.5), percentile(values, 0.9)
    p99, top = percentile(values, 0.99), values[-1]
    out = io.StringIO()
    out.write(
        f"\nsent {outcome.sent} events at {args.rate:g}/s; counted {outcome.counted} "
        f"(the first {WARM_UP_SECONDS:g} s are warm-up); late sends (>2 ms behind schedule): "
        f"{outcome.late_sends}; repeated updates: {outcome.repeats}\n"
    )
    out.write(
        f"consumer: {outcome.applied} applied in {outcome.consumer_batches} transactions "
        f"({outcome.applied / max(1, outcome.consumer_batches):.1f} per transaction); "
        f"relay: {outcome.published} published in {outcome.relay_batches} batches "
        f"({outcome.published / max(1, outcome.relay_batches):.1f} per batch)\n\n"
    )
    out.write("end to end (ms), send -> subscriber:\n")
    out.write(
        f"  count {len(values)}  p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  max {top:.1f}\n"
    )
    out.write("stages (ms), from the database's timestamps and the consumer's and relay's logs:\n")
    stage = outcome.stages
    out.write(f"  send -> consumer transaction start     {summary(stage.to_consumer)}\n")
    if stage.queued:
        out.write(f"    (the first record of each of its {len(stage.queued)} batches:)\n")
        out.write(f"    send -> the consumer has it         {summary(stage.to_fetched)}\n")
        out.write(f"    -> its batch starts                 {summary(stage.queued)}\n")
    if outcome.commit_timestamps:
        out.write(f"  -> its commit                         {summary(stage.transaction)}\n")
        out.write(f"  -> relay hands its batch to producer  {summary(stage.to_relay_send)}\n")
    else:
        out.write("  -> its commit                         - (track_commit_timestamp is off)\n")
        out.write(f"  (from the start) -> relay hands over  {summary(stage.to_relay_send)}\n")
    out.write(f"  -> every ack of that batch            {summary(stage.produce)}\n")
    out.write(f"  -> subscriber receives it             {summary(stage.to_subscriber)}\n")
    out.write(
        "  (each from the one before; the subscriber may have a message a little before the "
        "relay has read its ack: the last stage can be negative)\n\n"
    )
    if outcome.cpu_seconds:
        out.write(
            "CPU per event (µs, user + system, from /proc): "
            f"{cpu_summary(outcome.cpu_seconds, outcome.sent, outcome.cpu_window)}\n\n"
        )
    result = f"RESULT p50_ms={p50:.1f} p99_ms={p99:.1f} max_ms={top:.1f}"
    base: tuple[float, float] | None = None
    if outcome.baseline is not None:
        base = compared(
            out,
            outcome.baseline,
            "baseline, the same stream through a bare forwarder process (consume, produce, no "
            "database), measured first in this run",
            (p50, p99),
        )
        result += f" baseline_p50_ms={base[0]:.1f} baseline_p99_ms={base[1]:.1f}"
    if outcome.floor is not None:
        floor_p50, floor_p99 = compared(
            out,
            outcome.floor,
            "floor, the same stream through the outbox pattern at its barest (one statement "
            "per fetch, a relay that only reads; see `floor`), measured second",
            (p50, p99),
        )
        if base is not None:
            out.write(
                f"the floor against the forwarder: p50 {floor_p50 / base[0]:.1f}x "
                f"({floor_p50 - base[0]:+.1f} ms), p99 {floor_p99 / base[1]:.1f}x\n\n"
            )
        result += f" floor_p50_ms={floor_p50:.1f} floor_p99_ms={floor_p99:.1f}"
    out.write(result)
    return out.getvalue()


def compared(
    out: io.StringIO, measured: Measured, title: str, orderflow: tuple[float, float]
) -> tuple[float, float]:
    """Write a baseline's figures and orderflow's (p50, p99) against them; its (p50, p99)."""
    values = measured.latencies_ms
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    cpu = cpu_summary(measured.cpu_seconds, measured.sent, measured.cpu_window)
    out.write(
        f"{title}:\n  count {len(values)}  {summary(values)}\n  CPU per event (µs): {cpu}\n"
        f"orderflow against it: p50 {orderflow[0] / p50:.1f}x, p99 {orderflow[1] / p99:.1f}x\n\n"
    )
    return p50, p99


def cpu_summary(cpu_seconds: dict[str, float], sent: int, window: float) -> str:
    """Each role's CPU per event (µs), then all of it, also as cores busy."""
    events = max(1, sent)
    total = sum(cpu_seconds.values())
    roles = ", ".join(
        f"{role} {seconds / events * 1e6:,.0f}"
        for role, seconds in sorted(cpu_seconds.items(), key=lambda item: -item[1])
        if seconds > 0
    )
    return (
        f"{roles}; all {total / events * 1e6:,.0f} = {total / max(window, 1e-9):.2f} of "
        f"{os.cpu_count()} cores"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=500, help="events per second (default 500)")
    parser.add_argument(
        "--seconds", type=float, default=20, help="seconds of steady traffic (default 20)"
    )
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions of each topic (default 3)"
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run consume and relay as tasks of this process instead of as `orderflow "
        "consume` / `orderflow relay` processes (they then share one event loop with the "
        "producer and the subscriber)",
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= WARM_UP_SECONDS or args.partitions < 1:
        parser.error(f"--rate must be positive, --seconds above {WARM_UP_SECONDS:g}")
    return args


def main(argv: list[str] | None = None) -> int:
    middle = {"--forward": forward, "--floor": floor}
    given = sys.argv[1:] if argv is None else argv
    if len(given) == 1 and given[0] in middle:
        return run_middle(middle[given[0]])
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        # Only warnings on the terminal, whatever a logger lets through (``--in-process``
        # lets the relay's batch lines through, to time its batches).
        handler.setLevel(logging.WARNING)
    # Stopped with SIGTERM (a timeout, say), go the way of Ctrl-C: the cleanup stops the
    # consume, relay and baseline processes it started in sessions of their own, which
    # would otherwise run on, their services gone, taking CPU from whatever runs next.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    began = time.perf_counter()
    with provide_services(COMMIT_TIMESTAMPS) as services:
        outcome = asyncio.run(benchmark(services, args))
    say(f"(whole run: {time.perf_counter() - began:.1f} s)")
    say(report(outcome, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
