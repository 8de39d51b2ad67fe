"""Parking on a real database: events that arrive before the events they need wait, are
applied right after them in arrival order, and end applied or dead-lettered exactly once
(see "Resequencing and parking" in the contract)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import select, text, update

from consumer.apply import BatchOutcome, Destinations, InboundMessage, apply_batch
from consumer.errors import OffsetConflict
from consumer.models import ParkedEvent
from consumer.parking import PARKED_MS_HEADER, expire_parked, expire_where
from tests.events import Message, cancelled, delivered, event, paid, placed, shipped
from tests.helpers import (
    Expected,
    TestEnv,
    decode_json,
    expected_outcome,
    header_map,
    invoke_cli,
    lock_waits,
    orders_by_id,
    outbox_rows,
)

pytestmark = pytest.mark.integration

TOPIC = "orders.events.parking"


class Partition:
    """One inbound partition fed batch by batch through ``apply_batch``, as a lane does."""

    def __init__(self, env: TestEnv, *, park: bool = True, number: int = 0) -> None:
        self.env = env
        self.park = park
        self.number = number
        self.offset: int | None = None
        self.destinations = Destinations(
            updates_topic=env.settings.outbound_topic,
            dead_letter_topic=env.settings.dlq_topic,
        )

    async def apply(self, *messages: Message, now: datetime | None = None) -> BatchOutcome:
        start = self.offset or 0
        inbound = [
            InboundMessage(TOPIC, self.number, start + index, key, value)
            for index, (key, value) in enumerate(messages)
        ]
        outcome = await apply_batch(
            self.env.sessions,
            group_id="g",
            destinations=self.destinations,
            messages=inbound,
            expected_offset=self.offset,
            now=now or datetime.now(UTC),
            park=self.park,
        )
        self.offset = outcome.next_offset
        return outcome

    async def expire(self, older_than: timedelta = timedelta(0)) -> int:
        assert self.offset is not None
        expired = await expire_parked(
            self.env.sessions,
            group_id="g",
            topic=TOPIC,
            partition=self.number,
            expected_offset=self.offset,
            older_than=older_than,
            dead_letter_topic=self.destinations.dead_letter_topic,
            now=datetime.now(UTC),
        )
        return expired.count


async def parked_rows(env: TestEnv) -> list[ParkedEvent]:
    async with env.sessions() as session:
        return list((await session.execute(select(ParkedEvent).order_by(ParkedEvent.id))).scalars())


async def versions_emitted(env: TestEnv, order_id: uuid.UUID) -> list[tuple[int, str]]:
    """(order_version, change) of every update of ``order_id`` in the outbox, in id order."""
    updates = []
    for row in await outbox_rows(env.sessions, env.settings.outbound_topic):
        document = decode_json(row.payload)
        if document["order_id"] == str(order_id):
            updates.append((document["order_version"], document["change"]))
    return updates


async def dead_letters(env: TestEnv) -> list[dict[str, str]]:
    return [
        header_map(row.headers) for row in await outbox_rows(env.sessions, env.settings.dlq_topic)
    ]


async def test_a_payment_before_its_order_waits_and_applies_right_after_it(env: TestEnv) -> None:
    order_id = uuid.uuid4()
    partition = Partition(env)
    early = await partition.apply(paid(order_id))
    assert (early.applied, early.parked, early.dead_letters) == (0, {"OrderPaid": 1}, {})
    [waiting] = await parked_rows(env)
    assert (waiting.order_id, waiting.event_type, waiting.reason) == (
        order_id,
        "OrderPaid",
        "unknown_order",
    )
    assert waiting.offset == 0

    late = await partition.apply(placed(order_id))
    assert (late.applied, late.released) == (2, {"OrderPaid": 1})
    order = (await orders_by_id(env.sessions))[order_id]
    assert (order.status, order.version) == ("paid", 2)
    assert await versions_emitted(env, order_id) == [(1, "OrderPlaced"), (2, "OrderPaid")]
    assert await parked_rows(env) == []
    assert await dead_letters(env) == []


async def test_a_whole_lifecycle_in_reverse_comes_out_in_order_in_one_batch(env: TestEnv) -> None:
    order_id = uuid.uuid4()
    outcome = await Partition(env).apply(
        delivered(order_id), shipped(order_id), paid(order_id), placed(order_id)
    )
    assert outcome.applied == 4
    assert await versions_emitted(env, order_id) == [
        (1, "OrderPlaced"),
        (2, "OrderPaid"),
        (3, "OrderShipped"),
        (4, "OrderDelivered"),
    ]
    assert await parked_rows(env) == []


async def test_parked_events_wait_across_batches_until_each_can_apply(env: TestEnv) -> None:
    order_id = uuid.uuid4()
    partition = Partition(env)
    await partition.apply(placed(order_id))
    await partition.apply(delivered(order_id))  # needs shipped, which needs paid
    await partition.apply(shipped(order_id))  # needs paid
    assert [row.event_type for row in await parked_rows(env)] == ["OrderDelivered", "OrderShipped"]
    outcome = await partition.apply(paid(order_id))
    assert outcome.released == {"OrderShipped": 1, "OrderDelivered": 1}
    assert await versions_emitted(env, order_id) == [
        (1, "OrderPlaced"),
        (2, "OrderPaid"),
        (3, "OrderShipped"),
        (4, "OrderDelivered"),
    ]


async def test_a_repeat_of_a_parked_event_is_a_duplicate(env: TestEnv) -> None:
    order_id = uuid.uuid4()
    early = paid(order_id)
    partition = Partition(env)
    await partition.apply(early)
    again = await partition.apply(early)
    assert (again.duplicates, again.parked) == (1, {})
    await partition.apply(placed(order_id))
    assert await versions_emitted(env, order_id) == [(1, "OrderPlaced"), (2, "OrderPaid")]
    assert (await partition.apply(early)).duplicates == 1  # applied now: still a duplicate


async def test_with_parking_off_an_early_event_is_dead_lettered_at_once(env: TestEnv) -> None:
    order_id = uuid.uuid4()
    outcome = await Partition(env, park=False).apply(paid(order_id), placed(order_id))
    assert (outcome.applied, outcome.parked, dict(outcome.dead_letters)) == (
        1,
        {},
        {"unknown_order": 1},
    )
    assert await parked_rows(env) == []
    [letter] = await dead_letters(env)
    assert letter["error.reason"] == "unknown_order"
    assert PARKED_MS_HEADER not in letter


async def test_events_that_can_never_apply_are_dead_lettered_at_once_not_parked(
    env: TestEnv,
) -> None:
    order_id = uuid.uuid4()
    partition = Partition(env)
    await partition.apply(placed(order_id), cancelled(order_id))
    outcome = await partition.apply(paid(order_id), placed(order_id), paid(uuid.uuid4(), "1"))
    # Paid on a cancelled order, a second OrderPlaced: never; a payment for an unknown order
    # might be early: it waits.
    assert dict(outcome.dead_letters) == {"invalid_transition": 1, "duplicate_order": 1}
    assert outcome.parked == {"OrderPaid": 1}


async def test_a_parked_event_whose_order_moved_past_it_is_dead_lettered_when_it_did(
    env: TestEnv,
) -> None:
    """OrderShipped waits for OrderPaid; the order is cancelled instead: it can never apply,
    so it is dead-lettered then (with the reason that now holds), not when it expires."""
    order_id = uuid.uuid4()
    partition = Partition(env)
    await partition.apply(placed(order_id), shipped(order_id))
    outcome = await partition.apply(cancelled(order_id))
    assert dict(outcome.dead_letters) == {"invalid_transition": 1}
    [letter] = await dead_letters(env)
    assert letter["error.reason"] == "invalid_transition"
    assert "parked" in letter["error.message"]
    assert int(letter[PARKED_MS_HEADER]) >= 0
    assert (letter["source.partition"], letter["source.offset"]) == ("0", "1")
    assert await parked_rows(env) == []


async def test_an_early_payment_of_the_wrong_amount_is_dead_lettered_when_its_order_comes(
    env: TestEnv,
) -> None:
    order_id = uuid.uuid4()
    partition = Partition(env)
    await partition.apply(paid(order_id, amount="10.00"))
    outcome = await partition.apply(placed(order_id))  # total 25.00
    assert (outcome.applied, dict(outcome.dead_letters)) == (1, {"amount_mismatch": 1})
    assert await versions_emitted(env, order_id) == [(1, "OrderPlaced")]


async def test_an_event_parked_too_long_is_dead_lettered_with_the_reason_it_arrived_with(
    env: TestEnv,
) -> None:
    order_id = uuid.uuid4()
    partition = Partition(env)
    await partition.apply(paid(order_id))
    assert await partition.expire(timedelta(hours=1)) == 0  # not yet
    async with env.sessions() as session, session.begin():
        await session.execute(
            update(ParkedEvent).values(parked_at=datetime.now(UTC) - timedelta(seconds=90))
        )
    assert await partition.expire(timedelta(seconds=60)) == 1
    [letter] = await dead_letters(env)
    assert letter["error.reason"] == "unknown_order"
    assert "waited 60 s" in letter["error.message"]
    assert 90_000 <= int(letter[PARKED_MS_HEADER]) < 120_000
    assert (letter["source.topic"], letter["source.offset"]) == (TOPIC, "0")
    assert await parked_rows(env) == []
    # Its order comes after all: the payment is gone (dead-lettered), the order is new.
    await partition.apply(placed(order_id))
    assert await versions_emitted(env, order_id) == [(1, "OrderPlaced")]


async def test_a_member_that_lost_the_partition_expires_nothing(env: TestEnv) -> None:
    order_id = uuid.uuid4()
    owner = Partition(env)
    await owner.apply(paid(order_id))
    zombie = Partition(env)
    zombie.offset = owner.offset
    await owner.apply(shipped(uuid.uuid4()))  # the owner moves on
    with pytest.raises(OffsetConflict):
        await zombie.expire()
    assert len(await parked_rows(env)) == 2


async def test_expiry_racing_the_late_event_ends_each_parked_event_exactly_once(
    env: TestEnv,
) -> None:
    """The late OrderPlaced and the expiry of the payment waiting for it, at once, many
    times: either the payment is applied (version 2) or dead-lettered, never both, never
    neither."""
    outcomes: set[str] = set()
    for round_number in range(20):
        order_id = uuid.uuid4()
        partition = Partition(env, number=round_number)
        await partition.apply(paid(order_id))
        expected = partition.offset
        assert expected is not None
        late = partition.apply(placed(order_id))
        expiry = expire_parked(
            env.sessions,
            group_id="g",
            topic=TOPIC,
            partition=round_number,
            expected_offset=expected,
            older_than=timedelta(0),
            dead_letter_topic=env.settings.dlq_topic,
            now=datetime.now(UTC),
        )
        results = await asyncio.gather(late, expiry, return_exceptions=True)
        versions = await versions_emitted(env, order_id)
        paid_letters = [
            letter
            for letter in await dead_letters(env)
            if letter["source.partition"] == str(round_number)
        ]
        if versions == [(1, "OrderPlaced"), (2, "OrderPaid")]:
            assert paid_letters == [], results
            outcomes.add("applied")
        else:
            assert versions == [(1, "OrderPlaced")], results
            assert [letter["error.reason"] for letter in paid_letters] == ["unknown_order"]
            outcomes.add("expired")
        assert [row for row in await parked_rows(env) if row.order_id == order_id] == []
    assert outcomes  # (which one wins is up to the server; both do, over the rounds)


async def test_an_operator_can_dead_letter_what_waits_for_one_order(env: TestEnv) -> None:
    kept, dropped = uuid.uuid4(), uuid.uuid4()
    partition = Partition(env)
    await partition.apply(paid(kept), paid(dropped), shipped(dropped))
    expired, matched = await expire_where(
        env.sessions,
        dead_letter_topic=env.settings.dlq_topic,
        order_id=dropped,
        older_than=timedelta(0),
        now=datetime.now(UTC),
        dry_run=True,
    )
    assert (expired.count, len(matched)) == (0, 2)
    assert len(await parked_rows(env)) == 3
    expired, matched = await expire_where(
        env.sessions,
        dead_letter_topic=env.settings.dlq_topic,
        order_id=dropped,
        older_than=timedelta(0),
        now=datetime.now(UTC),
    )
    assert expired.expired == {"OrderPaid": 1, "OrderShipped": 1}
    assert [row.order_id for row in await parked_rows(env)] == [kept]
    letters = await dead_letters(env)
    assert [letter["source.offset"] for letter in letters] == ["1", "2"]
    assert all("orderflow parked expire" in letter["error.message"] for letter in letters)


@pytest.mark.parametrize("park", [True, False])
async def test_a_rejected_event_corrected_with_the_same_event_id_in_the_same_batch_applies(
    env: TestEnv, park: bool
) -> None:
    """A dead-lettered event leaves nothing behind: its corrected copy, same event_id,
    applies, even right behind it in one batch (only applied and parked ids are seen)."""
    order_id = uuid.uuid4()
    event_id = str(uuid.uuid4())
    partition = Partition(env, park=park)
    await partition.apply(placed(order_id))
    wrong = event("OrderPaid", order_id, {"payment_id": "p", "amount": "1.00"}, event_id=event_id)
    right = event("OrderPaid", order_id, {"payment_id": "p", "amount": "25.00"}, event_id=event_id)
    outcome = await partition.apply(wrong, right)
    assert (outcome.applied, dict(outcome.dead_letters), outcome.duplicates) == (
        1,
        {"amount_mismatch": 1},
        0,
    )
    assert await versions_emitted(env, order_id) == [(1, "OrderPlaced"), (2, "OrderPaid")]


def lifecycles(rng: random.Random, orders: int, *, cancellations: bool) -> list[list[Message]]:
    """Each order's events, in business order: placed, paid, shipped, delivered; with
    ``cancellations``, some are cancelled on the way instead."""
    result = []
    for _ in range(orders):
        order_id = uuid.uuid4()
        events = [placed(order_id), paid(order_id), shipped(order_id), delivered(order_id)]
        fate = rng.random() if cancellations else 1.0
        if fate < 0.2:
            events = [placed(order_id), cancelled(order_id)]
        elif fate < 0.4:
            events = [placed(order_id), paid(order_id), cancelled(order_id)]
        result.append(events)
    return result


def shuffled(rng: random.Random, orders: list[list[Message]]) -> list[Message]:
    """Every order's events in a random order, the orders interleaved at random."""
    queues = [rng.sample(events, len(events)) for events in orders]
    stream: list[Message] = []
    while queues:
        queue = rng.choice(queues)
        stream.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return stream


async def feed(partition: Partition, rng: random.Random, stream: list[Message]) -> None:
    """``stream`` in batches of random sizes."""
    position = 0
    while position < len(stream):
        size = rng.randint(1, 12)
        await partition.apply(*stream[position : position + size])
        position += size


async def assert_outcome(env: TestEnv, expected: Expected) -> None:
    final = await orders_by_id(env.sessions)
    assert {order_id: (order.status, order.version) for order_id, order in final.items()} == {
        order_id: (state.status.value, state.version) for order_id, state in expected.orders.items()
    }
    for order_id, versions in expected.updates.items():
        assert [version for version, _ in await versions_emitted(env, order_id)] == versions
    reasons = Counter(letter["error.reason"] for letter in await dead_letters(env))
    assert reasons == expected.dead_letters


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_shuffled_lifecycles_end_as_if_they_had_come_in_order(
    env: TestEnv, seed: int
) -> None:
    """Many orders, each order's events (placed, paid, shipped, delivered) in a random
    order, some repeated, fed in batches of random sizes: every order ends delivered at
    version 4, its updates are versions 1, 2, 3, 4 in order, nothing is dead-lettered and
    nothing waits."""
    rng = random.Random(seed)
    orders = lifecycles(rng, 40, cancellations=False)
    stream = shuffled(rng, orders)
    stream += rng.sample(stream, 10)  # repeats
    in_order = expected_outcome([event for events in orders for event in events])
    assert expected_outcome(stream, park=True).parked > 0
    await feed(Partition(env), rng, stream)
    await assert_outcome(env, in_order)
    assert await parked_rows(env) == []


@pytest.mark.parametrize("seed", [4, 5])
async def test_shuffled_lifecycles_with_cancellations_end_as_the_contract_says(
    env: TestEnv, seed: int
) -> None:
    """With cancellations the order of arrival can matter (a cancellation that overtakes
    a payment applies to a pending order, and the payment can then never apply): the end
    state, each order's versions and the dead letters are exactly the contract's, and
    what still waits at the end expires with the reason it arrived with."""
    rng = random.Random(seed)
    stream = shuffled(rng, lifecycles(rng, 40, cancellations=True))
    stream += rng.sample(stream, 10)
    expected = expected_outcome(stream, park=True)
    partition = Partition(env)
    await feed(partition, rng, stream)
    assert len(await parked_rows(env)) == expected.expired
    await partition.expire()
    await assert_outcome(env, expected)
    assert await parked_rows(env) == []


async def test_a_poison_event_in_the_middle_holds_its_order_until_it_is_fixed(
    env: TestEnv,
) -> None:
    """The order's OrderPlaced is malformed (dead-lettered); its later events wait. The
    fixed OrderPlaced, sent again, releases them all, in order."""
    order_id = uuid.uuid4()
    partition = Partition(env)
    broken = event("OrderPlaced", order_id, {"currency": "EUR"})  # no customer, no lines
    await partition.apply(broken, paid(order_id), shipped(order_id))
    assert [row.event_type for row in await parked_rows(env)] == ["OrderPaid", "OrderShipped"]
    [letter] = await dead_letters(env)
    assert letter["error.reason"] == "schema_violation"
    outcome = await partition.apply(placed(order_id))  # the redriven, fixed event
    assert outcome.released == {"OrderPaid": 1, "OrderShipped": 1}
    assert await versions_emitted(env, order_id) == [
        (1, "OrderPlaced"),
        (2, "OrderPaid"),
        (3, "OrderShipped"),
    ]


async def test_parked_list_shows_what_waits_and_parked_expire_dead_letters_it(
    env: TestEnv,
) -> None:
    waiting, other = uuid.uuid4(), uuid.uuid4()
    partition = Partition(env)
    await partition.apply(paid(waiting), shipped(other))

    listed = await invoke_cli(env.settings, "parked", "list", "--json")
    assert listed.exit_code == 0, listed.output
    documents = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [(d["order_id"], d["event_type"], d["reason"]) for d in documents] == [
        (str(waiting), "OrderPaid", "unknown_order"),
        (str(other), "OrderShipped", "unknown_order"),
    ]
    assert documents[0]["source"] == {"topic": TOPIC, "partition": 0, "offset": 0}
    one = await invoke_cli(env.settings, "parked", "list", "--order", str(other))
    assert one.exit_code == 0, one.output
    assert str(other) in one.stdout
    assert str(waiting) not in one.stdout

    dry = await invoke_cli(env.settings, "parked", "expire", "--order", str(waiting), "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "matched=1 dead-lettered=0" in dry.stdout
    assert len(await parked_rows(env)) == 2
    young = await invoke_cli(env.settings, "parked", "expire", "--older-than", "1h")
    assert "matched=0" in young.stdout
    done = await invoke_cli(env.settings, "parked", "expire", "--order", str(waiting))
    assert done.exit_code == 0, done.output
    assert "matched=1 dead-lettered=1" in done.stdout
    assert [row.order_id for row in await parked_rows(env)] == [other]
    [letter] = await dead_letters(env)
    assert (letter["error.reason"], letter["source.offset"]) == ("unknown_order", "0")


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (("parked", "list", "--order", "not-a-uuid"), "--order"),
        (("parked", "expire", "--older-than", "soon"), "--older-than"),
    ],
)
async def test_bad_parked_options_are_one_line_naming_them(
    env: TestEnv, arguments: tuple[str, ...], named: str
) -> None:
    result = await invoke_cli(env.settings, *arguments)
    assert result.exit_code != 0
    assert named in result.output
    assert "Traceback" not in result.output


async def test_a_wrong_payment_in_the_middle_holds_what_follows_until_the_fixed_one_comes(
    env: TestEnv,
) -> None:
    """The payment's amount is wrong (dead-lettered at once: it can never apply); the
    shipment and delivery after it wait for a payment; the corrected payment, sent again
    with the same event_id, applies and releases them."""
    order_id = uuid.uuid4()
    event_id = str(uuid.uuid4())
    partition = Partition(env)
    wrong = event("OrderPaid", order_id, {"payment_id": "p", "amount": "9.99"}, event_id=event_id)
    await partition.apply(placed(order_id), wrong, shipped(order_id), delivered(order_id))
    assert [letter["error.reason"] for letter in await dead_letters(env)] == ["amount_mismatch"]
    assert [row.event_type for row in await parked_rows(env)] == ["OrderShipped", "OrderDelivered"]
    right = event("OrderPaid", order_id, {"payment_id": "p", "amount": "25.00"}, event_id=event_id)
    outcome = await partition.apply(right)
    assert outcome.released == {"OrderShipped": 1, "OrderDelivered": 1}
    assert [version for version, _ in await versions_emitted(env, order_id)] == [1, 2, 3, 4]
    assert await parked_rows(env) == []


@pytest.mark.parametrize("split", [True, False])
async def test_a_parked_event_dead_lettered_on_release_frees_its_event_id(
    env: TestEnv, split: bool
) -> None:
    """A payment of the wrong amount waits for its order, which then shows another total:
    it is dead-lettered, and leaves nothing behind, so its corrected copy (same event_id)
    right behind the order applies."""
    order_id, event_id = uuid.uuid4(), str(uuid.uuid4())
    wrong = event("OrderPaid", order_id, {"payment_id": "p", "amount": "1.00"}, event_id=event_id)
    right = event("OrderPaid", order_id, {"payment_id": "p", "amount": "25.00"}, event_id=event_id)
    partition = Partition(env)
    if split:
        await partition.apply(wrong)
        outcome = await partition.apply(placed(order_id), right)
    else:
        outcome = await partition.apply(wrong, placed(order_id), right)
    assert outcome.duplicates == 0
    assert await versions_emitted(env, order_id) == [(1, "OrderPlaced"), (2, "OrderPaid")]
    assert [letter["error.reason"] for letter in await dead_letters(env)] == ["amount_mismatch"]


async def hold_offset_row(env: TestEnv, partition: int) -> AsyncIterator[None]:
    """Hold the row lock of ``partition``'s stored offset while the block runs: a batch of
    that partition then waits in its compare-and-set, after it has read its orders."""
    async with env.engine.connect() as side, side.begin():
        await side.execute(
            text(
                "SELECT 1 FROM consumer_offsets WHERE topic = :topic AND partition = :p FOR UPDATE"
            ),
            {"topic": TOPIC, "p": partition},
        )
        yield


async def test_an_event_parked_while_its_order_is_placed_on_another_partition_is_released(
    env: TestEnv,
) -> None:
    """Events of one order on two partitions (a missing key, say): the payment's batch
    finds no order and parks it, while the other partition places the order. Without a
    lock on the order id, the placing batch sees no parked payment and the parking batch
    no order: the payment would wait until it expires. With it, they take turns."""
    order_id = uuid.uuid4()
    parking, placing = Partition(env, number=0), Partition(env, number=1)
    await parking.apply(placed(uuid.uuid4()))  # the partition's offset row exists
    async with contextlib.asynccontextmanager(hold_offset_row)(env, 0):
        early = asyncio.create_task(parking.apply(paid(order_id)))
        # It holds the order's lock, read its orders (none) and waits for the offset row.
        await lock_waits(env, "transactionid", 1)
        late = asyncio.create_task(placing.apply(placed(order_id)))
        await lock_waits(env, "advisory", 1)  # the placing batch, for the order's lock
    await early
    await late
    assert await versions_emitted(env, order_id) == [(1, "OrderPlaced"), (2, "OrderPaid")]
    assert await parked_rows(env) == []


async def test_expiry_takes_parked_rows_in_id_order_so_it_cannot_deadlock(env: TestEnv) -> None:
    """After a release and a vacuum a later parked row can sit before an earlier one in
    the table; an operator locking the earlier one and then the later one must not
    deadlock with the partition's expiry."""
    partition = Partition(env)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await partition.apply(paid(first), paid(second))
    await partition.apply(placed(first))  # releases the first row: its slot is free
    async with env.engine.connect() as connection:
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(text("VACUUM parked_events"))
    await partition.apply(paid(third))  # may take the freed slot
    rows = await parked_rows(env)
    assert [row.order_id for row in rows] == [second, third]
    async with env.engine.connect() as operator, operator.begin():
        await operator.execute(
            text("SELECT 1 FROM parked_events WHERE id = :id FOR UPDATE"), {"id": rows[0].id}
        )
        expiry = asyncio.create_task(partition.expire())
        await lock_waits(env, "transactionid", 1)  # the expiry, for the first row only
        await asyncio.wait_for(
            operator.execute(
                text("SELECT 1 FROM parked_events WHERE id = :id FOR UPDATE"),
                {"id": rows[1].id},
            ),
            timeout=10,
        )
    assert await asyncio.wait_for(expiry, timeout=10) == 2
