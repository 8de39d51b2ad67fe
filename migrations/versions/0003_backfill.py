"""backfill runs

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

``orderflow backfill snapshots`` records each run's progress here: its filters, the last
order id it covered (the keyset cursor) and its counts. The cursor moves in the same
transaction as the outbox rows of the batch it covers, so an interrupted run continues
after its last committed batch and never emits an order twice. At most one unfinished
run exists per kind and filter set (partial unique index).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "backfill_runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("filters", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("filters_key", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'running'"), nullable=False),
        sa.Column("cursor", sa.UUID(), nullable=True),
        sa.Column("queued", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("skipped", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("batches", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'finished', 'abandoned')", name="ck_backfill_runs_status"
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ux_backfill_runs_running",
        "backfill_runs",
        ["kind", "filters_key"],
        unique=True,
        postgresql_where=sa.text("status = 'running'"),
    )


def downgrade() -> None:
    op.drop_index(
        "ux_backfill_runs_running",
        table_name="backfill_runs",
        postgresql_where=sa.text("status = 'running'"),
    )
    op.drop_table("backfill_runs")
