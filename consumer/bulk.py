"""Bulk UPDATE, DELETE and upsert statements through a session: its pending changes first.

A bulk statement goes straight to the database; the session's pending ORM changes
(attributes set on loaded objects, objects added) are not part of it. Run before they
are flushed, it reads rows without them, and SQLAlchemy then either drops a pending
change to an attribute the statement also sets (it expires it) or flushes the change at
commit, over the statement's result. SQLAlchemy's autoflush prevents that only for
ORM-enabled statements run by the session itself, and only while autoflush is on; a Core
statement on the session's connection (the consumer's offset compare-and-set) never gets
one. So every bulk statement of ours runs through one of these two functions, which
flush first, whatever the session's autoflush.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVarTuple, overload

from sqlalchemy import Executable, Result
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

if TYPE_CHECKING:
    from sqlalchemy.sql.selectable import TypedReturnsRows

_Ts = TypeVarTuple("_Ts")
Parameters: TypeAlias = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None


@overload
async def execute_bulk(
    session: AsyncSession, statement: TypedReturnsRows[*_Ts], parameters: Parameters = None
) -> Result[*_Ts]: ...


@overload
async def execute_bulk(
    session: AsyncSession, statement: Executable, parameters: Parameters = None
) -> Result[*tuple[Any, ...]]: ...


async def execute_bulk(
    session: AsyncSession, statement: Executable, parameters: Parameters = None
) -> Result[*tuple[Any, ...]]:
    """``session.execute(statement, parameters)``, after flushing the pending changes."""
    await session.flush()
    return await session.execute(statement, parameters)


async def bulk_connection(session: AsyncSession) -> AsyncConnection:
    """The session's connection, for Core bulk statements, after flushing the pending
    changes (the connection's statements bypass the session and its autoflush)."""
    await session.flush()
    return await session.connection()
