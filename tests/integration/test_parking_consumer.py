"""Parking with the real consumer, relay and broker: an early event waits and goes out in
version order after the one it needed; one that waits too long is dead-lettered even on a
partition that receives nothing more; a fixed dead letter, redriven, releases what waited
behind it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from orderflow.runtime.wiring import create_producer
from orderflow.tools.dlq import DeadLetterFilter, DeadLetterScan, redrive
from orderflow.tools.ranges import create_reader, stop_client
from tests.events import event, paid, placed, shipped
from tests.helpers import (
    TestEnv,
    decode_json,
    eventually,
    header_map,
    orders_by_id,
    produce,
    read_topic,
    running_consumer,
    running_relay,
)

pytestmark = pytest.mark.integration


def updates_of(records: list[Any], order_id: uuid.UUID) -> list[int]:
    """The order_version of ``order_id``'s updates, in topic order."""
    versions = []
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        document = decode_json(record.value)
        if document["order_id"] == str(order_id):
            versions.append(document["order_version"])
    return versions


async def test_events_that_overtook_their_order_go_out_in_version_order(env: TestEnv) -> None:
    settings = env.with_settings(park_timeout_s=60)
    order_id = uuid.uuid4()
    async with running_consumer(settings) as consumer, running_relay(settings):
        await produce(settings, [shipped(order_id), paid(order_id)])

        async def both_parked() -> None:
            assert sum(consumer.stats.parked.values()) == 2

        await eventually(both_parked)
        await produce(settings, [placed(order_id)])
        records = await read_topic(settings, settings.outbound_topic, 3)
    assert updates_of(records, order_id) == [1, 2, 3]
    assert consumer.stats.released == {"OrderPaid": 1, "OrderShipped": 1}
    assert sum(consumer.stats.dead_letters.values()) == 0
    order = (await orders_by_id(env.sessions))[order_id]
    assert (order.status, order.version) == ("shipped", 3)


async def test_an_event_that_waited_too_long_is_dead_lettered_on_an_idle_partition(
    env: TestEnv,
) -> None:
    settings = env.with_settings(park_timeout_s=1)
    order_id = uuid.uuid4()
    async with running_consumer(settings) as consumer, running_relay(settings):
        await produce(settings, [paid(order_id)])  # and nothing more, on any partition
        [letter] = await read_topic(settings, settings.dlq_topic, 1, within=30, settle=1.0)

        async def counted() -> None:
            assert consumer.stats.expired == {"OrderPaid": 1}

        await eventually(counted)
    headers = header_map(letter.headers)
    assert headers["error.reason"] == "unknown_order"
    assert 1000 <= int(headers["error.parked_ms"]) < 30_000
    assert "waited 1 s" in headers["error.message"]
    assert headers["source.topic"] == settings.inbound_topic


async def test_a_fixed_dead_letter_redriven_releases_what_waited_behind_it(
    env: TestEnv,
) -> None:
    """The order's OrderPlaced is dead-lettered (its lines were missing), its OrderPaid and
    OrderShipped wait; the producer fixes it and publishes it again with the same
    event_id, as a redrive of the corrected event does: the waiting ones follow it."""
    settings = env.with_settings(park_timeout_s=120)
    order_id = uuid.uuid4()
    event_id = str(uuid.uuid4())
    key, broken = event(
        "OrderPlaced",
        order_id,
        {"customer": {"email": "a@example.com", "name": "Ada"}, "currency": "EUR"},
        event_id=event_id,
    )
    async with running_consumer(settings) as consumer, running_relay(settings):
        await produce(settings, [(key, broken), paid(order_id), shipped(order_id)])
        await read_topic(settings, settings.dlq_topic, 1, settle=0.5)

        async def waiting() -> None:
            assert sum(consumer.stats.parked.values()) == 2

        await eventually(waiting)
        fixed = placed(order_id)
        document = decode_json(fixed[1])
        document["event_id"] = event_id
        await produce(settings, [(fixed[0], orjson.dumps(document))])
        records = await read_topic(settings, settings.outbound_topic, 3)
    assert updates_of(records, order_id) == [1, 2, 3]
    assert consumer.stats.released == {"OrderPaid": 1, "OrderShipped": 1}


async def test_a_redriven_unknown_order_event_releases_what_waited_for_it(
    env: TestEnv,
) -> None:
    """With parking off an OrderPlaced-less payment is dead-lettered at once; turned on,
    the shipment that follows waits for the payment. Redriving the payment (once its
    order exists) applies it and releases the shipment."""
    order_id = uuid.uuid4()
    off = env.settings  # parking off
    async with running_consumer(off), running_relay(off):
        await produce(off, [paid(order_id)])
        await read_topic(off, off.dlq_topic, 1, settle=0.5)
    on = env.with_settings(park_timeout_s=120)
    async with running_consumer(on) as consumer, running_relay(on):
        await produce(on, [placed(order_id), shipped(order_id)])

        async def shipment_waits() -> None:
            assert consumer.stats.parked == {"OrderShipped": 1}

        await eventually(shipment_waits)
        reader = create_reader(on)
        await reader.start()
        producer = create_producer(on)
        await producer.start()
        try:
            letters = DeadLetterScan(
                reader, on.dlq_topic, DeadLetterFilter(reasons=frozenset({"unknown_order"}))
            )
            await letters.plan()
            outcome = await redrive(
                letters, producer, inbound_topic=on.inbound_topic, rate=50.0, stop=asyncio.Event()
            )
        finally:
            await stop_client(producer)
            await stop_client(reader)
        assert outcome.published == 1
        records = await read_topic(on, on.outbound_topic, 3)
    assert updates_of(records, order_id) == [1, 2, 3]
    assert consumer.stats.released == {"OrderShipped": 1}
