"""``orderflow dev``: the whole system on one machine, with a live view of what flows.

Embedded PostgreSQL and Tansu (a Kafka-protocol broker) run as child processes; consume,
relay, a sample-traffic feeder and a subscriber run as tasks of this process, using the
same code as the real commands. Ctrl-C stops the tasks, then the children.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from consumer.intake import OrderConsumer
from consumer.models import Order
from orderflow.devstand.embedded import EmbeddedKafka, EmbeddedPostgres
from orderflow.runtime.migrate import upgrade_async
from orderflow.runtime.services import run_consumer, run_relay
from orderflow.runtime.settings import Settings
from orderflow.runtime.signals import stop_on_signals
from orderflow.runtime.topics import ensure_topics
from orderflow.runtime.wiring import create_engine, session_factory
from orderflow.tools.samples import SampleStream
from outbox.relay import Relay

#: Tansu holds each consumer-group join for half the session timeout: keep it short here.
DEV_SESSION_TIMEOUT_MS = 3000


@dataclass
class Flow:
    """What the live view shows."""

    produced: int = 0
    expected_faults: Counter[str] = field(default_factory=Counter)
    updates_read: int = 0
    update_ids: set[str] = field(default_factory=set)
    dead_letters_read: Counter[str] = field(default_factory=Counter)
    latest_updates: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    latest_dead_letters: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    statuses: dict[str, int] = field(default_factory=dict)
    consumer: OrderConsumer | None = None
    relay: Relay | None = None
    started: float = field(default_factory=time.monotonic)


async def run_dev(*, partitions: int, rate: float, duration: float | None) -> None:
    console = Console(soft_wrap=True)
    console.print("[bold]orderflow dev[/]: starting embedded PostgreSQL and Tansu...")
    postgres = EmbeddedPostgres()
    kafka = EmbeddedKafka()
    try:
        await asyncio.to_thread(postgres.start)
        await asyncio.to_thread(kafka.start)
        settings = Settings(
            database_url=postgres.url,
            kafka_bootstrap_servers=kafka.bootstrap_servers,
            kafka_idempotence=False,
            kafka_session_timeout_ms=DEV_SESSION_TIMEOUT_MS,
        )
        await ensure_topics(settings, partitions=partitions)
        engine = create_engine(settings, pool_size=2)
        try:
            await upgrade_async(engine)
            console.print(
                f"PostgreSQL: [cyan]{postgres.url}[/]   Kafka: [cyan]{kafka.bootstrap_servers}[/]\n"
                f"topics: {settings.inbound_topic} -> {settings.outbound_topic}, "
                f"dead letters -> {settings.dlq_topic} ({partitions} partitions each)"
            )
            await _run(settings, engine, console, rate=rate, duration=duration)
        finally:
            await engine.dispose()
    finally:
        await asyncio.to_thread(kafka.close)
        await asyncio.to_thread(postgres.close)
        console.print("stopped: no process left behind")


async def _run(
    settings: Settings,
    engine: AsyncEngine,
    console: Console,
    *,
    rate: float,
    duration: float | None,
) -> None:
    flow = Flow()
    stop = asyncio.Event()
    sessions = session_factory(engine)

    def consumer_ready(consumer: OrderConsumer) -> None:
        flow.consumer = consumer

    def relay_ready(relay: Relay) -> None:
        flow.relay = relay

    async def refresh_statuses() -> None:
        while not stop.is_set():
            async with sessions() as session:
                rows = await session.execute(
                    select(Order.status, func.count()).group_by(Order.status)
                )
                flow.statuses = {status: count for status, count in rows}
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def stop_later() -> None:
        if duration is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), duration)
            stop.set()

    with stop_on_signals(stop):
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(run_consumer(settings, stop, ready=consumer_ready))
            tasks.create_task(run_relay(settings, stop, ready=relay_ready))
            tasks.create_task(_feed(settings, stop, flow, rate))
            tasks.create_task(_subscribe(settings, stop, flow))
            tasks.create_task(refresh_statuses())
            tasks.create_task(stop_later())
            tasks.create_task(_show(console, stop, flow))
    console.print(_summary(flow))


async def _feed(settings: Settings, stop: asyncio.Event, flow: Flow, rate: float) -> None:
    """Upstream: a steady stream of sample order events, mistakes included."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.require_kafka(), enable_idempotence=False, linger_ms=5
    )
    await producer.start()
    try:
        # Racing producers too: every 8th order has two events the wrong way round.
        stream = SampleStream(seed=int(time.time()), race_every=8, clock=lambda: datetime.now(UTC))
        interval = 1.0 / rate
        next_send = time.monotonic()
        while not stop.is_set():
            message = next(stream)
            await producer.send(settings.inbound_topic, key=message.key, value=message.value)
            flow.produced += 1
            if message.expect != "event":
                flow.expected_faults[message.expect] += 1
            next_send += interval
            delay = next_send - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
    finally:
        await producer.stop()


async def _subscribe(settings: Settings, stop: asyncio.Event, flow: Flow) -> None:
    """Downstream: read order updates and dead letters, as a subscriber would."""
    reader = AIOKafkaConsumer(
        settings.outbound_topic,
        settings.dlq_topic,
        bootstrap_servers=settings.require_kafka(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await reader.start()
    try:
        while not stop.is_set():
            batches = await reader.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    headers = {
                        name: value.decode(errors="replace") for name, value in record.headers
                    }
                    clock = datetime.now().strftime("%H:%M:%S")
                    if record.topic == settings.dlq_topic:
                        reason = headers.get("error.reason", "?")
                        flow.dead_letters_read[reason] += 1
                        flow.latest_dead_letters.appendleft(
                            f"{clock}  {reason:<19} {headers.get('error.message', '')[:90]}"
                        )
                        continue
                    flow.updates_read += 1
                    update = orjson.loads(record.value or b"{}")
                    flow.update_ids.add(update.get("event_id", ""))
                    order = update.get("order", {})
                    order_id = str(update.get("order_id", ""))[:8]
                    flow.latest_updates.appendleft(
                        f"{clock}  {order_id}  v{update.get('order_version')}  "
                        f"{update.get('change', ''):<15} {order.get('status', ''):<10} "
                        f"{order.get('total', '')} {order.get('currency', '')}"
                    )
    finally:
        await reader.stop()


def _view(flow: Flow) -> Group:
    elapsed = max(0.001, time.monotonic() - flow.started)
    consumer = flow.consumer.stats if flow.consumer else None
    relay = flow.relay.stats if flow.relay else None
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("upstream produced", f"{flow.produced}  ({flow.produced / elapsed:.1f}/s)")
    if consumer is not None:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(consumer.dead_letters.items())) or "-"
        table.add_row("consumer applied", str(consumer.applied))
        table.add_row("duplicates skipped", str(consumer.duplicates))
        table.add_row(
            "parked",
            f"{sum(consumer.parked.values())} arrived early, "
            f"{sum(consumer.released.values())} released in order, "
            f"{consumer.waiting} waiting, {sum(consumer.expired.values())} expired",
        )
        table.add_row("dead-lettered", f"{sum(consumer.dead_letters.values())}  ({reasons})")
    if relay is not None:
        table.add_row("relay published", f"{relay.published}  (owns {relay.owned_shards} shards)")
    table.add_row(
        "subscriber read",
        f"{flow.updates_read} updates ({len(flow.update_ids)} distinct), "
        f"{sum(flow.dead_letters_read.values())} dead letters",
    )
    statuses = ", ".join(f"{s}={n}" for s, n in sorted(flow.statuses.items())) or "-"
    table.add_row("orders by status", statuses)
    updates = "\n".join(flow.latest_updates) or "(waiting for the first update)"
    dead = "\n".join(flow.latest_dead_letters) or "(none yet)"
    return Group(
        Panel(table, title="orderflow dev - Ctrl-C to stop", border_style="cyan"),
        Panel(updates, title="latest updates on orders.updates", border_style="green"),
        Panel(dead, title="latest dead letters", border_style="red"),
    )


async def _show(console: Console, stop: asyncio.Event, flow: Flow) -> None:
    if console.is_terminal:
        with Live(_view(flow), console=console, refresh_per_second=4) as live:
            while not stop.is_set():
                live.update(_view(flow))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)
            live.update(_view(flow))
        return
    while not stop.is_set():  # not a terminal: one line every few seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 3.0)
        print(_summary(flow), flush=True)


def _summary(flow: Flow) -> str:
    consumer = flow.consumer.stats if flow.consumer else None
    relay = flow.relay.stats if flow.relay else None
    parts = [f"produced={flow.produced}"]
    if consumer is not None:
        parts += [
            f"applied={consumer.applied}",
            f"duplicates={consumer.duplicates}",
            f"parked={sum(consumer.parked.values())}",
            f"released={sum(consumer.released.values())}",
            f"waiting={consumer.waiting}",
            f"dead_lettered={sum(consumer.dead_letters.values())}",
        ]
    if relay is not None:
        parts.append(f"published={relay.published}")
    parts.append(f"updates_read={flow.updates_read}")
    parts.append(f"dead_letters_read={sum(flow.dead_letters_read.values())}")
    return " ".join(parts)
