"""Traces across real ``orderflow consume`` and ``orderflow relay`` processes: an inbound
event's trace continues through both to the outbound message, and the spans reach an
OTLP/HTTP endpoint (run by the test, decoding what the SDK's own exporter sends)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from orderflow.devstand.embedded import free_port
from tests.e2e.processes import Launcher
from tests.e2e.test_chaos import sigterm
from tests.events import placed
from tests.helpers import TestEnv, eventually, header_map, read_topic

pytestmark = pytest.mark.e2e


@dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str


@dataclass
class Collector:
    """An OTLP/HTTP traces endpoint: ``POST /v1/traces`` with a protobuf body."""

    port: int
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if lines[0].startswith("POST /v1/traces"):
                    self.requests += 1
                    self.record(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                    + f"Content-Length: {len(reply)}\r\n\r\n".encode()
                    + reply
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def record(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = next(
                (
                    attribute.value.string_value
                    for attribute in resource_spans.resource.attributes
                    if attribute.key == "service.name"
                ),
                "?",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.kind,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                        )
                    )


@contextlib.asynccontextmanager
async def collector() -> AsyncIterator[Collector]:
    sink = Collector(free_port())
    server = await asyncio.start_server(sink.handle, "127.0.0.1", sink.port)
    try:
        yield sink
    finally:
        server.close()


@pytest.mark.timeout(120)
async def test_an_events_trace_runs_through_consume_and_relay_to_the_outbound_message(
    env: TestEnv, launch: Launcher
) -> None:
    settings = env.settings
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    async with collector() as sink:
        tracing = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a fraction of a second
        }
        consumer = launch.start("consume", settings, **tracing)
        relay = launch.start("relay", settings, **tracing)
        key, value = placed(uuid.uuid4())
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.require_kafka(), enable_idempotence=False
        )
        await producer.start()
        try:
            await producer.send_and_wait(
                settings.inbound_topic,
                value=value,
                key=key,
                headers=[("traceparent", f"00-{trace_id}-{span_id}-01".encode())],
            )
        finally:
            await producer.stop()
        [record] = await read_topic(settings, settings.outbound_topic, 1, within=60)
        outbound = header_map(record.headers)["traceparent"]
        assert outbound.split("-")[1] == trace_id  # the same trace, on the topic

        def traced() -> list[ReceivedSpan]:
            return [span for span in sink.spans if span.trace_id == trace_id]

        async def both_arrived() -> None:
            consumer.assert_running()
            relay.assert_running()
            services = {(span.service, span.name) for span in traced()}
            assert ("orderflow-consume", f"process {settings.inbound_topic}") in services
            assert ("orderflow-relay", f"publish {settings.outbound_topic}") in services

        await eventually(both_arrived, within=30)
        await asyncio.gather(sigterm(consumer), sigterm(relay))
    spans = traced()
    [process] = [span for span in spans if span.service == "orderflow-consume"]
    [publish] = [span for span in spans if span.service == "orderflow-relay"]
    # upstream producer's span -> consume's process span -> relay's publish span
    assert process.parent_span_id == span_id
    assert publish.parent_span_id == process.span_id
    # and the outbound message names the publish span as its parent
    assert outbound.split("-")[2] == publish.span_id
