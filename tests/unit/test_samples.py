"""SampleStream: seeded sample traffic whose every message is what its label says."""

import itertools
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from consumer.errors import DeadLetterReason, RejectedEvent
from consumer.events import InboundEvent, decode_event
from consumer.state_machine import OrderState, transition
from orderflow.tools.samples import SampleMessage, SampleStream, encode, event_document
from tests.helpers import expected_outcome

AT = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)
FAULT_REASONS = {
    "malformed_json",
    "schema_violation",
    "unknown_event_type",
    "unknown_order",
    "amount_mismatch",
    "invalid_transition",
}
#: Rejected by decode_event itself; the others need the order's state to decide.
DECODE_REASONS = {"malformed_json", "schema_violation", "unknown_event_type"}
STATE_REASONS = FAULT_REASONS - DECODE_REASONS


def take(stream: SampleStream, count: int) -> list[SampleMessage]:
    return list(itertools.islice(stream, count))


def shape(message: SampleMessage) -> tuple[Any, ...]:
    """What must not depend on anything but the seed (not the clock, not uuid4)."""
    try:
        document = orjson.loads(message.value or b"")
    except orjson.JSONDecodeError:
        body: Any = message.value
    else:
        body = {k: v for k, v in document.items() if k not in {"event_id", "occurred_at"}}
    return (message.key, message.expect, message.order_id, body)


def event_id(message: SampleMessage) -> str:
    assert message.value is not None
    return str(orjson.loads(message.value)["event_id"])


@pytest.fixture(scope="module")
def faulty() -> list[SampleMessage]:
    """Enough traffic, with a fault every other message, to see every kind of mistake."""
    return take(SampleStream(seed=11, open_orders=8, fault_every=2), 1_500)


def test_every_label_occurs(faulty: list[SampleMessage]) -> None:
    labels = Counter(message.expect for message in faulty)
    assert set(labels) == {"event", "duplicate", *FAULT_REASONS}
    assert set(labels) - {"event", "duplicate"} <= {reason.value for reason in DeadLetterReason}


def test_deterministic_shape_for_a_seed() -> None:
    first = [shape(m) for m in take(SampleStream(seed=3, fault_every=5), 400)]
    second = [shape(m) for m in take(SampleStream(seed=3, fault_every=5), 400)]
    assert first == second


def test_different_seeds_differ() -> None:
    first = [shape(m) for m in take(SampleStream(seed=1), 100)]
    second = [shape(m) for m in take(SampleStream(seed=2), 100)]
    assert first != second


def test_event_ids_are_deterministic_for_a_seed() -> None:
    def event_ids() -> list[str]:
        messages = take(SampleStream(seed=3, fault_every=3), 300)
        return [event_id(m) for m in messages if m.expect != "malformed_json"]

    first, second = event_ids(), event_ids()
    assert first
    assert first == second


def test_bytes_are_deterministic_for_a_seed() -> None:
    first = [(m.key, m.value, m.expect) for m in take(SampleStream(seed=3), 200)]
    second = [(m.key, m.value, m.expect) for m in take(SampleStream(seed=3), 200)]
    assert first == second


def test_count_counts_messages() -> None:
    stream = SampleStream(seed=5)
    take(stream, 37)
    assert stream.count == 37


def test_no_faults_when_disabled() -> None:
    messages = take(SampleStream(seed=9, fault_every=0), 500)
    assert {m.expect for m in messages} == {"event"}


def test_default_stream_is_mostly_events() -> None:
    labels = Counter(m.expect for m in take(SampleStream(seed=7), 500))
    assert labels["event"] >= 450
    assert sum(labels.values()) == 500


def test_every_event_decodes(faulty: list[SampleMessage]) -> None:
    events = [m for m in faulty if m.expect == "event"]
    assert len(events) > 500
    for message in events:
        event = decode_event(message.key, message.value)
        assert isinstance(event, InboundEvent)
        assert event.order_id == message.order_id
        assert message.key == str(message.order_id).encode()


def test_events_of_the_default_stream_decode() -> None:
    for message in take(SampleStream(), 300):
        if message.expect == "event":
            decode_event(message.key, message.value)


def test_duplicates_decode_and_repeat_an_earlier_event(faulty: list[SampleMessage]) -> None:
    seen: set[str] = set()
    duplicates = 0
    for message in faulty:
        if message.expect == "event":
            seen.add(event_id(message))
        elif message.expect == "duplicate":
            duplicates += 1
            decode_event(message.key, message.value)
            assert event_id(message) in seen
    assert duplicates > 0


@pytest.mark.parametrize("reason", sorted(STATE_REASONS))
def test_state_faults_decode_fine(faulty: list[SampleMessage], reason: str) -> None:
    messages = [m for m in faulty if m.expect == reason]
    assert messages
    for message in messages:
        event = decode_event(message.key, message.value)
        assert event.order_id == message.order_id


@pytest.mark.parametrize("reason", sorted(DECODE_REASONS))
def test_decode_faults_are_rejected_as_labelled(faulty: list[SampleMessage], reason: str) -> None:
    messages = [m for m in faulty if m.expect == reason]
    assert messages
    for message in messages:
        with pytest.raises(RejectedEvent) as excinfo:
            decode_event(message.key, message.value)
        assert excinfo.value.reason == reason


class PureConsumer:
    """The consumer's decisions without a database: decode, skip repeats, transition."""

    def __init__(self) -> None:
        self.orders: dict[uuid.UUID, OrderState] = {}
        self.applied: set[uuid.UUID] = set()

    def outcome(self, message: SampleMessage) -> str:
        try:
            event = decode_event(message.key, message.value)
        except RejectedEvent as error:
            return error.reason.value
        if event.event_id in self.applied:
            return "duplicate"
        try:
            state = transition(self.orders.get(event.order_id), event, at=AT)
        except RejectedEvent as error:
            return error.reason.value
        self.orders[event.order_id] = state
        self.applied.add(event.event_id)
        return "event"


def test_whole_stream_through_the_state_machine(faulty: list[SampleMessage]) -> None:
    """Replayed through decode_event and transition, every message ends as its label says."""
    consumer = PureConsumer()
    for offset, message in enumerate(faulty):
        assert consumer.outcome(message) == message.expect, (offset, message)
    finished = Counter(state.status.value for state in consumer.orders.values())
    assert finished["delivered"] > 0
    assert finished["cancelled"] > 0


def test_event_document_and_encode() -> None:
    order_id = uuid.UUID("0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10")
    given = uuid.UUID("7d9f0c1e-1111-4f6e-9d5c-0a7c2b8f9e01")
    document = event_document("OrderDelivered", order_id, {}, event_id=given, occurred_at=AT)
    assert document == {
        "event_id": str(given),
        "event_type": "OrderDelivered",
        "schema_version": 1,
        "occurred_at": "2026-11-24T10:15:00Z",
        "order_id": str(order_id),
        "payload": {},
    }
    event = decode_event(str(order_id).encode(), encode(document))
    assert event.event_id == given
    assert event.occurred_at == AT


def test_racing_producers_swap_two_events_of_some_orders_and_parking_puts_them_right() -> None:
    messages = take(SampleStream(seed=5, fault_every=0, race_every=4), 400)
    early = [m for m in messages if m.expect == "early"]
    assert early
    stream = [(m.key, m.value) for m in messages]
    parked = expected_outcome(stream, park=True)
    # Every early event waits for the one it needs and is released, but for those whose
    # partner the stream ends before (they would expire).
    assert parked.dead_letters.total() == parked.expired
    assert parked.released + parked.expired == parked.parked
    assert parked.parked >= len(early) - 5
    assert parked.released > 0
    # Without parking, an early event is dead-lettered.
    assert sum(expected_outcome(stream).dead_letters.values()) >= len(early)


def test_without_races_nothing_arrives_early() -> None:
    assert all(m.expect != "early" for m in take(SampleStream(seed=5), 500))
