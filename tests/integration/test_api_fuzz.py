"""The read API against an independent fuzzer: schemathesis, every check, on real orders.

Schemathesis fuzzes the API's own OpenAPI document (the one ``/openapi.json`` serves)
against the app served by uvicorn, as ``orderflow api`` serves it, on a migrated database
that holds orders applied by the consumer's own transaction (``apply_batch``). All its
checks are on: no 500, only declared status codes, content types and headers, responses
valid against their schemas, schema-valid requests accepted and schema-invalid ones
rejected, 405 with ``Allow`` for undeclared methods.

Phases: the document's examples (its example order id and customer are seeded, so
``GET /orders/{order_id}`` answers an order that exists and the listing has several
pages), coverage (boundary values of every constraint), fuzzing (``MAX_EXAMPLES`` cases per
operation) and, in a second test, stateful runs that follow the document's links (a page's
first order, a page's next page) from real responses. Every run is derandomized: the same
cases on every machine.

One rule is beyond what a schema can say: a cursor is good only with the filters it was
issued for (its check covers them). :func:`cursor_for_its_filters` therefore gives every
cursor of the right shape the check for its own case's filters, so that schema-valid cases
stay valid and reach the keyset query at arbitrary positions; cursors of other filters
are 422, tested in ``test_api.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import httpx
import hypothesis
import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI

from consumer.apply import Destinations, apply_batch
from consumer.messages import InboundMessage
from orderflow.api import (
    CURSOR_PATTERN,
    EXAMPLE_EMAIL,
    EXAMPLE_ORDER_ID,
    Filters,
    create_app,
    cursor_check,
)
from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import create_engine, session_factory
from orderflow.tools.samples import encode, event_document
from tests import events

pytestmark = pytest.mark.integration

#: Test cases per operation in the fuzzing phase, and scenarios of the stateful run.
MAX_EXAMPLES: Final = 100
SEED: Final = 16

START = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
LONGEST_EMAIL: Final = "l" * 64 + "@" + "e" * 251 + ".com"  # 320 characters


def lifecycle(order_id: uuid.UUID, total: str, steps: int) -> list[events.Message]:
    """After OrderPlaced: ``steps`` of paid, shipped, delivered (-1: cancelled)."""
    if steps == -1:
        return [events.cancelled(order_id)]
    later = [events.paid(order_id, total), events.shipped(order_id), events.delivered(order_id)]
    return later[:steps]


def seed_events() -> tuple[list[events.Message], list[uuid.UUID]]:
    """Orders of every status, for three customers (the document's example customer among
    them, with enough orders for several pages), the document's example order id, and two
    orders at the first and the last instant a timestamp can hold."""
    messages: list[events.Message] = []
    ids: list[uuid.UUID] = []
    customers = [(EXAMPLE_EMAIL, "Ada"), ("zoë@例え.jp", "Zoë"), (LONGEST_EMAIL, "L")]
    for index in range(12):
        order_id = uuid.UUID(EXAMPLE_ORDER_ID) if index == 0 else uuid.uuid4()
        email, name = customers[index % 3 if index % 2 else 0]
        occurred = START + timedelta(seconds=index // 2)  # two orders per instant
        placed = event_document(
            "OrderPlaced",
            order_id,
            {
                "customer": {"email": email, "name": name},
                "currency": "EUR",
                "lines": [{"sku": "SKU-1", "quantity": index + 1, "unit_price": "12.50"}],
            },
            occurred_at=occurred,
        )
        messages.append((events.key(order_id), encode(placed)))
        messages.extend(lifecycle(order_id, f"{(index + 1) * 12.5:.2f}", index % 5 - 1))
        ids.append(order_id)
    for occurred in (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)):
        order_id = uuid.uuid4()
        document = event_document(
            "OrderPlaced",
            order_id,
            {
                "customer": {"email": "edge@example.com", "name": "Edge"},
                "currency": "EUR",
                "lines": [{"sku": "SKU-E", "quantity": 1, "unit_price": "1"}],
            },
            occurred_at=occurred,
        )
        messages.append((events.key(order_id), encode(document)))
        ids.append(order_id)
    return messages, ids


async def seed(settings: Settings) -> list[uuid.UUID]:
    """Apply the seed events with the consumer's own transaction; the ids of the orders."""
    messages, ids = seed_events()
    engine = create_engine(settings)
    try:
        outcome = await apply_batch(
            session_factory(engine),
            group_id="seed",
            destinations=Destinations(settings.outbound_topic, settings.dlq_topic),
            messages=[
                InboundMessage(settings.inbound_topic, 0, offset, key, value)
                for offset, (key, value) in enumerate(messages)
            ],
            expected_offset=None,
            now=datetime.now(UTC),
        )
    finally:
        await engine.dispose()
    assert not outcome.rejections, outcome.rejections
    return ids


def cursor_for_its_filters(_context: schemathesis.HookContext, case: schemathesis.Case) -> Any:
    """A ``map_case`` hook: a cursor of the right shape gets the check for the filters of
    its own case, as if the API had issued it for them (see the module docstring)."""
    query = case.query
    if case.operation.label != "GET /orders" or not isinstance(query, dict):
        return case
    cursor, status, email = query.get("cursor"), query.get("status"), query.get("customer_email")
    match = re.fullmatch(CURSOR_PATTERN, cursor) if isinstance(cursor, str) else None
    if match is None or not all(
        value is None or isinstance(value, str) for value in (status, email)
    ):
        return case  # not a cursor's shape, or not filters at all: the case is about that
    micros, order_hex, _ = match.groups()
    check = cursor_check(micros, order_hex, Filters(status, email))
    query["cursor"] = f"{micros}.{order_hex}.{check}"
    return case


#: (operation, status) of every response the fuzzer got, and the order ids it got a 200
#: for, across the module's tests.
ANSWERED: Counter[tuple[str, int]] = Counter()
FOUND: set[uuid.UUID] = set()

#: The document, as the app generates it for ``/openapi.json`` (no database needed for it).
DOCUMENT: Final = create_app(
    Settings(database_url="postgresql://orderflow@127.0.0.1/unused", kafka_bootstrap_servers=None)
).openapi()


def fuzzer(**checks: Any) -> schemathesis.BaseSchema:
    """Schemathesis on :data:`DOCUMENT`: every check, derandomized, the cursor hook."""
    loaded = schemathesis.openapi.from_dict(
        DOCUMENT,
        config=schemathesis.Config.from_dict(
            {
                "seed": SEED,
                "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
                "checks": {"enabled": True, **checks},
            }
        ),
    )
    loaded.hook("map_case")(cursor_for_its_filters)

    @loaded.hook
    def after_call(
        _context: schemathesis.HookContext,
        case: schemathesis.Case,
        response: schemathesis.Response,
    ) -> None:
        ANSWERED[(case.operation.label, response.status_code)] += 1
        if case.operation.label == "GET /orders/{order_id}" and response.status_code == 200:
            FOUND.add(uuid.UUID(response.json()["id"]))

    return loaded


schema = fuzzer()
#: Without a database, 503 is what the API answers, as declared: every check still runs,
#: and any other 5xx (a 500 above all) fails.
schema_without_database = fuzzer(
    not_a_server_error={"expected-statuses": ["1xx", "2xx", "3xx", "4xx", "503"]}
)


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn (the server of ``orderflow api``) in a thread; its URL.

    The socket listens before the server starts, so the first request waits in its
    backlog until the app has started, instead of a poll for it.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        # The fuzzed document is the one the app serves.
        assert httpx.get(f"{url}/openapi.json", timeout=30).json() == DOCUMENT
        yield url
    finally:
        server.should_exit = True
        thread.join()
        listener.close()


@dataclass(frozen=True)
class Seeded:
    url: str
    order_ids: frozenset[uuid.UUID]


@pytest.fixture
def api(test_settings: Settings) -> Iterator[Seeded]:
    """The API on a migrated database holding the seed orders."""
    order_ids = asyncio.run(seed(test_settings))
    with serving(create_app(test_settings)) as url:
        yield Seeded(url, frozenset(order_ids))


@pytest.fixture
def api_without_database_url(test_settings: Settings) -> Iterator[str]:
    """The API where nothing listens for its database."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = test_settings.with_overrides(
        database_url=f"postgresql://orderflow@127.0.0.1:{port}/orders"
    )
    with serving(create_app(settings)) as url:
        yield url


# One server for all the cases of an operation, on purpose: the API only reads.
_ONE_SERVER = hypothesis.settings(
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture]
)


@schema.parametrize()
@_ONE_SERVER
def test_every_operation_keeps_its_contract(case: schemathesis.Case, api: Seeded) -> None:
    case.call_and_validate(base_url=api.url)


def test_following_links_keeps_the_contract(api: Seeded) -> None:
    """Stateful: from real pages to their first order and to the next page."""

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": api.url}

    ANSWERED.clear()
    FOUND.clear()
    Workflow.run(
        settings=hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            stateful_step_count=6,
            database=None,
        )
    )
    # The links led to orders that exist, beyond the document's example.
    assert FOUND - {uuid.UUID(EXAMPLE_ORDER_ID)}, ANSWERED
    assert api.order_ids >= FOUND
    assert ANSWERED[("GET /orders", 200)] > 0, ANSWERED


@schema_without_database.parametrize()
@_ONE_SERVER
def test_without_a_database_every_answer_is_declared(
    case: schemathesis.Case, api_without_database_url: str
) -> None:
    case.call_and_validate(base_url=api_without_database_url)
