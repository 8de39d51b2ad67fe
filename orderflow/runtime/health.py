"""The health and metrics endpoint of ``orderflow consume`` and ``orderflow relay``.

One small HTTP/1.1 server on ``--metrics-port`` (``ORDERFLOW_METRICS_PORT``), served by
the component's own event loop (no thread, nothing that outlives the process):

- ``GET /metrics``: Prometheus text format (OpenMetrics when asked for; gzip when
  accepted), from the component's own registry (see :mod:`orderflow.metrics`).
- ``GET /healthz``: 200 while the process runs its event loop. For liveness probes.
- ``GET /readyz``: 200 when the database and the broker answer and the component is
  serving (partitions assigned, or relay membership held); otherwise 503. Both carry a
  JSON body naming each check and, when not ready, what is missing. For readiness probes
  and ``docker compose`` healthchecks.

It listens on every interface (``0.0.0.0``): Prometheus scrapes from another host or
container. It serves no data and no secret, only counts and check results; keep the port
inside your network as you would any metrics port.

The endpoint has a connection of its own to the database and to the broker, so that its
checks neither wait for nor disturb the component's work: a full consumer pool must not
make it look unready, and a relay's single connection is never lent out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.admin import ApiVersionRequest
from prometheus_client.exposition import choose_encoder
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from orderflow.runtime.metrics import ComponentMetrics
from orderflow.runtime.settings import Settings, SettingsError
from orderflow.runtime.wiring import StartupError, create_engine, kafka_common

log = logging.getLogger("orderflow.health")

#: Address the endpoint listens on: every IPv4 interface (see the module docstring).
LISTEN_HOST: Final = "0.0.0.0"
#: A check (database or broker) that takes longer than this counts as failed.
CHECK_TIMEOUT_SECONDS: Final = 5.0
#: How often lag, backlog and the ``orderflow_ready`` gauge are refreshed.
REFRESH_SECONDS: Final = 5.0
#: A client gets this long to send its request line and headers.
REQUEST_TIMEOUT_SECONDS: Final = 5.0
#: At most this many request headers (no endpoint needs more than a few).
MAX_HEADERS: Final = 64
#: How long closing the endpoint's own broker connection may take at stop.
CLOSE_TIMEOUT_SECONDS: Final = 3.0

_JSON: Final = "application/json"
_ENDPOINTS: Final = ("/metrics", "/healthz", "/readyz")


def listen_port(settings: Settings) -> int | None:
    """The endpoint's port, or None when it is not to be served; a ``SettingsError`` for a
    port that cannot be one (0 would let the system pick a port nobody knows about)."""
    port = settings.metrics_port
    if port is None:
        return None
    if not 1 <= port <= 65535:
        raise SettingsError(f"ORDERFLOW_METRICS_PORT must be between 1 and 65535, got {port}")
    return port


@contextlib.asynccontextmanager
async def serve_health(
    settings: Settings, metrics: ComponentMetrics, stop: asyncio.Event
) -> AsyncIterator[None]:
    """Serve the endpoint for the life of the block, when ``settings.metrics_port`` is set.

    The port is bound on entry, before anything else starts: a port in use is a one-line
    start-up error, and ``/healthz`` answers while the component still connects
    (``/readyz`` says what it waits for). Leaving the block closes the endpoint at once.
    """
    port = listen_port(settings)
    if port is None:
        yield
        return
    endpoint = HealthEndpoint(settings, metrics, stop)
    await endpoint.start(port)
    try:
        yield
    finally:
        await endpoint.close()


class _Shared:
    """Runs a check at most once at a time: concurrent callers share the run in flight.

    The run is bounded by ``CHECK_TIMEOUT_SECONDS`` on its own, so a caller that goes away
    (a client hanging up) does not cancel it for the others.
    """

    def __init__(self, check: Callable[[], Awaitable[None]]) -> None:
        self._check = check
        self._task: asyncio.Task[str | None] | None = None

    async def __call__(self) -> str | None:
        """None when the check passed, else one line saying why it failed."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        # Shielded: several requests may wait for this one run; one of them being
        # cancelled (its client hung up) must not cancel the run the others wait for.
        return await asyncio.shield(self._task)

    async def _run(self) -> str | None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                await self._check()
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT_SECONDS:.0f} s"
        except Exception as error:
            return describe_error(error)
        return None

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})


class HealthEndpoint:
    """The HTTP server, its checks and the periodic refresh of state metrics."""

    def __init__(self, settings: Settings, metrics: ComponentMetrics, stop: asyncio.Event) -> None:
        self._settings = settings
        self._metrics = metrics
        self._stop = stop
        self._database: AsyncEngine = create_engine(settings, pool_size=1)
        self._kafka: AIOKafkaClient | None = None
        self._check_database = _Shared(self._ping_database)
        self._check_broker = _Shared(self._ping_broker)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None

    async def start(self, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, LISTEN_HOST, port, reuse_address=True
            )
        except OSError as error:
            await self._database.dispose()
            raise StartupError(
                f"cannot serve metrics and health on port {port}: {error.strerror or error}"
            ) from None
        self._refresher = asyncio.create_task(self._refresh_forever())
        log.info("serving /metrics, /healthz and /readyz on port %d", port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [task for task in (self._refresher, *self._connections) if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._check_database.close()
        await self._check_broker.close()
        if self._kafka is not None:
            closing = asyncio.create_task(self._kafka.close())
            await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_SECONDS)
            if not closing.done():
                closing.cancel()
                await asyncio.wait({closing})
            self._kafka = None
        await self._database.dispose()

    # -- checks -------------------------------------------------------------------------

    async def _ping_database(self) -> None:
        async with self._database.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def _ping_broker(self) -> None:
        """An ApiVersions request (the smallest a broker answers) on a connection of ours."""
        client = self._kafka
        if client is None:
            options = kafka_common(self._settings)
            options["request_timeout_ms"] = int(CHECK_TIMEOUT_SECONDS * 1000)
            client = AIOKafkaClient(**options)
            try:
                await client.bootstrap()
            except BaseException:
                await client.close()
                raise
            self._kafka = client
        node = client.get_random_node()
        if node is None:
            # No broker in the cluster metadata: bootstrap again next time.
            self._kafka = None
            await client.close()
            raise ConnectionError("the cluster metadata names no broker")
        await client.send(node, ApiVersionRequest())

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body of /readyz)."""
        database, broker = await asyncio.gather(self._check_database(), self._check_broker())
        serving = self._metrics.serving()
        checks = {
            "database": database or "ok",
            "broker": broker or "ok",
            serving.check: serving.detail,
        }
        missing = []
        if database is not None:
            missing.append("database")
        if broker is not None:
            missing.append("broker")
        if not serving.ok:
            missing.append(serving.check)
        if self._stop.is_set():
            missing.append("stopping")
            checks["stopping"] = "the process is shutting down"
        ready = not missing
        self._metrics.set_ready(ready)
        body: dict[str, Any] = {
            "status": "ready" if ready else "not ready",
            "component": self._metrics.component,
            "checks": checks,
        }
        if missing:
            body["missing"] = missing
        return ready, body

    async def _refresh_forever(self) -> None:
        """Every REFRESH_SECONDS: readiness (for the ``orderflow_ready`` gauge), then the
        state metrics. A failure is logged at debug level and tried again next time:
        /readyz and ``orderflow_ready`` already say what is wrong."""
        while True:
            started = time.monotonic()
            await self.readiness()
            try:
                async with asyncio.timeout(CHECK_TIMEOUT_SECONDS * 2):
                    await self._metrics.refresh(self._database)
            except Exception as error:
                log.debug("metrics refresh failed: %s", describe_error(error))
            await asyncio.sleep(max(0.0, REFRESH_SECONDS - (time.monotonic() - started)))

    # -- HTTP ---------------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                    method, target, headers = await _read_request(reader)
            except _BadRequest as error:
                await _send(writer, "GET", 400, _JSON, _json({"error": str(error)}))
                return
            status, content_type, body, extra = await self._respond(method, target, headers)
            await _send(writer, method, status, content_type, body, extra)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the client was too slow or went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _respond(
        self, method: str, target: str, headers: dict[str, str]
    ) -> tuple[int, str, bytes, dict[str, str]]:
        path = urlsplit(target).path
        if path not in _ENDPOINTS:
            body = {"error": f"no such endpoint: {path}", "endpoints": list(_ENDPOINTS)}
            return 404, _JSON, _json(body), {}
        if method not in {"GET", "HEAD"}:
            body = {"error": f"method {method} not allowed, use GET"}
            return 405, _JSON, _json(body), {"Allow": "GET, HEAD"}
        if path == "/healthz":
            return 200, _JSON, _json({"status": "alive", "component": self._metrics.component}), {}
        if path == "/readyz":
            ready, body = await self.readiness()
            return (200 if ready else 503), _JSON, _json(body), {}
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        payload = encoder(self._metrics.registry)
        if "gzip" in headers.get("accept-encoding", ""):
            return 200, content_type, gzip.compress(payload), {"Content-Encoding": "gzip"}
        return 200, content_type, payload, {}


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """The method, target and headers (lower-case names) of one HTTP/1.x request."""
    try:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed before the request line")
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest("not an HTTP/1.x request line")
        headers: dict[str, str] = {}
        for count in range(MAX_HEADERS + 1):
            line = await reader.readline()
            if line in {b"\r\n", b"\n"}:
                break
            if not line:
                raise ConnectionError("closed inside the headers")
            if count == MAX_HEADERS:
                raise _BadRequest(f"more than {MAX_HEADERS} headers")
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _BadRequest("malformed header line")
            headers[name.strip().lower()] = value.strip()
    except (ValueError, asyncio.LimitOverrunError):
        # StreamReader's line limit (64 KiB): no request of ours is that long.
        raise _BadRequest("request line or header too long") from None
    return parts[0].upper(), parts[1], headers


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


async def _send(
    writer: asyncio.StreamWriter,
    method: str,
    status: int,
    content_type: str,
    body: bytes,
    extra: dict[str, str] | None = None,
) -> None:
    head = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (extra or {}).items()),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if method != "HEAD":
        writer.write(body)
    await writer.drain()


def _json(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document) + b"\n"


def describe_error(error: BaseException) -> str:
    """One line on why a check failed (no password: neither driver puts one in messages)."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        error = error.orig
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
