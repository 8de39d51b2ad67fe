"""An inbound Kafka record as the consumer holds it, and the dead letter it can become."""

from __future__ import annotations

from dataclasses import dataclass

from consumer.errors import RejectedEvent
from outbox import OutboxMessage


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One Kafka record as the consumer received it (the bytes untouched)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def dead_letter(message: InboundMessage, error: RejectedEvent, topic: str) -> OutboxMessage:
    """The DLQ record of a rejected message: original key and value bytes, contract headers."""
    return OutboxMessage(
        topic=topic,
        key=message.key,
        payload=message.value,
        headers=(
            ("error.reason", error.reason.value),
            ("error.message", error.message),
            ("source.topic", message.topic),
            ("source.partition", str(message.partition)),
            ("source.offset", str(message.offset)),
        ),
    )
