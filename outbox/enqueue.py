"""Adding messages to the outbox through the caller's session (never commits)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, cast

import orjson
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from outbox.bulk import TableRows, insert_rows
from outbox.models import OutboxRecord

_COLUMNS: Final = ("topic", "key", "payload", "headers", "shard")

#: Number of ordering shards. Fixed: changing it would move keys between shards while
#: messages of those keys may be waiting, so it is part of the stored format.
SHARD_COUNT: Final = 64


def shard_of(key: bytes | None) -> int:
    """The shard of a key: stable across processes and versions (CRC-32, not ``hash``)."""
    return 0 if key is None else zlib.crc32(key) % SHARD_COUNT


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """What to publish: destination topic, key, value bytes and text headers."""

    topic: str
    key: bytes | None
    payload: bytes | None
    headers: tuple[tuple[str, str], ...] = ()


async def add_messages(
    session: AsyncSession, messages: Sequence[OutboxMessage], *, along: Sequence[TableRows] = ()
) -> None:
    """Insert ``messages`` in the session's transaction, in the given order, in one statement
    (with the caller's ``along`` rows for other tables, written first: one round trip for
    all).

    Order matters: the relay publishes one key's messages in insertion (id) order. Callers
    must hold a lock that serialises writers of one key (the consumer locks the order row)
    so that id order is commit order for every key. Rows written to the outbox any other
    way must likewise come from a transaction that already has a transaction id.
    """
    outbox = TableRows(
        cast(Table, OutboxRecord.__table__),
        _COLUMNS,
        [
            (
                message.topic,
                message.key,
                message.payload,
                orjson.dumps(message.headers).decode(),
                shard_of(message.key),
            )
            for message in messages
        ],
        # The relay's scan floor relies on it (see ``outbox.relay.Relay._advance_floor``).
        xid_first=True,
    )
    await insert_rows(session, *along, outbox)


async def add_message(session: AsyncSession, message: OutboxMessage) -> None:
    await add_messages(session, [message])
