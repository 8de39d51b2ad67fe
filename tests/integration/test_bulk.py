"""Multi-table writes in one statement (``outbox.bulk.insert_rows``), on a real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import cast

import pytest
from sqlalchemy import Table, select

from consumer.models import Customer, Order, OrderLine
from outbox.bulk import Lookup, TableRows, Upsert, insert_rows
from tests.helpers import TestEnv

ORDERS = cast(Table, Order.__table__)
LINES = cast(Table, OrderLine.__table__)
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def order_row(order_id: uuid.UUID, customer: object, status: str) -> tuple[object, ...]:
    return (order_id, customer, status, "EUR", Decimal("12.50"), 1, AT, AT)


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


CUSTOMERS = cast(Table, Customer.__table__)
BY_EMAIL = Upsert(key=("email",), update=("name", "updated_at"))


async def test_an_upsert_and_a_lookup_of_its_rows_go_in_the_same_statement(
    env: TestEnv,
) -> None:
    known, unknown_id = uuid.uuid4(), uuid.uuid4()
    async with env.sessions() as session, session.begin():
        session.add(Customer(id=known, email="a@example.com", name="A"))
    async with env.sessions() as session:
        known_updated = (await session.get_one(Customer, known)).updated_at

    first, second, third = (uuid.uuid4() for _ in range(3))
    async with env.sessions() as session, session.begin():
        customers = TableRows(
            CUSTOMERS,
            ("id", "email", "name"),
            # The known email comes with a new id: the upsert keeps the existing row's.
            [(uuid.uuid4(), "a@example.com", "A. Lovelace"), (unknown_id, "b@example.com", "B")],
            upsert=BY_EMAIL,
        )
        await insert_rows(
            session,
            customers,
            TableRows(
                ORDERS,
                ORDER_COLUMNS,
                [
                    order_row(first, "b@example.com", "pending"),
                    order_row(second, "a@example.com", "pending"),
                    order_row(third, "a@example.com", "paid"),
                ],
                lookups=(Lookup("customer_id", customers, by="email", take="id"),),
            ),
            TableRows(
                LINES,
                ("order_id", "position", "sku", "quantity", "unit_price"),
                [(second, 1, "SKU-1", 2, Decimal("6.25"))],
            ),
        )

    async with env.sessions() as session:
        found = {
            customer.email: (customer.id, customer.name, customer.updated_at)
            for customer in (await session.scalars(select(Customer))).all()
        }
        orders = {
            order.id: (order.customer_id, order.status)
            for order in (await session.scalars(select(Order))).all()
        }
        lines = (await session.scalars(select(OrderLine))).all()
    assert found["a@example.com"][:2] == (known, "A. Lovelace")
    assert found["a@example.com"][2] > known_updated  # the update took its default
    assert found["b@example.com"][:2] == (unknown_id, "B")
    assert orders == {
        first: (unknown_id, "pending"),
        second: (known, "pending"),
        third: (known, "paid"),
    }
    assert [(line.order_id, line.sku) for line in lines] == [(second, "SKU-1")]


async def test_a_lookup_without_its_source_rows_is_refused(env: TestEnv) -> None:
    customers = TableRows(CUSTOMERS, ("id", "email", "name"), [], upsert=BY_EMAIL)
    orders = TableRows(
        ORDERS,
        ORDER_COLUMNS,
        [order_row(uuid.uuid4(), "a@example.com", "pending")],
        lookups=(Lookup("customer_id", customers, by="email", take="id"),),
    )
    async with env.sessions() as session, session.begin():
        with pytest.raises(ValueError, match="earlier inserting group with rows"):
            await insert_rows(session, customers, orders)
        with pytest.raises(ValueError, match="earlier inserting group with rows"):
            await insert_rows(session, orders)


@pytest.mark.parametrize(
    ("upsert", "match"),
    [
        (Upsert(key=("ref",), update=("name",)), "upsert's key"),
        (Upsert(key=("email",), update=("email",)), "upsert's key"),
        (Upsert(key=("email",), update=("nothing",)), "upsert.s key"),
        (Upsert(key=("email",), update=()), "upsert.s key"),
    ],
)
def test_an_upsert_names_a_given_key_and_other_columns(upsert: Upsert, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TableRows(CUSTOMERS, ("id", "email", "name"), [], upsert=upsert)


def test_a_lookup_names_its_own_column_and_its_sources() -> None:
    customers = TableRows(CUSTOMERS, ("id", "email", "name"), [], upsert=BY_EMAIL)
    with pytest.raises(ValueError, match="not one of the columns"):
        TableRows(ORDERS, ("id",), [], lookups=(Lookup("customer_id", customers, "email", "id"),))
    with pytest.raises(ValueError, match="columns of its source"):
        TableRows(
            ORDERS, ORDER_COLUMNS, [], lookups=(Lookup("customer_id", customers, "ref", "id"),)
        )
    with pytest.raises(ValueError, match="neither an upsert"):
        TableRows(ORDERS, ("id", "status"), [], update_key=("id",), upsert=BY_EMAIL)
