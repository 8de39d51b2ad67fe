"""Order snapshots for backfills: the run table, and one batch in one short transaction.

A snapshot is an ``OrderUpdated`` with ``change: "Snapshot"``, ``causation_id: null``, a
fresh ``event_id`` and the order's current state and version, written to the outbox so
the relay publishes it like any update.

Why per-order order holds while updates flow: a batch locks its orders ``FOR SHARE``
before it inserts their snapshots, and the consumer locks an order ``FOR UPDATE`` before
it inserts that order's updates. The two locks conflict, so for one order a snapshot and
an update never overlap: whichever locks first also draws its outbox id first and commits
first. The snapshot therefore carries exactly the version of the last update before it in
id order, and the relay publishes each shard (so each order) in id order. ``FOR SHARE``
(not ``FOR UPDATE``) because a snapshot only reads: two backfills may share an order, and
their snapshots, which hold the same version, need no order between them.

Resumability: a batch also locks its run's row, reads the run's cursor (the last order id
covered), and moves it in the same transaction as the outbox rows it inserts. A killed
run continues after its last committed batch, with no order emitted twice; two processes
running the same run serialise on the run row and share the work.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ColumnElement,
    DateTime,
    Identity,
    Index,
    Integer,
    Text,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, joinedload, mapped_column, selectinload

from consumer.apply import order_state, update_message
from consumer.bulk import execute_bulk
from consumer.models import Base, Order
from consumer.state_machine import OrderState, OrderStatus
from consumer.updates import SNAPSHOT_CHANGE
from outbox import OutboxMessage, add_messages

#: ``backfill_runs.kind`` of ``orderflow backfill snapshots``.
SNAPSHOT_KIND: Final = "snapshots"


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    #: Replaced by a newer run of the same filters (``--new``) before it finished.
    ABANDONED = "abandoned"


class BackfillRun(Base):
    """One backfill: its filters, how far it got (``cursor``) and what it did."""

    __tablename__ = "backfill_runs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    #: What the operator asked for, with relative times resolved when the run started.
    filters: Mapped[dict[str, Any]] = mapped_column(JSONB)
    #: The filters as the operator gave them, canonical: a rerun of the same command finds
    #: its run by this (so ``--since 2h`` resumes instead of meaning a new instant).
    filters_key: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'running'"))
    #: The last order id covered; the next batch starts after it.
    cursor: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    queued: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    skipped: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    batches: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(
            "status IN ('running', 'finished', 'abandoned')", name="ck_backfill_runs_status"
        ),
        Index(
            "ux_backfill_runs_running",
            "kind",
            "filters_key",
            unique=True,
            postgresql_where=text("status = 'running'"),
        ),
    )


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A backfill run as read from the database (a plain value, safe after commit)."""

    id: int
    kind: str
    filters: dict[str, Any]
    status: RunStatus
    cursor: uuid.UUID | None
    queued: int
    skipped: int
    batches: int
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None


def _info(run: BackfillRun) -> RunInfo:
    return RunInfo(
        id=run.id,
        kind=run.kind,
        filters=dict(run.filters),
        status=RunStatus(run.status),
        cursor=None if run.cursor is None else uuid.UUID(int=run.cursor.int),
        queued=run.queued,
        skipped=run.skipped,
        batches=run.batches,
        started_at=run.started_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
    )


@dataclass(frozen=True, slots=True)
class SnapshotFilter:
    """Which orders a backfill covers."""

    #: Only orders in one of these statuses (empty: every status).
    statuses: frozenset[OrderStatus] = frozenset()
    #: Only orders updated at or after this instant.
    updated_since: datetime | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if self.statuses:
            conditions.append(Order.status.in_(sorted(status.value for status in self.statuses)))
        if self.updated_since is not None:
            conditions.append(Order.updated_at >= self.updated_since)
        return conditions


def snapshot_message(
    state: OrderState, *, topic: str, now: datetime, event_id: uuid.UUID | None = None
) -> OutboxMessage:
    """The outbox message of one snapshot: an ``OrderUpdated`` with ``change: "Snapshot"``."""
    return update_message(
        state,
        topic=topic,
        event_id=event_id or uuid.uuid4(),
        change=SNAPSHOT_CHANGE,
        causation_id=None,
        now=now,
    )


async def find_runs(
    session: AsyncSession, *, kind: str, filters_key: str
) -> tuple[RunInfo | None, RunInfo | None]:
    """(the unfinished run, the newest finished run) of these filters, each may be None."""
    running = (
        await session.execute(
            select(BackfillRun).where(
                BackfillRun.kind == kind,
                BackfillRun.filters_key == filters_key,
                BackfillRun.status == RunStatus.RUNNING.value,
            )
        )
    ).scalar_one_or_none()
    finished = (
        await session.execute(
            select(BackfillRun)
            .where(
                BackfillRun.kind == kind,
                BackfillRun.filters_key == filters_key,
                BackfillRun.status == RunStatus.FINISHED.value,
            )
            .order_by(BackfillRun.id.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    return (
        None if running is None else _info(running),
        None if finished is None else _info(finished),
    )


async def create_run(
    session: AsyncSession, *, kind: str, filters_key: str, filters: dict[str, Any]
) -> RunInfo | None:
    """A new running run, or ``None`` when one with these filters exists (raced)."""
    statement = (
        pg_insert(BackfillRun)
        .values(kind=kind, filters_key=filters_key, filters=filters)
        .on_conflict_do_nothing(
            index_elements=[BackfillRun.kind, BackfillRun.filters_key],
            index_where=text("status = 'running'"),
        )
        .returning(BackfillRun)
    )
    run = (await session.execute(statement)).scalar_one_or_none()
    return None if run is None else _info(run)


async def abandon_run(session: AsyncSession, run_id: int) -> None:
    """Mark an unfinished run as replaced: it is never resumed."""
    await execute_bulk(
        session,
        update(BackfillRun)
        .where(BackfillRun.id == run_id, BackfillRun.status == RunStatus.RUNNING.value)
        .values(status=RunStatus.ABANDONED.value, updated_at=func.now()),
    )


async def get_run(session: AsyncSession, run_id: int) -> RunInfo | None:
    run = await session.get(BackfillRun, run_id, populate_existing=True)
    return None if run is None else _info(run)


async def list_runs(session: AsyncSession, *, limit: int, kind: str | None = None) -> list[RunInfo]:
    """The newest runs first."""
    statement = select(BackfillRun).order_by(BackfillRun.id.desc()).limit(limit)
    if kind is not None:
        statement = statement.where(BackfillRun.kind == kind)
    return [_info(run) for run in (await session.execute(statement)).scalars()]


async def count_matching(
    session: AsyncSession, filters: SnapshotFilter, *, after: uuid.UUID | None
) -> int:
    """How many orders a run would still cover after ``after`` (no locks)."""
    statement = select(func.count()).select_from(Order).where(*filters.conditions())
    if after is not None:
        statement = statement.where(Order.id > after)
    return int((await session.execute(statement)).scalar_one())


@dataclass(frozen=True, slots=True)
class SnapshotBatch:
    """What one batch did."""

    #: Order ids the cursor moved past.
    scanned: int
    #: Snapshots written to the outbox.
    queued: int
    #: Orders that stopped matching the filters between the scan and the lock.
    skipped: int
    cursor: uuid.UUID | None
    #: The run covered its last order with this batch (and is marked finished).
    finished: bool


async def snapshot_batch(
    session: AsyncSession,
    *,
    run_id: int,
    filters: SnapshotFilter,
    topic: str,
    limit: int,
    now: datetime,
) -> SnapshotBatch | None:
    """Write the snapshots of the run's next ``limit`` orders, in the caller's transaction.

    Returns ``None`` when the run is no longer running (finished or replaced meanwhile).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    # The run row first: two processes of one run serialise here and share the work.
    run = (
        await session.execute(
            select(BackfillRun.cursor, BackfillRun.status)
            .where(BackfillRun.id == run_id)
            .with_for_update()
        )
    ).one_or_none()
    if run is None or run.status != RunStatus.RUNNING.value:
        return None
    cursor: uuid.UUID | None = run.cursor
    # Which ids this batch covers: found without locks, so that the end of the run does
    # not depend on rows that change while we wait for their locks.
    scan = select(Order.id).where(*filters.conditions()).order_by(Order.id).limit(limit)
    if cursor is not None:
        scan = scan.where(Order.id > cursor)
    ids = list((await session.execute(scan)).scalars())
    orders: list[Order] = []
    if ids:
        # FOR SHARE in id order (as the consumer locks): serialised with every update of
        # these orders, and no deadlock with it. A row that changed while we waited is
        # re-read at its newest version and re-checked against the filters.
        result = await session.execute(
            select(Order)
            .where(Order.id.in_(ids), *filters.conditions())
            .order_by(Order.id)
            .options(selectinload(Order.lines), joinedload(Order.customer, innerjoin=True))
            .with_for_update(read=True, of=Order)
        )
        orders = list(result.unique().scalars())
        await add_messages(
            session,
            [snapshot_message(order_state(order), topic=topic, now=now) for order in orders],
        )
    finished = len(ids) < limit
    new_cursor = ids[-1] if ids else cursor
    await execute_bulk(
        session,
        update(BackfillRun)
        .where(BackfillRun.id == run_id)
        .values(
            cursor=new_cursor,
            queued=BackfillRun.queued + len(orders),
            skipped=BackfillRun.skipped + (len(ids) - len(orders)),
            batches=BackfillRun.batches + (1 if ids else 0),
            updated_at=func.now(),
            status=RunStatus.FINISHED.value if finished else RunStatus.RUNNING.value,
            finished_at=func.now() if finished else None,
        ),
    )
    return SnapshotBatch(
        scanned=len(ids),
        queued=len(orders),
        skipped=len(ids) - len(orders),
        cursor=None if new_cursor is None else uuid.UUID(int=new_cursor.int),
        finished=finished,
    )
