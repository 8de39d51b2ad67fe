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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, NoReturn

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy import select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import joinedload, selectinload

from consumer.models import Customer, Order
from consumer.state_machine import OrderStatus
from consumer.updates import format_timestamp, money_text
from orderflow import __version__
from orderflow.settings import Settings
from orderflow.wiring import create_engine
from outbox.stats import outbox_stats

log = logging.getLogger("orderflow.api")

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 200
#: ``/readyz`` answers 503 when the database has not answered within this time: a probe
#: must not hang on a database that accepts connections but never replies.
READY_TIMEOUT_SECONDS: Final = 3.0
#: A cursor is about 150 characters; anything much longer is not one of ours.
_MAX_CURSOR_LENGTH: Final = 1024
_CURSOR_VERSION: Final = 1
_TIMESTAMP_FORMAT: JsonDict = {"format": "date-time", "examples": ["2026-11-24T10:15:00.123456Z"]}
_MONEY_FORMAT: JsonDict = {"pattern": r"^\d+(\.\d+)?$", "examples": ["25.00"]}

_DESCRIPTION = """
Read-only HTTP access to the orders that `orderflow consume` writes, and to the state of
the transactional outbox.

* An **order** has the shape of the `order` object of the outbound `OrderUpdated` event
  (money as decimal strings, timestamps in RFC 3339 UTC), plus its `version`, which equals
  the `order_version` of the latest `OrderUpdated` of that order.
* **Listing** is newest first (by `created_at`, then `id`) with keyset pagination: pass the
  `next_cursor` of one page as `cursor` to get the next one; `next_cursor` is `null` on the
  last page. Cursors are opaque and tied to the filters they were issued with.
* Errors are JSON: `404` with a `detail` sentence, `422` with the list of invalid
  parameters, `503` when the database cannot be reached.
"""

_TAGS = [
    {"name": "orders", "description": "Orders with their customer and lines."},
    {"name": "outbox", "description": "Messages waiting for the relay, per topic."},
    {"name": "health", "description": "Probes for orchestrators and load balancers."},
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
    detail: str


# --- the app -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Database:
    """What the lifespan creates: the app's engine and its read-only session factory."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]


def create_app(settings: Settings) -> FastAPI:
    """The read API for the database of ``settings``; it connects when it starts serving."""
    settings.require_database()  # a bad URL fails here, not on the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        read_only = engine.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )
        app.state.database = Database(engine, async_sessionmaker(read_only, expire_on_commit=False))
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(
        title="orderflow read API",
        version=__version__,
        summary="Orders and outbox state, read-only.",
        description=_DESCRIPTION,
        openapi_tags=_TAGS,
        lifespan=lifespan,
    )
    _add_routes(app)
    app.add_exception_handler(sqlalchemy_errors.OperationalError, _database_unavailable)
    app.add_exception_handler(sqlalchemy_errors.InterfaceError, _database_unavailable)
    app.add_exception_handler(sqlalchemy_errors.TimeoutError, _database_unavailable)
    app.add_exception_handler(OSError, _database_unavailable)  # TimeoutError included
    return app


def database(request: Request) -> Database:
    state: Database = request.app.state.database
    return state


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
        tags=["orders"],
        summary="One order",
        response_model=OrderView,
        responses={404: {"model": Problem, "description": "No order has this id."}},
    )
    async def get_order(order_id: uuid.UUID, session: ReadSession) -> OrderView:
        """The order with its customer and lines."""
        statement = _with_details(select(Order).where(Order.id == order_id))
        order = (await session.execute(statement)).scalar_one_or_none()
        if order is None:
            raise HTTPException(404, detail=f"order {order_id} not found")
        return order_view(order)

    @app.get(
        "/orders",
        tags=["orders"],
        summary="List orders, newest first",
        response_model=OrderPage,
    )
    async def list_orders(
        session: ReadSession,
        status: Annotated[
            OrderStatus | None, Query(description="Only orders in this status.")
        ] = None,
        customer_email: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=320,
                description="Only orders of this customer (exact email, as placed).",
            ),
        ] = None,
        limit: Annotated[
            int, Query(ge=1, le=MAX_PAGE_SIZE, description="Orders per page.")
        ] = DEFAULT_PAGE_SIZE,
        cursor: Annotated[
            str | None,
            Query(
                max_length=_MAX_CURSOR_LENGTH,
                description="The `next_cursor` of the previous page (same filters).",
            ),
        ] = None,
    ) -> OrderPage:
        """A page of orders, newest first (by `created_at`, then `id`), with their customer
        and lines. Filters combine with AND."""
        filters = _filter_digest(status, customer_email)
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
        tags=["outbox"],
        summary="Outbox backlog per topic",
        response_model=OutboxStatsView,
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

    @app.get("/healthz", tags=["health"], summary="Liveness", response_model=Health)
    async def healthz() -> Health:
        """200 while the process serves requests; it touches nothing else."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness",
        response_model=Health,
        responses={503: {"model": Health, "description": "The database does not answer."}},
    )
    async def readyz(db: Annotated[Database, Depends(database)]) -> Any:
        """200 when the database answers a query within a few seconds, else 503."""
        try:
            async with asyncio.timeout(READY_TIMEOUT_SECONDS), db.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except (TimeoutError, OSError, sqlalchemy_errors.SQLAlchemyError) as error:
            log.warning("not ready: the database does not answer (%s)", type(error).__name__)
            return JSONResponse({"status": "database unavailable"}, status_code=503)
        return Health(status="ok")


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


# --- cursors -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ended: the listing continues strictly after this key."""

    created_at: datetime
    order_id: uuid.UUID


def _filter_digest(status: OrderStatus | None, customer_email: str | None) -> str:
    """A short fingerprint of the filters, so a cursor can't be used with other filters."""
    material = orjson.dumps([None if status is None else status.value, customer_email])
    return hashlib.sha256(material).hexdigest()[:16]


def encode_cursor(position: Position, filters: str) -> str:
    document = {
        "v": _CURSOR_VERSION,
        "t": position.created_at.isoformat(),
        "id": str(position.order_id),
        "f": filters,
    }
    return base64.urlsafe_b64encode(orjson.dumps(document)).rstrip(b"=").decode()


def decode_cursor(cursor: str, filters: str) -> Position:
    """The position in ``cursor``, or a 422 that says what is wrong with it."""
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        document = orjson.loads(raw)
    except (binascii.Error, ValueError):
        _invalid_cursor("it is not a cursor this API issued (use next_cursor as given)")
    if not isinstance(document, dict) or document.get("v") != _CURSOR_VERSION:
        _invalid_cursor("it is not a cursor this API issued (use next_cursor as given)")
    if document.get("f") != filters:
        _invalid_cursor(
            "it was issued for other filters; use the same status and customer_email "
            "as the first page, or start again without a cursor"
        )
    created_at, order_id = document.get("t"), document.get("id")
    try:
        if not isinstance(created_at, str) or not isinstance(order_id, str):
            raise ValueError("missing fields")
        position = Position(datetime.fromisoformat(created_at), uuid.UUID(order_id))
    except ValueError:
        _invalid_cursor("its position is damaged (use next_cursor as given)")
    if position.created_at.tzinfo is None:
        _invalid_cursor("its position is damaged (use next_cursor as given)")
    return position


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
