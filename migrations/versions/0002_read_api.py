"""indexes for the read API

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

``GET /orders`` pages newest first by the key ``(created_at, id)``, optionally filtered by
status or by customer. Each filter gets a composite B-tree index that ends in that key, so
every page is one index range scan of ``limit + 1`` entries, however deep the page is:

- ``ix_orders_created_at_id``: no filter;
- ``ix_orders_status_created_at_id``: ``status = ...``;
- ``ix_orders_customer_id_created_at_id``: ``customer_id = ...`` (the email is resolved
  through the existing unique index on ``customers.email``). Its leading column serves
  every lookup the old single-column ``ix_orders_customer_id`` served (the foreign key
  among them), so that one is dropped instead of being maintained twice on each insert.

``CREATE INDEX`` blocks writes to ``orders`` while it builds. On a large table, build the
same indexes beforehand with ``CREATE INDEX CONCURRENTLY`` under these names: the
``IF NOT EXISTS`` below then makes this revision instant.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_orders_created_at_id", "orders", ["created_at", "id"], if_not_exists=True)
    op.create_index(
        "ix_orders_status_created_at_id",
        "orders",
        ["status", "created_at", "id"],
        if_not_exists=True,
    )
    op.create_index(
        "ix_orders_customer_id_created_at_id",
        "orders",
        ["customer_id", "created_at", "id"],
        if_not_exists=True,
    )
    op.drop_index("ix_orders_customer_id", table_name="orders", if_exists=True)


def downgrade() -> None:
    op.create_index("ix_orders_customer_id", "orders", ["customer_id"], if_not_exists=True)
    op.drop_index("ix_orders_customer_id_created_at_id", table_name="orders", if_exists=True)
    op.drop_index("ix_orders_status_created_at_id", table_name="orders", if_exists=True)
    op.drop_index("ix_orders_created_at_id", table_name="orders", if_exists=True)
