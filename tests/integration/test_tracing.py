"""Trace context on a real database and broker: from an inbound event's ``traceparent`` to
the outbox rows it causes (updates, dead letters, released parked events) and out through
the relay; with tracing on, the spans (SDK in-memory exporter) and how they hang together."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from consumer.apply import Destinations, InboundMessage, apply_batch
from consumer.tracing import SpanTracing
from orderflow.runtime.wiring import create_engine, create_producer
from outbox.relay import Relay, RelayConfig
from outbox.tracing import SpanRelayTracing
from tests.events import Message, paid, placed
from tests.helpers import TestEnv, eventually, header_map, outbox_rows, read_topic

pytestmark = pytest.mark.integration

TOPIC = "orders.events.traced"


def traceparent() -> tuple[str, str, str]:
    """(traceparent, its trace id, its span id): as an upstream producer's span sends it."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def parts(header: str) -> tuple[str, str]:
    """(trace id, parent span id) of a traceparent."""
    _, trace_id, span_id, _ = header.split("-")
    return trace_id, span_id


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def inbound(offset: int, message: Message, header: str | None) -> InboundMessage:
    key, value = message
    trace = (("traceparent", header), ("tracestate", "vendor=1")) if header else ()
    return InboundMessage(TOPIC, 0, offset, key, value, trace=trace)


async def apply(
    env: TestEnv, messages: list[InboundMessage], tracing: Any, expected: int | None
) -> Any:
    return await apply_batch(
        env.sessions,
        group_id="g",
        destinations=Destinations(env.settings.outbound_topic, env.settings.dlq_topic),
        messages=messages,
        expected_offset=expected,
        now=datetime.now(UTC),
        park=True,
        tracing=tracing,
    )


async def test_tracing_off_carries_the_inbound_context_on_and_invents_none(env: TestEnv) -> None:
    header = traceparent()[0]
    order_id, other = uuid.uuid4(), uuid.uuid4()
    poison = (str(order_id).encode(), b"{not json")
    await apply_batch(
        env.sessions,
        group_id="g",
        destinations=Destinations(env.settings.outbound_topic, env.settings.dlq_topic),
        messages=[
            inbound(0, placed(order_id), header),
            inbound(1, poison, header),
            inbound(2, placed(other), None),
        ],
        expected_offset=None,
        now=datetime.now(UTC),
    )
    rows = {row.key: header_map(row.headers) for row in await outbox_rows(env.sessions)}
    update = rows[str(order_id).encode()]
    assert (update["traceparent"], update["tracestate"]) == (header, "vendor=1")
    letters = [
        header_map(row.headers) for row in await outbox_rows(env.sessions, env.settings.dlq_topic)
    ]
    assert [letter["traceparent"] for letter in letters] == [header]
    untraced = rows[str(other).encode()]
    assert "traceparent" not in untraced


async def test_spans_of_a_batch_with_a_duplicate_a_poison_and_a_parked_event(
    env: TestEnv, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tracing = SpanTracing(provider.get_tracer("test"))
    order_id, waiting = uuid.uuid4(), uuid.uuid4()
    first = placed(order_id)
    await apply(env, [inbound(0, first, traceparent()[0])], tracing, None)
    exporter.clear()

    again, again_trace, again_span = traceparent()
    poison, poison_trace, poison_span = traceparent()
    early, early_trace, early_span = traceparent()
    await apply(
        env,
        [
            inbound(1, first, again),  # the same event once more: a duplicate
            inbound(2, (str(order_id).encode(), b"{not json"), poison),
            inbound(3, paid(waiting), early),  # its order does not exist yet: parked
        ],
        tracing,
        1,
    )
    finished = exporter.get_finished_spans()
    [batch] = [span for span in finished if span.parent is None]
    assert (batch.name, batch.kind) == (f"process {TOPIC}", SpanKind.CONSUMER)
    assert batch.attributes["messaging.batch.message_count"] == 3
    assert {f"{link.context.trace_id:032x}" for link in batch.links} == {
        again_trace,
        poison_trace,
        early_trace,
    }
    [transaction] = [span for span in finished if span.name == "postgresql transaction"]
    assert transaction.parent.span_id == batch.context.span_id
    # One span per message, a child of the message's own (upstream) context, linked to
    # the batch's.
    events = {span.attributes.get("orderflow.outcome"): span for span in finished}
    for outcome, trace_id, parent in (
        ("duplicate", again_trace, again_span),
        ("dead-lettered", poison_trace, poison_span),
        ("parked", early_trace, early_span),
    ):
        span = events[outcome]
        assert (f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == (
            trace_id,
            parent,
        )
        assert span.kind == SpanKind.CONSUMER
        assert [link.context.span_id for link in span.links] == [batch.context.span_id]
    # The dead letter continues the poison message's trace, from its span.
    [letter] = [
        header_map(row.headers) for row in await outbox_rows(env.sessions, env.settings.dlq_topic)
    ]
    assert parts(letter["traceparent"]) == (
        poison_trace,
        f"{events['dead-lettered'].context.span_id:016x}",
    )

    # The parked payment is released a batch later: its update continues its own trace.
    exporter.clear()
    await apply(env, [inbound(4, placed(waiting), None)], tracing, 4)
    released = [
        span
        for span in exporter.get_finished_spans()
        if span.attributes.get("orderflow.outcome") == "released"
    ]
    assert len(released) == 1
    assert (f"{released[0].context.trace_id:032x}", f"{released[0].parent.span_id:016x}") == (
        early_trace,
        early_span,
    )
    payment = next(
        header_map(row.headers)
        for row in await outbox_rows(env.sessions, env.settings.outbound_topic)
        if row.key == str(waiting).encode() and b'"change":"OrderPaid"' in row.payload
    )
    assert parts(payment["traceparent"]) == (
        early_trace,
        f"{released[0].context.span_id:016x}",
    )


async def test_the_relay_publishes_each_message_in_a_child_span_of_its_rows_context(
    env: TestEnv, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    header, trace_id, span_id = traceparent()
    await apply_batch(
        env.sessions,
        group_id="g",
        destinations=Destinations(env.settings.outbound_topic, env.settings.dlq_topic),
        messages=[inbound(0, placed(uuid.uuid4()), header)],
        expected_offset=None,
        now=datetime.now(UTC),
    )
    engine = create_engine(env.settings, pool_size=1)
    kafka = create_producer(env.settings)
    await kafka.start()
    stop = asyncio.Event()
    relay = Relay(
        engine,
        kafka,
        RelayConfig(claim_interval=0.2),
        tracing=SpanRelayTracing(provider.get_tracer("test")),
    )
    running = asyncio.create_task(relay.run(stop))
    try:

        async def published() -> None:
            assert relay.stats.published == 1

        await eventually(published)
    finally:
        stop.set()
        await running
        await kafka.stop()
        await engine.dispose()
    [record] = await read_topic(env.settings, env.settings.outbound_topic, 1)
    [span] = [s for s in exporter.get_finished_spans() if s.name.startswith("publish ")]
    assert span.kind == SpanKind.PRODUCER
    assert (f"{span.context.trace_id:032x}", f"{span.parent.span_id:016x}") == (trace_id, span_id)
    outbound = header_map(record.headers)
    assert parts(outbound["traceparent"]) == (trace_id, f"{span.context.span_id:016x}")
    assert outbound["tracestate"] == "vendor=1"
