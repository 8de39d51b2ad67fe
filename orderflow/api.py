"""The read API (``orderflow api``): orders and the outbox, over HTTP, read-only.

Session discipline (each rule closes one of the classic async SQLAlchemy failures):

- One engine per app, created in the lifespan and disposed when the app stops; nothing
  is created at import time and nothing is shared between apps.
- One session per request, from :func:`read_session`: ``async with`` opens it and a
  transaction, and closes both whatever happens (exception, cancelled request), so a
  connection always goes back to the pool. Its scope is the path operation function:
  the connection is returned before the response is sent, not after a slow client read it.
- Every transaction is ``READ ONLY`` and ``REPEATABLE READ``: the API cannot write, and
  the statements of one request (an order page, then its lines) see one snapshot.
- Relationships are ``lazy="raise"`` and every query eager-loads what it serialises
  (customer by join, lines by one ``IN`` query), so a request costs a constant number of
  statements however many orders it returns, and nothing is loaded after the session ends.
- Responses are built as pydantic models while the session is open; no ORM object leaves
  the path operation function.

Contract: the OpenAPI document says exactly what the code accepts and answers. Every
parameter is checked at the boundary against the limits the document states (patterns,
lengths, ranges), so a value PostgreSQL would refuse (a NUL character) never reaches it;
every status an operation can answer is declared with it. ``tests/integration/
test_api_fuzz.py`` holds the two to each other with Schemathesis.

Metrics: ``GET /metrics`` serves the app's own Prometheus registry (:class:`ApiMetrics`,
one per app, so several apps in one process don't clash). A plain ASGI middleware counts
every other request once it has been routed, labelled by the route's template
(``/orders/{order_id}``), never by the raw path, so the number of series stays bounded.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, NoReturn

import orjson
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy import select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import joinedload, selectinload
from sqlalchemy.pool import QueuePool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumer.models import Customer, Order
from consumer.state_machine import OrderStatus
from consumer.updates import format_timestamp, money_text
from orderflow import __version__
from orderflow.runtime.metrics import ComponentMetrics
from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import create_engine, session_factory
from outbox.stats import outbox_stats

log = logging.getLogger("orderflow.api")

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 200
#: ``/readyz`` answers 503 when the database has not answered within this time: a probe
#: must not hang on a database that accepts connections but never replies.
READY_TIMEOUT_SECONDS: Final = 3.0
#: What the query and path parameters accept, as regular expressions that mean the same in
#: the OpenAPI document (ECMA-262), in pydantic (which enforces them) and in Python: ASCII
#: classes only, no ``\d``/``\s`` (their meaning differs between the three).
#:
#: An order id: a UUID in its canonical 8-4-4-4-12 form (``format: uuid``); pydantic alone
#: would also take braces, ``urn:uuid:`` and 32 bare digits, which the document doesn't say.
UUID_PATTERN: Final = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
#: A filter value PostgreSQL can compare: ``text`` cannot hold a NUL character, so a value
#: with one would be refused by the database (a 500) instead of by us (a 422).
NO_NUL_PATTERN: Final = r"^[^\x00]*$"
#: The longest email an ``OrderPlaced`` may carry (``consumer.events.Email``).
MAX_EMAIL_LENGTH: Final = 320
#: A cursor: where its page ended (the last order's ``created_at`` in microseconds since
#: the Unix epoch, and its id as 32 hex digits), then a check of that position together
#: with the filters the page was listed with. Every string of this shape is a position;
#: the check is what makes one cursor good for one listing only (see :func:`decode_cursor`).
CURSOR_PATTERN: Final = r"^(-?[0-9]{1,18})\.([0-9a-f]{32})\.([0-9a-f]{16})$"
_CURSOR: Final = re.compile(CURSOR_PATTERN)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
#: The positions of the first and last instant a ``datetime`` (so an order) can have.
_EARLIEST_MICROS: Final = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND
_LATEST_MICROS: Final = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND
#: The examples of the OpenAPI document (and of docs/api.md).
EXAMPLE_ORDER_ID: Final = "0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10"
EXAMPLE_EMAIL: Final = "ada@example.com"
_TIMESTAMP_FORMAT: JsonDict = {"format": "date-time", "examples": ["2026-11-24T10:15:00.123456Z"]}
_MONEY_FORMAT: JsonDict = {"pattern": r"^\d+(\.\d+)?$", "examples": ["25.00"]}
#: Where Prometheus scrapes; requests to it are not counted in the request metrics.
METRICS_PATH: Final = "/metrics"
#: The ``route`` label of requests that matched no route (404s for unknown paths): one
#: fixed value, so scanners probing random paths can't create series.
UNMATCHED_ROUTE: Final = "unmatched"
#: The ``method`` label of requests with a method outside :data:`_METHODS`.
OTHER_METHOD: Final = "other"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: One request, routing to the last byte sent: milliseconds normally, up to the pool's 30 s
#: wait for a connection when the database is slow.
REQUEST_DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

_DESCRIPTION = """
Read-only HTTP access to the orders that `orderflow consume` writes, and to the state of
the transactional outbox.

* An **order** has the shape of the `order` object of the outbound `OrderUpdated` event
  (money as decimal strings, timestamps in RFC 3339 UTC), plus its `version`, which equals
  the `order_version` of the latest `OrderUpdated` of that order.
* **Listing** is newest first (by `created_at`, then `id`) with keyset pagination: pass the
  `next_cursor` of one page as `cursor` to get the next one; `next_cursor` is `null` on the
  last page. Treat a cursor as a token: it holds where its page ended and a check of that
  position together with the filters, so it works only with the `status` and
  `customer_email` it was issued with.
* Errors are JSON: `404` with a `detail` sentence, `422` with the list of invalid
  parameters, `503` (with `Retry-After`) when the database cannot be reached. Every
  status an operation can answer is listed with it.
* Prometheus metrics are at `/metrics`.
"""

_TAGS = [
    {"name": "orders", "description": "Orders with their customer and lines."},
    {"name": "outbox", "description": "Messages waiting for the relay, per topic."},
    {"name": "health", "description": "Probes for orchestrators and load balancers."},
    {"name": "metrics", "description": "Prometheus metrics of this process."},
]


# --- response models -------------------------------------------------------------------


class CustomerView(BaseModel):
    model_config = ConfigDict(frozen=True)

    email: str = Field(examples=["ada@example.com"])
    name: str = Field(examples=["Ada"])


class LineView(BaseModel):
    model_config = ConfigDict(frozen=True)

    sku: str = Field(examples=["SKU-1"])
    quantity: int = Field(ge=1, examples=[2])
    unit_price: str = Field(description="Decimal, as a string.", json_schema_extra=_MONEY_FORMAT)


class OrderView(BaseModel):
    """An order as the outbound ``OrderUpdated`` carries it, plus its version."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    status: OrderStatus
    currency: str = Field(description="ISO 4217 code.", examples=["EUR"])
    total: str = Field(
        description="Sum of quantity × unit price, decimal, as a string.",
        json_schema_extra=_MONEY_FORMAT,
    )
    customer: CustomerView
    lines: list[LineView] = Field(description="In the order they were placed.")
    created_at: str = Field(
        description="When the order was placed (RFC 3339, UTC).",
        json_schema_extra=_TIMESTAMP_FORMAT,
    )
    updated_at: str = Field(
        description="When the latest event was applied (RFC 3339, UTC).",
        json_schema_extra=_TIMESTAMP_FORMAT,
    )
    version: int = Field(
        ge=1, description="1 after OrderPlaced, +1 per applied event (= order_version)."
    )


class OrderPage(BaseModel):
    orders: list[OrderView] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class TopicStatsView(BaseModel):
    topic: str
    backlog: int = Field(ge=0, description="Messages not yet published.")
    oldest_unpublished_age_seconds: float | None = Field(
        description="Age of the oldest unpublished message; null when there is none."
    )
    published_last_minute: int = Field(ge=0)


class OutboxStatsView(BaseModel):
    topics: list[TopicStatsView] = Field(
        description=(
            "One entry per topic with unpublished messages or messages published in the "
            "last minute, by topic name (the same objects as `orderflow outbox stats --json`)."
        )
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Problem(BaseModel):
    detail: str = Field(description="What went wrong, in one sentence.")


#: Declared on every operation that reads the database: what :func:`_database_unavailable`
#: answers.
_UNAVAILABLE: Final[dict[int | str, dict[str, Any]]] = {
    503: {
        "model": Problem,
        "description": (
            "The database cannot be reached, or every connection stayed busy for 30 s."
        ),
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before trying again.",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    }
}

#: Where a page leads (OpenAPI links): to its first order, and to the next page, listed with
#: the same filters.
_PAGE_LINKS: Final[dict[str, Any]] = {
    "firstOrder": {
        "operationId": "getOrder",
        "description": "The first order of the page.",
        "parameters": {"order_id": "$response.body#/orders/0/id"},
    },
    "nextPage": {
        "operationId": "listOrders",
        "description": "The next page: `next_cursor` as `cursor`, with the same filters.",
        "parameters": {
            "cursor": "$response.body#/next_cursor",
            "status": "$request.query.status",
            "customer_email": "$request.query.customer_email",
            "limit": "$request.query.limit",
        },
    },
}

_METRICS_RESPONSE: Final[dict[str, Any]] = {
    "description": (
        "The metrics: Prometheus text format 0.0.4 by default, OpenMetrics 1.0.0 when the "
        "`Accept` header asks for `application/openmetrics-text`."
    ),
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "application/openmetrics-text": {"schema": {"type": "string"}},
    },
    "headers": {
        "Cache-Control": {
            "description": "Always `no-store`.",
            "required": True,
            "schema": {"type": "string", "enum": ["no-store"]},
        },
    },
}


# --- the app -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Database:
    """What the lifespan creates: the app's engine and its read-only session factory."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]


def create_app(settings: Settings) -> FastAPI:
    """The read API for the database of ``settings``; it connects when it starts serving."""
    settings.require_database()  # a bad URL fails here, not on the first request

    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        read_only = engine.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        app.state.database = Database(engine, session_factory(read_only))
        metrics.watch(engine)
        try:
            yield
        finally:
            metrics.watch(None)
            await engine.dispose()

    app = FastAPI(
        title="orderflow read API",
        version=__version__,
        summary="Orders and outbox state, read-only.",
        description=_DESCRIPTION,
        openapi_tags=_TAGS,
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    _add_routes(app)
    # Inside Starlette's ServerErrorMiddleware (so it sees an unhandled error's 500) and
    # outside the exception handlers (so it sees the 404, 422 and 503 they answer).
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_exception_handler(sqlalchemy_errors.OperationalError, _database_unavailable)
    app.add_exception_handler(sqlalchemy_errors.InterfaceError, _database_unavailable)
    app.add_exception_handler(sqlalchemy_errors.TimeoutError, _database_unavailable)
    app.add_exception_handler(OSError, _database_unavailable)  # TimeoutError included
    return app


def database(request: Request) -> Database:
    state: Database = request.app.state.database
    return state


def app_metrics(request: Request) -> ApiMetrics:
    metrics: ApiMetrics = request.app.state.metrics
    return metrics


async def read_session(
    db: Annotated[Database, Depends(database)],
) -> AsyncGenerator[AsyncSession]:
    """One session and one read-only transaction per request, always closed.

    ``async with`` ends the transaction (commit, or rollback if the request failed) and
    returns the connection to the pool on every path, cancellation included.
    """
    async with db.sessions() as session, session.begin():
        yield session


ReadSession = Annotated[AsyncSession, Depends(read_session, scope="function")]


async def _database_unavailable(request: Request, error: Exception) -> JSONResponse:
    # The driver's own message, not SQLAlchemy's: that one carries the statement's
    # parameters (customer emails among them).
    cause = getattr(error, "orig", None) or error
    lines = str(cause).strip().splitlines()
    log.warning(
        "database unavailable: %s",
        lines[0] if lines else type(cause).__name__,
        extra={"path": request.url.path, "error": type(cause).__name__},
    )
    return JSONResponse(
        {"detail": "the database is unavailable; try again shortly"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def _add_routes(app: FastAPI) -> None:
    @app.get(
        "/orders/{order_id}",
        operation_id="getOrder",
        tags=["orders"],
        summary="One order",
        response_model=OrderView,
        responses={404: {"model": Problem, "description": "No order has this id."}, **_UNAVAILABLE},
    )
    async def get_order(
        session: ReadSession,
        order_id: Annotated[
            str,
            Path(
                pattern=UUID_PATTERN,
                description="The order's id, a UUID (8-4-4-4-12 hex digits).",
                json_schema_extra={"format": "uuid"},
                openapi_examples={"order": {"value": EXAMPLE_ORDER_ID}},
            ),
        ],
    ) -> OrderView:
        """The order with its customer and lines."""
        key = uuid.UUID(order_id)
        statement = _with_details(select(Order).where(Order.id == key))
        order = (await session.execute(statement)).scalar_one_or_none()
        if order is None:
            raise HTTPException(404, detail=f"order {key} not found")
        return order_view(order)

    @app.get(
        "/orders",
        operation_id="listOrders",
        tags=["orders"],
        summary="List orders, newest first",
        response_model=OrderPage,
        responses={200: {"links": _PAGE_LINKS}, **_UNAVAILABLE},
    )
    async def list_orders(
        session: ReadSession,
        status: Annotated[
            OrderStatus | None,
            Query(
                description="Only orders in this status.",
                openapi_examples={"paid": {"value": "paid"}},
            ),
        ] = None,
        customer_email: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=MAX_EMAIL_LENGTH,
                pattern=NO_NUL_PATTERN,
                description=(
                    "Only orders of this customer (exact email, as placed; no NUL character)."
                ),
                openapi_examples={"customer": {"value": EXAMPLE_EMAIL}},
            ),
        ] = None,
        limit: Annotated[
            int,
            Query(
                ge=1,
                le=MAX_PAGE_SIZE,
                description="Orders per page.",
                openapi_examples={"small": {"value": 2}},
            ),
        ] = DEFAULT_PAGE_SIZE,
        cursor: Annotated[
            str | None,
            Query(
                # Checked by decode_cursor, which says what is wrong in words.
                json_schema_extra={"pattern": CURSOR_PATTERN},
                description=(
                    "The `next_cursor` of the previous page, as given, with the same `status` "
                    "and `customer_email` (a cursor of other filters, or an altered one, is "
                    "`422`)."
                ),
            ),
        ] = None,
    ) -> OrderPage:
        """A page of orders, newest first (by `created_at`, then `id`), with their customer
        and lines. Filters combine with AND."""
        filters = Filters(None if status is None else status.value, customer_email)
        after = None if cursor is None else decode_cursor(cursor, filters)
        statement = select(Order)
        if status is not None:
            statement = statement.where(Order.status == status.value)
        if customer_email is not None:
            statement = statement.where(
                Order.customer_id
                == select(Customer.id).where(Customer.email == customer_email).scalar_subquery()
            )
        if after is not None:
            statement = statement.where(
                tuple_(Order.created_at, Order.id) < tuple_(after.created_at, after.order_id)
            )
        statement = _with_details(
            statement.order_by(Order.created_at.desc(), Order.id.desc()).limit(limit + 1)
        )
        orders = list((await session.execute(statement)).scalars())
        next_cursor = None
        if len(orders) > limit:
            del orders[limit:]
            last = orders[-1]
            next_cursor = encode_cursor(Position(last.created_at, last.id), filters)
        return OrderPage(orders=[order_view(order) for order in orders], next_cursor=next_cursor)

    @app.get(
        "/outbox/stats",
        operation_id="getOutboxStats",
        tags=["outbox"],
        summary="Outbox backlog per topic",
        response_model=OutboxStatsView,
        responses=_UNAVAILABLE,
    )
    async def get_outbox_stats(session: ReadSession) -> OutboxStatsView:
        """Per topic: unpublished backlog, age of the oldest unpublished message, and
        messages published in the last minute."""
        lines = await outbox_stats(await session.connection())
        return OutboxStatsView(
            topics=[
                TopicStatsView(
                    topic=line.topic,
                    backlog=line.backlog,
                    oldest_unpublished_age_seconds=(
                        None
                        if line.oldest_unpublished_age is None
                        else round(line.oldest_unpublished_age.total_seconds(), 3)
                    ),
                    published_last_minute=line.published_last_minute,
                )
                for line in lines
            ]
        )

    @app.get(
        "/healthz",
        operation_id="liveness",
        tags=["health"],
        summary="Liveness",
        response_model=Health,
    )
    async def healthz() -> Health:
        """200 while the process serves requests; it touches nothing else."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        operation_id="readiness",
        tags=["health"],
        summary="Readiness",
        response_model=Health,
        responses={503: {"model": Health, "description": "The database does not answer."}},
    )
    async def readyz(
        db: Annotated[Database, Depends(database)],
        metrics: Annotated[ApiMetrics, Depends(app_metrics)],
    ) -> Any:
        """200 when the database answers a query within a few seconds, else 503."""
        ready = await _database_answers(db)
        metrics.set_ready(ready)
        if not ready:
            return JSONResponse({"status": "database unavailable"}, status_code=503)
        return Health(status="ok")

    @app.get(
        METRICS_PATH,
        operation_id="metrics",
        tags=["metrics"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: _METRICS_RESPONSE},
    )
    async def metrics_endpoint(
        request: Request,
        db: Annotated[Database, Depends(database)],
        metrics: Annotated[ApiMetrics, Depends(app_metrics)],
    ) -> Response:
        """Prometheus text format, or OpenMetrics when the `Accept` header asks for it;
        gzip-compressed when `Accept-Encoding` allows it.

        `orderflow_ready` is checked afresh for each scrape (the /readyz check), so it is
        right even where nothing probes /readyz.
        """
        metrics.set_ready(await _database_answers(db))
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        payload = encoder(metrics.registry)
        headers = {"Cache-Control": "no-store"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            payload = gzip.compress(payload)
            headers["Content-Encoding"] = "gzip"
        return Response(payload, media_type=content_type, headers=headers)


async def _database_answers(db: Database) -> bool:
    """Whether the database answers ``SELECT 1`` within ``READY_TIMEOUT_SECONDS``."""
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS), db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (TimeoutError, OSError, sqlalchemy_errors.SQLAlchemyError) as error:
        log.warning("not ready: the database does not answer (%s)", type(error).__name__)
        return False
    return True


def _with_details(statement: Any) -> Any:
    """Eager-load what :func:`order_view` reads: the customer by join (one row each), the
    lines in one ``IN`` query for the whole page."""
    return statement.options(joinedload(Order.customer, innerjoin=True), selectinload(Order.lines))


def order_view(order: Order) -> OrderView:
    return OrderView(
        id=uuid.UUID(int=order.id.int),
        status=OrderStatus(order.status),
        currency=order.currency,
        total=money_text(order.total),
        customer=CustomerView(email=order.customer.email, name=order.customer.name),
        lines=[
            LineView(sku=line.sku, quantity=line.quantity, unit_price=money_text(line.unit_price))
            for line in order.lines
        ],
        created_at=format_timestamp(order.created_at),
        updated_at=format_timestamp(order.updated_at),
        version=order.version,
    )


# --- metrics -----------------------------------------------------------------------------


class ApiMetrics(ComponentMetrics):
    """The read API's metrics, in a registry of the app's own.

    From :class:`~orderflow.runtime.metrics.ComponentMetrics`: ``orderflow_build_info`` (component
    ``api``), ``orderflow_ready`` and the process metrics. Here: requests by method, route
    template and status, their duration, requests in flight, and the connection pool.
    """

    component = "api"

    def __init__(self) -> None:
        super().__init__()
        registry = self.registry
        self._requests = Counter(
            "orderflow_api_requests",
            "HTTP requests answered, by method, route template (not the raw path; "
            f"'{UNMATCHED_ROUTE}' for unknown paths) and status code; /metrics excluded.",
            ["method", "route", "status"],
            registry=registry,
        )
        self._duration = Histogram(
            "orderflow_api_request_duration_seconds",
            "Time from receiving a request to the last byte of its response, by method and "
            "route template; /metrics excluded.",
            ["method", "route"],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=registry,
        )
        self._in_progress = Gauge(
            "orderflow_api_requests_in_progress",
            "HTTP requests being served now (/metrics included).",
            registry=registry,
        )
        # Children by (method, route, status): a dict lookup per request instead of
        # prometheus_client's label validation and locked lookup. Bounded: a few methods,
        # the app's routes plus one, the statuses the app answers.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._engine: AsyncEngine | None = None
        registry.register(_PoolCollector(self))

    def watch(self, engine: AsyncEngine | None) -> None:
        """Report the pool of ``engine`` from now on (None: no pool, while not serving)."""
        self._engine = engine

    def request_started(self) -> None:
        self._in_progress.inc()

    def request_finished(self, method: str, route: str, status: int, seconds: float) -> None:
        self._in_progress.dec()
        if route == METRICS_PATH:
            return
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self._requests.labels(method, route, str(status)),
                self._duration.labels(method, route),
            )
        requests, duration = children
        requests.inc()
        duration.observe(seconds)

    def collect_pool(self) -> Iterable[Metric]:
        pool = self._engine.pool if self._engine is not None else None
        if not isinstance(pool, QueuePool):
            return
        yield GaugeMetricFamily(
            "orderflow_api_database_connections_in_use",
            "Database connections checked out of the pool now (a request or a probe holds "
            "each); at orderflow_api_database_pool_size, further requests wait.",
            value=pool.checkedout(),
        )
        yield GaugeMetricFamily(
            "orderflow_api_database_pool_size",
            "Database connections the pool may hold (--pool-size): requests served at once.",
            value=pool.size(),
        )


class _PoolCollector(Collector):
    def __init__(self, metrics: ApiMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics.collect_pool())


class RequestMetrics:
    """ASGI middleware: counts and times each HTTP request under its route template.

    The route is read from ``scope["route"]``, which the router sets when it matches, so
    it costs no path matching of its own. A request that raises before a response started
    counts as the 500 that Starlette then answers.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.request_started()
        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            method = scope["method"]
            self.metrics.request_finished(
                method if method in _METHODS else OTHER_METHOD,
                route_template(scope),
                status,
                time.perf_counter() - started,
            )


def route_template(scope: Scope) -> str:
    """The path template of the route the request matched, or :data:`UNMATCHED_ROUTE`."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


# --- cursors -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ended: the listing continues strictly after this key."""

    created_at: datetime
    order_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Filters:
    """The filters of a listing, as given (``status`` by its value)."""

    status: str | None
    customer_email: str | None


def cursor_check(micros: str, order_hex: str, filters: Filters) -> str:
    """The check of a cursor: its position together with the filters it was issued for.

    Not a secret (anyone may page from any position by listing again): it makes a cursor
    that was altered, or passed with other filters, a ``422`` instead of a page that
    silently belongs to another listing.
    """
    material = orjson.dumps([micros, order_hex, filters.status, filters.customer_email])
    return hashlib.sha256(material).hexdigest()[:16]


def encode_cursor(position: Position, filters: Filters) -> str:
    micros = str((position.created_at - _EPOCH) // _MICROSECOND)
    order_hex = position.order_id.hex
    return f"{micros}.{order_hex}.{cursor_check(micros, order_hex, filters)}"


def decode_cursor(cursor: str, filters: Filters) -> Position | None:
    """The position in ``cursor``, or a 422 that says what is wrong with it (not of the
    form of :data:`CURSOR_PATTERN`, or its check does not match); None for a position
    after every possible order.

    Every position of the pattern's range means something: one before the first instant a
    timestamp can hold lists nothing, one after the last lists from the newest order.
    """
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        _invalid_cursor("it is not a cursor this API issued (use next_cursor as given)")
    micros, order_hex, check = match.groups()
    if check != cursor_check(micros, order_hex, filters):
        _invalid_cursor(
            "it was issued for other filters, or altered; pass next_cursor as given, with "
            "the same status and customer_email as the first page, or start again without "
            "a cursor"
        )
    offset = int(micros)
    if offset > _LATEST_MICROS:
        return None
    if offset < _EARLIEST_MICROS:
        # (created_at, id) < (earliest, nil) holds for no order.
        return Position(datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))
    return Position(_EPOCH + offset * _MICROSECOND, uuid.UUID(hex=order_hex))


def _invalid_cursor(reason: str) -> NoReturn:
    raise RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("query", "cursor"),
                "msg": f"Invalid cursor: {reason}",
                "input": None,
            }
        ]
    )
