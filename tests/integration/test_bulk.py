"""Multi-table writes in one statement (``outbox.bulk.insert_rows``), on a real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import cast

import pytest
from sqlalchemy import Table, select

from consumer.models import Customer, Order, OrderLine
from outbox.bulk import TableRows, insert_rows
from tests.helpers import TestEnv

ORDERS = cast(Table, Order.__table__)
LINES = cast(Table, OrderLine.__table__)
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def order_row(order_id: uuid.UUID, customer_id: uuid.UUID, status: str) -> tuple[object, ...]:
    return (order_id, customer_id, status, "EUR", Decimal("12.50"), 1, AT, AT)


ORDER_COLUMNS = (
    "id",
    "customer_id",
    "status",
    "currency",
    "total",
    "version",
    "created_at",
    "updated_at",
)


async def test_new_rows_their_children_and_updates_by_key_go_in_one_statement(
    env: TestEnv,
) -> None:
    customer_id, kept, changed, placed = (uuid.uuid4() for _ in range(4))
    async with env.sessions() as session, session.begin():
        session.add(Customer(id=customer_id, email="a@example.com", name="A"))
        await session.flush()
        await insert_rows(
            session,
            TableRows(
                ORDERS,
                ORDER_COLUMNS,
                [
                    order_row(kept, customer_id, "pending"),
                    order_row(changed, customer_id, "pending"),
                ],
            ),
        )

    later = datetime(2026, 1, 3, tzinfo=UTC)
    async with env.sessions() as session, session.begin():
        await insert_rows(
            session,
            TableRows(ORDERS, ORDER_COLUMNS, [order_row(placed, customer_id, "pending")]),
            # Children of a row the same statement inserts: the key is checked at its end.
            TableRows(
                LINES,
                ("order_id", "position", "sku", "quantity", "unit_price"),
                [(placed, 1, "SKU-1", 2, Decimal("6.25"))],
            ),
            TableRows(
                ORDERS,
                ("id", "status", "version", "updated_at"),
                [(changed, "paid", 2, later)],
                update_key=("id",),
            ),
        )

    async with env.sessions() as session:
        orders = {
            order.id: (order.status, order.version, order.updated_at)
            for order in (await session.scalars(select(Order))).all()
        }
        lines = (await session.scalars(select(OrderLine))).all()
    assert orders == {
        kept: ("pending", 1, AT),
        changed: ("paid", 2, later),
        placed: ("pending", 1, AT),
    }
    assert [(line.order_id, line.sku, line.quantity) for line in lines] == [(placed, "SKU-1", 2)]


@pytest.mark.parametrize(
    ("columns", "key"), [(("id", "status"), ("id", "status")), (("id",), ("ref",))]
)
def test_an_update_key_names_some_of_the_columns(
    columns: tuple[str, ...], key: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="update_key"):
        TableRows(ORDERS, columns, [], update_key=key)


def test_an_update_takes_no_transaction_id_first() -> None:
    with pytest.raises(ValueError, match="xid_first"):
        TableRows(ORDERS, ("id", "status"), [], xid_first=True, update_key=("id",))
