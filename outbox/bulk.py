"""Fast multi-row inserts (and updates by key) inside the caller's transaction.

With asyncpg underneath, rows go in as one ``INSERT ... SELECT ... FROM unnest(...)`` with
one array parameter per column, and rows for several tables as one statement: one round
trip whatever the row count, a statement the driver prepares once per connection, and
arrays encoded in C (no per-row parameter handling). A group with an ``update_key`` is an
``UPDATE ... FROM unnest(...)`` of the rows with those keys instead. Any other driver gets
a Core executemany per group (and no upserts or lookups). Either way: same transaction, no
commit, rows inserted (and given their ids) in the given order.

Foreign keys between the groups of one statement hold: PostgreSQL checks them at the end
of the statement, so a group's rows may reference rows an earlier group inserts. A group
can be an upsert (``Upsert``: on a conflict over a unique key, the existing row is updated
instead), and a later group can take a column's values from an earlier group's rows
(``Lookup``: a customer's id by its email, whether the upsert inserted that customer or
found it): still one statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import ARRAY, Executable, Table, bindparam, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession


@dataclass(frozen=True, slots=True)
class Upsert:
    """An insert whose row, when it conflicts with an existing row over ``key`` (the
    columns of a unique index), updates that row's ``update`` columns instead: to the
    row's given values, or to their defaults for columns not given. Each key at most
    once in the group's rows."""

    key: tuple[str, ...]
    update: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Lookup:
    """A column of an inserting group whose given values name rows of an earlier group
    (``source``, passed to the same ``insert_rows`` call) by that group's ``by`` column:
    each is replaced by the named row's ``take`` column, as that group wrote it (for an
    upsert, the existing row's when it was there). ``by`` must tell ``source``'s rows
    apart; a value that names none of them leaves the column NULL."""

    column: str
    source: TableRows
    by: str
    take: str


@dataclass(frozen=True, slots=True)
class TableRows:
    """Rows for one table: tuples in ``columns`` order."""

    table: Table
    columns: tuple[str, ...]
    rows: Sequence[tuple[Any, ...]]
    #: The transaction gets its id (``pg_current_xact_id()``) before any row takes a
    #: value from a sequence default.
    xid_first: bool = False
    #: Columns (among ``columns``) that name existing rows: the group updates those rows'
    #: other columns instead of inserting (each key at most once in ``rows``).
    update_key: tuple[str, ...] = ()
    upsert: Upsert | None = None
    lookups: tuple[Lookup, ...] = ()

    def __post_init__(self) -> None:
        if self.update_key and (not set(self.update_key) < set(self.columns) or self.xid_first):
            raise ValueError(
                "update_key must be some, not all, of the columns, and without xid_first"
            )
        if self.update_key and (self.upsert is not None or self.lookups):
            raise ValueError("an update (update_key) is neither an upsert nor takes lookups")
        if self.upsert is not None and not (
            self.upsert.key
            and self.upsert.update
            and set(self.upsert.key) <= set(self.columns)
            and set(self.upsert.update) <= set(self.table.c.keys()) - set(self.upsert.key)
        ):
            raise ValueError(
                "an upsert's key must be given columns, its update one or more other columns"
            )
        for lookup in self.lookups:
            if lookup.column not in self.columns:
                raise ValueError(f"lookup of {lookup.column!r}: not one of the columns")
            if {lookup.by, lookup.take} - set(lookup.source.columns):
                raise ValueError(
                    f"lookup of {lookup.column!r}: by and take must be columns of its source"
                )


async def insert_rows(session: AsyncSession, *groups: TableRows) -> None:
    """Insert each group's rows into its table through ``session``, all in one statement
    (the groups but the last as data-modifying CTEs; ``INSERT`` triggers fire as usual)."""
    groups = tuple(group for group in groups if group.rows)
    if not groups:
        return
    sources = _lookup_sources(groups)
    # Updates and upserts change rows the session may hold changes to: those go first.
    await session.flush()
    connection = await session.connection()
    if connection.dialect.driver != "asyncpg":
        if any(group.upsert is not None or group.lookups for group in groups):
            raise TypeError("insert_rows: upserts and lookups need the asyncpg driver")
        for group in groups:
            if group.xid_first:
                await connection.execute(select(func.pg_current_xact_id()))
            statement: Executable
            if group.update_key:
                # Bound under other names: a column's own name in an UPDATE means SET.
                statement = (
                    update(group.table)
                    .where(*(group.table.c[k] == bindparam(f"key_{k}") for k in group.update_key))
                    .values({c: bindparam(c) for c in group.columns if c not in group.update_key})
                )
                names = [f"key_{c}" if c in group.update_key else c for c in group.columns]
            else:
                statement, names = insert(group.table), list(group.columns)
            await connection.execute(
                statement, [dict(zip(names, row, strict=True)) for row in group.rows]
            )
        return
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    if not driver.is_in_transaction():
        # SQLAlchemy begins the driver's transaction lazily, with the first statement it
        # runs itself: run one, or these rows would commit on their own, outside the
        # caller's transaction.
        await connection.execute(_BEGIN)
        if not driver.is_in_transaction():
            raise RuntimeError("insert_rows needs a session in a transaction")
    arguments = [column for group in groups for column in zip(*group.rows, strict=True)]
    await driver.execute(_unnest_insert(groups, sources, connection.dialect), *arguments)


def _lookup_sources(groups: Sequence[TableRows]) -> list[tuple[int, ...]]:
    """For each group, the position (among ``groups``) of each of its lookups' source."""
    positions: list[tuple[int, ...]] = []
    for number, group in enumerate(groups):
        found: list[int] = []
        for lookup in group.lookups:
            earlier = [at for at, other in enumerate(groups[:number]) if other is lookup.source]
            if not earlier or lookup.source.update_key:
                raise ValueError(
                    f"lookup of {group.table.name}.{lookup.column}: its source is not an "
                    "earlier inserting group with rows"
                )
            found.append(earlier[0])
        positions.append(tuple(found))
    return positions


_BEGIN: Final = text("SELECT 1")
_STATEMENTS: dict[tuple[object, ...], str] = {}


def _unnest_insert(
    groups: Sequence[TableRows], sources: Sequence[tuple[int, ...]], dialect: Any
) -> str:
    """``INSERT INTO t (a, b) SELECT a, b FROM unnest($1::type_a[], $2::type_b[]) WITH
    ORDINALITY ... ORDER BY ordinality`` per group, cached: rows take their ids (a sequence
    default) in array order, which the outbox's per-key order relies on; ``UPDATE t SET b
    = given.b FROM unnest(...) AS given (a, b) WHERE t.a = given.a`` for an update group.
    Groups before the last become ``WITH inserted_N AS (...)``; an upsert adds ``ON
    CONFLICT (key) DO UPDATE SET c = EXCLUDED.c``, and returns the columns its lookups
    need, which the looking-up group joins (``LEFT JOIN inserted_N AS found_M ON
    found_M.by = given.column``) to take its values from."""
    cache_key = tuple(
        (
            group.table.fullname,
            group.columns,
            group.xid_first,
            group.update_key,
            group.upsert,
            tuple(
                (lookup.column, source, lookup.by, lookup.take)
                for lookup, source in zip(group.lookups, group_sources, strict=True)
            ),
        )
        for group, group_sources in zip(groups, sources, strict=True)
    )
    statement = _STATEMENTS.get(cache_key)
    if statement is None:
        preparer = dialect.identifier_preparer
        inserts: list[str] = []
        number = 0
        for index, (group, group_sources) in enumerate(zip(groups, sources, strict=True)):
            for column in group.columns:
                if isinstance(group.table.c[column].type, ARRAY):
                    raise TypeError(
                        f"{group.table.name}.{column}: unnest would flatten an array column"
                    )
            # A looked-up column's array holds its source's values (an email, say).
            given_types = {
                lookup.column: groups[source].table.c[lookup.by].type
                for lookup, source in zip(group.lookups, group_sources, strict=True)
            }
            names = ", ".join(preparer.quote(column) for column in group.columns)
            arrays = ", ".join(
                f"${number + position}::"
                f"{given_types.get(column, group.table.c[column].type).compile(dialect=dialect)}[]"
                for position, column in enumerate(group.columns, start=1)
            )
            number += len(group.columns)
            table = preparer.format_table(group.table)
            if group.update_key:
                assignments = ", ".join(
                    f"{preparer.quote(column)} = given.{preparer.quote(column)}"
                    for column in group.columns
                    if column not in group.update_key
                )
                matches = " AND ".join(
                    f"{table}.{preparer.quote(column)} = given.{preparer.quote(column)}"
                    for column in group.update_key
                )
                inserts.append(
                    f"UPDATE {table} SET {assignments} FROM unnest({arrays}) AS given "
                    f"({names}) WHERE {matches}"
                )
                continue
            # A condition without columns: evaluated before the first row is produced,
            # and so before the first default is.
            condition = "WHERE pg_current_xact_id() IS NOT NULL " if group.xid_first else ""
            taken = {
                lookup.column: f"found_{at}.{preparer.quote(lookup.take)}"
                for at, lookup in enumerate(group.lookups)
            }
            values = ", ".join(
                taken.get(column, f"given.{preparer.quote(column)}") for column in group.columns
            )
            joins = "".join(
                f"LEFT JOIN inserted_{source} AS found_{at} ON found_{at}."
                f"{preparer.quote(lookup.by)} = given.{preparer.quote(lookup.column)} "
                for at, (lookup, source) in enumerate(
                    zip(group.lookups, group_sources, strict=True)
                )
            )
            ending = ""
            if group.upsert is not None:
                updates = ", ".join(
                    f"{preparer.quote(column)} = EXCLUDED.{preparer.quote(column)}"
                    for column in group.upsert.update
                )
                ending = (
                    f" ON CONFLICT ({', '.join(preparer.quote(c) for c in group.upsert.key)}) "
                    f"DO UPDATE SET {updates}"
                )
            wanted = sorted(
                {
                    column
                    for later, later_sources in zip(groups, sources, strict=True)
                    for lookup, source in zip(later.lookups, later_sources, strict=True)
                    if source == index
                    for column in (lookup.by, lookup.take)
                }
            )
            if wanted:
                ending += f" RETURNING {', '.join(preparer.quote(c) for c in wanted)}"
            inserts.append(
                f"INSERT INTO {table} ({names}) "
                f"SELECT {values} FROM unnest({arrays}) WITH ORDINALITY AS given ({names}, "
                f"ordinality) {joins}{condition}ORDER BY given.ordinality{ending}"
            )
        *before, last = inserts
        ctes = ", ".join(f"inserted_{index} AS ({sql})" for index, sql in enumerate(before))
        statement = f"WITH {ctes} {last}" if ctes else last
        _STATEMENTS[cache_key] = statement
    return statement
