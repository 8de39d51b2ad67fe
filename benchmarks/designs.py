"""What each way of recording "published" costs the database, statement by statement.

    python benchmarks/designs.py [--writes N] [--rows R] [--rounds K] [--designs a,b]

Uses ``DATABASE_URL`` when set, otherwise starts an embedded PostgreSQL (durable: fsync
on). No broker: this measures only the database's share of publishing, for the designs
the relay could use to remember what it has published. Each design gets its own fresh
database, migrated to schema revision 0004 (``BASELINE_REVISION``: the outbox before
``outbox_pending``, which every design changes from) and changed as the design needs:

* row-update     -- the relay's mark before revision 0005: it marks each row (``UPDATE
                    ... SET published_at``); the partial index on unpublished rows finds
                    them. A non-HOT update: a new version of the whole row (payload and
                    headers) and index entries.
* hot-update     -- the same mark, but neither partial index (an indexed column, or one in
                    an index's predicate, rules out HOT) and a fillfactor of 60, so the
                    new version can stay on the row's page (a HOT update: no index entry).
* pending-delete -- a narrow table of unpublished ids, written by the producing
                    transaction (in the same statement); the relay reads it joined to the
                    messages and deletes its rows once published.
* pending-trigger -- the same, the narrow table filled by a statement-level insert trigger
                    (a transition table) instead: writers unchanged. (Revision 0005 adopted
                    this one.)
* shard-position -- no per-row write at all: one small row per shard says "published up
                    to id N"; the relay upserts the positions of the shards a batch
                    touched. (Needs the horizon below which no id can still commit, which
                    the relay's scan floor already computes; not measured here.)
* no-mark        -- reads only, nothing recorded: the lower bound.

For each design and round, three phases, each measured by the server backend's CPU (from
``/proc``; the wall time when the server runs elsewhere) and the WAL it wrote:

* write   -- N rows (default 10000) written as the consumer writes them: 5 per
             transaction, one ``INSERT ... SELECT FROM unnest`` statement each (plus the
             design's own write), committed (fsync'd);
* publish -- R more rows (default 100000) loaded with binary ``COPY`` (and vacuumed);
             then, as one relay owning every shard, fetch 500 in id order from the last
             fetched id (an ideal scan floor, the same for every design) and record them
             as published, until none is left. Every row must be fetched exactly once, in
             id order, and the design's state must then say every row is published; a
             design that fails this ends the run with status 1;
* vacuum  -- ``VACUUM`` of the design's tables afterwards: the cleanup its writes left.

It prints each phase per row, for each design the median over the rounds, and what
publishing (publish + vacuum) costs against row-update's in the same run. The last line
is machine-readable: ``RESULT row_update_publishing_us=... row_update_write_us=...
<design>_publishing_ratio=... <design>_write_ratio=...`` (row-update's CPU per row, and
each design's ÷ row-update's).
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
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from alembic import command

from benchmarks.relay import COLUMNS, outbox_rows
from benchmarks.support import Services, admin, plain_url, provide_services, say
from orderflow.runtime.migrate import alembic_config
from orderflow.runtime.settings import async_database_url

TOPIC = "orderflow.order-updates"
#: The schema every design starts from: the outbox as it was before ``outbox_pending``.
BASELINE_REVISION = "0004"
BATCH = 500
ROWS_PER_TRANSACTION = 5
DESIGNS = (
    "row-update",
    "hot-update",
    "pending-delete",
    "pending-trigger",
    "shard-position",
    "no-mark",
)

_DROP_PARTIAL_INDEXES = (
    "DROP INDEX ix_outbox_messages_unpublished",
    "DROP INDEX ix_outbox_messages_published_at",
)
_CREATE_PENDING = "CREATE TABLE outbox_pending (id bigint PRIMARY KEY, shard smallint NOT NULL)"
_SETUP: dict[str, tuple[str, ...]] = {
    "row-update": (),
    "hot-update": (*_DROP_PARTIAL_INDEXES, "ALTER TABLE outbox_messages SET (fillfactor = 60)"),
    "pending-delete": (*_DROP_PARTIAL_INDEXES, _CREATE_PENDING),
    "pending-trigger": (
        *_DROP_PARTIAL_INDEXES,
        _CREATE_PENDING,
        """
        CREATE FUNCTION outbox_pending_add() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO outbox_pending (id, shard) SELECT id, shard FROM added;
            RETURN NULL;
        END $$
        """,
        "CREATE TRIGGER outbox_messages_pending AFTER INSERT ON outbox_messages "
        "REFERENCING NEW TABLE AS added FOR EACH STATEMENT "
        "EXECUTE FUNCTION outbox_pending_add()",
    ),
    "shard-position": (
        *_DROP_PARTIAL_INDEXES,
        "CREATE TABLE outbox_positions (shard smallint PRIMARY KEY, position bigint NOT NULL)",
    ),
    "no-mark": _DROP_PARTIAL_INDEXES,
}
#: The tables each design writes (vacuumed after the publish phase).
_TABLES: dict[str, tuple[str, ...]] = {
    "row-update": ("outbox_messages",),
    "hot-update": ("outbox_messages",),
    "pending-delete": ("outbox_messages", "outbox_pending"),
    "pending-trigger": ("outbox_messages", "outbox_pending"),
    "shard-position": ("outbox_messages", "outbox_positions"),
    "no-mark": ("outbox_messages",),
}

# As ``outbox.bulk.insert_rows`` writes outbox rows: the transaction's id first, then one
# row per array element, in order.
_INSERT = (
    "INSERT INTO outbox_messages (topic, key, payload, headers, shard) "
    "SELECT topic, key, payload, headers, shard FROM unnest($1::text[], $2::bytea[], "
    "$3::bytea[], $4::jsonb[], $5::smallint[]) WITH ORDINALITY AS given (topic, key, "
    "payload, headers, shard, ordinality) WHERE pg_current_xact_id() IS NOT NULL "
    "ORDER BY ordinality"
)
_INSERT_PENDING = (
    f"WITH inserted AS ({_INSERT} RETURNING id, shard) "
    "INSERT INTO outbox_pending (id, shard) SELECT id, shard FROM inserted"
)
_COLUMNS = "id, topic, key, payload, CAST(headers AS text) AS headers, shard"
_FETCH_UNMARKED = (
    f"SELECT {_COLUMNS} FROM outbox_messages WHERE published_at IS NULL "
    "AND shard = ANY($1::int[]) AND id >= $2 ORDER BY id LIMIT $3"
)
_FETCH_BY_ID = (
    f"SELECT {_COLUMNS} FROM outbox_messages WHERE shard = ANY($1::int[]) AND id >= $2 "
    "ORDER BY id LIMIT $3"
)
_FETCH_PENDING = (
    "SELECT m.id, m.topic, m.key, m.payload, CAST(m.headers AS text) AS headers, m.shard "
    "FROM outbox_pending AS p JOIN outbox_messages AS m ON m.id = p.id "
    # (m.id's bound too: the planner does not carry it over the join, and a merge join
    # would read the messages from the first.)
    "WHERE p.shard = ANY($1::int[]) AND p.id >= $2 AND m.id >= $2 ORDER BY p.id LIMIT $3"
)
_FETCH: dict[str, str] = {
    "row-update": _FETCH_UNMARKED,
    "hot-update": _FETCH_UNMARKED,
    "pending-delete": _FETCH_PENDING,
    "pending-trigger": _FETCH_PENDING,
    "shard-position": _FETCH_BY_ID,
    "no-mark": _FETCH_BY_ID,
}
_MARK_ROWS = (
    "UPDATE outbox_messages SET published_at = now() "
    "WHERE id = ANY($1::bigint[]) AND published_at IS NULL"
)
_UNPUBLISHED: dict[str, str] = {
    "row-update": "SELECT count(*) FROM outbox_messages WHERE published_at IS NULL",
    "hot-update": "SELECT count(*) FROM outbox_messages WHERE published_at IS NULL",
    "pending-delete": "SELECT count(*) FROM outbox_pending",
    "pending-trigger": "SELECT count(*) FROM outbox_pending",
    "shard-position": (
        "SELECT count(*) FROM outbox_messages AS m LEFT JOIN outbox_positions AS p "
        "USING (shard) WHERE p.position IS NULL OR m.id > p.position"
    ),
}


@dataclass
class Phase:
    cpu_us: float  # backend CPU per row (the wall time when /proc can't tell)
    wall_us: float
    wal_bytes: float


@dataclass
class Measured:
    design: str
    write: Phase
    publish: Phase
    vacuum: Phase
    problems: list[str] = field(default_factory=list)

    @property
    def publishing_us(self) -> float:
        """What publishing costs the database per row: the reads, the marks and the
        cleanup they leave."""
        return self.publish.cpu_us + self.vacuum.cpu_us


class Backend:
    """One server session, with the CPU and WAL its work costs."""

    def __init__(self, connection: asyncpg.Connection, pid: int) -> None:
        self.connection = connection
        self._stat = f"/proc/{pid}/stat"

    @classmethod
    async def connect(cls, url: str) -> Backend:
        connection = await asyncpg.connect(url)
        return cls(connection, await connection.fetchval("SELECT pg_backend_pid()"))

    def cpu_seconds(self) -> float | None:
        try:
            with open(self._stat) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            return None  # the server runs elsewhere
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def measure(self, rows: int, work: Callable[[], Awaitable[None]]) -> Phase:
        wal_before = await self.connection.fetchval("SELECT pg_current_wal_insert_lsn()")
        cpu_before = self.cpu_seconds()
        began = time.perf_counter()
        await work()
        wall = time.perf_counter() - began
        cpu_after = self.cpu_seconds()
        wal = await self.connection.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1)", wal_before
        )
        cpu = wall if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        return Phase(cpu * 1e6 / rows, wall * 1e6 / rows, float(wal) / rows)


async def create_baseline_database(services: Services, name: str) -> str:
    """A new database migrated to ``BASELINE_REVISION``; its plain URL."""
    await admin(services, f'CREATE DATABASE "{name}"')
    url = plain_url(services.admin_url, name)
    migrating = async_database_url(url).render_as_string(hide_password=False)
    # Alembic's env runs its own event loop: give it a thread.
    await asyncio.to_thread(command.upgrade, alembic_config(migrating), BASELINE_REVISION)
    return url


async def measure_design(services: Services, design: str, args: argparse.Namespace) -> Measured:
    name = f"orderflow_bench_designs_{uuid.uuid4().hex[:10]}"
    url = await create_baseline_database(services, name)
    try:
        backend = await Backend.connect(url)
        try:
            return await _measure(backend, design, args)
        finally:
            await backend.connection.close()
    finally:
        await admin(services, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _measure(backend: Backend, design: str, args: argparse.Namespace) -> Measured:
    connection = backend.connection
    for statement in _SETUP[design]:
        await connection.execute(statement)
    # Generated once, as the relay benchmark's rows: the writes take the first ones.
    chunks = list(outbox_rows(args.writes + args.rows))
    rows = [row for chunk in chunks for row in chunk]
    written, loaded = rows[: args.writes], rows[args.writes :]
    insert = _INSERT_PENDING if design == "pending-delete" else _INSERT

    async def write() -> None:
        for start in range(0, len(written), ROWS_PER_TRANSACTION):
            part = written[start : start + ROWS_PER_TRANSACTION]
            async with connection.transaction():
                await connection.execute(
                    insert,
                    [TOPIC] * len(part),
                    [key for key, _, _, _ in part],
                    [payload for _, payload, _, _ in part],
                    [headers for _, _, headers, _ in part],
                    [shard for _, _, _, shard in part],
                )

    write_phase = await backend.measure(len(written), write)
    # The publish phase publishes the written rows and R more, loaded here (the pending
    # designs get their pending ids for them too).
    await connection.copy_records_to_table(
        "outbox_messages",
        columns=COLUMNS,
        records=[(TOPIC, key, payload, headers, shard) for key, payload, headers, shard in loaded],
    )
    if design in ("pending-delete", "pending-trigger"):  # (the trigger filled it already)
        await connection.execute(
            "INSERT INTO outbox_pending (id, shard) SELECT id, shard FROM outbox_messages "
            "ON CONFLICT (id) DO NOTHING"
        )
    for table in _TABLES[design]:
        await connection.execute(f"VACUUM (ANALYZE) {table}")
    # Like the relay's session: marks don't wait for the disk.
    await connection.execute("SET synchronous_commit = off")
    fetched: list[int] = []
    shards = list(range(64))
    fetch, mark = _FETCH[design], _marker(design, connection)

    async def publish() -> None:
        floor = 0
        while True:
            records = await connection.fetch(fetch, shards, floor, BATCH)
            if not records:
                return
            ids = [record[0] for record in records]
            fetched.extend(ids)
            await mark(records)
            floor = ids[-1] + 1

    total = len(written) + len(loaded)
    publish_phase = await backend.measure(total, publish)

    async def vacuum() -> None:
        for table in _TABLES[design]:
            await connection.execute(f"VACUUM {table}")

    vacuum_phase = await backend.measure(total, vacuum)
    problems: list[str] = []
    every = [record[0] for record in await connection.fetch("SELECT id FROM outbox_messages")]
    if fetched != sorted(every):
        problems.append(
            f"{design}: fetched {len(fetched)} ids ({len(set(fetched))} distinct), "
            f"the table holds {len(every)}; in id order: {fetched == sorted(fetched)}"
        )
    check = _UNPUBLISHED.get(design)
    if check is not None:
        left = await connection.fetchval(check)
        if left:
            problems.append(f"{design}: {left} rows still unpublished after the drain")
    return Measured(design, write_phase, publish_phase, vacuum_phase, problems)


def _marker(design: str, connection: asyncpg.Connection) -> Callable[[list[Any]], Awaitable[None]]:
    """How ``design`` records a fetched batch as published."""

    async def update_rows(records: list[Any]) -> None:
        await connection.execute(_MARK_ROWS, [record[0] for record in records])

    async def delete_pending(records: list[Any]) -> None:
        await connection.execute(
            "DELETE FROM outbox_pending WHERE id = ANY($1::bigint[])",
            [record[0] for record in records],
        )

    async def upsert_positions(records: list[Any]) -> None:
        newest: dict[int, int] = {}
        for record in records:
            newest[record[5]] = record[0]  # in id order: the newest wins
        await connection.execute(
            "INSERT INTO outbox_positions (shard, position) "
            "SELECT * FROM unnest($1::smallint[], $2::bigint[]) "
            "ON CONFLICT (shard) DO UPDATE SET position = excluded.position",
            list(newest),
            list(newest.values()),
        )

    async def nothing(records: list[Any]) -> None:
        return None

    return {
        "row-update": update_rows,
        "hot-update": update_rows,
        "pending-delete": delete_pending,
        "pending-trigger": delete_pending,
        "shard-position": upsert_positions,
        "no-mark": nothing,
    }[design]


async def benchmark(services: Services, args: argparse.Namespace) -> list[list[Measured]]:
    say(f"services: {services.origin}")
    rounds: list[list[Measured]] = []
    for number in range(1, args.rounds + 1):
        measured: list[Measured] = []
        for design in args.designs:
            result = await measure_design(services, design, args)
            say(
                f"round {number} {design:<15} write {result.write.cpu_us:6.1f}  "
                f"publish {result.publish.cpu_us:6.1f}  vacuum {result.vacuum.cpu_us:5.1f} "
                f"µs/row"
            )
            measured.append(result)
        rounds.append(measured)
    return rounds


def report(rounds: list[list[Measured]], designs: list[str]) -> str:
    by_design = {design: [m for r in rounds for m in r if m.design == design] for design in designs}

    def median(design: str, value: Callable[[Measured], float]) -> float:
        return statistics.median([value(m) for m in by_design[design]])

    def ratio(value: float, base: float) -> float:
        # nan: too little work for the CPU clock (10 ms ticks) to see, at a tiny size.
        return value / base if base else float("nan")

    def publishing(design: str) -> float:
        return median(design, lambda m: m.publishing_us)

    def writing(design: str) -> float:
        return median(design, lambda m: m.write.cpu_us)

    def versus_row_update(design: str) -> float:
        return ratio(publishing(design), publishing("row-update"))

    lines = [
        "",
        f"medians of {len(rounds)} round(s), per row: CPU of the server backend (µs) and WAL "
        "written (bytes)",
        f"{'design':<15} {'write µs':>9} {'WAL B':>6} {'publish µs':>11} {'WAL B':>6} "
        f"{'wall µs':>8} {'vacuum µs':>10} {'WAL B':>6} {'publishing':>11} {'vs row-update':>13}",
    ]
    for design in designs:
        lines.append(
            f"{design:<15} {writing(design):>9.1f} "
            f"{median(design, lambda m: m.write.wal_bytes):>6.0f} "
            f"{median(design, lambda m: m.publish.cpu_us):>11.1f} "
            f"{median(design, lambda m: m.publish.wal_bytes):>6.0f} "
            f"{median(design, lambda m: m.publish.wall_us):>8.1f} "
            f"{median(design, lambda m: m.vacuum.cpu_us):>10.1f} "
            f"{median(design, lambda m: m.vacuum.wal_bytes):>6.0f} "
            f"{publishing(design):>11.1f} {versus_row_update(design):>13.2f}"
        )
    lines.append(
        "(publishing = publish + vacuum; write: 5 rows a transaction, its commit included)"
    )
    ratios = " ".join(
        f"{design.replace('-', '_')}_publishing_ratio="
        f"{versus_row_update(design):.2f} {design.replace('-', '_')}_write_ratio="
        f"{ratio(writing(design), writing('row-update')):.2f}"
        for design in designs
        if design != "row-update"
    )
    lines.append(
        f"\nRESULT row_update_publishing_us={publishing('row-update'):.1f} "
        f"row_update_write_us={writing('row-update'):.1f} {ratios}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--writes", type=int, default=10_000, help="rows written 5 per transaction (10000)"
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows loaded and published")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every design (3)")
    parser.add_argument(
        "--designs",
        default=",".join(DESIGNS),
        help=f"comma-separated, row-update always included ({', '.join(DESIGNS)})",
    )
    args = parser.parse_args(argv)
    chosen = [design.strip() for design in args.designs.split(",") if design.strip()]
    unknown = sorted(set(chosen) - set(DESIGNS))
    if unknown:
        parser.error(f"unknown design(s): {', '.join(unknown)}; known: {', '.join(DESIGNS)}")
    args.designs = ["row-update", *(d for d in DESIGNS if d in chosen and d != "row-update")]
    if args.writes < ROWS_PER_TRANSACTION or args.rows < 1 or args.rounds < 1:
        parser.error(f"--writes must be at least {ROWS_PER_TRANSACTION}; --rows, --rounds 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    with provide_services(broker=False) as services:
        rounds = asyncio.run(benchmark(services, args))
    say(f"(whole run: {time.perf_counter() - began:.0f} s)")
    problems = [problem for r in rounds for m in r for problem in m.problems]
    for problem in problems:
        say(f"PROBLEM {problem}")
    say(report(rounds, args.designs))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
