"""Transient faults with real ``orderflow`` processes: the database link cut, the database
server crashed and restarted, the broker unreachable for a minute. The processes must stay up,
retry with backoff, dead-letter nothing for the outage, resume by themselves and end in the
exact state a correct system reaches (see ``tests.helpers.expected_outcome``).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import delete, func, select

from orderflow.devstand.embedded import EmbeddedKafka, free_port
from orderflow.runtime.settings import Settings
from orderflow.runtime.topics import ensure_topics
from outbox import OutboxMessage, add_messages
from outbox.models import OutboxPending, OutboxRecord
from tests.e2e.processes import Launcher, Process
from tests.e2e.test_chaos import (
    BUSY,
    Stream,
    assert_consistent,
    assert_exact_end_state,
    database_port,
    finish,
    sample_messages,
    sigterm,
    stored_total,
    via,
    wait_drained,
    wait_progress,
)
from tests.helpers import (
    Expected,
    TestEnv,
    broker_log,
    decode_json,
    eventually,
    expected_outcome,
    header_map,
    read_topic,
)
from tests.proxy import SlowLink, TcpProxy
from tests.services import Services

pytestmark = pytest.mark.e2e


async def hold(seconds: float, *processes: Process) -> None:
    """Wait ``seconds``, failing at once (with its stderr) if one of ``processes`` exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for process in processes:
            process.assert_running()
        await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    for process in processes:
        process.assert_running()


async def stop_after(seconds: float, process: Process) -> None:
    """SIGTERM ``process`` after ``seconds``: it must exit 0 within the bound all the same."""
    await hold(seconds, process)
    await sigterm(process, within=35)


async def stopped(process: Process, *, within: float) -> str | None:
    """SIGTERM ``process``; None if it exited 0 in time without a traceback, else what it did."""
    started = time.monotonic()
    process.popen.send_signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(process.popen.wait, within)
    except subprocess.TimeoutExpired:
        return f"{process.describe()}\ndid not exit within {within:.0f} s of SIGTERM"
    took = time.monotonic() - started
    if code != 0 or "Traceback" in process.stderr():
        return f"{process.describe()}\nexited with code {code} {took:.1f} s after SIGTERM"
    return None


async def unpublished(env: TestEnv) -> tuple[int, int]:
    """(outbox rows, of which not yet published)."""
    async with env.sessions() as session:
        total, waiting = (
            await session.execute(
                select(
                    select(func.count()).select_from(OutboxRecord).scalar_subquery(),
                    select(func.count()).select_from(OutboxPending).scalar_subquery(),
                )
            )
        ).one()
    return int(total), int(waiting)


async def wait_published(
    env: TestEnv,
    expected: Expected,
    processes: list[Process],
    *,
    within: float = 60.0,
    others: int = 0,
) -> None:
    """Until every outbox row the stream causes (and ``others`` more) exists and is marked
    published."""
    rows = len(expected.applied) + sum(expected.dead_letters.values()) + others
    deadline = time.monotonic() + within
    while True:
        for process in processes:
            process.assert_running()
        total, waiting = await unpublished(env)
        if total == rows and waiting == 0:
            return
        if time.monotonic() > deadline:
            logs = "\n\n".join(process.describe() for process in processes)
            pytest.fail(
                f"{waiting} of {total} outbox rows unpublished after {within:.0f} s\n{logs}"
            )
        await asyncio.sleep(0.2)


async def assert_topics(settings: Settings, expected: Expected) -> None:
    """Every update reached the outbound topic at least once, each order's versions in order;
    every dead letter reached the DLQ topic at least once."""
    records = await read_topic(settings, settings.outbound_topic, len(expected.applied))
    first_seen: dict[str, dict[str, Any]] = {}
    for record in records:  # in partition order, so in each order's order
        event_id = header_map(record.headers)["event_id"]
        first_seen.setdefault(event_id, decode_json(record.value))
    assert len(first_seen) == len(expected.applied), (
        f"{len(first_seen)} distinct updates on the topic, {len(expected.applied)} applied"
    )
    assert {document["causation_id"] for document in first_seen.values()} == {
        str(event_id) for event_id in expected.applied
    }
    versions: dict[str, list[int]] = {}
    for document in first_seen.values():
        versions.setdefault(document["order_id"], []).append(document["order_version"])
    assert versions == {str(order_id): v for order_id, v in expected.updates.items()}

    dead_letters = sum(expected.dead_letters.values())
    records = await read_topic(settings, settings.dlq_topic, dead_letters)
    sources: dict[tuple[str, str], str] = {}
    for record in records:
        headers = header_map(record.headers)
        sources[(headers["source.partition"], headers["source.offset"])] = headers["error.reason"]
    assert Counter(sources.values()) == expected.dead_letters


# --- the database link cut --------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_the_consumer_rides_out_a_cut_database_link(env: TestEnv, launch: Launcher) -> None:
    settings = env.settings
    stream = Stream(sample_messages(2000, seed=53))
    async with SlowLink(database_port(settings), delay=0.002) as link:
        slow = {"DATABASE_URL": via(settings, link)}
        consumer = launch.start("consume", settings, **slow, **BUSY)
        #: A second member, stopped during the outage: it must still exit 0 in time.
        leaving = launch.start("consume", settings, **slow, **BUSY)
        producing = asyncio.ensure_future(stream.flow(settings, per_second=200))
        try:
            await wait_progress(env, stream, 0, within=30)
            await hold(0.5, consumer, leaving)

            async def behind() -> None:
                # Chunks arrive every 50 ms and the group may catch up in between: cut
                # while some are still to apply.
                assert await stored_total(env) < stream.produced, "the group is idle: cut too late"

            await eventually(behind, within=5, interval=0.005)
            await link.cut()
            await asyncio.gather(hold(8.0, consumer), stop_after(1.0, leaving))
            await link.restore()
            await producing
        finally:
            await finish(producing)
        await wait_drained(env, stream, [consumer])
        assert "transient fault applying" in consumer.stderr(), consumer.describe()
        await sigterm(consumer)
    await assert_exact_end_state(env, stream)


@pytest.mark.timeout(120)
async def test_the_relay_rides_out_a_cut_database_link(env: TestEnv, launch: Launcher) -> None:
    settings = env.settings
    stream = Stream(sample_messages(1500, seed=59))
    expected = expected_outcome(stream.messages)
    consumer = launch.start("consume", settings)
    async with TcpProxy(database_port(settings)) as link:
        relay = launch.start(
            "relay", settings, DATABASE_URL=via(settings, link), ORDERFLOW_RELAY_BATCH_SIZE="20"
        )
        producing = asyncio.ensure_future(stream.flow(settings, per_second=200))
        try:

            async def publishing() -> None:
                relay.assert_running()
                total, waiting = await unpublished(env)
                assert total > waiting > 0, "the relay has not published yet, or is idle"

            await eventually(publishing, within=30, interval=0.02)
            await link.cut()
            await hold(8.0, consumer, relay)
            await link.restore()
            await producing
        finally:
            await finish(producing)
        await wait_drained(env, stream, [consumer, relay])
        await wait_published(env, expected, [consumer, relay])
        assert "relay lost the database" in relay.stderr(), relay.describe()
        await assert_topics(settings, expected)
        await asyncio.gather(sigterm(relay), sigterm(consumer))
    await assert_exact_end_state(env, stream)


# --- the database server crashes and restarts --------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_database_server_crash_and_restart_is_ridden_out(
    env: TestEnv, services: Services, launch: Launcher
) -> None:
    server = services.embedded_postgres
    if server is None:
        pytest.skip(
            f"the tests do not own the database server ({services.postgres_origin}): "
            "it cannot be crashed and restarted here"
        )
    settings = env.settings
    stream = Stream(sample_messages(2000, seed=61))
    expected = expected_outcome(stream.messages)
    consumer = launch.start("consume", settings, **BUSY)
    relay = launch.start("relay", settings)
    producing = asyncio.ensure_future(stream.flow(settings, per_second=200))
    try:
        await wait_progress(env, stream, 0, within=30)
        await hold(1.0, consumer, relay)
        server.kill()  # SIGKILL of the postmaster and every backend: a crash
        try:
            await hold(3.0, consumer, relay)
        finally:
            # Crash recovery, same port and data. Other tests use this server: always
            # restart it, and in this thread (the server dies with the thread that started it).
            server.start()
        await producing
    finally:
        await finish(producing)
    await wait_drained(env, stream, [consumer, relay])
    await wait_published(env, expected, [consumer, relay])
    assert "transient fault applying" in consumer.stderr(), consumer.describe()
    assert "relay lost the database" in relay.stderr(), relay.describe()
    await assert_topics(settings, expected)
    await asyncio.gather(sigterm(relay), sigterm(consumer))
    await assert_exact_end_state(env, stream)


# --- the broker unreachable for a minute ----------------------------------------------------------


@pytest.fixture
async def broker_behind_proxy() -> AsyncIterator[TcpProxy]:
    """A dedicated Tansu broker that advertises a proxy's port; cut the proxy for an outage."""
    port = free_port()
    broker = EmbeddedKafka(advertised_port=port)
    try:
        broker.start()  # in this thread: the broker dies with the thread that started it
        async with TcpProxy(broker.port, listen_port=port) as proxy:
            yield proxy
    finally:
        broker.close()


async def through(proxy: TcpProxy, settings: Settings) -> Settings:
    """``settings`` with the dedicated broker behind ``proxy``, and topics created there."""
    settings = settings.with_overrides(
        kafka_bootstrap_servers=proxy.address,
        kafka_idempotence=False,  # Tansu has no idempotent producer
        kafka_session_timeout_ms=3000,  # Tansu holds every join for half of it
    )
    await ensure_topics(settings, partitions=3)
    return settings


#: How long the broker stays unreachable: the outage issue 5 asks the relay to ride out.
OUTAGE_SECONDS = 60.0


@pytest.mark.timeout(210)
async def test_a_broker_outage_of_a_minute_is_ridden_out(
    env: TestEnv, broker_behind_proxy: TcpProxy, launch: Launcher
) -> None:
    proxy = broker_behind_proxy
    settings = await through(proxy, env.settings)
    side_topic = f"{settings.outbound_topic}.side"
    await ensure_topics(settings, [side_topic])
    side = [
        OutboxMessage(side_topic, f"side-{i}".encode(), f"side-{i}".encode()) for i in range(20)
    ]
    stream = Stream(sample_messages(2000, seed=67))
    expected = expected_outcome(stream.messages)
    async with SlowLink(database_port(settings), delay=0.002) as link:
        slow = {"DATABASE_URL": via(settings, link)}
        consumer = launch.start("consume", settings, **slow, **BUSY)
        relay = launch.start("relay", settings, **slow, ORDERFLOW_RELAY_BATCH_SIZE="20")
        await stream.flow(settings, per_second=1000, stop=1000)
        await wait_progress(env, stream, 0, within=30)
        assert await stored_total(env) < stream.produced, "the consumer is idle: cut too late"
        await proxy.cut()
        # Written while the broker is unreachable, so certain to have to wait (whether the
        # consumer still had fetched events to apply at the cut is up to timing).
        async with env.sessions() as session, session.begin():
            await add_messages(session, side)
        await hold(OUTAGE_SECONDS, consumer, relay)
        # The broker was out of reach indeed: its own log, read on its own port (the proxy's
        # is cut), holds nothing written after the cut. (A connection that survived the cut
        # would let the relay publish through it, and mark the rows: no relay bug, no outage.)
        logged = await broker_log(proxy.target_port, side_topic)
        assert logged == [], f"{len(logged)} side records reached the broker during the outage"
        # The relay could publish nothing: what was written meanwhile waits.
        rows, waiting = await unpublished(env)
        assert waiting >= len(side), f"{waiting} of {rows} outbox rows wait after the outage"
        await proxy.restore()
        await stream.flow(settings, per_second=500, start=1000)
        await wait_drained(env, stream, [consumer, relay], within=90)
        await wait_published(env, expected, [consumer, relay], others=len(side))
        assert "outbox messages failed, will retry" in relay.stderr(), relay.describe()
        await assert_topics(settings, expected)
        # Never sent before the outage, so published exactly once after it.
        records = await read_topic(settings, side_topic, len(side))
        assert sorted(record.value for record in records) == sorted(m.payload for m in side)
        await asyncio.gather(sigterm(relay), sigterm(consumer))
    # The end state compares the stream's own outbox rows: the side rows are done with.
    async with env.sessions() as session, session.begin():
        await session.execute(delete(OutboxRecord).where(OutboxRecord.topic == side_topic))
    await assert_exact_end_state(env, stream)


@pytest.mark.timeout(120)
async def test_sigterm_during_a_broker_outage_exits_0_in_time(
    env: TestEnv, broker_behind_proxy: TcpProxy, launch: Launcher
) -> None:
    proxy = broker_behind_proxy
    settings = await through(proxy, env.settings)
    stream = Stream(sample_messages(1000, seed=71))
    async with SlowLink(database_port(settings), delay=0.002) as link:
        slow = {"DATABASE_URL": via(settings, link)}
        consumer = launch.start("consume", settings, **slow, **BUSY)
        relay = launch.start("relay", settings, **slow, ORDERFLOW_RELAY_BATCH_SIZE="20")
        await stream.flow(settings, per_second=1000)
        await wait_progress(env, stream, 0, within=30)
        assert await stored_total(env) < stream.produced, "the consumer is idle: cut too late"
        await proxy.cut()
        await hold(3.0, consumer, relay)
        outcomes = await asyncio.gather(
            *(stopped(process, within=35) for process in (consumer, relay))
        )
        assert all(outcome is None for outcome in outcomes), "\n\n".join(
            outcome for outcome in outcomes if outcome is not None
        )
    # Whatever was in flight committed or rolled back.
    await assert_consistent(env, stream, at="after SIGTERM during the outage")
