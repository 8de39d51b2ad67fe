"""``orderflow backfill snapshots``: every matching order's current state, as a Snapshot.

Runs in batches of short transactions (see :mod:`consumer.snapshots` for the locking that
keeps per-order order with live updates) and records its progress in ``backfill_runs``
in the same transaction as each batch's outbox rows:

- the same command run again (same ``--status`` and ``--since`` as typed, same topic)
  resumes its unfinished run after the last committed batch;
- once a run with those filters has finished, running it again is refused unless
  ``--new`` asks for a fresh set of snapshots (so a rerun after a crash at the very end
  can't silently emit everything twice);
- ``--new`` while a run is unfinished abandons that run and starts over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from consumer.snapshots import (
    SNAPSHOT_KIND,
    RunInfo,
    SnapshotBatch,
    SnapshotFilter,
    abandon_run,
    count_matching,
    create_run,
    find_runs,
    get_run,
    snapshot_batch,
)
from consumer.state_machine import OrderStatus
from orderflow.tools.progress import RateLimiter
from outbox.faults import Backoff, is_transient


class AlreadyFinished(Exception):
    """A run with the same filters finished already; ``--new`` starts another."""

    def __init__(self, run: RunInfo) -> None:
        finished = (
            run.finished_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            if run.finished_at
            else "?"
        )
        super().__init__(
            f"backfill run {run.id} with these filters already finished at {finished} "
            f"({run.queued} snapshots); pass --new to emit a fresh set"
        )
        self.run = run


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """What the operator asked for."""

    topic: str
    statuses: frozenset[OrderStatus] = frozenset()
    #: The resolved ``--since`` instant, and the text it came from (what identifies the run).
    since: datetime | None = None
    since_given: str | None = None
    batch: int = 500
    rate: float | None = None
    new: bool = False
    dry_run: bool = False

    def filters_key(self) -> str:
        return orjson.dumps(
            {
                "since": self.since_given,
                "status": sorted(status.value for status in self.statuses) or None,
                "topic": self.topic,
            },
            option=orjson.OPT_SORT_KEYS,
        ).decode()

    def filters_document(self) -> dict[str, Any]:
        return {
            "status": sorted(status.value for status in self.statuses) or None,
            "since": None if self.since is None else self.since.astimezone(UTC).isoformat(),
            "since_given": self.since_given,
            "topic": self.topic,
        }


def run_filter(run: RunInfo) -> SnapshotFilter:
    """The filters a run was started with (``--since`` as resolved back then)."""
    since = run.filters.get("since")
    return SnapshotFilter(
        statuses=frozenset(OrderStatus(status) for status in run.filters.get("status") or ()),
        updated_since=None if since is None else datetime.fromisoformat(since),
    )


@dataclass(slots=True)
class SnapshotOutcome:
    """What one invocation did (or, for a dry run, would do)."""

    run: RunInfo | None
    resumed: bool
    #: Orders still to cover when this invocation started.
    remaining_at_start: int
    queued: int = 0
    skipped: int = 0
    batches: int = 0
    finished: bool = False
    interrupted: bool = False
    #: The run was finished or replaced by another process meanwhile.
    taken_over: bool = False


StartHook = Callable[[SnapshotOutcome], None]
BatchHook = Callable[[SnapshotBatch], Awaitable[None] | None]


async def backfill_snapshots(
    sessions: async_sessionmaker[AsyncSession],
    request: SnapshotRequest,
    *,
    stop: asyncio.Event,
    on_start: StartHook | None = None,
    on_batch: BatchHook | None = None,
) -> SnapshotOutcome:
    """Start or resume the run of ``request`` and work until it finishes or ``stop`` is set.

    ``stop`` is honoured between batches: the batch in flight commits (or, if the process
    dies, rolls back) and the next invocation continues after the last committed one.
    """
    run, resumed = await _open_run(sessions, request)
    filters = run_filter(run) if run is not None else _request_filter(request)
    async with sessions() as session:
        remaining = await count_matching(
            session, filters, after=None if run is None else run.cursor
        )
    outcome = SnapshotOutcome(run=run, resumed=resumed, remaining_at_start=remaining)
    if on_start is not None:
        on_start(outcome)
    if request.dry_run or run is None:
        outcome.queued = remaining
        return outcome

    limiter = RateLimiter(request.rate)
    while not stop.is_set():
        if not await _until_stopped(limiter.acquire(request.batch), stop):
            break
        batch = await _one_batch(sessions, run.id, filters, request, stop)
        if batch is None:
            outcome.taken_over = True
            break
        outcome.queued += batch.queued
        outcome.skipped += batch.skipped
        outcome.batches += 1 if batch.scanned else 0
        if on_batch is not None:
            result = on_batch(batch)
            if result is not None:
                await result
        if batch.finished:
            outcome.finished = True
            break
    outcome.interrupted = stop.is_set() and not outcome.finished
    async with sessions() as session:
        outcome.run = await get_run(session, run.id)
    return outcome


def _request_filter(request: SnapshotRequest) -> SnapshotFilter:
    return SnapshotFilter(statuses=request.statuses, updated_since=request.since)


async def _open_run(
    sessions: async_sessionmaker[AsyncSession], request: SnapshotRequest
) -> tuple[RunInfo | None, bool]:
    """(run, resumed). A dry run writes nothing and may return no run."""
    key = request.filters_key()
    for _ in range(3):
        async with sessions() as session, session.begin():
            running, finished = await find_runs(session, kind=SNAPSHOT_KIND, filters_key=key)
            if running is not None and not request.new:
                return running, True
            if running is None and finished is not None and not request.new:
                raise AlreadyFinished(finished)
            if request.dry_run:
                return None, False
            if running is not None:
                await abandon_run(session, running.id)
            created = await create_run(
                session,
                kind=SNAPSHOT_KIND,
                filters_key=key,
                filters=request.filters_document(),
            )
            if created is not None:
                return created, False
        # Another process created the run between our look and our insert: look again.
    raise RuntimeError("could not start or find the backfill run (three races in a row)")


async def _one_batch(
    sessions: async_sessionmaker[AsyncSession],
    run_id: int,
    filters: SnapshotFilter,
    request: SnapshotRequest,
    stop: asyncio.Event,
) -> SnapshotBatch | None:
    """One batch in one transaction; transient faults (connection loss, deadlock) retried."""
    backoff = Backoff()
    while True:
        try:
            async with sessions() as session, session.begin():
                return await snapshot_batch(
                    session,
                    run_id=run_id,
                    filters=filters,
                    topic=request.topic,
                    limit=request.batch,
                    now=datetime.now(UTC),
                )
        except Exception as error:
            if not is_transient(error) or stop.is_set():
                raise
            await backoff.sleep(stop)


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await ``work`` unless ``stop`` is set first; True when the work completed."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    return task.done() and not task.cancelled()
