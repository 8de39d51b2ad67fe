"""parked events

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

An inbound event that cannot apply *yet* (its order does not exist, or it applies from a
status the order can still reach) waits here instead of being dead-lettered. It is
written in the transaction that advances its partition's offset, and leaves in the
transaction that applies it (released by an earlier event of its order) or dead-letters
it (it waited ``ORDERFLOW_PARK_TIMEOUT_S``, or can no longer apply). ``id`` is the arrival
order; ``event_id`` makes a repeat of a waiting event a duplicate; the original key and
value bytes, source position and W3C trace context are kept for the dead letter (or the
update) it becomes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "parked_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("order_id", sa.UUID(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("offset", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("traceparent", sa.Text(), nullable=True),
        sa.Column("tracestate", sa.Text(), nullable=True),
        sa.Column(
            "parked_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id", name="uq_parked_events_event_id"),
    )
    op.create_index("ix_parked_events_order_id", "parked_events", ["order_id"])
    op.create_index(
        "ix_parked_events_partition",
        "parked_events",
        ["group_id", "topic", "partition", "parked_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_parked_events_partition", table_name="parked_events")
    op.drop_index("ix_parked_events_order_id", table_name="parked_events")
    op.drop_table("parked_events")
