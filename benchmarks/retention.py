"""Relay cost as history grows: one relay's drain with no retained rows, with many, and
with many due for pruning.

    python benchmarks/retention.py [--retained N] [--rows R] [--partitions P]

Uses ``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS`` when set, otherwise starts an embedded
PostgreSQL (durable: fsync on) and an embedded Tansu broker. In one fresh, migrated
database, each stage to a fresh topic, one ``outbox.relay.Relay`` (as in
``benchmarks/relay.py``: own engine and producer) drains R unpublished rows (default
100000), timed from its start until no unpublished row is left:

* empty    -- the outbox holds only the R rows;
* retained -- below them, N published rows (default 10,000,000: a week at about 16
              events/s), written 8 days ago, which the relay keeps (retention 30 days):
              what reading and marking cost with a large history;
* pruning  -- the same N rows, now older than the retention (the default 7 days): the
              relay prunes them while it drains the next R rows.

The history rows are ``OrderUpdated``-sized (one generated chunk, repeated), loaded with
binary ``COPY`` and vacuumed and analysed, as are the R rows before each stage. They are
loaded as published long ago: with the insert trigger off while they load, so that
``outbox_pending`` never holds their ids (as in a running outbox, where the relay deleted
each id soon after it was written and vacuum has long since reclaimed the space).

It prints each stage's rate, PostgreSQL's CPU per drained row (the database cost of
fetching and marking; in the pruning stage, the deletes too), and the ratios against the
empty stage. A stage that publishes nothing for 30 s ends there (the relay busy with
something else: pruning, say), and is reported as stalled. The last line is
machine-readable: ``RESULT empty_eps=... retained_eps=... retained_ratio=...
pruning_eps=... pruning_ratio=... retained_db_cost_ratio=... pruning_db_cost_ratio=...``
(the rates' ratios, then the ratios of PostgreSQL's CPU per row; 0 for a stalled stage).
"""

# ruff: noqa: E402

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and the sibling
# ``consumer.py`` benchmark would shadow the project's ``consumer`` package: put the
# project root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from benchmarks.relay import (
    COLUMNS,
    LOAD_CHUNK,
    Run,
    cleanup,
    outbox_rows,
    run_relays,
)
from benchmarks.support import Services, create_database, provide_services, say

#: The retained rows' age, and the retention of the stage that keeps them.
HISTORY_AGE = timedelta(days=8)
KEEPING_HOURS = 30 * 24.0
PRUNING_HOURS = 7 * 24.0
#: The insert trigger that writes each new message's id into ``outbox_pending``.
PEND = "outbox_messages_pend"


@dataclass
class Stage:
    name: str
    rows: int
    seconds: float
    postgres_us_per_row: float
    stalled: str | None = None

    @property
    def eps(self) -> float:
        return 0.0 if self.stalled else self.rows / self.seconds


async def load_history(url: str, topic: str, count: int) -> float:
    """``count`` published rows, written ``HISTORY_AGE`` ago; seconds it took."""
    began = time.perf_counter()
    [chunk] = list(outbox_rows(LOAD_CHUNK, seed=7))
    written = datetime.now(UTC) - HISTORY_AGE
    connection = await asyncpg.connect(url)
    try:
        # Published: their ids never enter outbox_pending. The trigger is off only inside
        # this transaction (whose lock keeps every other session off the table meanwhile).
        async with connection.transaction():
            await connection.execute(f"ALTER TABLE outbox_messages DISABLE TRIGGER {PEND}")
            loaded = 0
            while loaded < count:
                part = chunk[: count - loaded]
                await connection.copy_records_to_table(
                    "outbox_messages",
                    columns=[*COLUMNS, "created_at"],
                    records=[
                        (topic, key, payload, headers, shard, written)
                        for key, payload, headers, shard in part
                    ],
                )
                loaded += len(part)
                if loaded % 1_000_000 < LOAD_CHUNK:
                    say(f"  {loaded:,} of {count:,} history rows loaded")
            await connection.execute(f"ALTER TABLE outbox_messages ENABLE TRIGGER {PEND}")
        pending = await connection.fetchval("SELECT count(*) FROM outbox_pending")
        if pending:
            raise RuntimeError(f"{pending} rows are pending after loading the history")
    finally:
        await connection.close()
    return time.perf_counter() - began


async def add_unpublished(url: str, topic: str, rows: int) -> None:
    """Replace the unpublished-then-published rows of the last stage with ``rows`` new
    unpublished ones for ``topic`` (the history stays), vacuumed and analysed; then a
    checkpoint, so that no stage pays for the writes before it (loading the history
    writes gigabytes: a checkpoint it sets off would run into the next drain, and the
    first change to each page after a checkpoint logs the whole page)."""
    connection = await asyncpg.connect(url)
    try:
        # (Rows a stalled stage left unpublished go too, with their pending ids.)
        await connection.execute(
            "DELETE FROM outbox_messages AS m WHERE created_at > $1 "
            "OR EXISTS (SELECT FROM outbox_pending AS p WHERE p.id = m.id)",
            datetime.now(UTC) - HISTORY_AGE / 2,
        )
        await connection.execute("DELETE FROM outbox_pending")
        for chunk in outbox_rows(rows):
            await connection.copy_records_to_table(
                "outbox_messages",
                columns=COLUMNS,
                records=[
                    (topic, key, payload, headers, shard) for key, payload, headers, shard in chunk
                ],
            )
        await connection.execute(
            "VACUUM (ANALYZE) outbox_messages, outbox_pending, outbox_throughput"
        )
        try:
            await connection.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            say(
                "  (no CHECKPOINT: the role lacks pg_checkpoint; stages may pay for earlier writes)"
            )
    finally:
        await connection.close()


async def history_left(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM outbox_messages WHERE created_at < $1",
                datetime.now(UTC) - HISTORY_AGE / 2,
            )
        )
    finally:
        await connection.close()


async def drain(run: Run, url: str, name: str, args: argparse.Namespace, hours: float) -> Stage:
    topic = await run.topic(name, args.partitions)
    await add_unpublished(url, topic, args.rows)
    say(f"{name}: one relay drains {args.rows:,} rows (retention {hours / 24:g} days) ...")
    try:
        measurement = await run_relays(run.services, url, 1, args.rows, retention_hours=hours)
    except RuntimeError as stall:
        say(f"  stalled: {stall}")
        return Stage(name, args.rows, float("nan"), float("nan"), stalled=str(stall))
    stage = Stage(
        name,
        args.rows,
        measurement.seconds,
        measurement.cpu.get("postgres", 0.0) / args.rows * 1e6,
    )
    say(f"  {stage.eps:,.0f} rows/s; PostgreSQL {stage.postgres_us_per_row:.1f} µs per row")
    return stage


async def benchmark(services: Services, args: argparse.Namespace) -> list[Stage]:
    run = Run(services, uuid.uuid4().hex[:10])
    try:
        say(f"services: {services.origin}")
        name = f"orderflow_bench_retention_{run.suffix}"
        run.databases.append(name)
        url = await create_database(services, name)
        empty = await drain(run, url, "empty", args, KEEPING_HOURS)
        history = await run.topic("history", args.partitions)
        say(f"loading {args.retained:,} published rows, {HISTORY_AGE.days} days old ...")
        seconds = await load_history(url, history, args.retained)
        say(f"  loaded in {seconds:.0f} s")
        retained = await drain(run, url, "retained", args, KEEPING_HOURS)
        pruning = await drain(run, url, "pruning", args, PRUNING_HOURS)
        left = await history_left(url)
        say(f"  history rows left after the pruning stage: {left:,} of {args.retained:,}")
        return [empty, retained, pruning]
    finally:
        await cleanup(run)


def report(stages: list[Stage]) -> str:
    empty, retained, pruning = stages
    lines = [f"\n{'stage':<9} {'rows':>8} {'rows/s':>9} {'vs empty':>9} {'PG µs/row':>10}  note"]
    for stage in stages:
        versus = stage.eps / empty.eps if empty.eps else float("nan")
        lines.append(
            f"{stage.name:<9} {stage.rows:>8} {stage.eps:>9.0f} {versus:>9.2f} "
            f"{stage.postgres_us_per_row:>10.1f}  {stage.stalled or ''}"
        )

    def ratio(stage: Stage) -> float:
        return stage.eps / empty.eps if empty.eps else 0.0

    def cost_ratio(stage: Stage) -> float:
        if stage.stalled or not empty.postgres_us_per_row:
            return 0.0
        return stage.postgres_us_per_row / empty.postgres_us_per_row

    lines.append(
        f"\nRESULT empty_eps={empty.eps:.0f} retained_eps={retained.eps:.0f} "
        f"retained_ratio={ratio(retained):.2f} pruning_eps={pruning.eps:.0f} "
        f"pruning_ratio={ratio(pruning):.2f} "
        f"retained_db_cost_ratio={cost_ratio(retained):.2f} "
        f"pruning_db_cost_ratio={cost_ratio(pruning):.2f}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--retained", type=int, default=10_000_000, help="published rows kept (default 10M)"
    )
    parser.add_argument(
        "--rows", type=int, default=100_000, help="rows each stage drains (default 100000)"
    )
    parser.add_argument(
        "--partitions", type=int, default=3, help="partitions of each topic (default 3)"
    )
    args = parser.parse_args(argv)
    if args.retained < 1 or args.rows < 1 or args.partitions < 1:
        parser.error("--retained, --rows and --partitions must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    with provide_services() as services:
        stages = asyncio.run(benchmark(services, args))
    say(f"(whole run: {time.perf_counter() - began:.0f} s)")
    say(report(stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
