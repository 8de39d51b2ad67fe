"""Three real relays SIGKILLed at random while thousands of events flow: every order's
updates still reach the topic in version order, each version at least once, repeats with
the same event_id, and nothing lost."""

from __future__ import annotations

import asyncio
import random
import signal
from itertools import islice

import pytest
from sqlalchemy import func, select

from orderflow.tools.samples import SampleStream
from outbox.models import OutboxPending
from tests.e2e.processes import Process, Start
from tests.e2e.test_processes import while_running
from tests.helpers import (
    TestEnv,
    applied_count,
    decode_json,
    eventually,
    expected_outcome,
    produce,
    read_topic,
)

pytestmark = pytest.mark.e2e

RELAY_BATCH = 40


async def unpublished(env: TestEnv) -> int:
    async with env.sessions() as session:
        return int(
            (await session.execute(select(func.count()).select_from(OutboxPending))).scalar_one()
        )


@pytest.mark.timeout(240)
async def test_three_relays_killed_at_random_keep_every_order_in_version_order(
    env: TestEnv,
    orderflow: Start,
) -> None:
    rng = random.Random(20261127)
    stream = SampleStream(seed=5, fault_every=15)
    messages = [(m.key, m.value) for m in islice(stream, 3000)]
    expected = expected_outcome(messages)
    settings = env.settings
    relay_env = {"ORDERFLOW_RELAY_BATCH_SIZE": str(RELAY_BATCH)}

    consumer = orderflow("consume", settings, ORDERFLOW_CONSUMER_BATCH_SIZE="100")
    relays: list[Process] = [orderflow("relay", settings, **relay_env) for _ in range(3)]
    kills = 0

    async def feed() -> None:
        for start in range(0, len(messages), 300):
            await produce(settings, messages[start : start + 300])
            await asyncio.sleep(rng.uniform(0.1, 0.4))

    async def chaos() -> None:
        nonlocal kills
        while kills < 12:
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            victim = rng.randrange(len(relays))
            relays[victim].popen.send_signal(signal.SIGKILL)
            await asyncio.to_thread(relays[victim].popen.wait, 10)
            kills += 1
            if rng.random() < 0.7:  # sometimes the relay stays dead a while
                await asyncio.sleep(rng.uniform(0.0, 0.5))
            relays[victim] = orderflow("relay", settings, **relay_env)

    await while_running(asyncio.gather(feed(), chaos()), consumer)

    async def all_applied_and_published() -> None:
        assert await applied_count(env.sessions) == len(expected.applied)
        assert await unpublished(env) == 0

    await while_running(eventually(all_applied_and_published, within=90), consumer, *relays)

    records = await read_topic(settings, settings.outbound_topic, len(expected.applied), settle=2)
    first_seen: dict[str, list[int]] = {}
    version_ids: dict[tuple[str, int], str] = {}
    seen_ids: set[str] = set()
    repeats = 0
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        document = decode_json(record.value)
        order_id, version, event_id = (
            document["order_id"],
            document["order_version"],
            document["event_id"],
        )
        # A repeat carries the same event_id as the original of that version.
        assert version_ids.setdefault((order_id, version), event_id) == event_id
        if event_id in seen_ids:
            repeats += 1
            continue
        seen_ids.add(event_id)
        first_seen.setdefault(order_id, []).append(version)
    # Dropping repeats, every order shows 1, 2, ..., n: in order, none missing, none twice.
    assert first_seen == {str(k): v for k, v in expected.updates.items()}
    # At least once with bounded repeats: at most the batch in flight per kill.
    assert repeats <= kills * RELAY_BATCH
    assert kills == 12
