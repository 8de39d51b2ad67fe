"""Tracing of ``consume`` and ``relay``, on when the standard OpenTelemetry environment asks.

On when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``; ``none`` keeps
it off), or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), unless ``OTEL_SDK_DISABLED`` is true. The
OpenTelemetry SDK reads the rest itself: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (the service name is ``orderflow-consume`` /
``orderflow-relay`` otherwise), the sampler (``OTEL_TRACES_SAMPLER``, ``_ARG``), the
endpoint, headers and timeout of the OTLP/HTTP exporter, ``OTEL_PROPAGATORS``. The SDK
and its exporter are the ``tracing`` extra (``pip install 'orderflow[tracing]'``).

Off, nothing of the SDK is imported and the consumer and the relay only carry the trace
context they are given (see :mod:`consumer.tracing`, :mod:`outbox.tracing`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from orderflow.runtime.settings import SettingsError
from orderflow.runtime.wiring import StartupError

_EXPORTERS = ("otlp", "console", "none")


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OpenTelemetry environment asks for traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporters(env)
    if exporters is not None:
        return exporters != ["none"]
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporters(env: Mapping[str, str]) -> list[str] | None:
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        return None
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    for name in names:
        if name not in _EXPORTERS:
            raise SettingsError(
                f"OTEL_TRACES_EXPORTER: {name!r} is not an exporter orderflow has; use "
                f"{', '.join(_EXPORTERS)}"
            )
    return [name for name in names if name != "none"] or ["none"]


@contextlib.contextmanager
def tracer_provider(
    component: str, environ: Mapping[str, str] | None = None
) -> Iterator[Any | None]:
    """The SDK's ``TracerProvider`` for ``component`` (None when tracing is off); at the
    end, what it recorded is flushed to the exporters."""
    env = os.environ if environ is None else environ
    if not tracing_requested(env):
        yield None
        return
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    exporters = _exporters(env) or ["otlp"]
    if "otlp" in exporters and protocol.strip().lower() != "http/protobuf":
        raise SettingsError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r}: orderflow exports OTLP over HTTP "
            "only; use http/protobuf"
        )
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as error:
        raise StartupError(
            "tracing is asked for (OTEL_* environment) but the OpenTelemetry SDK is not "
            "installed: pip install 'orderflow[tracing]'"
        ) from error
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {SERVICE_NAME: f"orderflow-{component}"})
    provider = TracerProvider(resource=resource)
    for name in exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    try:
        yield provider
    finally:
        provider.shutdown()
