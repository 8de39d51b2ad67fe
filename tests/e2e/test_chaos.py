"""Chaos with real ``orderflow consume`` processes: SIGKILL at random moments while a stream
with duplicates and poison flows, a consumer group whose members die, join and leave, and a
SIGTERM in the middle of a busy stream. Every test ends with the exact state a correct
consumer must reach (computed by the pure core in ``tests.helpers.expected_outcome``).

Between kills the tests also check the atomicity invariant in one database snapshot: the
effects stored (orders, processed events, outbox rows) are exactly those of the messages
below each partition's stored offset, never more, never fewer.

The consumers reach the database through a link with a few milliseconds of latency: a
consumer on a local database drains a thousand events in half a second, so random kills
would mostly find it idle. Over the slow link every kill finds work in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import islice

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from consumer.models import ConsumerOffset, Order, ParkedEvent, ProcessedEvent
from orderflow.runtime.settings import Settings
from orderflow.tools.samples import SampleStream
from outbox.models import OutboxRecord
from tests.e2e.processes import Launcher, Process
from tests.helpers import (
    Expected,
    TestEnv,
    decode_json,
    eventually,
    expected_outcome,
    header_map,
)
from tests.proxy import SlowLink, TcpProxy

pytestmark = pytest.mark.e2e

Message = tuple[bytes | None, bytes | None]


# --- processes --------------------------------------------------------------------------------


async def sigkill(process: Process) -> None:
    process.popen.kill()
    assert await process.exit_code(within=10) == -signal.SIGKILL, process.describe()


async def sigterm(process: Process, *, within: float = 35.0) -> float:
    """SIGTERM ``process``; it must exit 0 within ``within`` s, without a traceback."""
    started = time.monotonic()
    process.popen.send_signal(signal.SIGTERM)
    code = await process.exit_code(within=within)
    took = time.monotonic() - started
    assert code == 0, process.describe()
    assert "Traceback" not in process.stderr(), process.describe()
    return took


async def finish(task: asyncio.Future[None]) -> None:
    """Cancel ``task`` if it still runs, and wait for it to end."""
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def assert_all_running(processes: Sequence[Process]) -> None:
    for process in processes:
        process.assert_running()


def database_port(settings: Settings) -> int:
    """The port of the test database, when a local proxy can stand in front of it."""
    url = make_url(settings.database_url or "")
    if url.host not in {"127.0.0.1", "localhost"} or url.port is None:
        pytest.skip(f"the test database is not on this machine ({url.host}): no proxy possible")
    return url.port


def via(settings: Settings, proxy: TcpProxy) -> str:
    """The test database's URL through ``proxy``."""
    url = make_url(settings.database_url or "").set(host="127.0.0.1", port=proxy.port)
    return url.render_as_string(hide_password=False)


@pytest.fixture
async def slow_database(env: TestEnv) -> AsyncIterator[str]:
    """The test database's URL through a link with a few milliseconds of latency."""
    async with SlowLink(database_port(env.settings), delay=0.002) as link:
        yield via(env.settings, link)


# --- the stream -------------------------------------------------------------------------------


def sample_messages(
    count: int, *, seed: int, fault_every: int = 15, race_every: int = 0
) -> list[Message]:
    stream = SampleStream(seed=seed, fault_every=fault_every, race_every=race_every)
    return [(message.key, message.value) for message in islice(stream, count)]


class Stream:
    """Messages produced to the inbound topic, and where each one landed."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        #: (partition, offset) -> index in ``messages``, filled in as the broker acks.
        self.positions: dict[tuple[int, int], int] = {}
        self.produced = 0

    async def flow(
        self,
        settings: Settings,
        *,
        per_second: float,
        start: int = 0,
        stop: int | None = None,
        chunk: int = 10,
    ) -> None:
        """Produce ``messages[start:stop]``, ``chunk`` at a time, ``per_second`` on average."""
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.require_kafka(),
            enable_idempotence=settings.kafka_idempotence,
            acks="all",
            linger_ms=5,
        )
        await producer.start()
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            deliveries: list[asyncio.Future[RecordMetadata]] = []
            stop = len(self.messages) if stop is None else stop
            for sent, index in enumerate(range(start, stop)):
                if sent and sent % chunk == 0:
                    await asyncio.sleep(max(0.0, began + sent / per_second - loop.time()))
                key, value = self.messages[index]
                delivery = await producer.send(settings.inbound_topic, value=value, key=key)
                delivery.add_done_callback(functools.partial(self._acked, index))
                deliveries.append(delivery)
            await asyncio.gather(*deliveries)
        finally:
            await producer.stop()

    def _acked(self, index: int, delivery: asyncio.Future[RecordMetadata]) -> None:
        if not delivery.cancelled() and delivery.exception() is None:
            metadata = delivery.result()
            self.positions[(metadata.partition, metadata.offset)] = index
            self.produced += 1

    def end_offsets(self) -> dict[int, int]:
        ends: dict[int, int] = {}
        for partition, offset in self.positions:
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        return ends

    def below(self, offsets: dict[int, int]) -> list[Message] | None:
        """The messages below each partition's offset, in produce order (None: not all acked)."""
        indexes: list[int] = []
        for partition, end in offsets.items():
            for offset in range(end):
                index = self.positions.get((partition, offset))
                if index is None:
                    return None
                indexes.append(index)
        return [self.messages[index] for index in sorted(indexes)]


# --- the database, in one snapshot ------------------------------------------------------------


@dataclass
class Update:
    order_id: str
    version: int
    causation_id: str


@dataclass
class Snapshot:
    offsets: dict[int, int]
    orders: dict[uuid.UUID, tuple[str, Decimal, int]]
    processed: list[uuid.UUID]
    #: Outbox rows aimed at the outbound topic, in id order.
    updates: list[Update] = field(default_factory=list)
    #: Headers of the outbox rows aimed at the dead-letter topic.
    dead_letters: list[dict[str, str]] = field(default_factory=list)
    other_rows: int = 0
    #: Event ids of the parked events.
    parked: list[uuid.UUID] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return sum(self.offsets.values())


async def snapshot(env: TestEnv) -> Snapshot:
    """Offsets and effects read in one REPEATABLE READ transaction (one consistent view)."""
    settings = env.settings
    async with env.engine.connect() as connection:
        connection = await connection.execution_options(isolation_level="REPEATABLE READ")
        async with connection.begin():
            offsets = {
                partition: next_offset
                for partition, next_offset in await connection.execute(
                    select(ConsumerOffset.partition, ConsumerOffset.next_offset).where(
                        ConsumerOffset.group_id == settings.consumer_group,
                        ConsumerOffset.topic == settings.inbound_topic,
                    )
                )
            }
            orders = {
                order_id: (status, total, version)
                for order_id, status, total, version in await connection.execute(
                    select(Order.id, Order.status, Order.total, Order.version)
                )
            }
            processed = list((await connection.execute(select(ProcessedEvent.event_id))).scalars())
            parked = list((await connection.execute(select(ParkedEvent.event_id))).scalars())
            rows = list(
                await connection.execute(
                    select(OutboxRecord.topic, OutboxRecord.payload, OutboxRecord.headers).order_by(
                        OutboxRecord.id
                    )
                )
            )
    state = Snapshot(offsets=offsets, orders=orders, processed=processed, parked=parked)
    for topic, payload, headers in rows:
        if topic == settings.outbound_topic:
            document = decode_json(payload)
            state.updates.append(
                Update(document["order_id"], document["order_version"], document["causation_id"])
            )
        elif topic == settings.dlq_topic:
            state.dead_letters.append(header_map(headers))
        else:
            state.other_rows += 1
    return state


def assert_state(state: Snapshot, expected: Expected, *, at: str) -> None:
    """``state`` holds exactly the effects of ``expected``: each applied event once, no more."""
    where = f" ({at}; stored offsets {state.offsets})"
    assert state.orders == {
        order_id: (order.status.value, order.total, order.version)
        for order_id, order in expected.orders.items()
    }, f"orders differ{where}"
    assert len(state.processed) == len(expected.applied), f"processed events{where}"
    assert set(state.processed) == set(expected.applied), f"processed events differ{where}"
    causes = Counter(update.causation_id for update in state.updates)
    assert [cause for cause, times in causes.items() if times > 1] == [], f"repeated{where}"
    assert set(causes) == {str(event_id) for event_id in expected.applied}, f"updates{where}"
    versions: dict[str, list[int]] = {}
    for update in state.updates:  # in outbox id order
        versions.setdefault(update.order_id, []).append(update.version)
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values()), f"versions{where}"
    assert versions == {str(order_id): v for order_id, v in expected.updates.items()}, (
        f"versions differ{where}"
    )
    reasons = Counter(headers["error.reason"] for headers in state.dead_letters)
    assert reasons == expected.dead_letters, f"dead letters differ{where}"
    sources = Counter(
        (headers["source.partition"], headers["source.offset"]) for headers in state.dead_letters
    )
    assert [source for source, times in sources.items() if times > 1] == [], f"DLQ{where}"
    assert state.other_rows == 0, f"outbox rows for other topics{where}"
    assert sorted(state.parked) == sorted(expected.waiting), f"parked events differ{where}"


async def assert_consistent(
    env: TestEnv, stream: Stream, *, at: str, park: bool = False
) -> Snapshot:
    """The effects stored are exactly those of the messages below the stored offsets (with
    ``park``: as parking makes them, nothing expired yet)."""
    deadline = time.monotonic() + 10
    while True:
        state = await snapshot(env)
        below = stream.below(state.offsets)
        if below is not None:
            break
        # The consumer read a record before our producer saw its ack: wait for the ack.
        assert time.monotonic() < deadline, f"offsets {state.offsets} past the acked records"
        await asyncio.sleep(0.1)
    assert_state(state, expected_outcome(below, park=park, expire=False), at=at)
    return state


async def assert_exact_end_state(
    env: TestEnv, stream: Stream, *, at: str = "end", park: bool = False
) -> None:
    state = await snapshot(env)
    assert state.offsets == stream.end_offsets(), f"stored offsets ({at})"
    assert_state(state, expected_outcome(stream.messages, park=park, expire=False), at=at)


async def wait_drained(
    env: TestEnv, stream: Stream, processes: Sequence[Process], *, within: float = 60.0
) -> None:
    """Until every produced message is below its partition's stored offset."""
    deadline = time.monotonic() + within
    ends = stream.end_offsets()
    while True:
        assert_all_running(processes)
        state = await snapshot(env)
        if state.offsets == ends:
            return
        if time.monotonic() > deadline:
            logs = "\n\n".join(process.describe() for process in processes)
            pytest.fail(f"not drained within {within:.0f} s: {state.offsets} != {ends}\n{logs}")
        await asyncio.sleep(0.2)


async def stored_total(env: TestEnv) -> int:
    """The sum of the stored offsets: how many messages the group is done with."""
    async with env.sessions() as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(ConsumerOffset.next_offset), 0)).where(
                ConsumerOffset.group_id == env.settings.consumer_group,
                ConsumerOffset.topic == env.settings.inbound_topic,
            )
        )
    return int(total or 0)


async def wait_progress(env: TestEnv, stream: Stream, since: int, *, within: float) -> None:
    """Until the stored offsets moved past ``since``, or everything produced so far is done."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stored = await stored_total(env)
        if stored > since or (stored == stream.produced and stream.produced > 0):
            return
        await asyncio.sleep(0.05)


#: A killed member's partitions move once its session times out; a restarted member waits
#: for that. Short, so that a dozen kill-and-restart rounds fit in the test's time.
QUICK_TAKEOVER = {"ORDERFLOW_KAFKA_SESSION_TIMEOUT_MS": "1000"}

# --- SIGKILL, one consumer --------------------------------------------------------------------

#: Small batches, one partition at a time: a consumer stays busy long enough to be killed
#: at every step of its work.
BUSY = {"ORDERFLOW_CONSUMER_BATCH_SIZE": "40", "ORDERFLOW_DB_POOL_SIZE": "1"}


@pytest.mark.timeout(150)
async def test_sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice(
    env: TestEnv, slow_database: str, launch: Launcher
) -> None:
    settings = env.settings
    rng = random.Random(20261124)
    stream = Stream(sample_messages(4000, seed=41))
    expected = expected_outcome(stream.messages)
    assert expected.duplicates, "the stream must hold duplicates"
    assert expected.dead_letters, "the stream must hold poison"
    producing = asyncio.ensure_future(stream.flow(settings, per_second=100))
    kills: list[int] = []
    busy = 0  # kills that found work waiting (the consumer was not idle)
    try:
        for round_ in range(12):
            before = await stored_total(env)
            consumer = launch.start(
                "consume", settings, DATABASE_URL=slow_database, **BUSY, **QUICK_TAKEOVER
            )
            if rng.random() >= 0.25:  # else a kill while starting, joining the group or seeking
                await wait_progress(env, stream, before, within=20)
            await asyncio.sleep(rng.uniform(0.05, 1.5))
            consumer.assert_running()
            await sigkill(consumer)
            state = await assert_consistent(env, stream, at=f"after kill {round_ + 1}")
            kills.append(state.stored)
            busy += state.stored < stream.produced
        await producing
    finally:
        await finish(producing)
    assert len(set(kills)) > 6, f"the kills hit too few distinct moments: {kills}"
    assert busy >= 6, f"only {busy} of the kills found the consumer busy: {kills}"
    assert kills[-1] < len(stream.messages), f"killed too late to test anything: {kills}"

    consumer = launch.start("consume", settings, **BUSY)
    await wait_drained(env, stream, [consumer])
    await sigterm(consumer)
    await assert_exact_end_state(env, stream)


# --- SIGKILL in a consumer group, a member joining and leaving ---------------------------------


@pytest.mark.timeout(150)
async def test_a_group_with_members_killed_joining_and_leaving_ends_in_the_exact_state(
    env: TestEnv, slow_database: str, launch: Launcher
) -> None:
    settings = env.settings
    rng = random.Random(1337)
    stream = Stream(sample_messages(4000, seed=43))

    def member() -> Process:
        return launch.start("consume", settings, DATABASE_URL=slow_database, **BUSY)

    members = {name: member() for name in ("a", "b")}
    producing = asyncio.ensure_future(stream.flow(settings, per_second=120))
    kills: list[int] = []
    try:
        for round_ in range(8):
            if round_ == 2:
                members["c"] = member()  # joins mid-stream
            if round_ == 6:
                await sigterm(members.pop("c"))  # and leaves cleanly
            if rng.random() < 0.75:  # else a kill in the middle of a rebalance
                await wait_progress(env, stream, await stored_total(env), within=20)
            await asyncio.sleep(rng.uniform(0.05, 1.5))
            assert_all_running(list(members.values()))
            victim = rng.choice(sorted(members))
            await sigkill(members[victim])
            state = await assert_consistent(env, stream, at=f"after kill {round_ + 1}")
            kills.append(state.stored)
            members[victim] = member()
        await producing
    finally:
        await finish(producing)
    assert kills[-1] < len(stream.messages), f"killed too late to test anything: {kills}"

    await wait_drained(env, stream, list(members.values()))
    await asyncio.gather(*(sigterm(member) for member in members.values()))
    await assert_exact_end_state(env, stream)


# --- SIGKILL and rebalances while events are parked ---------------------------------------------


@pytest.mark.timeout(180)
async def test_a_group_killed_and_rebalanced_while_events_wait_releases_each_once(
    env: TestEnv, slow_database: str, launch: Launcher
) -> None:
    """Racing producers: every third order has two events the wrong way round, so events
    are parked all the time, and released by a later batch, maybe of another member after
    a rebalance or a kill. After every kill, and at the end, the database holds exactly
    what the contract's resequencing makes of the messages below the stored offsets: each
    early event applied once, in version order, or still parked — never lost, never twice."""
    settings = env.with_settings(park_timeout_s=600)  # nothing expires during the test
    rng = random.Random(2026)
    stream = Stream(sample_messages(3000, seed=47, race_every=3))
    expected = expected_outcome(stream.messages, park=True, expire=False)
    assert expected.released > 100, "the stream must make events wait"
    assert expected.waiting, "and some must still wait at the end"

    def member() -> Process:
        return launch.start("consume", settings, DATABASE_URL=slow_database, **BUSY)

    members = {name: member() for name in ("a", "b")}
    producing = asyncio.ensure_future(stream.flow(settings, per_second=120))
    kills: list[int] = []
    try:
        for round_ in range(8):
            if rng.random() < 0.75:  # else a kill in the middle of a rebalance
                await wait_progress(env, stream, await stored_total(env), within=20)
            await asyncio.sleep(rng.uniform(0.05, 1.5))
            assert_all_running(list(members.values()))
            victim = rng.choice(sorted(members))
            await sigkill(members[victim])
            state = await assert_consistent(env, stream, at=f"after kill {round_ + 1}", park=True)
            kills.append(state.stored)
            members[victim] = member()
        await producing
    finally:
        await finish(producing)
    assert kills[-1] < len(stream.messages), f"killed too late to test anything: {kills}"

    await wait_drained(env, stream, list(members.values()))
    await asyncio.gather(*(sigterm(member) for member in members.values()))
    await assert_exact_end_state(env, stream, park=True)


# --- SIGTERM while busy -------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_sigterm_while_busy_exits_0_in_time_with_consistent_offsets(
    env: TestEnv, slow_database: str, launch: Launcher
) -> None:
    settings = env.settings
    stream = Stream(sample_messages(3000, seed=47))
    consumer = launch.start("consume", settings, DATABASE_URL=slow_database, **BUSY)
    producing = asyncio.ensure_future(stream.flow(settings, per_second=300))
    try:
        await wait_progress(env, stream, 0, within=30)
        await asyncio.sleep(1.0)

        async def behind() -> None:
            # Chunks arrive every 33 ms and the consumer may catch up in between: signal
            # it while some are still to apply.
            assert await stored_total(env) < stream.produced, "not busy any more"

        await eventually(behind, within=5, interval=0.005)
        consumer.assert_running()
        took = await sigterm(consumer, within=35)
        await producing
    finally:
        await finish(producing)
    # Committed or rolled back, nothing half-done: the effects match the stored offsets.
    state = await assert_consistent(env, stream, at=f"after SIGTERM ({took:.1f} s)")
    assert 0 < state.stored < len(stream.messages)

    consumer = launch.start("consume", settings, **BUSY)
    await wait_drained(env, stream, [consumer])
    await sigterm(consumer)
    await assert_exact_end_state(env, stream)
