"""Fast multi-row inserts inside the caller's transaction.

With asyncpg underneath, rows go in as one ``INSERT ... SELECT ... FROM unnest(...)`` with
one array parameter per column: one round trip whatever the row count, a statement the
driver prepares once per connection, and arrays encoded in C (no per-row parameter
handling). Any other driver gets a Core ``INSERT`` executemany. Either way: same
transaction, no commit, rows inserted (and given their ids) in the given order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ARRAY, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession


async def insert_rows(
    session: AsyncSession, table: Table, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert ``rows`` (tuples in ``columns`` order) into ``table`` through ``session``."""
    if not rows:
        return
    connection = await session.connection()
    if connection.dialect.driver != "asyncpg":
        await connection.execute(
            insert(table), [dict(zip(columns, row, strict=True)) for row in rows]
        )
        return
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    await driver.execute(
        _unnest_insert(table, columns, connection.dialect), *zip(*rows, strict=True)
    )


_STATEMENTS: dict[tuple[str, tuple[str, ...]], str] = {}


def _unnest_insert(table: Table, columns: Sequence[str], dialect: Any) -> str:
    """``INSERT INTO t (a, b) SELECT a, b FROM unnest($1::type_a[], $2::type_b[]) WITH
    ORDINALITY ... ORDER BY ordinality``, cached: rows take their ids (a sequence default)
    in array order, which the outbox's per-key order relies on."""
    cache_key = (table.fullname, tuple(columns))
    statement = _STATEMENTS.get(cache_key)
    if statement is None:
        preparer = dialect.identifier_preparer
        for column in columns:
            if isinstance(table.c[column].type, ARRAY):
                raise TypeError(f"{table.name}.{column}: unnest would flatten an array column")
        names = ", ".join(preparer.quote(column) for column in columns)
        arrays = ", ".join(
            f"${number}::{table.c[column].type.compile(dialect=dialect)}[]"
            for number, column in enumerate(columns, start=1)
        )
        statement = (
            f"INSERT INTO {preparer.format_table(table)} ({names}) "
            f"SELECT {names} FROM unnest({arrays}) WITH ORDINALITY AS given ({names}, ordinality) "
            "ORDER BY ordinality"
        )
        _STATEMENTS[cache_key] = statement
    return statement
