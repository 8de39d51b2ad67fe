"""The outbox table. Its own metadata: the outbox shares no mapping with its users."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from sqlalchemy import BigInteger, DateTime, Index, LargeBinary, SmallInteger, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Channel the outbox's insert trigger notifies, once per inserting transaction.
NOTIFY_CHANNEL: Final = "orderflow_outbox"


class OutboxBase(DeclarativeBase):
    pass


class OutboxRecord(OutboxBase):
    """One message waiting for (or kept after) publication.

    ``shard`` is a stable hash of the key: every message of one key lives in one shard,
    and one relay owns a shard at a time, which is what keeps a key's messages in order.
    ``headers`` is a JSON list of ``[name, value]`` text pairs.
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
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # The relay's only lookup, in id order: small, because published rows leave it.
        Index(
            "ix_outbox_messages_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
        ),
        Index(
            "ix_outbox_messages_published_at",
            "published_at",
            postgresql_where=text("published_at IS NOT NULL"),
        ),
    )
