"""transition(state, event, at=...): every legal move, every refusal, and properties over runs."""

import copy
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.errors import (
    AmountMismatch,
    DeadLetterReason,
    DuplicateOrder,
    InvalidTransition,
    RejectedEvent,
    UnknownOrder,
)
from consumer.events import (
    Customer,
    EventType,
    InboundEvent,
    Line,
    OrderCancelled,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    Payload,
)
from consumer.state_machine import (
    TERMINAL_STATUSES,
    LineState,
    OrderState,
    OrderStatus,
    can_apply_later,
    order_total,
    transition,
)

ORDER_ID = uuid.UUID("0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10")
T0 = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)

PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: The contract's graph, written out independently of the implementation.
LEGAL: dict[tuple[OrderStatus, EventType], OrderStatus] = {
    (OrderStatus.PENDING, EventType.ORDER_PAID): OrderStatus.PAID,
    (OrderStatus.PAID, EventType.ORDER_SHIPPED): OrderStatus.SHIPPED,
    (OrderStatus.SHIPPED, EventType.ORDER_DELIVERED): OrderStatus.DELIVERED,
    (OrderStatus.PENDING, EventType.ORDER_CANCELLED): OrderStatus.CANCELLED,
    (OrderStatus.PAID, EventType.ORDER_CANCELLED): OrderStatus.CANCELLED,
}
NON_PLACED = [t for t in EventType if t is not EventType.ORDER_PLACED]

_TYPES: dict[type, EventType] = {
    OrderPlaced: EventType.ORDER_PLACED,
    OrderPaid: EventType.ORDER_PAID,
    OrderShipped: EventType.ORDER_SHIPPED,
    OrderDelivered: EventType.ORDER_DELIVERED,
    OrderCancelled: EventType.ORDER_CANCELLED,
}


def event(payload: Payload, *, order_id: uuid.UUID = ORDER_ID) -> InboundEvent:
    return InboundEvent(
        event_id=uuid.uuid4(),
        event_type=_TYPES[type(payload)],
        occurred_at=T0,
        order_id=order_id,
        payload=payload,
    )


def placed(*lines: tuple[str, int, str], currency: str = "EUR") -> InboundEvent:
    lines = lines or (("SKU-1", 2, "12.50"),)
    return event(
        OrderPlaced(
            customer=Customer(email="a@example.com", name="Ada"),
            currency=currency,
            lines=tuple(
                Line(sku=sku, quantity=quantity, unit_price=Decimal(price))
                for sku, quantity, price in lines
            ),
        )
    )


def paid(amount: str) -> InboundEvent:
    return event(OrderPaid(payment_id="pay_1", amount=Decimal(amount)))


def shipped() -> InboundEvent:
    return event(OrderShipped(carrier="DHL", tracking_number="TRK1"))


def delivered() -> InboundEvent:
    return event(OrderDelivered())


def cancelled() -> InboundEvent:
    return event(OrderCancelled(reason="changed mind"))


def state(status: OrderStatus, *, total: str = "25.00", version: int = 3) -> OrderState:
    return OrderState(
        id=ORDER_ID,
        status=status,
        currency="EUR",
        total=Decimal(total),
        version=version,
        customer_email="a@example.com",
        customer_name="Ada",
        lines=(LineState(sku="SKU-1", quantity=2, unit_price=Decimal("12.50")),),
        created_at=T0,
        updated_at=T0,
    )


def non_placed_event(event_type: EventType, *, total: str = "25.00") -> InboundEvent:
    return {
        EventType.ORDER_PAID: lambda: paid(total),
        EventType.ORDER_SHIPPED: shipped,
        EventType.ORDER_DELIVERED: delivered,
        EventType.ORDER_CANCELLED: cancelled,
    }[event_type]()


def rejected_by(expected: type[RejectedEvent], current: OrderState | None, e: InboundEvent) -> str:
    with pytest.raises(RejectedEvent) as excinfo:
        transition(current, e, at=T1)
    error = excinfo.value
    assert type(error) is expected, f"{type(error).__name__}: {error}"
    assert error.reason is expected.reason
    assert str(e.order_id) in error.message
    return error.message


# --- OrderPlaced ------------------------------------------------------------------------------


def test_order_placed_creates_a_pending_order() -> None:
    e = placed(("SKU-1", 2, "12.50"), ("SKU-2", 3, "0.10"))
    new = transition(None, e, at=T1)
    assert new == OrderState(
        id=ORDER_ID,
        status=OrderStatus.PENDING,
        currency="EUR",
        total=Decimal("25.30"),
        version=1,
        customer_email="a@example.com",
        customer_name="Ada",
        lines=(
            LineState(sku="SKU-1", quantity=2, unit_price=Decimal("12.50")),
            LineState(sku="SKU-2", quantity=3, unit_price=Decimal("0.10")),
        ),
        created_at=T1,
        updated_at=T1,
    )
    assert str(new.total) == "25.30"


@pytest.mark.parametrize(
    ("lines", "total"),
    [
        ((("A", 2, "12.50"),), "25.00"),
        ((("A", 3, "0.1"),), "0.3"),  # binary floats would give 0.30000000000000004
        ((("A", 1, "0.1"), ("B", 1, "0.2")), "0.3"),
        ((("A", 1, "0"),), "0"),
        ((("A", 1_000_000, "99999999999999.9999"),), "99999999999999999900.0000"),
        ((("A", 7, "1.2345"), ("B", 1, "100")), "108.6415"),
        ((("A", 1, "1E+2"),), "100"),
    ],
)
def test_total_is_the_exact_sum_of_quantity_times_unit_price(
    lines: tuple[tuple[str, int, str], ...], total: str
) -> None:
    new = transition(None, placed(*lines), at=T1)
    assert new.total == Decimal(total)
    assert type(new.total) is Decimal
    assert Fraction(new.total) == sum(Fraction(Decimal(p)) * q for _, q, p in lines)


def test_total_keeps_the_scale_of_the_prices() -> None:
    new = transition(None, placed(("A", 2, "12.50")), at=T1)
    assert new.total.as_tuple() == Decimal("25.00").as_tuple()


@pytest.mark.parametrize("status", list(OrderStatus))
def test_order_placed_on_an_existing_order_is_a_duplicate(status: OrderStatus) -> None:
    message = rejected_by(DuplicateOrder, state(status), placed())
    assert "already exists" in message


# --- the legal moves --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "make_event", "after"),
    [
        (OrderStatus.PENDING, lambda: paid("25.00"), OrderStatus.PAID),
        (OrderStatus.PAID, shipped, OrderStatus.SHIPPED),
        (OrderStatus.SHIPPED, delivered, OrderStatus.DELIVERED),
        (OrderStatus.PENDING, cancelled, OrderStatus.CANCELLED),
        (OrderStatus.PAID, cancelled, OrderStatus.CANCELLED),
    ],
    ids=["pending-paid", "paid-shipped", "shipped-delivered", "pending-cancel", "paid-cancel"],
)
def test_legal_move(
    before: OrderStatus, make_event: Callable[[], InboundEvent], after: OrderStatus
) -> None:
    current = state(before, version=4)
    new = transition(current, make_event(), at=T1)
    assert new == replace(current, status=after, version=5, updated_at=T1)
    assert new.created_at == T0
    assert new.total == current.total
    assert new.lines == current.lines


def test_whole_lifecycle_counts_versions() -> None:
    steps = [placed(("A", 2, "12.50")), paid("25.00"), shipped(), delivered()]
    current: OrderState | None = None
    for version, e in enumerate(steps, 1):
        at = T0 + timedelta(hours=version)
        current = transition(current, e, at=at)
        assert current.version == version
        assert current.updated_at == at
        assert current.created_at == T0 + timedelta(hours=1)
    assert current is not None
    assert current.status is OrderStatus.DELIVERED


@pytest.mark.parametrize("status", list(OrderStatus))
@pytest.mark.parametrize("event_type", NON_PLACED)
def test_every_status_and_event_type_pair(status: OrderStatus, event_type: EventType) -> None:
    current = state(status)
    e = non_placed_event(event_type)
    if (status, event_type) in LEGAL:
        new = transition(current, e, at=T1)
        assert new.status is LEGAL[(status, event_type)]
        assert new.version == current.version + 1
    else:
        message = rejected_by(InvalidTransition, current, e)
        assert str(event_type) in message
        assert str(status) in message


def test_exactly_the_contract_moves_are_legal() -> None:
    accepted = set()
    for status in OrderStatus:
        for event_type in NON_PLACED:
            try:
                transition(state(status), non_placed_event(event_type), at=T1)
            except InvalidTransition:
                continue
            accepted.add((status, event_type))
    assert accepted == set(LEGAL)


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_terminal_statuses(status: OrderStatus) -> None:
    assert {OrderStatus.DELIVERED, OrderStatus.CANCELLED} == TERMINAL_STATUSES
    for event_type in NON_PLACED:
        rejected_by(InvalidTransition, state(status), non_placed_event(event_type))


@pytest.mark.parametrize("event_type", NON_PLACED)
def test_event_for_a_missing_order_is_unknown_order(event_type: EventType) -> None:
    message = rejected_by(UnknownOrder, None, non_placed_event(event_type))
    assert str(event_type) in message


# --- OrderPaid amounts ------------------------------------------------------------------------


@pytest.mark.parametrize("amount", ["25.01", "24.99", "0", "2500", "25.0001"])
def test_wrong_amount_is_an_amount_mismatch(amount: str) -> None:
    current = state(OrderStatus.PENDING, total="25.00")
    message = rejected_by(AmountMismatch, current, paid(amount))
    assert amount in message
    assert "25.00" in message
    assert AmountMismatch.reason is DeadLetterReason.AMOUNT_MISMATCH


@pytest.mark.parametrize("amount", ["25", "25.0", "25.00", "25.0000", "2.5E+1"])
def test_equal_amount_of_any_scale_is_accepted(amount: str) -> None:
    current = state(OrderStatus.PENDING, total="25.00")
    new = transition(current, paid(amount), at=T1)
    assert new.status is OrderStatus.PAID
    assert new.total.as_tuple() == Decimal("25.00").as_tuple()  # the total is not rewritten


def test_wrong_amount_in_a_wrong_status_is_an_invalid_transition() -> None:
    rejected_by(InvalidTransition, state(OrderStatus.PAID), paid("1.00"))


def test_order_total_of_no_lines_is_zero() -> None:
    assert order_total(()) == Decimal(0)


# --- properties -------------------------------------------------------------------------------

KINDS = ["placed", "paid", "paid_wrong", "shipped", "delivered", "cancelled"]

money = st.decimals(min_value=0, max_value=10_000, places=2, allow_nan=False)
line_strategy = st.tuples(
    st.sampled_from(["SKU-1", "SKU-2", "SKU-3"]), st.integers(1, 5), money
).map(lambda t: (t[0], t[1], str(t[2])))
lines_strategy = st.lists(line_strategy, min_size=1, max_size=4)


def make(kind: str, lines: list[tuple[str, int, str]], total: Decimal) -> InboundEvent:
    if kind == "placed":
        return placed(*lines)
    if kind == "paid":
        return paid(str(total))
    if kind == "paid_wrong":
        return paid(str(total + Decimal("0.01")))
    return {"shipped": shipped, "delivered": delivered, "cancelled": cancelled}[kind]()


def expected_refusal(
    before: OrderState | None, kind: str, e: InboundEvent
) -> type[RejectedEvent] | None:
    """The model: which refusal the contract names for this event, or None if it applies."""
    if before is None:
        return None if kind == "placed" else UnknownOrder
    if kind == "placed":
        return DuplicateOrder
    if (before.status, e.event_type) not in LEGAL:
        return InvalidTransition
    if kind == "paid_wrong":
        return AmountMismatch
    return None


@PROPERTY_SETTINGS
@given(
    kinds=st.lists(st.sampled_from(KINDS), max_size=12),
    lines=lines_strategy,
    start_placed=st.booleans(),
)
def test_runs_follow_the_graph(
    kinds: list[str], lines: list[tuple[str, int, str]], start_placed: bool
) -> None:
    total = sum((Decimal(p) * q for _, q, p in lines), Decimal(0))
    if start_placed:
        kinds = ["placed", *kinds]
    current: OrderState | None = None
    accepted_after_placement = 0
    for step, kind in enumerate(kinds):
        e = make(kind, lines, total)
        at = T0 + timedelta(seconds=step)
        before = current
        snapshot = copy.deepcopy(before)
        refusal = expected_refusal(before, kind, e)
        if refusal is not None:
            with pytest.raises(RejectedEvent) as excinfo:
                transition(before, e, at=at)
            assert type(excinfo.value) is refusal, excinfo.value
            assert before == snapshot  # never mutated, even when refused
            continue
        current = transition(before, e, at=at)
        assert before == snapshot
        if before is None:
            assert kind == "placed"
            assert current.status is OrderStatus.PENDING
            assert current.version == 1
            assert current.total == total
            assert current.created_at == at
        else:
            assert before.status not in TERMINAL_STATUSES, "a terminal state moved"
            assert kind != "paid_wrong"
            assert LEGAL[(before.status, e.event_type)] is current.status
            accepted_after_placement += 1
            assert current.created_at == before.created_at
            assert current.total == before.total
            assert current.lines == before.lines
            assert current.id == before.id
        assert current.updated_at == at
        assert current.version == 1 + accepted_after_placement
    if current is not None and current.status in TERMINAL_STATUSES:
        for kind in KINDS:
            with pytest.raises((InvalidTransition, DuplicateOrder)):
                transition(current, make(kind, lines, total), at=T1)


def _outcome(current: OrderState | None, e: InboundEvent) -> object:
    try:
        return transition(current, e, at=T1)
    except RejectedEvent as error:
        return (type(error), str(error))


states = st.builds(
    lambda status, total, version: state(status, total=str(total), version=version),
    st.sampled_from(list(OrderStatus)),
    money,
    st.integers(1, 50),
)


@PROPERTY_SETTINGS
@given(
    current=st.none() | states,
    kind=st.sampled_from(KINDS),
    lines=lines_strategy,
)
def test_transition_is_deterministic_and_pure(
    current: OrderState | None, kind: str, lines: list[tuple[str, int, str]]
) -> None:
    total = current.total if current is not None else Decimal(0)
    e = make(kind, lines, total)
    state_before = copy.deepcopy(current)
    event_before = copy.deepcopy(e)
    first = _outcome(current, e)
    second = _outcome(current, e)
    assert first == second
    assert current == state_before
    assert e == event_before


@PROPERTY_SETTINGS
@given(current=st.none() | states, kind=st.sampled_from(KINDS), lines=lines_strategy)
def test_applying_an_event_twice_never_moves_twice(
    current: OrderState | None, kind: str, lines: list[tuple[str, int, str]]
) -> None:
    total = current.total if current is not None else Decimal(0)
    e = make(kind, lines, total)
    try:
        once = transition(current, e, at=T1)
    except RejectedEvent:
        return
    # No status has a self-loop: the same event again is refused, so it can't count twice.
    with pytest.raises(RejectedEvent):
        transition(once, e, at=T1)


# -- parking: which refusals are "not yet" ---------------------------------------------------

#: What becomes of each event type in each status (None: no order yet), written out from
#: the contract's "Resequencing and parking": "apply", "park" (it can still apply once
#: other events of its order did) or "reject" (it never can).
FATE: dict[tuple[OrderStatus | None, EventType], str] = {
    (None, EventType.ORDER_PLACED): "apply",
    (None, EventType.ORDER_PAID): "park",
    (None, EventType.ORDER_SHIPPED): "park",
    (None, EventType.ORDER_DELIVERED): "park",
    (None, EventType.ORDER_CANCELLED): "park",
    (OrderStatus.PENDING, EventType.ORDER_PLACED): "reject",
    (OrderStatus.PENDING, EventType.ORDER_PAID): "apply",
    (OrderStatus.PENDING, EventType.ORDER_SHIPPED): "park",  # waits for OrderPaid
    (OrderStatus.PENDING, EventType.ORDER_DELIVERED): "park",  # ... and OrderShipped
    (OrderStatus.PENDING, EventType.ORDER_CANCELLED): "apply",
    (OrderStatus.PAID, EventType.ORDER_PLACED): "reject",
    (OrderStatus.PAID, EventType.ORDER_PAID): "reject",  # pending is left for good
    (OrderStatus.PAID, EventType.ORDER_SHIPPED): "apply",
    (OrderStatus.PAID, EventType.ORDER_DELIVERED): "park",  # waits for OrderShipped
    (OrderStatus.PAID, EventType.ORDER_CANCELLED): "apply",
    (OrderStatus.SHIPPED, EventType.ORDER_PLACED): "reject",
    (OrderStatus.SHIPPED, EventType.ORDER_PAID): "reject",
    (OrderStatus.SHIPPED, EventType.ORDER_SHIPPED): "reject",
    (OrderStatus.SHIPPED, EventType.ORDER_DELIVERED): "apply",
    (OrderStatus.SHIPPED, EventType.ORDER_CANCELLED): "reject",  # too late to cancel
    **{(OrderStatus.DELIVERED, kind): "reject" for kind in EventType},
    **{(OrderStatus.CANCELLED, kind): "reject" for kind in EventType},
}


def fate(current: OrderState | None, incoming: InboundEvent) -> str:
    try:
        transition(current, incoming, at=T1)
    except RejectedEvent:
        return "park" if can_apply_later(current, incoming) else "reject"
    return "apply"


@pytest.mark.parametrize(("status", "event_type"), sorted(FATE, key=str))
def test_every_status_and_event_type_applies_parks_or_is_rejected_as_the_contract_says(
    status: OrderStatus | None, event_type: EventType
) -> None:
    current = None if status is None else state(status)
    incoming = placed() if event_type is EventType.ORDER_PLACED else non_placed_event(event_type)
    assert fate(current, incoming) == FATE[(status, event_type)]


def test_the_fate_table_covers_every_status_and_event_type() -> None:
    assert set(FATE) == {(status, kind) for status in (None, *OrderStatus) for kind in EventType}


def test_an_amount_mismatch_is_rejected_even_though_the_status_fits() -> None:
    """An OrderPaid whose amount differs from the total can never apply: no later event
    changes the total."""
    assert fate(state(OrderStatus.PENDING, total="25.00"), paid("24.00")) == "reject"
