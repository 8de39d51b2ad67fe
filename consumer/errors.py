"""Why an event is rejected, as data.

Every rejection the contract knows is a subclass of :class:`RejectedEvent` that carries
exactly one :class:`DeadLetterReason`. A rejected event is dead-lettered and consumption
goes on. Transient failures (database or broker unreachable) are *not* rejections: they are
retried and never dead-lettered, so they have no place in this hierarchy.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class DeadLetterReason(enum.StrEnum):
    """The values of the ``error.reason`` header on the dead-letter topic (the contract)."""

    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    UNKNOWN_ORDER = "unknown_order"
    DUPLICATE_ORDER = "duplicate_order"
    INVALID_TRANSITION = "invalid_transition"
    AMOUNT_MISMATCH = "amount_mismatch"


class RejectedEvent(Exception):
    """An inbound message that can never be applied; ``str(error)`` is the human sentence."""

    reason: ClassVar[DeadLetterReason]

    @property
    def message(self) -> str:
        return str(self)


class MalformedJson(RejectedEvent):
    reason = DeadLetterReason.MALFORMED_JSON


class SchemaViolation(RejectedEvent):
    reason = DeadLetterReason.SCHEMA_VIOLATION


class UnknownEventType(RejectedEvent):
    reason = DeadLetterReason.UNKNOWN_EVENT_TYPE


class UnknownOrder(RejectedEvent):
    reason = DeadLetterReason.UNKNOWN_ORDER


class DuplicateOrder(RejectedEvent):
    reason = DeadLetterReason.DUPLICATE_ORDER


class InvalidTransition(RejectedEvent):
    reason = DeadLetterReason.INVALID_TRANSITION


class AmountMismatch(RejectedEvent):
    reason = DeadLetterReason.AMOUNT_MISMATCH


class OffsetConflict(Exception):
    """The stored offset of a partition is not the one this consumer expected.

    Another group member (or an earlier incarnation of this one) advanced it: the batch
    was rolled back and must be dropped; the consumer re-reads the stored offset and
    seeks there. This is the fence that keeps a zombie from committing over a new owner.
    """

    def __init__(self, topic: str, partition: int, expected: int | None, stored: int | None):
        super().__init__(
            f"offset of {topic}[{partition}] is {stored}, expected {expected}: "
            "another consumer owns this partition now"
        )
        self.topic = topic
        self.partition = partition
        self.expected = expected
        self.stored = stored
