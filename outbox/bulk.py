"""Fast multi-row inserts (and updates by key) inside the caller's transaction.

With asyncpg underneath, rows go in as one ``INSERT ... SELECT ... FROM unnest(...)`` with
one array parameter per column, and rows for several tables as one statement: one round
trip whatever the row count, a statement the driver prepares once per connection, and
arrays encoded in C (no per-row parameter handling). A group with an ``update_key`` is an
``UPDATE ... FROM unnest(...)`` of the rows with those keys instead. Any other driver gets
a Core executemany per group. Either way: same transaction, no commit, rows inserted (and
given their ids) in the given order.

Foreign keys between the groups of one statement hold: PostgreSQL checks them at the end
of the statement, so a group's rows may reference rows an earlier group inserts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import ARRAY, Executable, Table, bindparam, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession


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

    def __post_init__(self) -> None:
        if self.update_key and (not set(self.update_key) < set(self.columns) or self.xid_first):
            raise ValueError(
                "update_key must be some, not all, of the columns, and without xid_first"
            )


async def insert_rows(session: AsyncSession, *groups: TableRows) -> None:
    """Insert each group's rows into its table through ``session``, all in one statement
    (the groups but the last as data-modifying CTEs; ``INSERT`` triggers fire as usual)."""
    groups = tuple(group for group in groups if group.rows)
    if not groups:
        return
    connection = await session.connection()
    if connection.dialect.driver != "asyncpg":
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
    await driver.execute(_unnest_insert(groups, connection.dialect), *arguments)


_BEGIN: Final = text("SELECT 1")
_STATEMENTS: dict[tuple[tuple[str, tuple[str, ...], bool, tuple[str, ...]], ...], str] = {}


def _unnest_insert(groups: Sequence[TableRows], dialect: Any) -> str:
    """``INSERT INTO t (a, b) SELECT a, b FROM unnest($1::type_a[], $2::type_b[]) WITH
    ORDINALITY ... ORDER BY ordinality`` per group, cached: rows take their ids (a sequence
    default) in array order, which the outbox's per-key order relies on; ``UPDATE t SET b
    = given.b FROM unnest(...) AS given (a, b) WHERE t.a = given.a`` for an update group.
    Groups before the last become ``WITH inserted_N AS (...)``."""
    cache_key = tuple(
        (group.table.fullname, group.columns, group.xid_first, group.update_key) for group in groups
    )
    statement = _STATEMENTS.get(cache_key)
    if statement is None:
        preparer = dialect.identifier_preparer
        inserts: list[str] = []
        number = 0
        for group in groups:
            for column in group.columns:
                if isinstance(group.table.c[column].type, ARRAY):
                    raise TypeError(
                        f"{group.table.name}.{column}: unnest would flatten an array column"
                    )
            names = ", ".join(preparer.quote(column) for column in group.columns)
            arrays = ", ".join(
                f"${number + position}::{group.table.c[column].type.compile(dialect=dialect)}[]"
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
            inserts.append(
                f"INSERT INTO {table} ({names}) "
                f"SELECT {names} FROM unnest({arrays}) WITH ORDINALITY AS given ({names}, "
                f"ordinality) {condition}ORDER BY ordinality"
            )
        *before, last = inserts
        ctes = ", ".join(f"inserted_{index} AS ({sql})" for index, sql in enumerate(before))
        statement = f"WITH {ctes} {last}" if ctes else last
        _STATEMENTS[cache_key] = statement
    return statement
