"""The consumer on a real PostgreSQL and a real broker: transitions, rejections, duplicates,
restarts, fencing and poison isolation."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Set
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import TopicPartition
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import selectinload

from consumer.apply import (
    ORDER_LOCK_NAMESPACE,
    BatchOutcome,
    Destinations,
    InboundMessage,
    apply_batch,
)
from consumer.errors import OffsetConflict
from consumer.intake import OrderConsumer
from consumer.models import ConsumerOffset, Customer, Order, ProcessedEvent
from consumer.observe import ConsumerObserver
from consumer.parking import Expired
from orderflow.runtime.services import run_consumer
from orderflow.tools.samples import SampleStream
from tests.events import cancelled, delivered, key, paid, placed, shipped
from tests.helpers import (
    Expected,
    TestEnv,
    applied_count,
    decode_json,
    eventually,
    expected_outcome,
    header_map,
    lock_waits,
    orders_by_id,
    outbox_rows,
    produce,
    running_consumer,
)

pytestmark = pytest.mark.integration


async def wait_applied(env: TestEnv, count: int) -> None:
    async def check() -> None:
        assert await applied_count(env.sessions) == count

    await eventually(check)


async def wait_outbox(env: TestEnv, count: int) -> None:
    async def check() -> None:
        assert len(await outbox_rows(env.sessions)) == count

    await eventually(check)


async def test_every_transition_is_applied_with_one_update_each(env: TestEnv) -> None:
    delivered_id, cancelled_pending, cancelled_paid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    lines = [
        {"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"},
        {"sku": "SKU-2", "quantity": 1, "unit_price": 0.1},
    ]
    stream = [
        placed(delivered_id, lines=lines),
        placed(cancelled_pending, email="grace@example.com", name="Grace"),
        paid(delivered_id, amount="25.1"),
        cancelled(cancelled_pending),
        shipped(delivered_id),
        placed(cancelled_paid, email="ada@example.com", name="Ada L."),
        delivered(delivered_id),
        paid(cancelled_paid),
        cancelled(cancelled_paid),
    ]
    await produce(env.settings, stream)
    async with running_consumer(env.settings):
        await wait_applied(env, len(stream))

    orders = await orders_by_id(env.sessions)
    assert {order_id: (o.status, o.version) for order_id, o in orders.items()} == {
        delivered_id: ("delivered", 4),
        cancelled_pending: ("cancelled", 2),
        cancelled_paid: ("cancelled", 3),
    }
    async with env.sessions() as session:
        order = (
            await session.execute(
                select(Order)
                .where(Order.id == delivered_id)
                .options(selectinload(Order.lines), selectinload(Order.customer))
            )
        ).scalar_one()
        assert order.total == Decimal("25.10")
        assert order.currency == "EUR"
        assert [(line.sku, line.quantity, line.unit_price) for line in order.lines] == [
            ("SKU-1", 2, Decimal("12.50")),
            ("SKU-2", 1, Decimal("0.1")),
        ]
        customers = list(
            (await session.execute(select(Customer).order_by(Customer.email))).scalars()
        )
        # Upserted by email: one customer, whichever of the two names was applied last
        # (the two orders may sit on different partitions).
        assert [c.email for c in customers] == ["ada@example.com", "grace@example.com"]
        assert customers[0].name in {"Ada", "Ada L."}
        orders_of = {o.id: o.customer_id for o in (await session.execute(select(Order))).scalars()}
        assert orders_of[delivered_id] == orders_of[cancelled_paid] == customers[0].id

    updates = await outbox_rows(env.sessions, env.settings.outbound_topic)
    assert len(updates) == len(stream)
    versions: dict[str, list[int]] = {}
    for row in updates:
        document = decode_json(row.payload)
        versions.setdefault(document["order_id"], []).append(document["order_version"])
        assert row.key == document["order_id"].encode()
    assert versions == {
        str(delivered_id): [1, 2, 3, 4],
        str(cancelled_pending): [1, 2],
        str(cancelled_paid): [1, 2, 3],
    }
    assert await outbox_rows(env.sessions, env.settings.dlq_topic) == []


REJECTIONS = [
    ("malformed_json", lambda o: (key(o), b'{"event_id": "x", ')),
    ("malformed_json", lambda o: (key(o), b"\xff\xfe not utf-8")),
    ("schema_violation", lambda o: paid(o, amount="-5")),
    (
        "schema_violation",
        lambda o: placed(o, lines=[{"sku": "S", "quantity": 0, "unit_price": "1"}]),
    ),
    ("schema_violation", lambda o: (key(o), b'{"event_type": "OrderPaid"}')),
    ("unknown_event_type", lambda o: (key(o), placed(o)[1].replace(b"OrderPlaced", b"OrderLost"))),
    ("unknown_order", lambda o: shipped(uuid.uuid4())),
    ("duplicate_order", lambda o: placed(o)),
    ("invalid_transition", lambda o: shipped(o)),
    ("amount_mismatch", lambda o: paid(o, amount="24.99")),
]


async def test_every_rejection_reason_is_dead_lettered_and_consumption_goes_on(
    env: TestEnv,
) -> None:
    order_id = uuid.uuid4()
    poison = [make(order_id) for _, make in REJECTIONS]
    stream = [placed(order_id), *poison, paid(order_id)]
    await produce(env.settings, stream)
    async with running_consumer(env.settings) as consumer:
        await wait_outbox(env, 2 + len(poison))

        # The rows are visible at commit, a moment before the consumer counts the batch.
        async def counted() -> None:
            assert consumer.stats.dead_letters == Counter(
                {reason: sum(1 for r, _ in REJECTIONS if r == reason) for reason, _ in REJECTIONS}
            )

        await eventually(counted)

    # The order moved on past the poison: placed, then paid.
    orders = await orders_by_id(env.sessions)
    assert (orders[order_id].status, orders[order_id].version) == ("paid", 2)
    dead_letters = await outbox_rows(env.sessions, env.settings.dlq_topic)
    assert len(dead_letters) == len(poison)
    expected_reason = {
        value: reason for (reason, _), (_, value) in zip(REJECTIONS, poison, strict=True)
    }
    original_key = dict((value, k) for k, value in poison)
    positions: dict[str, list[int]] = {}
    for row in dead_letters:
        headers = header_map(row.headers)
        assert row.payload in expected_reason  # the original bytes, untouched
        assert headers["error.reason"] == expected_reason[row.payload]
        assert row.key == original_key[row.payload]
        assert headers["error.message"]
        assert headers["source.topic"] == env.settings.inbound_topic
        positions.setdefault(headers["source.partition"], []).append(int(headers["source.offset"]))
    assert all(offsets == sorted(offsets) for offsets in positions.values())
    # Rejected events leave no trace in the inbox.
    assert await applied_count(env.sessions) == 2


async def test_a_duplicate_in_the_stream_and_a_replay_after_commit_are_skipped(
    env: TestEnv,
) -> None:
    order_id = uuid.uuid4()
    first, payment = placed(order_id), paid(order_id)
    await produce(env.settings, [first, first, payment])
    async with running_consumer(env.settings) as consumer:
        await wait_outbox(env, 2)

        async def skipped() -> None:  # counted a moment after the commit shows the rows
            assert consumer.stats.duplicates == 1

        await eventually(skipped)
        # Replayed long after it was committed: skipped, counted, not dead-lettered.
        await produce(env.settings, [payment, first])

        async def both_skipped() -> None:
            assert consumer.stats.duplicates == 3

        await eventually(both_skipped)
        assert sum(consumer.stats.dead_letters.values()) == 0
    orders = await orders_by_id(env.sessions)
    assert (orders[order_id].status, orders[order_id].version) == ("paid", 2)
    assert len(await outbox_rows(env.sessions)) == 2
    assert await applied_count(env.sessions) == 2


async def test_restart_mid_stream_resumes_without_loss_or_double_effects(env: TestEnv) -> None:
    stream = SampleStream(seed=11, fault_every=9)
    messages = [(m.key, m.value) for m in (next(stream) for _ in range(600))]
    expected = expected_outcome(messages)
    settings = env.with_settings(consumer_batch_size=20)
    await produce(env.settings, messages)

    for _ in range(3):  # stop after a few batches, each time somewhere else in the stream
        # Asked to stop by its third batch's commit (a test polling from outside could be
        # slower than the consumer): the lanes finish what is in flight, a batch each.
        stop = asyncio.Event()

        def stop_soon(consumer: OrderConsumer, stop: asyncio.Event = stop) -> None:
            consumer.observer = StopAfterBatches(consumer.observer, 3, stop)

        await asyncio.wait_for(run_consumer(settings, stop, ready=stop_soon), timeout=60)
    assert await applied_count(env.sessions) < len(expected.applied), "stopped too late"
    async with running_consumer(settings):
        await wait_applied(env, len(expected.applied))
        await wait_outbox(env, len(expected.applied) + sum(expected.dead_letters.values()))

    await assert_end_state(env, expected)


class StopAfterBatches:
    """A consumer observer that passes everything on and sets ``stop`` at the ``count``th
    committed batch."""

    def __init__(self, observer: ConsumerObserver, count: int, stop: asyncio.Event) -> None:
        self._observer = observer
        self._left = count
        self._stop = stop

    def fetched(self, count: int) -> None:
        self._observer.fetched(count)

    def batch_committed(
        self, outcome: BatchOutcome, *, size: int, seconds: float, queued: float | None = None
    ) -> None:
        self._observer.batch_committed(outcome, size=size, seconds=seconds, queued=queued)
        self._left -= 1
        if self._left <= 0:
            self._stop.set()

    def partitions_assigned(self, partitions: Set[TopicPartition]) -> None:
        self._observer.partitions_assigned(partitions)

    def parked_expired(self, outcome: Expired) -> None:
        self._observer.parked_expired(outcome)


async def assert_end_state(env: TestEnv, expected: Expected) -> None:
    orders = await orders_by_id(env.sessions)
    assert {
        order_id: (order.status, order.total, order.version) for order_id, order in orders.items()
    } == {
        order_id: (state.status.value, state.total, state.version)
        for order_id, state in expected.orders.items()
    }
    async with env.sessions() as session:
        processed = set((await session.execute(select(ProcessedEvent.event_id))).scalars())
    assert processed == set(expected.applied)
    updates: dict[str, list[int]] = {}
    for row in await outbox_rows(env.sessions, env.settings.outbound_topic):
        document = decode_json(row.payload)
        updates.setdefault(document["order_id"], []).append(document["order_version"])
    assert updates == {str(k): v for k, v in expected.updates.items()}
    reasons = Counter(
        header_map(row.headers)["error.reason"]
        for row in await outbox_rows(env.sessions, env.settings.dlq_topic)
    )
    assert reasons == expected.dead_letters


async def test_a_fenced_consumer_cannot_commit_over_the_new_owner(env: TestEnv) -> None:
    order_id = uuid.uuid4()
    topic = env.settings.inbound_topic
    destinations = Destinations(env.settings.outbound_topic, env.settings.dlq_topic)
    first = InboundMessage(topic, 0, 0, *placed(order_id))
    second = InboundMessage(topic, 0, 1, *paid(order_id))
    now = datetime.now(UTC)

    owner = await apply_batch(
        env.sessions,
        group_id="g",
        destinations=destinations,
        messages=[first],
        expected_offset=None,
        now=now,
    )
    assert owner.next_offset == 1
    # A zombie that still believes the partition is new, and one that is behind.
    for stale in (None, 0):
        with pytest.raises(OffsetConflict) as conflict:
            await apply_batch(
                env.sessions,
                group_id="g",
                destinations=destinations,
                messages=[first, second],
                expected_offset=stale,
                now=now,
            )
        assert conflict.value.stored == 1
    async with env.sessions() as session:
        stored = (await session.execute(select(ConsumerOffset.next_offset))).scalar_one()
    assert stored == 1
    assert await applied_count(env.sessions) == 1
    assert len(await outbox_rows(env.sessions)) == 1


async def _apply_at(
    env: TestEnv, offset: int, expected: int | None, *messages: Any
) -> BatchOutcome:
    """``messages`` as partition 0's records from ``offset`` on, applied in one batch."""
    return await apply_batch(
        env.sessions,
        group_id="g",
        destinations=Destinations(env.settings.outbound_topic, env.settings.dlq_topic),
        messages=[
            InboundMessage(env.settings.inbound_topic, 0, offset + index, *message)
            for index, message in enumerate(messages)
        ],
        expected_offset=expected,
        now=datetime.now(UTC),
    )


async def _place_holding_its_lock(env: TestEnv, order_id: uuid.UUID) -> AsyncIterator[None]:
    """Place ``order_id`` in a transaction that holds its order lock as a consumer's would,
    and commits only once the test resumes the generator."""
    async with env.sessions() as session, session.begin():
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:namespace, hashtext(CAST(:id AS text)))"),
            {"namespace": ORDER_LOCK_NAMESPACE, "id": str(order_id)},
        )
        customer = Customer(email="grace@example.com", name="Grace")
        session.add(customer)
        await session.flush()
        at = datetime.now(UTC)
        session.add(
            Order(
                id=order_id,
                customer_id=customer.id,
                status="pending",
                currency="EUR",
                total=Decimal("25.00"),
                version=1,
                created_at=at,
                updated_at=at,
            )
        )
        await session.flush()
        yield


async def test_an_order_placed_while_its_batch_waits_for_the_lock_is_seen(env: TestEnv) -> None:
    """The batch's first statement takes the order locks, then reads the orders; an order
    placed by the transaction it waited for is not in that statement's snapshot. It must
    still be found (and its event applied), not taken for an unknown order."""
    order_id = uuid.uuid4()
    destinations = Destinations(env.settings.outbound_topic, env.settings.dlq_topic)
    holder = _place_holding_its_lock(env, order_id)
    await anext(holder)
    batch = asyncio.create_task(
        apply_batch(
            env.sessions,
            group_id="g",
            destinations=destinations,
            messages=[InboundMessage(env.settings.inbound_topic, 0, 0, *paid(order_id))],
            expected_offset=None,
            now=datetime.now(UTC),
        )
    )
    await lock_waits(env, "advisory", 1)
    with pytest.raises(StopAsyncIteration):
        await anext(holder)  # commits the placed order
    outcome = await batch
    assert (outcome.applied, outcome.dead_lettered) == (1, 0)
    assert (await orders_by_id(env.sessions))[order_id].status == "paid"


@pytest.mark.parametrize("first_commits", [True, False], ids=["commits", "rolls-back"])
async def test_a_customer_another_transaction_writes_meanwhile_is_the_one_referenced(
    env: TestEnv, first_commits: bool
) -> None:
    """Two transactions write the same new customer (two partitions place orders by one
    email): the batch's write waits for the other's row, then references what is there
    once it ends (the upsert's own answer, not the table read under a snapshot taken
    before the wait)."""
    email, first_id, order_id = "new@example.com", uuid.uuid4(), uuid.uuid4()
    async with env.sessions() as first:
        transaction = await first.begin()
        first.add(Customer(id=first_id, email=email, name="First"))
        await first.flush()
        batch = asyncio.create_task(
            _apply_at(env, 0, None, placed(order_id, email=email, name="B"))
        )
        await lock_waits(env, "transactionid", 1)
        await (transaction.commit() if first_commits else transaction.rollback())
    outcome = await batch
    assert (outcome.applied, outcome.dead_lettered) == (1, 0)
    async with env.sessions() as session:
        customer = await session.scalar(select(Customer).where(Customer.email == email))
        order = await session.get_one(Order, order_id)
    assert customer is not None
    assert customer.name == "B"
    assert (customer.id == first_id) is first_commits
    assert order.customer_id == customer.id


async def test_a_batch_locks_its_customers_in_email_order(env: TestEnv) -> None:
    """Two partitions' batches upsert customers they share in one order (by email, not by
    the events' order): one holding "b" and waiting for "a" while the other holds "a"
    and waits for "b" would deadlock."""
    async with env.sessions() as session, session.begin():
        session.add_all(
            [Customer(email="a@example.com", name="A"), Customer(email="b@example.com", name="B")]
        )
    later, earlier = uuid.uuid4(), uuid.uuid4()
    async with env.sessions() as holder, holder.begin():
        await holder.execute(text("UPDATE customers SET name = 'B.' WHERE email = 'b@example.com'"))
        batch = asyncio.create_task(
            _apply_at(  # "b" first in the stream
                env,
                0,
                None,
                placed(later, email="b@example.com"),
                placed(earlier, email="a@example.com"),
            )
        )
        await lock_waits(env, "transactionid", 1)  # the batch, for "b"
        async with env.sessions() as probe:
            with pytest.raises(DBAPIError, match="could not obtain lock"):
                # "a" is already the batch's.
                await probe.execute(
                    text("SELECT 1 FROM customers WHERE email = 'a@example.com' FOR UPDATE NOWAIT")
                )
    outcome = await batch
    assert (outcome.applied, outcome.dead_lettered) == (2, 0)


async def test_an_order_changed_while_its_batch_waits_for_the_lock_is_read_as_changed(
    env: TestEnv,
) -> None:
    """The first statement's snapshot predates its wait for the order lock; the row lock
    it then takes must still give it the order as the transaction it waited for left it
    (paid, version 2), not as its snapshot had it."""
    order_id = uuid.uuid4()
    await _apply_at(env, 0, None, placed(order_id))
    async with env.sessions() as holder, holder.begin():
        await holder.execute(
            text("SELECT pg_advisory_xact_lock(:namespace, hashtext(CAST(:id AS text)))"),
            {"namespace": ORDER_LOCK_NAMESPACE, "id": str(order_id)},
        )
        await holder.execute(
            text("UPDATE orders SET status = 'paid', version = 2 WHERE id = :id"),
            {"id": order_id},
        )
        batch = asyncio.create_task(_apply_at(env, 1, 1, shipped(order_id)))
        await lock_waits(env, "advisory", 1)
    outcome = await batch
    assert (outcome.applied, outcome.dead_lettered) == (1, 0)
    order = (await orders_by_id(env.sessions))[order_id]
    assert (order.status, order.version) == ("shipped", 3)


async def test_an_order_placed_meanwhile_cannot_deadlock_the_batch_with_a_backfill(
    env: TestEnv,
) -> None:
    """X < Z by id; Z exists, X is placed while the batch waits for X's lock. The batch's
    first statement then locks only Z's row. Had it locked X's row later (out of id
    order), a backfill holding X FOR SHARE and waiting for Z would close a cycle. The
    batch starts over instead: both its events apply and the backfill goes through."""
    low, high = sorted([uuid.uuid4(), uuid.uuid4()])
    await _apply_at(env, 0, None, placed(high))
    holder = _place_holding_its_lock(env, low)
    await anext(holder)
    async with env.engine.connect() as offsets, offsets.begin():
        # The batch will wait here, in its second statement, after its first.
        await offsets.execute(text("SELECT 1 FROM consumer_offsets WHERE partition = 0 FOR UPDATE"))
        batch = asyncio.create_task(_apply_at(env, 1, 1, paid(low), paid(high)))
        await lock_waits(env, "advisory", 1)
        with pytest.raises(StopAsyncIteration):
            await anext(holder)  # places the low order
        await lock_waits(env, "transactionid", 1)  # the batch, at the offset row

        async def backfill() -> None:
            # As a backfill batch locks its orders.
            async with env.engine.connect() as side, side.begin():
                await side.execute(
                    text("SELECT id FROM orders WHERE id = ANY(:ids) ORDER BY id FOR SHARE"),
                    {"ids": [low, high]},
                )

        backfilling = asyncio.create_task(backfill())
        await lock_waits(env, "transactionid", 2)  # the backfill too, at the high order
    await backfilling
    outcome = await batch
    assert (outcome.applied, outcome.dead_lettered) == (2, 0)
    statuses = {
        order_id: order.status for order_id, order in (await orders_by_id(env.sessions)).items()
    }
    assert statuses == {low: "paid", high: "paid"}


async def test_a_message_the_database_refuses_is_isolated_and_its_neighbours_applied_once(
    env: TestEnv,
) -> None:
    before, refused, after = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    # PostgreSQL text can't hold NUL: valid JSON, refused by the database itself.
    nul_line = [{"sku": "SKU-\u0000", "quantity": 1, "unit_price": "1.00"}]
    stream = [placed(before), placed(refused, lines=nul_line), placed(after), paid(before)]
    await produce(env.settings, stream)
    async with running_consumer(env.settings) as consumer:
        await wait_outbox(env, len(stream))

        async def counted() -> None:
            assert consumer.stats.dead_letters["schema_violation"] == 1

        await eventually(counted)
    orders = await orders_by_id(env.sessions)
    assert set(orders) == {before, after}
    assert orders[before].version == 2
    dead = await outbox_rows(env.sessions, env.settings.dlq_topic)
    assert [header_map(r.headers)["error.reason"] for r in dead] == ["schema_violation"]
    assert "database refused" in header_map(dead[0].headers)["error.message"]
    assert dead[0].payload == stream[1][1]
    assert await applied_count(env.sessions) == 3
