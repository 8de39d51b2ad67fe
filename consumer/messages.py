"""An inbound Kafka record as the consumer holds it, and the dead letter it can become."""

from __future__ import annotations

from dataclasses import dataclass, field

from consumer.errors import RejectedEvent
from outbox import OutboxMessage

#: W3C trace context headers as text pairs (``traceparent``, maybe ``tracestate``).
TraceHeaders = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One Kafka record as the consumer received it (the bytes untouched)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: Its W3C trace context, if it came with one (see :mod:`consumer.tracing`).
    trace: TraceHeaders = ()
    #: When the consume loop received it (``time.monotonic()``); 0.0 for a message that
    #: did not come through it (a replay, a parked event). Not part of its identity.
    fetched_at: float = field(default=0.0, compare=False)


def dead_letter(
    message: InboundMessage, error: RejectedEvent, topic: str, trace: TraceHeaders = ()
) -> OutboxMessage:
    """The DLQ record of a rejected message: original key and value bytes, contract headers,
    and the trace context it carries on (``trace``)."""
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
            *trace,
        ),
    )
