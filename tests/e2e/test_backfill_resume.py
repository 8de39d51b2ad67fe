"""The real ``orderflow backfill snapshots`` process, stopped with SIGTERM, then SIGKILLed
mid-run, and run again: every matching order gets exactly one snapshot across the runs; a
run after the finished one is refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from consumer.apply import Destinations, InboundMessage, apply_batch
from consumer.snapshots import BackfillRun
from tests.e2e.processes import ORDERFLOW, process_env
from tests.events import paid, placed
from tests.helpers import TestEnv, decode_json, eventually, outbox_rows

pytestmark = pytest.mark.e2e

ARGUMENTS = ("backfill", "snapshots", "--status", "paid", "--batch", "5", "--rate", "20")


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def start(
    env: TestEnv, tmp_path: Path, processes: list[subprocess.Popen[bytes]], *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    output = tmp_path / f"backfill-{len(processes)}.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [*ORDERFLOW, *ARGUMENTS, *extra],
            env=process_env(env.settings),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    processes.append(process)
    return process, output


async def start_and_wait_for(
    env: TestEnv, tmp_path: Path, processes: list[subprocess.Popen[bytes]], *, snapshots: int
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start the backfill; return once ``snapshots`` snapshots are committed in all."""
    process, output = start(env, tmp_path, processes)

    async def committed() -> None:
        assert process.poll() is None, output.read_text()
        assert len(await snapshot_order_ids(env)) >= snapshots

    await eventually(committed, within=60)
    return process, output


async def snapshot_order_ids(env: TestEnv) -> list[str]:
    rows = await outbox_rows(env.sessions, env.settings.outbound_topic)
    documents = [decode_json(row.payload) for row in rows]
    return [d["order_id"] for d in documents if d["change"] == "Snapshot"]


@pytest.mark.timeout(120)
async def test_backfill_stopped_or_killed_mid_run_continues_without_double_emit(
    env: TestEnv, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    paid_orders = [uuid.uuid4() for _ in range(60)]
    pending_orders = [uuid.uuid4() for _ in range(10)]
    messages = [placed(o) for o in paid_orders + pending_orders] + [paid(o) for o in paid_orders]
    await apply_batch(
        env.sessions,
        group_id="seed",
        destinations=Destinations(env.settings.outbound_topic, env.settings.dlq_topic),
        messages=[
            InboundMessage(env.settings.inbound_topic, 0, offset, key, value)
            for offset, (key, value) in enumerate(messages)
        ],
        expected_offset=None,
        now=datetime.now(UTC),
    )

    # SIGTERM (what Ctrl-C does): the batch in flight commits, exit 130 with a hint.
    first, first_output = await start_and_wait_for(env, tmp_path, started, snapshots=10)
    first.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first.wait, 30) == 130, first_output.read_text()
    assert "run the same command again to continue" in first_output.read_text()
    after_first = len(await snapshot_order_ids(env))
    assert 10 <= after_first < 60

    # SIGKILL: the batch in flight rolls back, nothing else is lost.
    killed, killed_output = await start_and_wait_for(
        env, tmp_path, started, snapshots=after_first + 15
    )
    assert "resuming backfill run" in killed_output.read_text()
    os.killpg(killed.pid, signal.SIGKILL)
    assert await asyncio.to_thread(killed.wait, 30) == -signal.SIGKILL
    emitted_before = len(await snapshot_order_ids(env))
    assert emitted_before < 60, "the kill must land mid-run"

    second, second_output = start(env, tmp_path, started)
    assert await asyncio.to_thread(second.wait, 60) == 0, second_output.read_text()
    output = second_output.read_text()
    assert "resuming backfill run" in output
    assert "finished: 60 snapshots queued in all" in output

    emitted = await snapshot_order_ids(env)
    assert sorted(emitted) == sorted(str(o) for o in paid_orders)  # each exactly once
    async with env.sessions() as session:
        run = (await session.execute(select(BackfillRun))).scalar_one()
    assert (run.status, run.queued, run.skipped) == ("finished", 60, 0)

    third, third_output = start(env, tmp_path, started)
    assert await asyncio.to_thread(third.wait, 60) == 1
    lines = third_output.read_text().strip().splitlines()
    assert lines[-1].startswith("orderflow: error: backfill run ")
    assert "pass --new" in lines[-1]
    assert len(await snapshot_order_ids(env)) == 60
