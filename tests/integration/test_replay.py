"""``replay outbox`` and ``replay topic`` on a real PostgreSQL and a real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import func, select, text

from consumer.apply import Destinations, InboundMessage, apply_batch
from consumer.models import ConsumerOffset, Order
from orderflow.runtime.settings import Settings
from orderflow.runtime.topics import ensure_topics
from orderflow.runtime.wiring import create_producer
from orderflow.tools.ranges import ReplayError
from orderflow.tools.replay import (
    REPLAY_LOCK_NAMESPACE,
    OutboxReplayRequest,
    TopicReplayRequest,
    group_lock_key,
    replay_outbox,
    replay_topic,
)
from outbox import OutboxMessage, add_messages
from tests.events import Message, paid, placed, shipped
from tests.helpers import (
    TestEnv,
    applied_count,
    decode_json,
    eventually,
    header_map,
    invoke_cli,
    mark_published,
    orders_by_id,
    outbox_rows,
    pending_ids,
    produce,
    read_topic,
    running_consumer,
)

pytestmark = pytest.mark.integration


def destinations(settings: Settings) -> Destinations:
    return Destinations(settings.outbound_topic, settings.dlq_topic)


async def apply_directly(env: TestEnv, messages: Sequence[Message]) -> None:
    await apply_batch(
        env.sessions,
        group_id=f"seed-{uuid.uuid4().hex[:6]}",
        destinations=destinations(env.settings),
        messages=[
            InboundMessage(env.settings.inbound_topic, 0, offset, key, value)
            for offset, (key, value) in enumerate(messages)
        ],
        expected_offset=None,
        now=datetime.now(UTC),
    )


# --------------------------------------------------------------------------- outbox


async def test_replay_outbox_republishes_the_same_messages_in_order_with_filters(
    env: TestEnv,
) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    await apply_directly(env, [placed(first), placed(second), paid(first), shipped(first)])
    rows = await outbox_rows(env.sessions, env.settings.outbound_topic)
    assert len(rows) == 4
    # All four published, written at these moments; a fifth message, written now too, is
    # still unpublished: no window replays it.
    now = datetime.now(UTC)
    written_at = [now - timedelta(hours=3), now - timedelta(minutes=50), now, now]
    async with env.sessions() as session, session.begin():
        for row, moment in zip(rows, written_at, strict=True):
            await session.execute(
                text("UPDATE outbox_messages SET created_at = :at WHERE id = :id"),
                {"at": moment, "id": row.id},
            )
    await mark_published(env.sessions, [row.id for row in rows])
    async with env.sessions() as session, session.begin():
        await add_messages(
            session,
            [OutboxMessage(env.settings.outbound_topic, str(first).encode(), b'{"pending": 1}')],
        )
    [waiting] = await pending_ids(env.sessions)
    assert waiting not in {row.id for row in rows}

    producer = create_producer(env.settings)
    await producer.start()
    try:
        outcome = await replay_outbox(
            env.sessions,
            producer,
            OutboxReplayRequest(
                since=now - timedelta(hours=1), until=None, topic=env.settings.outbound_topic
            ),
            stop=asyncio.Event(),
        )
        assert (outcome.matched, outcome.published) == (3, 3)
        records = await read_topic(env.settings, env.settings.outbound_topic, 3)
        assert len(records) == 3
        expected = rows[1:]
        by_key: dict[bytes | None, list[Any]] = {}
        for record in records:
            by_key.setdefault(record.key, []).append(record)
        for key in {row.key for row in expected}:
            sent = [row for row in expected if row.key == key]
            got = by_key[key]
            assert [r.value for r in got] == [row.payload for row in sent]  # same bytes, order
            assert [header_map(r.headers) for r in got] == [header_map(row.headers) for row in sent]

        # --order and --until, to another topic.
        repair_topic = f"{env.settings.outbound_topic}.repair"
        await ensure_topics(env.settings, [repair_topic])
        filtered = await replay_outbox(
            env.sessions,
            producer,
            OutboxReplayRequest(
                since=now - timedelta(hours=4),
                until=now - timedelta(minutes=1),
                topic=env.settings.outbound_topic,
                destination=repair_topic,
                order_ids=(first,),
            ),
            stop=asyncio.Event(),
        )
        assert (filtered.matched, filtered.published) == (1, 1)
        repaired = await read_topic(env.settings, repair_topic, 1)
        assert [decode_json(r.value)["event_id"] for r in repaired] == [
            decode_json(rows[0].payload)["event_id"]
        ]
    finally:
        await producer.stop()

    # The command itself: a dry run counts, a retention note when --since is too early.
    result = await invoke_cli(
        env.settings, "replay", "outbox", "--since", "5h", "--order", str(first), "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert "matched=3 published=0" in result.output
    assert "dry run" in result.output
    assert "nothing older can be replayed" in result.output
    bad = await invoke_cli(env.settings, "replay", "outbox", "--since", "1h", "--order", "nope")
    assert bad.exit_code == 1
    assert bad.output.strip() == "orderflow: error: --order: 'nope' is not an order id (a UUID)"


# --------------------------------------------------------------------------- topic


async def test_replay_topic_skips_applied_events_and_stops_at_the_end(env: TestEnv) -> None:
    order_ids = [uuid.uuid4() for _ in range(5)]
    stream = [placed(o) for o in order_ids] + [paid(o) for o in order_ids]
    poison = paid(uuid.uuid4())  # unknown_order
    started_at = datetime.now(UTC) - timedelta(seconds=5)
    await produce(env.settings, [*stream, poison])
    async with running_consumer(env.settings) as consumer:

        async def all_done() -> None:
            assert consumer.stats.applied == 10
            assert sum(consumer.stats.dead_letters.values()) == 1

        await eventually(all_done)

    outcome = await replay_topic(
        env.settings,
        env.engine,
        TopicReplayRequest(group="replay-1", from_timestamp=started_at),
        stop=asyncio.Event(),
    )
    assert outcome.total == 11
    assert (outcome.applied, outcome.skipped) == (0, 10)
    assert outcome.dead_letters == Counter({"unknown_order": 1})  # tried again, failed again
    assert await applied_count(env.sessions) == 10
    async with env.sessions() as session:
        left = await session.execute(
            select(func.count()).where(ConsumerOffset.group_id == "replay-1")
        )
        assert left.scalar_one() == 0  # the replay's offsets are removed at the end
    dead = [
        row
        for row in await outbox_rows(env.sessions, env.settings.dlq_topic)
        if header_map(row.headers)["error.reason"] == "unknown_order"
    ]
    assert len(dead) == 2  # the live one and the replay's

    # Through the command, for one partition, while nothing changed: all skipped.
    partition = next(r.partition for r in outcome.ranges if r.size)
    result = await invoke_cli(env.settings, "replay", "topic", "--from-offset", f"{partition}:0")
    assert result.exit_code == 0, result.output
    assert "applied=0" in result.output
    skipped_line = next(line for line in result.output.splitlines() if "applied=" in line)
    assert "dead_lettered=" in skipped_line
    live_group = await invoke_cli(
        env.settings,
        "replay",
        "topic",
        "--from-offset",
        "0:0",
        "--group",
        env.settings.consumer_group,
    )
    assert live_group.exit_code == 1
    assert "is the live consumer group" in live_group.output


async def produce_at(settings: Settings, messages: Sequence[Message], moment: datetime) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.require_kafka(),
        enable_idempotence=settings.kafka_idempotence,
        acks="all",
    )
    await producer.start()
    try:
        stamp = int(moment.timestamp() * 1000)
        deliveries = [
            await producer.send(settings.inbound_topic, value=value, key=key, timestamp_ms=stamp)
            for key, value in messages
        ]
        await asyncio.gather(*deliveries)
    finally:
        await producer.stop()


async def test_replay_topic_applies_into_a_fresh_database_between_timestamps(
    env: TestEnv,
) -> None:
    order_ids = [uuid.uuid4() for _ in range(4)]
    late = uuid.uuid4()
    base = datetime.now(UTC) - timedelta(minutes=10)
    await produce_at(
        env.settings, [placed(o) for o in order_ids] + [paid(o) for o in order_ids], base
    )
    await produce_at(
        env.settings, [shipped(o) for o in order_ids] + [placed(late)], base + timedelta(minutes=5)
    )
    middle = base + timedelta(minutes=2)

    dry = await replay_topic(
        env.settings,
        env.engine,
        TopicReplayRequest(group="replay-2", from_offsets={0: 0, 1: 0, 2: 0}, dry_run=True),
        stop=asyncio.Event(),
    )
    assert (dry.total, dry.to_process, dry.skipped, dry.undecodable) == (13, 13, 0, 0)
    assert await applied_count(env.sessions) == 0

    first = await replay_topic(
        env.settings,
        env.engine,
        TopicReplayRequest(group="replay-2", from_offsets={0: 0, 1: 0, 2: 0}, to_timestamp=middle),
        stop=asyncio.Event(),
    )
    assert (first.total, first.applied, first.skipped, first.dead_lettered) == (8, 8, 0, 0)
    orders = await orders_by_id(env.sessions)
    assert {o: (orders[o].status, orders[o].version) for o in order_ids} == {
        o: ("paid", 2) for o in order_ids
    }

    second = await replay_topic(
        env.settings,
        env.engine,
        TopicReplayRequest(group="replay-2", from_timestamp=middle),
        stop=asyncio.Event(),
    )
    assert (second.total, second.applied, second.skipped) == (5, 5, 0)
    orders = await orders_by_id(env.sessions)
    assert {o: orders[o].status for o in order_ids} == dict.fromkeys(order_ids, "shipped")
    assert orders[late].version == 1
    updates = await outbox_rows(env.sessions, env.settings.outbound_topic)
    assert len(updates) == 13  # one update per applied event, as the live consumer makes

    dry_again = await invoke_cli(
        env.settings, "replay", "topic", "--from-timestamp", base.isoformat(), "--dry-run"
    )
    assert dry_again.exit_code == 0, dry_again.output
    assert "skipped=13 to_process=0 undecodable=0" in dry_again.output


async def test_inbox_is_read_after_the_order_lock(env: TestEnv) -> None:
    """A replay racing the live consumer on one event: the second to commit must see the
    first's inbox row and skip the event, not run it against the newer state."""
    order_id = uuid.uuid4()
    await apply_directly(env, [placed(order_id)])
    key, value = paid(order_id)
    event_id = uuid.UUID(decode_json(value)["event_id"])
    async with env.sessions() as session, session.begin():
        # The live consumer's transaction: holds the order's lock while applying the event.
        await session.execute(select(Order).where(Order.id == order_id).with_for_update())
        replay = asyncio.create_task(
            apply_batch(
                env.sessions,
                group_id="replay-race",
                destinations=destinations(env.settings),
                messages=[InboundMessage(env.settings.inbound_topic, 1, 0, key, value)],
                expected_offset=None,
                now=datetime.now(UTC),
            )
        )

        async def replay_waits_for_the_lock() -> None:
            async with env.engine.connect() as connection:
                waiting = await connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    )
                )
                assert waiting.scalar_one() == 1

        await eventually(replay_waits_for_the_lock, within=10)
        assert not replay.done()
        await session.execute(
            text(
                "INSERT INTO processed_events (event_id, order_id, event_type, topic, "
                "partition, \"offset\") VALUES (:event, :order, 'OrderPaid', 't', 0, 0)"
            ),
            {"event": event_id, "order": order_id},
        )
        await session.execute(
            text("UPDATE orders SET status = 'paid', version = 2 WHERE id = :id"),
            {"id": order_id},
        )
    outcome = await replay
    assert (outcome.applied, outcome.duplicates, outcome.dead_lettered) == (0, 1, 0)


async def test_replay_topic_rejects_bad_positions(env: TestEnv) -> None:
    result = await invoke_cli(env.settings, "replay", "topic", "--from-offset", "9:0")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"orderflow: error: partition 9 does not exist: {env.settings.inbound_topic} "
        "has partitions 0-2"
    )
    result = await invoke_cli(env.settings, "replay", "topic", "--from-offset", "0:5")
    assert result.exit_code == 1
    assert "offset 5 is outside partition 0" in result.output
    result = await invoke_cli(env.settings, "replay", "topic", "--from-timestamp", "yesterday")
    assert result.exit_code == 1
    assert "--from-timestamp: 'yesterday' is not a time" in result.output
    result = await invoke_cli(env.settings, "replay", "topic")
    assert result.exit_code == 1
    assert "give exactly one start" in result.output


async def test_two_replays_of_one_group_do_not_run_at_once(env: TestEnv) -> None:
    await produce(env.settings, [placed(uuid.uuid4())])
    async with env.engine.connect() as holder:
        await holder.execute(
            text("SELECT pg_advisory_lock(:namespace, :key)"),
            {"namespace": REPLAY_LOCK_NAMESPACE, "key": group_lock_key("busy")},
        )
        with pytest.raises(ReplayError, match="another replay with group 'busy' is running"):
            await replay_topic(
                env.settings,
                env.engine,
                TopicReplayRequest(group="busy", from_offsets={0: 0, 1: 0, 2: 0}),
                stop=asyncio.Event(),
            )
    assert await applied_count(env.sessions) == 0


# --------------------------------------------------------------------------- backfill runs


async def test_backfill_runs_lists_each_run_with_its_filters_status_and_counts(
    env: TestEnv,
) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    await apply_directly(env, [placed(first), placed(second), paid(first)])

    empty = await invoke_cli(env.settings, "backfill", "runs")
    assert empty.exit_code == 0, empty.output
    assert "no backfill runs yet" in empty.output

    backfill = await invoke_cli(env.settings, "backfill", "snapshots", "--status", "paid")
    assert backfill.exit_code == 0, backfill.output
    listed = await invoke_cli(env.settings, "backfill", "runs", "--json")
    assert listed.exit_code == 0, listed.output
    runs = [decode_json(line.encode()) for line in listed.stdout.splitlines() if line]
    assert len(runs) == 1
    (only,) = runs
    assert only["kind"] == "snapshots"
    assert only["status"] == "finished"
    assert only["filters"]["status"] == ["paid"]
    assert only["queued"] == 1
    assert only["finished_at"] is not None
