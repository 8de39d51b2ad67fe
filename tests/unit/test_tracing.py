"""Which trace context the consumer carries on, and when tracing is on."""

from __future__ import annotations

import pytest

from consumer.tracing import trace_headers, trace_id
from orderflow.runtime.settings import SettingsError
from orderflow.runtime.tracing import tracing_requested

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_the_w3c_headers_are_kept_as_text_and_others_ignored() -> None:
    headers = [("traceparent", PARENT.encode()), ("tracestate", b"congo=t61rcWkgMzE"), ("x", b"y")]
    assert trace_headers(headers) == (("traceparent", PARENT), ("tracestate", "congo=t61rcWkgMzE"))
    assert trace_id(trace_headers(headers)) == "0af7651916cd43dd8448eb211c80319c"
    assert trace_headers(None) == ()
    assert trace_headers([("tracestate", b"a=1")]) == ()  # a state without a parent: nothing


@pytest.mark.parametrize(
    "value",
    [
        b"not-a-traceparent",
        PARENT.upper().encode(),  # W3C: lowercase hex only
        b"ff" + PARENT.encode()[2:],  # version ff is invalid
        PARENT.encode()[:-1],
        "00-\u00e9".encode(),
    ],
)
def test_a_malformed_traceparent_is_dropped_not_carried_on(value: bytes) -> None:
    assert trace_headers([("traceparent", value), ("tracestate", b"a=1")]) == ()


def test_an_oversized_tracestate_is_dropped() -> None:
    headers = [("traceparent", PARENT.encode()), ("tracestate", b"a=" + b"x" * 600)]
    assert trace_headers(headers) == (("traceparent", PARENT),)


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "shop"}, False),  # names the service, asks for nothing
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_on_when_the_opentelemetry_environment_asks(
    environ: dict[str, str], on: bool
) -> None:
    assert tracing_requested(environ) is on


def test_an_unknown_exporter_is_one_line_naming_the_variable() -> None:
    with pytest.raises(SettingsError) as raised:
        tracing_requested({"OTEL_TRACES_EXPORTER": "jaeger"})
    assert "OTEL_TRACES_EXPORTER" in str(raised.value)
    assert "\n" not in str(raised.value)
