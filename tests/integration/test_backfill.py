"""``backfill snapshots`` on a real PostgreSQL (and, for ordering, a real broker): one
Snapshot per matching order with its current state, filters, resuming after an
interruption without double emits, and per-order order on the topic while updates flow."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text

from consumer.apply import Destinations, InboundMessage, apply_batch
from consumer.snapshots import BackfillRun, SnapshotBatch
from consumer.state_machine import OrderStatus
from consumer.updates import update_event_id
from orderflow.tools.backfill import AlreadyFinished, SnapshotRequest, backfill_snapshots
from tests.events import Message, cancelled, delivered, paid, placed, shipped
from tests.helpers import (
    TestEnv,
    applied_count,
    decode_json,
    eventually,
    header_map,
    orders_by_id,
    outbox_rows,
    produce,
    read_topic,
    running_consumer,
    running_relay,
)

pytestmark = pytest.mark.integration


async def apply_directly(env: TestEnv, messages: Sequence[Message]) -> None:
    """Apply events through the consumer's own batch function (no broker needed)."""
    group = f"seed-{uuid.uuid4().hex[:6]}"
    await apply_batch(
        env.sessions,
        group_id=group,
        destinations=Destinations(env.settings.outbound_topic, env.settings.dlq_topic),
        messages=[
            InboundMessage(env.settings.inbound_topic, 0, offset, key, value)
            for offset, (key, value) in enumerate(messages)
        ],
        expected_offset=None,
        now=datetime.now(UTC),
    )


async def snapshots(env: TestEnv) -> list[dict[str, Any]]:
    rows = await outbox_rows(env.sessions, env.settings.outbound_topic)
    documents = []
    for row in rows:
        document = decode_json(row.payload)
        if document["change"] == "Snapshot":
            document["_key"] = row.key
            document["_headers"] = header_map(row.headers)
            documents.append(document)
    return documents


def request(env: TestEnv, **fields: Any) -> SnapshotRequest:
    return SnapshotRequest(topic=env.settings.outbound_topic, **fields)


async def run_backfill(env: TestEnv, snapshot_request: SnapshotRequest) -> Any:
    return await backfill_snapshots(env.sessions, snapshot_request, stop=asyncio.Event())


async def test_one_snapshot_per_order_with_its_current_state_and_version(env: TestEnv) -> None:
    pending, paid_id, shipped_id, cancelled_id = (uuid.uuid4() for _ in range(4))
    await apply_directly(
        env,
        [
            placed(pending),
            placed(paid_id, email="grace@example.com", name="Grace"),
            paid(paid_id),
            placed(shipped_id),
            paid(shipped_id),
            shipped(shipped_id),
            placed(cancelled_id),
            cancelled(cancelled_id),
        ],
    )
    updates_before = {
        decode_json(row.payload)["order_id"]: decode_json(row.payload)
        for row in await outbox_rows(env.sessions, env.settings.outbound_topic)
    }  # the last update of each order

    outcome = await run_backfill(env, request(env, batch=3))

    assert outcome.finished
    assert not outcome.interrupted
    assert (outcome.queued, outcome.skipped, outcome.batches) == (4, 0, 2)
    orders = await orders_by_id(env.sessions)
    found = await snapshots(env)
    assert sorted(uuid.UUID(s["order_id"]) for s in found) == sorted(orders)
    assert len({s["event_id"] for s in found}) == 4
    for snapshot in found:
        order = orders[uuid.UUID(snapshot["order_id"])]
        last_update = updates_before[snapshot["order_id"]]
        assert snapshot["event_type"] == "OrderUpdated"
        assert snapshot["causation_id"] is None
        assert snapshot["order_version"] == order.version == last_update["order_version"]
        assert snapshot["order"] == last_update["order"]  # the full current state
        assert snapshot["order"]["status"] == order.status
        assert snapshot["_key"] == snapshot["order_id"].encode()
        assert snapshot["_headers"] == {
            "event_id": snapshot["event_id"],
            "event_type": "OrderUpdated",
            "content-type": "application/json",
        }
        # A fresh id: not the id of any update.
        assert snapshot["event_id"] != last_update["event_id"]
        assert uuid.UUID(snapshot["event_id"]) != update_event_id(uuid.UUID(snapshot["order_id"]))
    async with env.sessions() as session:
        run = (await session.execute(select(BackfillRun))).scalar_one()
    assert (run.status, run.queued, run.batches) == ("finished", 4, 2)
    assert run.finished_at is not None


async def test_status_and_since_filters_and_rerun_rules(env: TestEnv) -> None:
    old_paid, new_paid, new_pending, delivered_id = (uuid.uuid4() for _ in range(4))
    await apply_directly(
        env,
        [
            placed(old_paid),
            paid(old_paid),
            placed(new_paid),
            paid(new_paid),
            placed(new_pending),
            placed(delivered_id),
            paid(delivered_id),
            shipped(delivered_id),
            delivered(delivered_id),
        ],
    )
    async with env.sessions() as session, session.begin():
        await session.execute(
            text("UPDATE orders SET updated_at = now() - interval '3 days' WHERE id = :id"),
            {"id": old_paid},
        )

    statuses = frozenset({OrderStatus.PAID, OrderStatus.DELIVERED})
    dry = await run_backfill(env, request(env, statuses=statuses, dry_run=True))
    assert dry.run is None
    assert dry.queued == 3
    assert await snapshots(env) == []  # a dry run writes nothing

    by_status = await run_backfill(env, request(env, statuses=statuses))
    assert by_status.queued == 3
    assert {uuid.UUID(s["order_id"]) for s in await snapshots(env)} == {
        old_paid,
        new_paid,
        delivered_id,
    }

    since = datetime.now(UTC) - timedelta(days=1)
    recent = await run_backfill(
        env, request(env, statuses=statuses, since=since, since_given="1d", batch=1)
    )
    assert recent.queued == 2
    found = await snapshots(env)
    assert [uuid.UUID(s["order_id"]) for s in found[3:]] == sorted([new_paid, delivered_id])

    # The same filters again: refused once finished, unless --new.
    with pytest.raises(AlreadyFinished, match="pass --new"):
        await run_backfill(env, request(env, statuses=statuses))
    again = await run_backfill(env, request(env, statuses=statuses, new=True))
    assert again.queued == 3
    assert not again.resumed
    assert len(await snapshots(env)) == 3 + 2 + 3


async def test_an_interrupted_run_resumes_after_its_last_batch_without_double_emits(
    env: TestEnv,
) -> None:
    order_ids = [uuid.uuid4() for _ in range(25)]
    await apply_directly(env, [placed(order_id) for order_id in order_ids])
    stop = asyncio.Event()
    seen: list[SnapshotBatch] = []

    def interrupt_after_three(batch: SnapshotBatch) -> None:
        seen.append(batch)
        if len(seen) == 3:
            stop.set()  # what Ctrl-C does: the batch in flight commits, then it stops

    first = await backfill_snapshots(
        env.sessions, request(env, batch=4), stop=stop, on_batch=interrupt_after_three
    )
    assert first.interrupted
    assert (first.queued, first.batches) == (12, 3)
    assert first.run is not None
    assert first.run.status == "running"

    second = await run_backfill(env, request(env, batch=4))
    assert second.resumed
    assert second.run is not None
    assert second.run.id == first.run.id
    assert second.remaining_at_start == 13
    assert second.finished
    assert second.queued == 13

    emitted = [uuid.UUID(s["order_id"]) for s in await snapshots(env)]
    assert sorted(emitted) == sorted(order_ids)  # every order exactly once
    assert emitted == sorted(order_ids)  # in keyset (id) order


async def test_two_processes_on_one_run_share_the_work(env: TestEnv) -> None:
    order_ids = [uuid.uuid4() for _ in range(30)]
    await apply_directly(env, [placed(order_id) for order_id in order_ids])
    outcomes = await asyncio.gather(
        run_backfill(env, request(env, batch=2)), run_backfill(env, request(env, batch=2))
    )
    assert sum(outcome.queued for outcome in outcomes) == 30
    assert sorted(uuid.UUID(s["order_id"]) for s in await snapshots(env)) == sorted(order_ids)
    async with env.sessions() as session:
        assert (await session.execute(select(func.count()).select_from(BackfillRun))).scalar() == 1


async def test_snapshots_keep_per_order_order_with_live_updates(env: TestEnv) -> None:
    """Consumer and relay run while the backfill runs: on the topic, each order's versions
    never go down, and each Snapshot carries the version of the update just before it."""
    order_ids = [uuid.uuid4() for _ in range(30)]
    rounds = [paid, shipped, delivered]
    async with running_consumer(env.settings), running_relay(env.settings):
        await produce(env.settings, [placed(order_id) for order_id in order_ids])
        await wait_applied(env, 30)

        async def live_traffic() -> None:
            for number, make in enumerate(rounds, start=2):
                await produce(env.settings, [make(order_id) for order_id in order_ids])
                await wait_applied(env, 30 * number)

        backfill = asyncio.create_task(run_backfill(env, request(env, batch=3, rate=20.0)))
        await live_traffic()
        outcome = await backfill
        assert outcome.finished
        assert outcome.queued == 30
        records = await read_topic(env.settings, env.settings.outbound_topic, 30 * 4 + 30)

    per_order: dict[str, list[tuple[str, int]]] = {}
    for record in records:  # one partition per key: topic order is publication order
        document = decode_json(record.value)
        per_order.setdefault(document["order_id"], []).append(
            (document["change"], document["order_version"])
        )
    assert set(per_order) == {str(order_id) for order_id in order_ids}
    for order_id, sequence in per_order.items():
        versions = [version for _, version in sequence]
        assert versions == sorted(versions), (order_id, sequence)
        assert [v for change, v in sequence if change != "Snapshot"] == [1, 2, 3, 4]
        position = next(i for i, (change, _) in enumerate(sequence) if change == "Snapshot")
        assert position > 0, (order_id, sequence)  # OrderPlaced came first
        assert sequence[position][1] == sequence[position - 1][1], (order_id, sequence)
        assert sum(1 for change, _ in sequence if change == "Snapshot") == 1


async def wait_applied(env: TestEnv, count: int) -> None:
    async def check() -> None:
        assert await applied_count(env.sessions) == count

    await eventually(check)
