"""Realistic sample traffic: order lifecycles interleaved across orders, with mistakes mixed in.

Used by ``orderflow loadgen`` (through :mod:`orderflow.tools.upstream`), ``orderflow dev``,
the tests and the benchmarks. Deterministic for a given seed.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

CUSTOMERS = [
    ("ada@example.com", "Ada Lovelace"),
    ("grace@example.com", "Grace Hopper"),
    ("edsger@example.com", "Edsger Dijkstra"),
    ("barbara@example.com", "Barbara Liskov"),
    ("ken@example.com", "Ken Thompson"),
    ("margaret@example.com", "Margaret Hamilton"),
    ("donald@example.com", "Donald Knuth"),
    ("frances@example.com", "Frances Allen"),
]
PRODUCTS = [
    ("SKU-KEYBOARD", Decimal("89.90")),
    ("SKU-MOUSE", Decimal("24.50")),
    ("SKU-MONITOR", Decimal("219.00")),
    ("SKU-CABLE", Decimal("7.99")),
    ("SKU-DOCK", Decimal("149.00")),
    ("SKU-HEADSET", Decimal("59.00")),
]
CARRIERS = ["DHL", "UPS", "PostNL", "La Poste"]
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SampleMessage:
    """One message for the inbound topic, and what the consumer should make of it."""

    key: bytes | None
    value: bytes | None
    #: "event" (should apply), "early" (overtook the event it needs: waits for it, then
    #: applies, with parking on), "duplicate", or a dead-letter reason.
    expect: str
    order_id: uuid.UUID | None = None


def event_document(
    event_type: str,
    order_id: uuid.UUID,
    payload: dict[str, Any],
    *,
    event_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    return {
        "event_id": str(event_id or uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "occurred_at": (occurred_at or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "order_id": str(order_id),
        "payload": payload,
    }


def encode(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document)


class SampleStream:
    """An endless, seeded stream of order events; each order runs its whole lifecycle.

    About every ``fault_every``-th message is a mistake: a re-sent event (duplicate),
    malformed bytes, a wrong type, an unknown event type, an event for an unknown order, a
    payment of the wrong amount, or a shipment before payment. With ``race_every``, about
    every ``race_every``-th order comes from racing producers: two of its consecutive
    events arrive swapped (the payment before the order, say), which parking puts right.
    """

    def __init__(
        self,
        seed: int = 7,
        *,
        open_orders: int = 20,
        fault_every: int = 25,
        race_every: int = 0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """``clock`` stamps ``occurred_at``; by default a fixed start plus one second per event,
        so that a seed gives the very same bytes every time."""
        self._random = random.Random(seed)
        self._clock = clock
        self._open_orders = open_orders
        self._fault_every = fault_every
        self._race_every = race_every
        self._lifecycles = 0
        self._active: list[list[SampleMessage]] = []
        self._sent: list[SampleMessage] = []
        self.count = 0

    def _now(self) -> datetime:
        if self._clock is not None:
            return self._clock()
        return _EPOCH + timedelta(seconds=self.count)

    def _document(
        self, event_type: str, order_id: uuid.UUID, payload: dict[str, Any]
    ) -> dict[str, Any]:
        return event_document(
            event_type, order_id, payload, event_id=self._uuid(), occurred_at=self._now()
        )

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self._random.getrandbits(128), version=4)

    def _lifecycle(self) -> list[SampleMessage]:
        rng = self._random
        order_id = self._uuid()
        key = str(order_id).encode()
        email, name = rng.choice(CUSTOMERS)
        chosen = [
            (sku, price, rng.randint(1, 3))
            for sku, price in rng.sample(PRODUCTS, rng.randint(1, 3))
        ]
        lines = [
            {"sku": sku, "quantity": quantity, "unit_price": str(price)}
            for sku, price, quantity in chosen
        ]
        total = sum((price * quantity for _, price, quantity in chosen), Decimal(0))

        def message(event_type: str, payload: dict[str, Any]) -> SampleMessage:
            document = self._document(event_type, order_id, payload)
            return SampleMessage(key, encode(document), "event", order_id)

        steps = [
            message(
                "OrderPlaced",
                {"customer": {"email": email, "name": name}, "currency": "EUR", "lines": lines},
            )
        ]
        roll = rng.random()
        if roll < 0.1:
            steps.append(message("OrderCancelled", {"reason": "customer changed their mind"}))
            return steps
        steps.append(
            message(
                "OrderPaid", {"payment_id": f"pay_{rng.getrandbits(40):x}", "amount": str(total)}
            )
        )
        if roll < 0.2:
            steps.append(message("OrderCancelled", {"reason": "out of stock"}))
            return steps
        steps.append(
            message(
                "OrderShipped",
                {"carrier": rng.choice(CARRIERS), "tracking_number": f"TRK{rng.getrandbits(32)}"},
            )
        )
        steps.append(message("OrderDelivered", {}))
        self._lifecycles += 1
        if self._race_every and self._lifecycles % self._race_every == 0:
            # Racing producers: one pair of consecutive events arrives the other way round.
            first = rng.randrange(len(steps) - 1)
            later, early = steps[first], steps[first + 1]
            steps[first : first + 2] = [
                SampleMessage(early.key, early.value, "early", early.order_id),
                later,
            ]
        return steps

    def _fault(self) -> SampleMessage | None:
        rng = self._random
        kind = rng.choice(
            ["duplicate", "malformed_json", "schema_violation", "unknown_event_type",
             "unknown_order", "amount_mismatch", "invalid_transition"]
        )  # fmt: skip
        if kind == "duplicate":
            applied = [m for m in self._sent[-50:] if m.expect in ("event", "early")]
            if not applied:
                return None
            original = rng.choice(applied)
            return SampleMessage(original.key, original.value, "duplicate", original.order_id)
        order_id = self._uuid()
        key = str(order_id).encode()
        if kind == "malformed_json":
            return SampleMessage(key, b'{"event_id": "oops", "event_type": ', kind, order_id)
        if kind == "schema_violation":
            document = self._document("OrderPaid", order_id, {"payment_id": 42, "amount": "1.00"})
            return SampleMessage(key, encode(document), kind, order_id)
        if kind == "unknown_event_type":
            document = self._document("OrderTeleported", order_id, {})
            return SampleMessage(key, encode(document), kind, order_id)
        if kind == "unknown_order":
            document = self._document("OrderDelivered", order_id, {})
            return SampleMessage(key, encode(document), kind, order_id)
        # amount_mismatch / invalid_transition need an order that exists: a fresh one.
        placed = self._document(
            "OrderPlaced",
            order_id,
            {
                "customer": {"email": "eve@example.com", "name": "Eve"},
                "currency": "EUR",
                "lines": [{"sku": "SKU-CABLE", "quantity": 1, "unit_price": "7.99"}],
            },
        )
        self._active.append([SampleMessage(key, encode(placed), "event", order_id)])
        if kind == "amount_mismatch":
            bad = self._document("OrderPaid", order_id, {"payment_id": "p", "amount": "1.00"})
        else:
            bad = self._document(
                "OrderShipped", order_id, {"carrier": "UPS", "tracking_number": "T"}
            )
        self._active[-1].append(SampleMessage(key, encode(bad), kind, order_id))
        return None

    def __iter__(self) -> Iterator[SampleMessage]:
        return self

    def __next__(self) -> SampleMessage:
        self.count += 1
        if self._fault_every and self.count % self._fault_every == 0:
            fault = self._fault()
            if fault is not None:
                self._sent.append(fault)
                return fault
        while len(self._active) < self._open_orders:
            self._active.append(self._lifecycle())
        lane = self._random.randrange(len(self._active))
        message = self._active[lane].pop(0)
        if not self._active[lane]:
            self._active.pop(lane)
        self._sent.append(message)
        if len(self._sent) > 200:
            del self._sent[:100]
        return message
