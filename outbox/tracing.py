"""Trace context through the relay: an outbox row's ``traceparent`` goes out with its message.

Tracing off (:data:`NO_RELAY_TRACING`): a message goes out with the headers its row holds,
``traceparent`` and ``tracestate`` included (the writer's trace context), and no span is
made. Tracing on (:class:`SpanRelayTracing`): one ``publish <topic>`` span (kind PRODUCER)
per message, a child of the context its row holds, from hand-over to the broker's ack;
the message goes out with that span's context instead, so a subscriber's span follows it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

Headers = list[tuple[str, bytes]]
_TRACE_HEADERS: Final = frozenset({"traceparent", "tracestate"})


class PublishTrace(Protocol):
    """The trace of one publish batch."""

    def headers(self, topic: str, partition: int, headers: Headers) -> Headers:
        """The headers a message goes out with (a span is started for it)."""
        ...

    def drop_last(self) -> None:
        """The last message did not go into this batch after all (it goes in the next)."""
        ...

    def end(self, error: BaseException | None = None) -> None:
        """The batch was acknowledged (or failed with ``error``)."""
        ...


class RelayTracing(Protocol):
    def publish(self) -> PublishTrace: ...


class _Untraced:
    def headers(self, topic: str, partition: int, headers: Headers) -> Headers:
        return headers

    def drop_last(self) -> None:
        pass

    def end(self, error: BaseException | None = None) -> None:
        pass


class _NoRelayTracing:
    _trace: Final = _Untraced()

    def publish(self) -> PublishTrace:
        return self._trace


NO_RELAY_TRACING: Final[RelayTracing] = _NoRelayTracing()


class SpanRelayTracing:
    """Tracing on, through an OpenTelemetry tracer (``opentelemetry.trace.Tracer``)."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.tracer = tracer
        self.propagator = propagate.get_global_textmap()
        self.trace = trace
        self.kind = SpanKind.PRODUCER
        self.status = (Status, StatusCode)

    def publish(self) -> PublishTrace:
        return _SpanPublish(self)


@dataclass
class _SpanPublish:
    tracing: SpanRelayTracing
    spans: list[Any] = field(default_factory=list)

    def headers(self, topic: str, partition: int, headers: Headers) -> Headers:
        tracing = self.tracing
        carried = {
            name: value.decode("ascii", "replace")
            for name, value in headers
            if name in _TRACE_HEADERS
        }
        parent = tracing.propagator.extract(carried) if carried else None
        span = tracing.tracer.start_span(
            f"publish {topic}",
            context=parent,
            kind=tracing.kind,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": topic,
                "messaging.destination.partition.id": str(partition),
                **_message_id(headers),
            },
        )
        self.spans.append(span)
        carrier: dict[str, str] = {}
        tracing.propagator.inject(carrier, context=tracing.trace.set_span_in_context(span))
        kept = [(name, value) for name, value in headers if name not in _TRACE_HEADERS]
        return kept + [(name, value.encode()) for name, value in carrier.items()]

    def drop_last(self) -> None:
        if self.spans:
            self.spans.pop()  # never ended, so never exported: the next batch sends it

    def end(self, error: BaseException | None = None) -> None:
        status, code = self.tracing.status
        for span in self.spans:
            if error is not None:
                span.set_status(status(code.ERROR, type(error).__name__))
                span.record_exception(error)
            span.end()


def _message_id(headers: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    for name, value in headers:
        if name == "event_id":
            return {"messaging.message.id": value.decode("ascii", "replace")}
    return {}
