"""``dlq list`` and ``dlq redrive`` with a real consumer, relay and broker: what a dead
letter shows, a poison redriven lands in the DLQ once more (no loop), and an
``unknown_order`` event redriven after its order arrived is applied, then skipped."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import create_producer
from orderflow.tools.dlq import REDRIVE_HEADER, DeadLetterFilter, DeadLetterScan, redrive
from orderflow.tools.ranges import create_reader, stop_client
from tests.events import paid, placed
from tests.helpers import (
    TestEnv,
    applied_count,
    eventually,
    header_map,
    invoke_cli,
    orders_by_id,
    produce,
    read_topic,
    running_consumer,
    running_relay,
)

pytestmark = pytest.mark.integration


async def scan(settings: Settings, filters: DeadLetterFilter) -> list[Any]:
    reader = create_reader(settings)
    await reader.start()
    try:
        letters = DeadLetterScan(reader, settings.dlq_topic, filters)
        await letters.plan()
        return [letter async for letter, matched in letters if matched]
    finally:
        await stop_client(reader)


async def dead_letter_count(settings: Settings, count: int) -> None:
    """Wait until the DLQ topic holds ``count`` records, and check no more arrive."""
    records = await read_topic(settings, settings.dlq_topic, count, settle=1.5)
    assert len(records) == count


async def test_list_shows_dead_letters_and_a_poison_redriven_fails_once_more(
    env: TestEnv,
) -> None:
    settings = env.settings
    malformed_key = str(uuid.uuid4()).encode()
    async with running_consumer(settings), running_relay(settings):
        await produce(settings, [(malformed_key, b"{not json"), placed(uuid.uuid4())])
        await dead_letter_count(settings, 1)

        letters = await scan(settings, DeadLetterFilter())
        assert len(letters) == 1
        letter = letters[0]
        assert letter.reason == "malformed_json"
        assert letter.message
        assert (letter.key, letter.value) == (malformed_key, b"{not json")
        assert letter.source_topic == settings.inbound_topic
        assert letter.source_offset is not None
        assert letter.preview() == "{not json"
        assert await scan(settings, DeadLetterFilter(reasons=frozenset({"unknown_order"}))) == []

        listed = await invoke_cli(settings, "dlq", "list", "--json")
        assert listed.exit_code == 0, listed.output
        documents = [orjson.loads(line) for line in listed.stdout.splitlines() if line]
        assert [(d["reason"], d["value"], d["source_offset"]) for d in documents] == [
            ("malformed_json", "{not json", letter.source_offset)
        ]
        assert "1 dead letters match" in listed.output

        # Nothing was fixed: redriven, it is dead-lettered again, once.
        redriven = await invoke_cli(settings, "dlq", "redrive", "--reason", "malformed_json")
        assert redriven.exit_code == 0, redriven.output
        assert "scanned=1 matched=1 published=1" in redriven.output
        await dead_letter_count(settings, 2)

    letters = await scan(settings, DeadLetterFilter())
    assert [letter.reason for letter in letters] == ["malformed_json", "malformed_json"]
    again = letters[1]
    assert (again.key, again.value) == (malformed_key, b"{not json")
    assert again.source_offset != letter.source_offset  # it came from the redriven copy
    inbound = await read_topic(settings, settings.inbound_topic, 3)
    copies = [r for r in inbound if REDRIVE_HEADER in header_map(r.headers)]
    assert len(copies) == 1
    assert header_map(copies[0].headers)[REDRIVE_HEADER] == letter.position
    assert (copies[0].partition, copies[0].offset) == (again.source_partition, again.source_offset)

    dry = await invoke_cli(
        settings, "dlq", "redrive", "--dry-run", "--at", f"{again.partition}:{again.offset}"
    )
    assert dry.exit_code == 0, dry.output
    assert "scanned=1 matched=1 published=0" in dry.output
    bad = await invoke_cli(settings, "dlq", "list", "--reason", "typo")
    assert bad.exit_code == 1
    assert bad.output.startswith("orderflow: error: --reason: 'typo' is not a dead-letter reason")


async def test_an_unknown_order_event_redriven_after_its_order_arrived_is_applied_once(
    env: TestEnv,
) -> None:
    settings = env.settings
    order_id = uuid.uuid4()
    async with running_consumer(settings) as consumer, running_relay(settings):
        await produce(settings, [paid(order_id)])  # before its OrderPlaced: unknown_order
        await dead_letter_count(settings, 1)
        await produce(settings, [placed(order_id)])

        async def placed_applied() -> None:
            assert await applied_count(env.sessions) == 1

        await eventually(placed_applied)

        reader = create_reader(settings)
        await reader.start()
        producer = create_producer(settings)
        await producer.start()
        try:
            letters = DeadLetterScan(
                reader, settings.dlq_topic, DeadLetterFilter(reasons=frozenset({"unknown_order"}))
            )
            await letters.plan()
            outcome = await redrive(
                letters,
                producer,
                inbound_topic=settings.inbound_topic,
                rate=50.0,
                stop=asyncio.Event(),
            )
        finally:
            await stop_client(producer)
            await stop_client(reader)
        assert (outcome.scanned, outcome.matched, outcome.published) == (1, 1, 1)

        async def paid_applied() -> None:
            assert await applied_count(env.sessions) == 2

        await eventually(paid_applied)
        order = (await orders_by_id(env.sessions))[order_id]
        assert (order.status, order.version) == ("paid", 2)

        # A second redrive of the same dead letter: a duplicate, skipped, not dead-lettered.
        second = await invoke_cli(settings, "dlq", "redrive", "--reason", "unknown_order")
        assert second.exit_code == 0, second.output
        assert "published=1" in second.output

        async def skipped() -> None:
            assert consumer.stats.duplicates == 1

        await eventually(skipped)
        await dead_letter_count(settings, 1)
    assert await applied_count(env.sessions) == 2
