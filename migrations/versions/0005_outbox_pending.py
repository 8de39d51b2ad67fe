"""outbox: publishing is a delete from a narrow pending table

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Until now the relay marked every published row with an ``UPDATE`` of ``published_at``:
a new version of every wide row (payload included), never a HOT update (the column is
in partial index predicates). From here on a message is unpublished while its id is in
``outbox_pending`` (id, shard), filled by a statement-level insert trigger in the
inserting transaction, and the relay's mark deletes the ids it published: a few dozen
bytes of WAL per row instead of the whole row. ``outbox_messages`` keeps every
message's bytes, unchanged, until retention prunes it, counted from ``created_at`` (now
indexed: pruning and ``replay outbox`` windows). ``outbox_throughput`` keeps, per second,
relay and topic, how many messages were published (``orderflow outbox stats``' last
minute).

``published_at`` now defaults to ``'infinity'``: a new message's state is in
``outbox_pending`` alone. The rows waiting at the migration keep ``published_at`` NULL
(and their ids go into ``outbox_pending``), and whichever relay publishes one stamps it:
a relay of the previous version with its usual mark (an update trigger then removes the
ids from ``outbox_pending``), a relay of this version along with its own mark (see
``outbox.relay``). That is what carries a live system over: a relay of the previous
version reads ``published_at IS NULL``, which matches only those older rows, so no
message is published by both, none twice, and its prune never takes an unpublished
message (``'infinity'`` is never older than its retention). The shards such a relay owns
wait for their newer messages until it stops or hands them over at a claim round.

The migration takes ``outbox_messages`` for itself first (readers and writers wait until
it commits: seconds per million retained rows, for the ``created_at`` index), so that
every row committed before it is filled into ``outbox_pending`` (when unmarked) and every
row committed after it goes through the default and the trigger. The partial index of
unpublished rows stays (it holds only those older rows, and empties as they go out);
the one on ``published_at`` goes (every new row would enter it).

Downgrade: the rows still pending get ``published_at`` NULL, the others (published since)
now: relays of the previous version publish exactly what is still pending. Stop every
relay of this version first.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Everyone else waits from here to the commit (taken at once: a weaker lock first
    # would deadlock with a transaction that read the table and then writes to it).
    op.execute("LOCK TABLE outbox_messages IN ACCESS EXCLUSIVE MODE")
    op.create_table(
        "outbox_pending",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        "INSERT INTO outbox_pending (id, shard) "
        "SELECT id, shard FROM outbox_messages WHERE published_at IS NULL"
    )
    op.execute("ALTER TABLE outbox_messages ALTER COLUMN published_at SET DEFAULT 'infinity'")
    op.execute(
        """
        CREATE FUNCTION orderflow_outbox_pend() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO outbox_pending (id, shard) SELECT id, shard FROM inserted;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER outbox_messages_pend AFTER INSERT ON outbox_messages
        REFERENCING NEW TABLE AS inserted
        FOR EACH STATEMENT EXECUTE FUNCTION orderflow_outbox_pend()
        """
    )
    # A mark by a relay of the previous version publishes the row too.
    op.execute(
        """
        CREATE FUNCTION orderflow_outbox_marked() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM outbox_pending AS p USING updated AS u
            WHERE p.id = u.id AND u.published_at <> 'infinity';
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER outbox_messages_marked AFTER UPDATE ON outbox_messages
        REFERENCING NEW TABLE AS updated
        FOR EACH STATEMENT EXECUTE FUNCTION orderflow_outbox_marked()
        """
    )
    op.create_table(
        "outbox_throughput",
        sa.Column("second", sa.DateTime(timezone=True), nullable=False),
        sa.Column("relay", sa.Integer(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("published", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("second", "relay", "topic"),
    )
    op.create_index("ix_outbox_messages_created_at", "outbox_messages", ["created_at"])
    op.drop_index("ix_outbox_messages_published_at", table_name="outbox_messages")


def downgrade() -> None:
    op.execute("LOCK TABLE outbox_messages, outbox_pending IN ACCESS EXCLUSIVE MODE")
    op.execute("DROP TRIGGER outbox_messages_marked ON outbox_messages")
    op.execute("DROP TRIGGER outbox_messages_pend ON outbox_messages")
    op.execute("DROP FUNCTION orderflow_outbox_marked()")
    op.execute("DROP FUNCTION orderflow_outbox_pend()")
    op.execute("ALTER TABLE outbox_messages ALTER COLUMN published_at DROP DEFAULT")
    op.execute(
        "UPDATE outbox_messages AS m SET published_at = CASE "
        "WHEN EXISTS (SELECT FROM outbox_pending AS p WHERE p.id = m.id) THEN NULL "
        "ELSE now() END "
        "WHERE published_at = 'infinity'"
    )
    op.create_index(
        "ix_outbox_messages_published_at",
        "outbox_messages",
        ["published_at"],
        postgresql_where=sa.text("published_at IS NOT NULL"),
    )
    op.drop_index("ix_outbox_messages_created_at", table_name="outbox_messages")
    op.drop_table("outbox_throughput")
    op.drop_table("outbox_pending")
