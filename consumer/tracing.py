"""Trace context through the consumer: from an inbound event to the outbox rows it causes.

An inbound record may carry W3C ``traceparent`` / ``tracestate`` headers. Whatever the
event becomes (an ``OrderUpdated``, a dead letter; now, or later once parked) carries a
``traceparent`` in the same trace, through the outbox row's headers: across the process
boundary to the relay, and across restarts.

Tracing off (:data:`NO_TRACING`): the inbound headers are copied as they are, and no span
is made (nothing else is done, so it costs nothing measurable). Tracing on
(:class:`SpanTracing`, through the OpenTelemetry API, configured by the process): one span
per batch (``process <topic>``, links to every message's context), one for its database
transaction, and one per event, a child of the event's inbound context, whose context is
what the outbox rows carry on (so the relay's publish span is its child).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from consumer.messages import InboundMessage, TraceHeaders

#: The W3C Trace Context headers the consumer carries on.
TRACE_HEADERS: Final = ("traceparent", "tracestate")
_TRACEPARENT: Final = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
#: W3C: tracestate holds at most 32 entries of at most 256 characters; 512 is what
#: propagators are asked to keep at least.
_TRACESTATE_MAX: Final = 512


def trace_headers(headers: Sequence[tuple[str, bytes]] | None) -> TraceHeaders:
    """The W3C trace context of an inbound record's headers, as text; a malformed
    ``traceparent`` (and then its ``tracestate``) is dropped, not carried on."""
    if not headers:
        return ()
    parent: str | None = None
    state: str | None = None
    for name, value in headers:
        if name == "traceparent" and value:
            text = _ascii(value)
            if text is not None and _TRACEPARENT.match(text) and not text.startswith("ff"):
                parent = text
        elif name == "tracestate" and value:
            text = _ascii(value)
            if text is not None and len(text) <= _TRACESTATE_MAX:
                state = text
    if parent is None:
        return ()
    return (
        (("traceparent", parent),)
        if state is None
        else (
            ("traceparent", parent),
            ("tracestate", state),
        )
    )


def trace_id(headers: TraceHeaders) -> str | None:
    """The trace id of a ``traceparent`` (for logs)."""
    for name, value in headers:
        if name == "traceparent":
            return value[3:35]
    return None


def _ascii(value: bytes) -> str | None:
    try:
        return value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None


class BatchTrace(Protocol):
    """The trace of one batch: its events' outbound trace context, and its spans."""

    def event(self, message: InboundMessage, outcome: str) -> TraceHeaders:
        """The trace context the rows caused by ``message`` carry (``outcome``: applied,
        released, parked, duplicate or dead-lettered)."""
        ...

    @property
    def trace_id(self) -> str | None:
        """The batch's trace id, for its log line (None: tracing off)."""
        ...

    def transaction(self) -> Any:
        """A context manager around the batch's database transaction."""
        ...

    def end(self, error: BaseException | None = None) -> None: ...


class Tracing(Protocol):
    def batch(
        self, messages: Sequence[InboundMessage], *, group_id: str, topic: str, partition: int
    ) -> BatchTrace: ...


class _Untraced:
    """Tracing off: the inbound context is carried on as it came; no span."""

    trace_id = None

    def event(self, message: InboundMessage, outcome: str) -> TraceHeaders:
        return message.trace

    @contextmanager
    def transaction(self) -> Iterator[None]:
        yield

    def end(self, error: BaseException | None = None) -> None:
        pass


class _NoTracing:
    _batch: Final = _Untraced()

    def batch(
        self, messages: Sequence[InboundMessage], *, group_id: str, topic: str, partition: int
    ) -> BatchTrace:
        return self._batch


NO_TRACING: Final[Tracing] = _NoTracing()


class SpanTracing:
    """Tracing on: spans through an OpenTelemetry tracer (``opentelemetry.trace.Tracer``),
    following the messaging conventions (``process`` spans of kind CONSUMER)."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        self._tracer = tracer
        self._propagator = propagate.get_global_textmap()
        self._trace = trace
        self._link = Link
        self._kind = SpanKind.CONSUMER
        self._status = (Status, StatusCode)

    def batch(
        self, messages: Sequence[InboundMessage], *, group_id: str, topic: str, partition: int
    ) -> BatchTrace:
        return _SpanBatch(self, messages, group_id=group_id, topic=topic, partition=partition)

    def context_of(self, headers: TraceHeaders) -> Any:
        return self._propagator.extract(dict(headers)) if headers else None

    def headers_of(self, context: Any) -> TraceHeaders:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=context)
        return tuple((name, carrier[name]) for name in TRACE_HEADERS if name in carrier)


@dataclass
class _SpanBatch:
    tracing: SpanTracing
    messages: Sequence[InboundMessage]
    group_id: str
    topic: str
    partition: int
    spans: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        tracing = self.tracing
        links = []
        for message in self.messages:
            if message.trace:
                context = tracing.context_of(message.trace)
                span_context = tracing._trace.get_current_span(context).get_span_context()
                if span_context.is_valid:
                    links.append(tracing._link(span_context))
        self.root = tracing._tracer.start_span(
            f"process {self.topic}",
            kind=tracing._kind,
            links=links,
            attributes={
                **self._common(),
                "messaging.batch.message_count": len(self.messages),
            },
        )
        self._root_context = tracing._trace.set_span_in_context(self.root)

    def _common(self) -> dict[str, Any]:
        return {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": self.topic,
            "messaging.destination.partition.id": str(self.partition),
            "messaging.consumer.group.name": self.group_id,
        }

    @property
    def trace_id(self) -> str | None:
        return f"{self.root.get_span_context().trace_id:032x}"

    def event(self, message: InboundMessage, outcome: str) -> TraceHeaders:
        tracing = self.tracing
        parent = tracing.context_of(message.trace) if message.trace else self._root_context
        span = tracing._tracer.start_span(
            f"process {message.topic}",
            context=parent,
            kind=tracing._kind,
            links=[tracing._link(self.root.get_span_context())],
            attributes={
                **self._common(),
                "messaging.destination.name": message.topic,
                "messaging.destination.partition.id": str(message.partition),
                "messaging.kafka.offset": message.offset,
                "orderflow.outcome": outcome,
            },
        )
        self.spans.append(span)
        return tracing.headers_of(tracing._trace.set_span_in_context(span))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        tracing = self.tracing
        span = tracing._tracer.start_span(
            "postgresql transaction",
            context=self._root_context,
            kind=tracing._trace.SpanKind.CLIENT,
            attributes={"db.system.name": "postgresql", "db.operation.name": "transaction"},
        )
        try:
            yield
        except BaseException as error:
            self._fail(span, error)
            raise
        finally:
            span.end()

    def end(self, error: BaseException | None = None) -> None:
        for span in self.spans:
            if error is not None:
                self._fail(span, error)
            span.end()
        if error is not None:
            self._fail(self.root, error)
        self.root.end()

    def _fail(self, span: Any, error: BaseException) -> None:
        status, code = self.tracing._status
        span.set_status(status(code.ERROR, type(error).__name__))
        span.record_exception(error)
