"""The four "Common Failure Cases" of the SQLAlchemy 2.0 async notes, proven impossible here.

One test per case, on a real database, each quoting the case it guards and naming the
guard; each fails if its guard is removed:

1. relationships are ``lazy="raise"`` (``consumer.models``);
2. sessions are made with ``expire_on_commit=False`` (``runtime.wiring.session_factory``);
3. the read API's session dependency closes its session on every path
   (``orderflow.api.read_session``);
4. bulk statements flush the session first (``consumer.bulk``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import InvalidRequestError, MissingGreenlet
from sqlalchemy.orm import joinedload, selectinload

from consumer.models import Base, ConsumerOffset, Order
from consumer.offsets import advance_offset
from consumer.snapshots import (
    SNAPSHOT_KIND,
    BackfillRun,
    SnapshotFilter,
    create_run,
    snapshot_batch,
)
from orderflow.api import ReadSession, create_app
from tests.helpers import TestEnv, insert_orders, serve_api, statements

pytestmark = pytest.mark.integration

BASE = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


async def test_1_a_relationship_the_query_did_not_load_raises_at_once(env: TestEnv) -> None:
    """MissingGreenlet: greenlet_spawn has not been called when accessing a relationship
    in async context. "Why: lazy loading relationships (accessing user.orders without
    selectinload) triggers a synchronous database call inside an async context; SQLAlchemy
    2.0 raises MissingGreenlet instead of silently blocking."

    Every relationship of our models is ``lazy="raise"``: touching one that the query did
    not eager-load raises an ``InvalidRequestError`` naming it, at once and without a
    statement sent, never a ``MissingGreenlet``. Loaded with ``selectinload`` /
    ``joinedload``, the same relationship reads normally.
    """
    await insert_orders(env, [(BASE, "paid", "ada@example.com")])
    relationships = [
        (mapper.class_, relationship.key)
        for mapper in Base.registry.mappers
        for relationship in mapper.relationships
    ]
    assert len(relationships) >= 4  # customer.orders, order.customer, order.lines, line.order
    async with env.sessions() as session, session.begin():
        for model, key in relationships:
            instance = (await session.execute(select(model).limit(1))).scalar_one()
            with statements(env.engine) as sent, pytest.raises(InvalidRequestError) as raised:
                getattr(instance, key)
            assert not isinstance(raised.value, MissingGreenlet), (model.__name__, key)
            assert "lazy='raise'" in str(raised.value), (model.__name__, key)
            assert sent == [], (model.__name__, key)
        eager = (
            await session.execute(
                select(Order).options(selectinload(Order.lines), joinedload(Order.customer))
            )
        ).scalar_one()
        assert [line.sku for line in eager.lines] == ["SKU-0", "SKU-1", "SKU-2"]
        assert eager.customer.email == "ada@example.com"


async def test_2_attributes_stay_readable_after_commit_and_after_the_session_closes(
    env: TestEnv,
) -> None:
    """DetachedInstanceError after committing a session and accessing model attributes.
    "Why: by default, SQLAlchemy expires all attributes after a commit; accessing an
    attribute on a committed instance triggers a new lazy load, but if the session is
    closed, the object is detached and the load fails."

    Our sessions (``session_factory``, the read API's too) keep what a transaction loaded
    or wrote: after the commit, and after the session closed, every attribute reads
    without a statement sent.
    """
    (placed,) = await insert_orders(env, [(BASE, "pending", "ada@example.com")])
    async with env.sessions() as session:
        async with session.begin():
            order = (
                await session.execute(
                    select(Order)
                    .where(Order.id == placed.id)
                    .options(selectinload(Order.lines), joinedload(Order.customer))
                )
            ).scalar_one()
            order.status = "paid"
            order.version = 2
        with statements(env.engine) as sent:
            after_commit = (order.status, order.version, order.customer.email, order.total)
        assert sent == []
    with statements(env.engine) as sent:
        after_close = (order.status, order.version, order.customer.email, order.total)
        skus = [line.sku for line in order.lines]
    assert sent == []
    assert after_commit == after_close == ("paid", 2, "ada@example.com", Decimal("9.00"))
    assert skus == ["SKU-0", "SKU-1", "SKU-2"]

    async with serve_api(create_app(env.settings)) as api:
        async with api.database.sessions() as session, session.begin():
            read = (await session.execute(select(Order).where(Order.id == placed.id))).scalar_one()
        with statements(api.database.engine) as sent:
            assert (read.status, read.version) == ("paid", 2)
        assert sent == []


async def test_3_a_request_that_fails_mid_handler_returns_its_connection(env: TestEnv) -> None:
    """Connection pool exhausted under load because sessions are not properly closed.
    "Why: if a database session is not closed (e.g., an exception exits the get_db
    dependency before yield cleanup runs), the connection is not returned to the pool;
    under load, the pool exhausts and new requests hang waiting for a connection."

    With a pool of 2, a burst of 12 concurrent requests whose handler raises after its
    session took a connection: every one is a 500, afterwards no connection is checked
    out, and the API goes on answering.
    """
    (placed,) = await insert_orders(env, [(BASE, "paid", "ada@example.com")])
    app = create_app(env.with_settings(db_pool_size=2))

    async def fails_after_a_query(session: ReadSession) -> None:
        await session.execute(text("SELECT 1"))  # the session holds a pooled connection now
        raise RuntimeError("a bug, after the handler took its connection")

    app.add_api_route("/fails-after-a-query", fails_after_a_query)
    async with serve_api(app, raise_app_exceptions=False) as api:
        pool: Any = api.database.engine.pool
        assert pool.size() == 2
        async with asyncio.timeout(20):  # a leak would leave later requests waiting (30 s)
            burst = await asyncio.gather(
                *(api.client.get("/fails-after-a-query") for _ in range(12))
            )
            assert [response.status_code for response in burst] == [500] * 12
            assert pool.checkedout() == 0
            later = await asyncio.gather(
                *(api.client.get(f"/orders/{placed.id}") for _ in range(6)),
                api.client.get("/readyz"),
            )
        assert [response.status_code for response in later] == [200] * 7
        assert pool.checkedout() == 0


async def test_4_a_bulk_update_never_overwrites_pending_orm_changes(env: TestEnv) -> None:
    """Bulk UPDATE via ORM session.execute(update(Model).values(...)) does not flush
    pending changes first. "Why: SQLAlchemy's ORM tracks pending changes in the session's
    identity map; a session.execute(update(...)) bypasses the ORM and goes directly to the
    database, so in-memory changes may conflict with or be overwritten by the bulk update."

    Our bulk statements flush the session first (``consumer.bulk``), whatever its
    autoflush. Two of them, each with a pending change to the row it updates:

    - the consumer's offset compare-and-set, a Core statement on the session's connection
      (which no autoflush ever covers): it sees the pending offset and moves on from it;
    - a backfill batch's progress update (``queued = queued + n``) inside a
      ``no_autoflush`` block: the pending count is added to, not dropped, and nothing is
      left pending behind the statement (the notes' "session.dirty shows pending objects
      at the time of the bulk update").
    """
    group, topic = "seed-case-4", env.settings.inbound_topic
    async with env.sessions() as session, session.begin():
        await advance_offset(
            session, group_id=group, topic=topic, partition=0, expected=None, to=10
        )
    async with env.sessions() as session, session.begin():
        stored = await session.get(ConsumerOffset, (group, topic, 0))
        assert stored is not None
        stored.next_offset = 50  # pending: the offset row, in memory only
        await advance_offset(session, group_id=group, topic=topic, partition=0, expected=50, to=60)
    async with env.sessions() as session:
        stored = await session.get(ConsumerOffset, (group, topic, 0))
        assert stored is not None
        assert stored.next_offset == 60

    await insert_orders(env, [(BASE, "paid", "ada@example.com")])
    async with env.sessions() as session, session.begin():
        run = await create_run(session, kind=SNAPSHOT_KIND, filters_key="seed-case-4", filters={})
        assert run is not None
    async with env.sessions() as session, session.begin():
        loaded = await session.get(BackfillRun, run.id)
        assert loaded is not None
        with session.no_autoflush:
            loaded.queued = 7  # pending: the run row, in memory only
            batch = await snapshot_batch(
                session,
                run_id=run.id,
                filters=SnapshotFilter(),
                topic=env.settings.outbound_topic,
                limit=10,
                now=BASE,
            )
        assert batch is not None
        assert batch.queued == 1
        assert not session.dirty
    async with env.sessions() as session:
        stored_run = await session.get(BackfillRun, run.id)
        assert stored_run is not None
        assert (stored_run.queued, stored_run.batches, stored_run.status) == (8, 1, "finished")
