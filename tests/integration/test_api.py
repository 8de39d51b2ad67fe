"""The read API (``orderflow api``) against the real test database.

Requests go through httpx to the ASGI app with its lifespan running, so the app creates
and disposes its own engine exactly as in production. One test starts the real
``orderflow api`` process.
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import socket
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from orderflow.api import (
    CURSOR_PATTERN,
    METRICS_PATH,
    UNMATCHED_ROUTE,
    ApiMetrics,
    Filters,
    create_app,
    cursor_check,
    read_session,
)
from outbox import OutboxMessage, add_messages
from outbox.stats import outbox_stats
from tests import events
from tests.e2e.processes import Launcher
from tests.helpers import (
    Api,
    Placed,
    TestEnv,
    applied_count,
    eventually,
    insert_orders,
    mark_published,
    outbox_rows,
    produce,
    running_consumer,
    serve_api,
)

pytestmark = pytest.mark.integration

BASE = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@pytest.fixture
async def api(env: TestEnv) -> AsyncIterator[Api]:
    async with serve_api(create_app(env.settings)) as served:
        yield served


def newest_first(orders: list[Placed]) -> list[uuid.UUID]:
    return [order.id for order in sorted(orders, key=lambda o: (o.created_at, o.id), reverse=True)]


async def walk(api: Api, limit: int, **filters: str) -> tuple[list[uuid.UUID], list[int]]:
    """Follow ``next_cursor`` to the end: every id returned, and the size of each page."""
    ids: list[uuid.UUID] = []
    sizes: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": limit, **filters}
        if cursor is not None:
            params["cursor"] = cursor
        response = await api.client.get("/orders", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        ids.extend(uuid.UUID(order["id"]) for order in page["orders"])
        sizes.append(len(page["orders"]))
        cursor = page["next_cursor"]
        if cursor is None:
            return ids, sizes
        assert len(sizes) < 100, "pagination does not end"


# --- GET /orders/{id} ----------------------------------------------------------------------


async def test_an_order_reads_as_its_latest_outbound_update(env: TestEnv, api: Api) -> None:
    """Applied by the real consumer: the API's order equals the ``order`` object of the
    latest OrderUpdated in the outbox, field by field, and ``version`` its order_version."""
    order_id = uuid.uuid4()
    lines = [
        {"sku": "SKU-B", "quantity": 3, "unit_price": "0.10"},
        {"sku": "SKU-A", "quantity": 1, "unit_price": "99.9"},
    ]
    await produce(
        env.settings,
        [
            events.placed(order_id, email="grace@example.com", name="Grace", lines=lines),
            events.paid(order_id, amount="100.20"),
        ],
    )
    async with running_consumer(env.settings):

        async def both_applied() -> None:
            assert await applied_count(env.sessions) == 2

        await eventually(both_applied)

    updates = await outbox_rows(env.sessions, topic=env.settings.outbound_topic)
    latest = orjson.loads(updates[-1].payload or b"")
    response = await api.client.get(f"/orders/{order_id}")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body.pop("version") == latest["order_version"] == 2
    assert body == latest["order"]
    assert body["status"] == "paid"
    assert body["total"] == "100.20"
    assert [line["sku"] for line in body["lines"]] == ["SKU-B", "SKU-A"]


async def test_an_unknown_order_is_404_with_a_detail(api: Api) -> None:
    missing = uuid.uuid4()
    response = await api.client.get(f"/orders/{missing}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"order {missing} not found"}


ORDER_ID = uuid.UUID("0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10")


@pytest.mark.parametrize(
    "text",
    [
        "12345",
        ORDER_ID.hex,  # no hyphens
        f"{{{ORDER_ID}}}",  # braces
        ORDER_ID.urn,
        f"{ORDER_ID}\n",
        "0b6c6a53-2222-4a57-8f44-6d1b1c9e2a1\x00",
    ],
    ids=["digits", "hex", "braces", "urn", "newline", "nul"],
)
async def test_an_id_that_is_not_a_uuid_in_its_canonical_form_is_422(api: Api, text: str) -> None:
    """The document says `format: uuid` (8-4-4-4-12): the forms pydantic would also read
    are refused, so the code accepts what the document says and nothing else."""
    response = await api.client.get(f"/orders/{urllib.parse.quote(text)}")
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["path", "order_id"]


async def test_an_id_in_capitals_is_the_same_order(env: TestEnv, api: Api) -> None:
    (order,) = await insert_orders(env, [(BASE, "paid", "ada@example.com")])
    response = await api.client.get(f"/orders/{str(order.id).upper()}")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == str(order.id)


# --- eager loading, sessions ---------------------------------------------------------------


async def test_a_page_costs_the_same_statements_for_1_or_20_orders(env: TestEnv, api: Api) -> None:
    """Customer joined, lines in one IN query: no N+1, and no lazy load (lazy="raise"
    would turn one into a 500)."""
    emails = [f"c{index}@example.com" for index in range(20)]
    placed = await insert_orders(
        env, [(BASE + timedelta(minutes=i), "pending", email) for i, email in enumerate(emails)]
    )
    assert (await api.client.get("/healthz")).status_code == 200

    with api.statements() as one:
        response = await api.client.get("/orders", params={"limit": 1})
    assert response.status_code == 200
    assert len(response.json()["orders"]) == 1

    with api.statements() as twenty:
        response = await api.client.get("/orders", params={"limit": 20})
    assert response.status_code == 200
    orders = response.json()["orders"]
    assert [uuid.UUID(order["id"]) for order in orders] == newest_first(placed)
    assert all(len(order["lines"]) == 3 for order in orders)
    assert {order["customer"]["email"] for order in orders} == set(emails)

    with api.statements() as filtered:
        response = await api.client.get(
            "/orders", params={"customer_email": emails[3], "status": "pending"}
        )
    assert [order["id"] for order in response.json()["orders"]] == [str(placed[3].id)]

    with api.statements() as single:
        response = await api.client.get(f"/orders/{placed[0].id}")
    assert response.status_code == 200

    assert len(one) == len(twenty) == len(filtered) == len(single) == 2, twenty


async def test_every_session_goes_back_to_the_pool(env: TestEnv, api: Api) -> None:
    """Successes, 404s, 422s and many concurrent requests (more than the pool holds):
    all answered, and afterwards no connection is checked out."""
    (order,) = await insert_orders(env, [(BASE, "paid", "ada@example.com")])
    paths = [f"/orders/{order.id}", f"/orders/{uuid.uuid4()}", "/orders", "/outbox/stats"] * 10
    paths.append("/orders?cursor=nonsense")
    responses = await asyncio.gather(*(api.client.get(path) for path in paths))
    assert sorted({response.status_code for response in responses}) == [200, 404, 422]
    assert sum(response.status_code == 200 for response in responses) == 30
    assert api.database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_requests_read_in_read_only_repeatable_read_transactions(api: Api) -> None:
    sessions = read_session(api.database)
    session = await anext(sessions)
    try:
        read_only = (await session.execute(text("SHOW transaction_read_only"))).scalar_one()
        isolation = (await session.execute(text("SHOW transaction_isolation"))).scalar_one()
    finally:
        await sessions.aclose()
    assert (read_only, isolation) == ("on", "repeatable read")


# --- GET /orders: pagination and filters ---------------------------------------------------


async def test_pages_return_every_order_once_newest_first(env: TestEnv, api: Api) -> None:
    """23 orders, several created at the same instant (the id breaks the tie), two
    customers, three statuses: every filter combination, walked 4 at a time."""
    statuses = ["pending", "paid", "cancelled"]
    specs = []
    for index in range(23):
        created_at = BASE + timedelta(seconds=index // 3)  # three orders per instant
        specs.append((created_at, statuses[index % 3], f"c{index % 2}@example.com"))
    placed = await insert_orders(env, specs)

    cases: list[dict[str, str]] = [
        {},
        {"status": "paid"},
        {"customer_email": "c1@example.com"},
        {"status": "pending", "customer_email": "c0@example.com"},
        {"customer_email": "nobody@example.com"},
    ]
    for filters in cases:
        expected = newest_first(
            [
                order
                for order in placed
                if order.status == filters.get("status", order.status)
                and order.email == filters.get("customer_email", order.email)
            ]
        )
        ids, sizes = await walk(api, 4, **filters)
        assert ids == expected, filters
        assert all(size == 4 for size in sizes[:-1]), (filters, sizes)
        assert 0 <= sizes[-1] <= 4

    ids, sizes = await walk(api, 200)
    assert (len(ids), sizes) == (23, [23])


async def test_an_order_placed_while_paging_neither_repeats_nor_shifts_a_page(
    env: TestEnv, api: Api
) -> None:
    placed = await insert_orders(
        env, [(BASE + timedelta(minutes=i), "pending", "ada@example.com") for i in range(6)]
    )
    first = (await api.client.get("/orders", params={"limit": 3})).json()
    await insert_orders(env, [(BASE + timedelta(hours=1), "pending", "bob@example.com")])
    second = (
        await api.client.get("/orders", params={"limit": 3, "cursor": first["next_cursor"]})
    ).json()

    ids = [uuid.UUID(order["id"]) for order in first["orders"] + second["orders"]]
    assert ids == newest_first(placed)
    assert second["next_cursor"] is None


async def test_the_default_page_is_50_orders(env: TestEnv, api: Api) -> None:
    await insert_orders(
        env, [(BASE + timedelta(seconds=i), "paid", "ada@example.com") for i in range(51)]
    )
    page = (await api.client.get("/orders")).json()
    assert len(page["orders"]) == 50
    assert page["next_cursor"] is not None


def _cursor(micros: int | str, order_id: uuid.UUID, check: str = "0" * 16) -> str:
    return f"{micros}.{order_id.hex}.{check}"


@pytest.mark.parametrize(
    ("params", "location", "message"),
    [
        pytest.param({"status": "lost"}, "status", "'pending'", id="unknown-status"),
        pytest.param({"limit": "0"}, "limit", "greater than or equal to 1", id="limit-0"),
        pytest.param({"limit": "201"}, "limit", "less than or equal to 200", id="limit-201"),
        pytest.param({"limit": "ten"}, "limit", "valid integer", id="limit-text"),
        pytest.param({"customer_email": ""}, "customer_email", "at least 1", id="empty-email"),
        pytest.param(
            {"customer_email": "ada\x00@example.com"},
            "customer_email",
            "should match pattern",
            id="email-with-nul",
        ),
        pytest.param(
            {"customer_email": "a" * 321}, "customer_email", "at most 320", id="email-too-long"
        ),
        pytest.param({"cursor": "%%%"}, "cursor", "not a cursor", id="cursor-garbage"),
        pytest.param(
            {"cursor": base64.urlsafe_b64encode(b'{"v":1}').decode()},
            "cursor",
            "not a cursor",
            id="cursor-of-another-form",
        ),
        pytest.param(
            {"cursor": _cursor(1, uuid.uuid4()) + "\n"},
            "cursor",
            "not a cursor",
            id="cursor-with-a-newline",
        ),
        pytest.param(
            {"cursor": _cursor("1" * 19, uuid.uuid4())},
            "cursor",
            "not a cursor",
            id="cursor-position-too-long",
        ),
        pytest.param(
            {"cursor": _cursor(1, uuid.uuid4()).upper()},
            "cursor",
            "not a cursor",
            id="cursor-upper",
        ),
        pytest.param({"cursor": "A" * 2000}, "cursor", "not a cursor", id="cursor-too-long"),
        pytest.param(
            {"cursor": _cursor(1, uuid.uuid4())}, "cursor", "other filters", id="cursor-not-ours"
        ),
    ],
)
async def test_invalid_query_parameters_are_422(
    api: Api, params: dict[str, str], location: str, message: str
) -> None:
    response = await api.client.get("/orders", params=params)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", location]
    assert message in error["msg"]


async def test_a_tampered_cursor_is_422(env: TestEnv, api: Api) -> None:
    await insert_orders(
        env, [(BASE + timedelta(seconds=i), "paid", "ada@example.com") for i in range(3)]
    )
    cursor = (await api.client.get("/orders", params={"limit": 1})).json()["next_cursor"]
    micros, order_hex, check = cursor.split(".")

    async def rejection(tampered: str, **filters: str) -> str:
        response = await api.client.get("/orders", params={"cursor": tampered, **filters})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["query", "cursor"]
        message: str = error["msg"]
        return message

    assert "other filters, or altered" in await rejection(cursor, status="paid")
    assert "other filters" in await rejection(cursor, customer_email="ada@example.com")
    assert "altered" in await rejection(f"{int(micros) - 1}.{order_hex}.{check}")
    assert "altered" in await rejection(f"{micros}.{uuid.uuid4().hex}.{check}")
    assert "altered" in await rejection(f"{micros}.{order_hex}.{'0' * 16}")
    assert "not a cursor" in await rejection(cursor[:-3])
    assert "not a cursor" in await rejection(f"{micros}.{order_hex}")
    # The untouched cursor still works.
    assert (await api.client.get("/orders", params={"cursor": cursor})).status_code == 200


async def test_a_cursor_is_a_position_and_a_check(env: TestEnv, api: Api) -> None:
    """The last order's created_at in microseconds since the epoch, its id in hex, and the
    check of both with the filters."""
    placed = await insert_orders(
        env, [(BASE + timedelta(seconds=i), "paid", "ada@example.com") for i in range(3)]
    )
    page = (await api.client.get("/orders", params={"limit": 2, "status": "paid"})).json()
    second_newest = sorted(placed, key=lambda order: order.created_at)[1]
    micros, order_hex, check = page["next_cursor"].split(".")
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert int(micros) == (second_newest.created_at - epoch) // _MICROSECOND
    assert order_hex == second_newest.id.hex
    assert check == cursor_check(micros, order_hex, Filters("paid", None))
    assert re.fullmatch(CURSOR_PATTERN, page["next_cursor"])


async def test_a_cursor_before_or_after_every_order_is_a_position(env: TestEnv, api: Api) -> None:
    """Every cursor of the documented form is a position, also past the first and the last
    instant a timestamp can hold: before them lists nothing, after them lists all."""
    await insert_orders(env, [(BASE, "paid", "ada@example.com")])
    filters = Filters(None, None)
    order_hex = uuid.uuid4().hex
    tomorrow = str((BASE + timedelta(days=1) - datetime(1970, 1, 1, tzinfo=UTC)) // _MICROSECOND)
    for micros, expected in (("-" + "9" * 18, 0), ("0", 0), (tomorrow, 1), ("9" * 18, 1)):
        cursor = f"{micros}.{order_hex}.{cursor_check(micros, order_hex, filters)}"
        response = await api.client.get("/orders", params={"cursor": cursor})
        assert response.status_code == 200, response.text
        assert len(response.json()["orders"]) == expected, micros


# --- GET /outbox/stats ---------------------------------------------------------------------


async def test_outbox_stats_per_topic(env: TestEnv, api: Api) -> None:
    assert (await api.client.get("/outbox/stats")).json() == {"topics": []}

    async with env.sessions() as session, session.begin():
        await add_messages(
            session,
            [OutboxMessage("updates", b"k", b"v")] * 3 + [OutboxMessage("dlq", None, b"v")],
        )
    # One update went out just now (the relay's mark, and its count of it).
    update_rows = await outbox_rows(env.sessions, "updates")
    await mark_published(env.sessions, [update_rows[0].id])
    async with env.engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO outbox_throughput (second, relay, topic, published) "
                "VALUES (date_trunc('second', now()), 1, 'updates', 1)"
            )
        )
        await connection.execute(
            text(
                "UPDATE outbox_messages SET created_at = now() - interval '1 hour' "
                "WHERE topic = 'dlq'"
            )
        )
    response = await api.client.get("/outbox/stats")

    assert response.status_code == 200
    topics = response.json()["topics"]
    assert [topic["topic"] for topic in topics] == ["dlq", "updates"]
    dlq, updates = topics
    assert (dlq["backlog"], dlq["published_last_minute"]) == (1, 0)
    assert 3590 < dlq["oldest_unpublished_age_seconds"] < 3610
    assert (updates["backlog"], updates["published_last_minute"]) == (2, 1)
    async with env.engine.connect() as connection:
        assert [line.topic for line in await outbox_stats(connection)] == ["dlq", "updates"]


# --- health, docs, database down -----------------------------------------------------------


async def test_health_and_readiness(api: Api) -> None:
    healthz = await api.client.get("/healthz")
    readyz = await api.client.get("/readyz")
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    assert (readyz.status_code, readyz.json()) == (200, {"status": "ok"})
    assert healthz.headers["content-type"] == readyz.headers["content-type"] == _JSON
    metrics = await api.client.get(METRICS_PATH)
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


_JSON = "application/json"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_without_a_database_probes_and_reads_say_503(env: TestEnv) -> None:
    """Nothing listens where the database should be: alive, not ready, reads are 503 (not
    500), and the password never shows."""
    settings = env.with_settings(
        database_url=f"postgresql://orderflow:s3cret-pw@127.0.0.1:{_free_port()}/orders"
    )
    async with serve_api(create_app(settings)) as api:
        assert (await api.client.get("/healthz")).status_code == 200
        readyz = await api.client.get("/readyz")
        assert (readyz.status_code, readyz.json()) == (503, {"status": "database unavailable"})
        assert readyz.headers["content-type"] == _JSON
        for path in (f"/orders/{uuid.uuid4()}", "/orders", "/outbox/stats"):
            response = await api.client.get(path)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["retry-after"] == "5"
            assert response.headers["content-type"] == _JSON
            assert "s3cret" not in response.text
        assert api.database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_openapi_document_and_docs_are_served(api: Api) -> None:
    schema = (await api.client.get("/openapi.json")).json()
    assert schema["info"]["title"] == "orderflow read API"
    assert "keyset pagination" in schema["info"]["description"]
    assert {"/orders/{order_id}", "/orders", "/outbox/stats", "/healthz", "/readyz"} <= set(
        schema["paths"]
    )
    listing = schema["paths"]["/orders"]["get"]
    assert {parameter["name"] for parameter in listing["parameters"]} == {
        "status",
        "customer_email",
        "limit",
        "cursor",
    }
    order = schema["components"]["schemas"]["OrderView"]
    assert order["properties"]["created_at"]["format"] == "date-time"
    # Every status an operation can answer is declared (test_api_fuzz.py checks the
    # answers against these); those that read the database say 503 with Retry-After.
    declared = {
        path: sorted(operation["get"]["responses"]) for path, operation in schema["paths"].items()
    }
    assert declared == {
        "/orders/{order_id}": ["200", "404", "422", "503"],
        "/orders": ["200", "422", "503"],
        "/outbox/stats": ["200", "503"],
        "/healthz": ["200"],
        "/readyz": ["200", "503"],
        METRICS_PATH: ["200"],
    }
    unavailable = listing["responses"]["503"]
    assert unavailable["headers"]["Retry-After"]["required"] is True
    metrics = schema["paths"][METRICS_PATH]["get"]["responses"]["200"]
    assert set(metrics["content"]) == {"text/plain", "application/openmetrics-text"}
    parameters = {parameter["name"]: parameter for parameter in listing["parameters"]}
    assert parameters["cursor"]["schema"]["pattern"] == CURSOR_PATTERN
    docs = await api.client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


# --- the real process ----------------------------------------------------------------------


@pytest.mark.e2e
async def test_the_orderflow_api_process_serves_and_stops_on_sigterm(
    env: TestEnv, tmp_path: Path
) -> None:
    (order,) = await insert_orders(env, [(BASE, "shipped", "ada@example.com")])
    port = _free_port()
    launcher = Launcher(tmp_path)
    try:
        process = launcher.start("api", env.settings, ORDERFLOW_API_PORT=str(port))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:

            async def alive() -> httpx.Response:
                process.assert_running()
                try:
                    response = await client.get("/healthz")
                except httpx.TransportError as error:
                    raise AssertionError(f"not listening yet: {error}") from error
                assert response.status_code == 200
                return response

            await eventually(alive, within=30)
            assert (await client.get("/readyz")).status_code == 200
            response = await client.get(f"/orders/{order.id}")
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "shipped"
            assert response.json()["customer"] == {"email": "ada@example.com", "name": "ada"}
            scraped = await scrape(client)
            assert scraped.value("orderflow_api_requests_total", **by_order) == 1
            (build,) = scraped.samples("orderflow_build_info")
            assert dict(build)["component"] == "api"
            assert scraped.value("orderflow_ready") == 1

        process.popen.send_signal(signal.SIGTERM)
        assert await process.exit_code(within=30) == 0, process.describe()
    finally:
        launcher.kill_all()


@pytest.mark.e2e
async def test_a_port_in_use_is_a_one_line_error(env: TestEnv, tmp_path: Path) -> None:
    launcher = Launcher(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            process = launcher.start("api", env.settings, ORDERFLOW_API_PORT=str(port))
            assert await process.exit_code(within=30) == 1
        finally:
            launcher.kill_all()
    assert "Traceback" not in process.stderr()
    assert process.stderr().strip().splitlines()[-1] == (
        f"orderflow: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


# --- GET /metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer, parsed as Prometheus parses it."""

    text: str

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Label set (sorted pairs) -> value, for every sample named ``name``."""
        return {
            tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
            if sample.name == name
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples(name).get(tuple(sorted(labels.items())))

    def label_values(self) -> set[str]:
        return {
            value
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
            for value in sample.labels.values()
        }


async def scrape(client: httpx.AsyncClient, **headers: str) -> Scrape:
    response = await client.get(METRICS_PATH, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return Scrape(response.text)


by_order = {"method": "GET", "route": "/orders/{order_id}", "status": "200"}


def requests_by_labels(scraped: Scrape) -> dict[tuple[str, str, str], float]:
    return {
        (labels["method"], labels["route"], labels["status"]): value
        for labels, value in (
            (dict(key), value)
            for key, value in scraped.samples("orderflow_api_requests_total").items()
        )
    }


async def test_requests_are_counted_and_timed_by_route_template(env: TestEnv, api: Api) -> None:
    (order,) = await insert_orders(env, [(BASE, "paid", "ada@example.com")])
    missing = uuid.uuid4()
    statuses = [
        (await api.client.get(path)).status_code
        for path in (
            f"/orders/{order.id}",
            f"/orders/{order.id}",
            f"/orders/{missing}",
            "/orders/not-a-uuid",
            "/orders?limit=1",
            "/orders?limit=0",
            f"/no/such/path/{missing}",
            "/healthz",
        )
    ]
    assert statuses == [200, 200, 404, 422, 200, 422, 404, 200]
    assert (await api.client.post("/orders", json={})).status_code == 405
    assert (await api.client.request("BREW", "/orders")).status_code == 405
    await scrape(api.client)  # not counted: /metrics is left out of the request metrics

    scraped = await scrape(api.client)

    assert requests_by_labels(scraped) == {
        ("GET", "/orders/{order_id}", "200"): 2,
        ("GET", "/orders/{order_id}", "404"): 1,
        ("GET", "/orders/{order_id}", "422"): 1,
        ("GET", "/orders", "200"): 1,
        ("GET", "/orders", "422"): 1,
        ("GET", UNMATCHED_ROUTE, "404"): 1,
        ("GET", "/healthz", "200"): 1,
        ("POST", "/orders", "405"): 1,
        ("other", "/orders", "405"): 1,
    }
    durations = "orderflow_api_request_duration_seconds"
    for (method, route), count in {
        ("GET", "/orders/{order_id}"): 4,
        ("GET", "/orders"): 2,
        ("GET", UNMATCHED_ROUTE): 1,
        ("POST", "/orders"): 1,
    }.items():
        labels = {"method": method, "route": route}
        assert scraped.value(f"{durations}_count", **labels) == count
        assert scraped.value(f"{durations}_bucket", **labels, le="+Inf") == count
        assert 0 < (scraped.value(f"{durations}_sum", **labels) or 0) < 30
        buckets = [
            value
            for key, value in scraped.samples(f"{durations}_bucket").items()
            if {("method", method), ("route", route)} <= set(key)
        ]
        assert len(buckets) == 15  # 14 bounds and +Inf
    # Bounded cardinality: no raw path, id or method from a request is a label value.
    values = scraped.label_values()
    assert not {str(order.id), str(missing), "not-a-uuid", "BREW", METRICS_PATH} & values
    assert not [value for value in values if str(missing) in value or str(order.id) in value]
    # The scrape itself is the one request in flight.
    assert scraped.value("orderflow_api_requests_in_progress") == 1


async def test_metrics_export_build_readiness_process_and_pool(env: TestEnv, api: Api) -> None:
    async with api.database.engine.connect():  # one connection held: "in use"
        scraped = await scrape(api.client)
    assert scraped.value("orderflow_api_database_connections_in_use") == 1
    assert scraped.value("orderflow_api_database_pool_size") == env.settings.db_pool_size
    assert (await scrape(api.client)).value("orderflow_api_database_connections_in_use") == 0
    (build,) = scraped.samples("orderflow_build_info")
    assert dict(build)["component"] == "api"
    assert dict(build)["version"]
    assert scraped.value("orderflow_ready") == 1
    assert scraped.value("process_resident_memory_bytes")
    assert scraped.samples("python_info")

    # What Prometheus asks for by default: OpenMetrics, gzip-compressed.
    response = await api.client.get(
        METRICS_PATH,
        headers={
            "Accept": "application/openmetrics-text; version=1.0.0",
            "Accept-Encoding": "gzip",
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.headers["content-encoding"] == "gzip"
    assert response.text.rstrip().endswith("# EOF")
    assert "orderflow_api_requests_in_progress" in response.text


async def test_an_unhandled_error_counts_as_a_500_of_its_route(env: TestEnv) -> None:
    app = create_app(env.settings)

    async def broken() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/broken/{item}", broken)
    async with serve_api(app, raise_app_exceptions=False) as served:
        assert (await served.client.get("/broken/1")).status_code == 500
        scraped = await scrape(served.client)
    assert requests_by_labels(scraped) == {("GET", "/broken/{item}", "500"): 1}
    assert scraped.value("orderflow_api_requests_in_progress") == 1


async def test_each_app_has_its_own_registry(env: TestEnv) -> None:
    """Two apps in one process: no duplicate-series error, and no shared counts."""
    async with (
        serve_api(create_app(env.settings)) as first,
        serve_api(create_app(env.settings)) as second,
    ):
        assert first.app.state.metrics is not second.app.state.metrics
        for _ in range(3):
            assert (await first.client.get("/healthz")).status_code == 200
        assert (await second.client.get("/healthz")).status_code == 200
        healthz = {"method": "GET", "route": "/healthz", "status": "200"}
        assert (await scrape(first.client)).value("orderflow_api_requests_total", **healthz) == 3
        assert (await scrape(second.client)).value("orderflow_api_requests_total", **healthz) == 1


async def test_metrics_say_not_ready_without_a_database(env: TestEnv) -> None:
    settings = env.with_settings(
        database_url=f"postgresql://orderflow:s3cret-pw@127.0.0.1:{_free_port()}/orders"
    )
    async with serve_api(create_app(settings)) as api:
        assert (await api.client.get("/orders")).status_code == 503
        scraped = await scrape(api.client)
    assert scraped.value("orderflow_ready") == 0
    assert requests_by_labels(scraped) == {("GET", "/orders", "503"): 1}
    assert scraped.value("orderflow_api_database_connections_in_use") == 0
    assert "s3cret" not in scraped.text


# --- documentation -------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


async def test_every_api_metric_is_documented() -> None:
    metrics = ApiMetrics()
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1/none")  # no connection
    metrics.watch(engine)  # the pool gauges exist while an engine is watched
    try:
        families = list(metrics.registry.collect())
    finally:
        await engine.dispose()
    names = {
        family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
        for family in families
        if not family.name.startswith(("process_", "python_"))
    }
    assert {"orderflow_api_requests_total", "orderflow_api_database_pool_size"} <= names
    for document in ("README.md", "docs/operations.md", "docs/api.md"):
        text = (ROOT / document).read_text(encoding="utf-8")
        missing = sorted(name for name in names if f"`{name}`" not in text)
        assert not missing, f"{document} does not list {missing}"
