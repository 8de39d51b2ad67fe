"""`orderflow tail` as a real process: a subscriber's view of the updates topic.

Fed updates with a repeat (same event_id), an old snapshot (a stale version), a gap and
a message that is not an update, it shows each order's versions once, newest state last,
flags the gap, reports the unreadable message, and exits 0 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from consumer.state_machine import LineState, OrderState, OrderStatus
from consumer.updates import SNAPSHOT_CHANGE, build_update, update_event_id
from orderflow.runtime.settings import Settings
from tests.e2e.processes import ORDERFLOW, process_env
from tests.helpers import eventually, produce

pytestmark = pytest.mark.e2e

AT = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)
LIFE = [
    (OrderStatus.PENDING, "OrderPlaced"),
    (OrderStatus.PAID, "OrderPaid"),
    (OrderStatus.SHIPPED, "OrderShipped"),
]


def update(order: uuid.UUID, version: int, *, snapshot: bool = False) -> bytes:
    status, change = LIFE[version - 1]
    state = OrderState(
        id=order,
        status=status,
        currency="EUR",
        total=Decimal("25.00"),
        version=version,
        customer_email="a@example.com",
        customer_name="Ada",
        lines=(LineState("SKU-1", 2, Decimal("12.50")),),
        created_at=AT,
        updated_at=AT + timedelta(minutes=version),
    )
    cause = uuid.uuid4()
    return build_update(
        state,
        event_id=uuid.uuid4() if snapshot else update_event_id(cause),
        change=SNAPSHOT_CHANGE if snapshot else change,
        causation_id=None if snapshot else cause,
        occurred_at=AT + timedelta(minutes=version),
    )


class Tail:
    """A running ``orderflow tail``; its output goes to files."""

    def __init__(self, settings: Settings, directory: Path, *args: str) -> None:
        name = f"tail-{len(list(directory.glob('tail-*.out')))}"
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self.popen = subprocess.Popen(
                [*ORDERFLOW, "tail", *args],
                env=process_env(settings),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )

    def stdout(self) -> list[str]:
        return self.stdout_path.read_text().splitlines()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)


@pytest.fixture
def tails(test_settings: Settings, tmp_path: Path) -> Iterator[list[Tail]]:
    started: list[Tail] = []
    try:
        yield started
    finally:
        for tail in started:
            tail.kill()


async def interrupt(tail: Tail) -> int:
    tail.popen.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 20
    while tail.popen.poll() is None:
        assert time.monotonic() < deadline, f"tail did not stop on SIGINT:\n{tail.stderr()}"
        await asyncio.sleep(0.05)
    return tail.popen.returncode


async def test_tail_shows_each_version_once_with_the_latest_state(
    test_settings: Settings, tmp_path: Path, tails: list[Tail]
) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    every = Tail(test_settings, tmp_path, "--from-beginning")
    only_second = Tail(
        test_settings, tmp_path, "--from-beginning", "--json", "--order", str(second)
    )
    tails.extend([every, only_second])

    async def reading() -> None:
        for tail in tails:
            if tail.popen.poll() is not None:
                pytest.fail(f"tail exited early:\n{tail.stderr()}")
            assert "tail: reading" in tail.stderr()

    await eventually(reading, within=60)

    first_v1, first_v2 = update(first, 1), update(first, 2)
    second_v1, second_v3 = update(second, 1), update(second, 3)
    key_first, key_second = str(first).encode(), str(second).encode()
    await produce(
        test_settings,
        [
            (key_first, first_v1),
            (key_first, first_v2),
            (key_first, first_v2),  # delivered again: same event_id
            (key_second, second_v1),
            (key_first, update(first, 1, snapshot=True)),  # an old snapshot: stale
            (key_first, b"this is not an update"),
            (key_first, update(first, 3)),
            (key_second, second_v3),  # version 2 never came
        ],
        topic=test_settings.outbound_topic,
    )

    async def shown() -> None:
        assert len(every.stdout()) == 5
        assert len(only_second.stdout()) == 2

    await eventually(shown, within=30)
    assert await interrupt(every) == 0
    assert await interrupt(only_second) == 0

    lines = [line.split() for line in every.stdout()]
    of_first = [line[3:] for line in lines if line[2] == str(first)]
    of_second = [line[3:] for line in lines if line[2] == str(second)]
    assert of_first == [
        ["v1", "pending", "25.00", "EUR", "OrderPlaced"],
        ["v2", "paid", "25.00", "EUR", "OrderPaid"],
        ["v3", "shipped", "25.00", "EUR", "OrderShipped"],
    ]
    assert of_second == [
        ["v1", "pending", "25.00", "EUR", "OrderPlaced"],
        ["v3", "shipped", "25.00", "EUR", "OrderShipped", "(missed", "1", "earlier", "version)"],
    ]
    stderr = every.stderr()
    assert "offset" in stderr
    assert "not JSON" in stderr
    assert "tail: read=8 shown=5 repeated=1 stale=1 gaps=1 unreadable=1" in stderr

    assert [orjson.loads(line) for line in only_second.stdout()] == [
        orjson.loads(second_v1),
        orjson.loads(second_v3),
    ]
    assert "tail: read=2 shown=2 repeated=0 stale=0 gaps=1 unreadable=0" in only_second.stderr()


async def test_tail_of_a_missing_topic_is_one_line_and_an_order_must_be_an_id(
    test_settings: Settings, tmp_path: Path, tails: list[Tail]
) -> None:
    missing = Tail(test_settings.with_overrides(outbound_topic="no.such.topic"), tmp_path)
    bad_order = Tail(test_settings, tmp_path, "--order", "42")
    tails.extend([missing, bad_order])
    for tail, code in ((missing, 1), (bad_order, 2)):
        assert await asyncio.to_thread(tail.popen.wait, 60) == code
    assert (
        missing.stderr()
        .strip()
        .splitlines()[-1]
        .startswith("orderflow: error: topic 'no.such.topic' does not exist on Kafka")
    )
    assert bad_order.stderr().strip() == (
        "orderflow: error: --order '42' is not an order id (a UUID)"
    )
