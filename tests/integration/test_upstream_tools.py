"""`orderflow import`, `publish` and `loadgen` as real processes against the real broker.

What a demanding upstream team relies on: every valid line reaches the inbound topic keyed
by its order and in file order; an invalid line is reported by number and JSON path and
nothing is sent unless asked; what loadgen sends is applied by the real consumer exactly as
its summary says; the rate limit holds.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from orderflow.runtime.settings import Settings
from tests.e2e.processes import ORDERFLOW, process_env
from tests.events import cancelled, event, paid, placed, shipped
from tests.helpers import (
    TestEnv,
    applied_count,
    eventually,
    expected_outcome,
    header_map,
    orders_by_id,
    outbox_rows,
    read_topic,
    running_consumer,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Ran:
    code: int
    stdout: str
    stderr: str


async def orderflow(
    settings: Settings, *args: str, stdin: bytes | None = None, **environment: str
) -> Ran:
    """Run ``orderflow ARGS`` configured by ``settings``; wait for it to exit."""
    process = await asyncio.create_subprocess_exec(
        *ORDERFLOW,
        *args,
        env=process_env(settings, **environment),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), timeout=90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


async def records_in(settings: Settings, topic: str) -> int:
    """How many records ``topic`` holds: everything readable from its beginning.

    For checking that a command sent nothing: reading stops after two empty polls (what
    a command sent is readable once it exits: it waits for the broker's acks). Counts
    above zero are read with ``read_topic``, which waits for them.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.require_kafka(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    count = empty_polls = 0
    try:
        while empty_polls < 2:
            batch = await consumer.getmany(timeout_ms=500)
            fetched = sum(len(records) for records in batch.values())
            count += fetched
            empty_polls = 0 if fetched else empty_polls + 1
    finally:
        await consumer.stop()
    return count


def summary_counts(output: str) -> dict[str, int]:
    """``import x: published=7 rejected=0 in 0.2 s`` -> {"published": 7, "rejected": 0}."""
    return {name: int(count) for name, count in re.findall(r"(\w+)=(\d+)", output)}


def jsonl(*values: bytes | None, end: bytes = b"\n") -> bytes:
    return b"".join((value or b"") + end for value in values)


# -- import -----------------------------------------------------------------------------


async def test_import_publishes_every_line_keyed_by_its_order_in_file_order(
    env: TestEnv, tmp_path: Path
) -> None:
    first, second, third = (uuid.uuid4() for _ in range(3))
    messages = [
        placed(first),
        placed(second),
        paid(first),
        placed(third),
        cancelled(second),
        paid(third),
        shipped(third),
    ]
    values = [value for _, value in messages if value is not None]
    assert len(values) == len(messages)
    file = tmp_path / "events.jsonl"
    # A CRLF line end, a blank line and a trailing line without a newline are all fine.
    file.write_bytes(values[0] + b"\r\n" + b"\n" + jsonl(*values[1:-1]) + b"   \n" + values[-1])

    ran = await orderflow(env.settings, "import", str(file))

    assert ran.code == 0, ran.stderr
    assert summary_counts(ran.stdout) == {"published": 7, "rejected": 0}
    records = await read_topic(env.settings, env.settings.inbound_topic, 7)
    assert sorted(record.value or b"" for record in records) == sorted(values)  # once each
    per_order: dict[bytes, list[bytes]] = {}
    for record in sorted(records, key=lambda record: (record.partition, record.offset)):
        document = orjson.loads(record.value)
        assert record.key == document["order_id"].encode()
        per_order.setdefault(record.key, []).append(record.value)
    for key, sent in per_order.items():
        assert sent == [value for message_key, value in messages if message_key == key]


async def test_import_reports_invalid_lines_by_number_and_sends_nothing(
    env: TestEnv, tmp_path: Path
) -> None:
    order = uuid.uuid4()
    bad_quantity = placed(order, lines=[{"sku": "SKU-1", "quantity": 0, "unit_price": "1.00"}])
    file = tmp_path / "events.jsonl"
    file.write_bytes(
        jsonl(
            placed(order)[1],  # 1
            bad_quantity[1],  # 2
            paid(order)[1],  # 3
            b'{"event_id": "oops", "event_type": ',  # 4
            event("OrderTeleported", order, {})[1],  # 5
            shipped(order)[1],  # 6
        )
    )

    ran = await orderflow(env.settings, "import", str(file))

    assert ran.code == 1
    reported = [line for line in ran.stderr.splitlines() if line.startswith("line ")]
    assert reported == [
        "line 2: $.payload.lines[0].quantity: Expected `int` >= 1 (schema_violation)",
        "line 4: the value is not valid UTF-8 JSON: Input data was truncated (malformed_json)",
        "line 5: unknown event_type 'OrderTeleported'; known types: OrderPlaced, OrderPaid, "
        "OrderShipped, OrderDelivered, OrderCancelled (unknown_event_type)",
    ]
    assert "nothing was sent: 3 of 6 events are invalid" in ran.stderr
    assert summary_counts(ran.stdout) == {"published": 0, "rejected": 3}
    assert await records_in(env.settings, env.settings.inbound_topic) == 0

    # Asked to, it sends the valid lines and still says (exit 1) that some were not.
    skipped = await orderflow(env.settings, "import", "--skip-invalid", str(file))
    assert skipped.code == 1
    assert summary_counts(skipped.stdout) == {"published": 3, "rejected": 3}
    assert len(await read_topic(env.settings, env.settings.inbound_topic, 3)) == 3


async def test_validate_only_needs_no_broker_and_sends_nothing(
    env: TestEnv, tmp_path: Path
) -> None:
    order = uuid.uuid4()
    file = tmp_path / "events.jsonl"
    file.write_bytes(jsonl(placed(order)[1], paid(order)[1]))

    offline = await orderflow(
        env.settings, "import", "--validate-only", str(file), KAFKA_BOOTSTRAP_SERVERS="nowhere:1"
    )
    dry = await orderflow(env.settings, "import", "--dry-run", str(file))

    for ran in (offline, dry):
        assert ran.code == 0, ran.stderr
        assert summary_counts(ran.stdout) == {"valid": 2, "rejected": 0}
        assert "dry run: nothing was written" in ran.stdout
    assert await records_in(env.settings, env.settings.inbound_topic) == 0


async def test_import_reads_standard_input(env: TestEnv) -> None:
    order = uuid.uuid4()
    values = [placed(order)[1], paid(order)[1]]

    ran = await orderflow(env.settings, "import", "-", stdin=jsonl(*values))

    assert ran.code == 0, ran.stderr
    assert summary_counts(ran.stdout) == {"published": 2, "rejected": 0}
    records = await read_topic(env.settings, env.settings.inbound_topic, 2)
    assert [record.value for record in sorted(records, key=lambda r: r.offset)] == values


async def test_import_of_a_missing_file_says_so_in_one_line(env: TestEnv, tmp_path: Path) -> None:
    ran = await orderflow(env.settings, "import", str(tmp_path / "nope.jsonl"))
    assert ran.code == 2
    assert ran.stderr.strip().splitlines() == [
        f"orderflow: error: cannot read {tmp_path / 'nope.jsonl'}: No such file or directory"
    ]


# -- publish ----------------------------------------------------------------------------


async def test_publish_sends_one_event_and_prints_where_it_landed(
    env: TestEnv, tmp_path: Path
) -> None:
    order = uuid.uuid4()
    document = orjson.loads(placed(order)[1] or b"")
    file = tmp_path / "event.json"
    file.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")

    ran = await orderflow(env.settings, "publish", str(file))

    assert ran.code == 0, ran.stderr
    match = re.fullmatch(
        rf"published OrderPlaced {document['event_id']} for order {order} to "
        rf"{re.escape(env.settings.inbound_topic)} partition (\d+) offset (\d+)\n",
        ran.stdout,
    )
    assert match, ran.stdout
    (record,) = await read_topic(env.settings, env.settings.inbound_topic, 1)
    assert (record.partition, record.offset) == (int(match[1]), int(match[2]))
    assert record.key == str(order).encode()
    assert orjson.loads(record.value) == document


async def test_publish_refuses_an_invalid_event_and_sends_nothing(
    env: TestEnv, tmp_path: Path
) -> None:
    order = uuid.uuid4()
    invalid = tmp_path / "invalid.json"
    invalid.write_bytes(paid(order, amount="-5")[1] or b"")
    two = tmp_path / "two.json"
    two.write_bytes(jsonl(placed(order)[1], paid(order)[1]))

    refused = await orderflow(env.settings, "publish", str(invalid))
    not_jsonl = await orderflow(env.settings, "publish", str(two))

    assert refused.code == 1
    assert refused.stderr == (
        f"orderflow: error: {invalid}: $.payload.amount: a money amount must not be negative, "
        "got -5 (schema_violation); nothing was sent\n"
    )
    assert not_jsonl.code == 1
    assert "for JSON Lines use `orderflow import`" in not_jsonl.stderr
    assert await records_in(env.settings, env.settings.inbound_topic) == 0


# -- loadgen ----------------------------------------------------------------------------


async def test_loadgen_orders_are_applied_by_the_real_consumer_without_dead_letters(
    env: TestEnv,
) -> None:
    ran = await orderflow(env.settings, "loadgen", "--orders", "12", "--rate", "0", "--seed", "4")

    assert ran.code == 0, ran.stderr
    counts = summary_counts(ran.stdout)
    assert counts["orders"] == 12
    assert counts["duplicates"] == counts["poison"] == 0
    assert "--seed 4" in ran.stderr
    async with running_consumer(env.settings):

        async def all_applied() -> None:
            assert await applied_count(env.sessions) == counts["published"]

        await eventually(all_applied)
    orders = await orders_by_id(env.sessions)
    assert len(orders) == 12
    assert {order.status for order in orders.values()} <= {"delivered", "cancelled"}
    assert sum(order.version for order in orders.values()) == counts["published"]
    assert await outbox_rows(env.sessions, env.settings.dlq_topic) == []


async def test_loadgen_mistakes_end_as_its_summary_says(env: TestEnv) -> None:
    ran = await orderflow(
        env.settings, "loadgen", "--orders", "15", "--faults", "4", "--rate", "0", "--seed", "8"
    )

    assert ran.code == 0, ran.stderr
    counts = summary_counts(ran.stdout)
    records = await read_topic(env.settings, env.settings.inbound_topic, counts["published"])
    assert len(records) == counts["published"]
    records.sort(key=lambda record: (record.partition, record.offset))
    expected = expected_outcome((record.key, record.value) for record in records)
    assert expected.duplicates == counts["duplicates"] > 0
    assert sum(expected.dead_letters.values()) == counts["poison"] > 0

    async with running_consumer(env.settings):

        async def all_settled() -> None:
            assert await applied_count(env.sessions) == len(expected.applied)
            dead = await outbox_rows(env.sessions, env.settings.dlq_topic)
            assert len(dead) == counts["poison"]

        await eventually(all_settled)
    dead = await outbox_rows(env.sessions, env.settings.dlq_topic)
    reasons = Counter(header_map(row.headers)["error.reason"] for row in dead)
    assert reasons == expected.dead_letters


async def test_loadgen_keeps_to_its_rate(env: TestEnv) -> None:
    """Counted, not timed: in 1.5 s at 20/s at most 30 events plus one second's burst."""
    ran = await orderflow(env.settings, "loadgen", "--rate", "20", "--duration", "1.5")

    assert ran.code == 0, ran.stderr
    published = summary_counts(ran.stdout)["published"]
    assert 1 <= published <= 20 * 1.5 + 20 + 1
    assert len(await read_topic(env.settings, env.settings.inbound_topic, published)) == published


async def test_an_interrupted_import_says_how_many_events_were_published(
    env: TestEnv, tmp_path: Path
) -> None:
    orders = [uuid.uuid4() for _ in range(100)]
    file = tmp_path / "events.jsonl"
    file.write_bytes(
        jsonl(*(value for order in orders for _, value in (placed(order), paid(order))))
    )
    process = await asyncio.create_subprocess_exec(
        *ORDERFLOW,
        "import",
        "--rate",
        "20",
        str(file),
        env=process_env(env.settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await read_topic(env.settings, env.settings.inbound_topic, 1, settle=0)  # it is sending
        process.send_signal(signal.SIGINT)
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert process.returncode == 130, stderr.decode()
    published = summary_counts(stdout.decode())["published"]
    assert 1 <= published < 200
    assert f"interrupted: {published} of 200 events were published" in stderr.decode()
    assert len(await read_topic(env.settings, env.settings.inbound_topic, published)) == published
