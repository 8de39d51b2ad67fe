"""A reusable transactional outbox for SQLAlchemy (asyncio) and Kafka.

It knows nothing about orders. Callers add messages through their own session
(:func:`add_messages` never commits), so a message exists exactly when the caller's
transaction commits. The relay publishes them in order, per key, then marks them (deleting
their ids from ``outbox_pending``).
"""

from outbox.enqueue import OutboxMessage, add_message, add_messages, shard_of
from outbox.models import OutboxBase, OutboxPending, OutboxRecord

__all__ = [
    "OutboxBase",
    "OutboxMessage",
    "OutboxPending",
    "OutboxRecord",
    "add_message",
    "add_messages",
    "shard_of",
]
