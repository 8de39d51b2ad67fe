"""The outbox table. Its own metadata: the outbox shares no mapping with its users."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Channel the outbox's insert trigger notifies, once per inserting transaction.
NOTIFY_CHANNEL: Final = "orderflow_outbox"


class OutboxBase(DeclarativeBase):
    pass


class OutboxRecord(OutboxBase):
    """One message, kept from its insertion until retention prunes it.

    ``shard`` is a stable hash of the key: every message of one key lives in one shard,
    and one relay owns a shard at a time, which is what keeps a key's messages in order.
    ``headers`` is a JSON list of ``[name, value]`` text pairs. A message is unpublished
    while its id is in ``outbox_pending`` (:class:`OutboxPending`). ``published_at`` is
    ``'infinity'`` on every row written since schema revision 0005 (its state is in
    ``outbox_pending`` alone); on older rows it is the time they were published, or NULL
    while they wait (relays of the previous version read those).
    """

    __tablename__ = "outbox_messages"

    # From a sequence without a per-session cache: ids are handed out in time order,
    # which the relay's scan floor relies on.
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(Text)
    key: Mapped[bytes | None] = mapped_column(LargeBinary)
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    headers: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    shard: Mapped[int] = mapped_column(SmallInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    published_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=text("'infinity'")
    )

    __table_args__ = (
        # Retention (pruning) and ``replay outbox`` windows count from ``created_at``.
        Index("ix_outbox_messages_created_at", "created_at"),
        # The messages waiting since before schema revision 0005 (see ``outbox.relay``).
        Index(
            "ix_outbox_messages_unpublished", "id", postgresql_where=text("published_at IS NULL")
        ),
    )


class OutboxPending(OutboxBase):
    """The id (and shard) of every unpublished message: written by an insert trigger on
    ``outbox_messages`` in the inserting transaction, deleted by the relay's mark. Narrow,
    so that publishing rewrites nothing of the message itself."""

    __tablename__ = "outbox_pending"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    shard: Mapped[int] = mapped_column(SmallInteger)


class OutboxThroughput(OutboxBase):
    """How many messages of a topic one relay session published in one second (for
    ``outbox stats``); the relay prunes rows older than an hour."""

    __tablename__ = "outbox_throughput"

    second: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    relay: Mapped[int] = mapped_column(Integer, primary_key=True)
    topic: Mapped[str] = mapped_column(Text, primary_key=True)
    published: Mapped[int] = mapped_column(BigInteger)
