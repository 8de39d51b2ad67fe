"""A relay whose host vanishes: no FIN, no RST, its packets just stop.

Its shard locks live as long as its database session, and the server ends a session only
when it gives up on the connection: with the operating system's defaults that takes
minutes to hours, and the relay's shards are published by no one meanwhile. The relay's
session keepalives (``outbox.relay.SESSION_SETTINGS``) make it seconds.

The vanishing host is a network namespace of its own, linked to this one by a veth pair
whose far end is then taken down. So these tests need root and iproute2.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from orderflow.devstand.embedded import EmbeddedKafka, EmbeddedPostgres
from orderflow.runtime.migrate import upgrade
from orderflow.runtime.settings import Settings
from orderflow.runtime.topics import ensure_topics
from orderflow.runtime.wiring import create_engine, session_factory
from outbox import OutboxMessage, add_messages
from outbox.enqueue import SHARD_COUNT
from outbox.relay import ADVISORY_LOCK_NAMESPACE
from tests.e2e.processes import Launcher
from tests.helpers import eventually

pytestmark = pytest.mark.e2e

#: The server notices within about 6 s, 12 s at worst (see ``SESSION_SETTINGS``); a live
#: relay claims the freed shards at its next claim round (every 2 s). The deadline leaves
#: room for a loaded machine; without the settings, the shards stay locked for minutes.
TAKEOVER_DEADLINE_SECONDS = 30.0


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True)


@dataclass(frozen=True)
class Host:
    """A network namespace: another host, reachable from this one at ``address``."""

    name: str
    #: The host's address, and this machine's on the link between them.
    address: str
    gateway: str
    #: The link's end inside the namespace.
    link: str

    @property
    def wrapper(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def vanish(self) -> None:
        """Take the host's end of the link down: nothing more comes from it or reaches it."""
        _ip("-n", self.name, "link", "set", self.link, "down")


@pytest.fixture
def host() -> Iterator[Host]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make a network namespace")
    suffix = uuid.uuid4().hex[:6]
    name, near, far = f"orderflow-{suffix}", f"of{suffix}a", f"of{suffix}b"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    host = Host(name, address=f"{subnet}.2", gateway=f"{subnet}.1", link=far)
    _ip("netns", "add", name)
    try:
        _ip("link", "add", near, "type", "veth", "peer", "name", far)
        _ip("link", "set", far, "netns", name)
        _ip("addr", "add", f"{host.gateway}/30", "dev", near)
        _ip("link", "set", near, "up")
        _ip("-n", name, "addr", "add", f"{host.address}/30", "dev", far)
        _ip("-n", name, "link", "set", far, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield host
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", near], check=False, capture_output=True)


async def shard_owners(url: str) -> dict[str, int]:
    """Shard locks granted, by the client address of the session that holds them."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            """
            SELECT host(activity.client_addr) AS client, count(*) AS shards
            FROM pg_locks AS locks JOIN pg_stat_activity AS activity USING (pid)
            WHERE locks.locktype = 'advisory' AND locks.granted AND locks.objsubid = 2
              AND locks.classid = CAST($1 AS oid)
            GROUP BY 1
            """,
            ADVISORY_LOCK_NAMESPACE,
        )
    finally:
        await connection.close()
    return {row["client"]: row["shards"] for row in rows}


async def commit_every(engine: AsyncEngine, topic: str, seconds: float) -> None:
    """Commit an outbox row every ``seconds``, until cancelled."""
    sessions = session_factory(engine)
    for number in itertools.count():
        async with sessions() as session, session.begin():
            await add_messages(session, [OutboxMessage(topic, b"ticker", str(number).encode())])
        await asyncio.sleep(seconds)


@pytest.mark.timeout(150)
async def test_a_relay_whose_host_vanishes_gives_up_its_shards_within_seconds(
    host: Host, launch: Launcher
) -> None:
    with (
        EmbeddedPostgres(
            durable=False,
            listen=("127.0.0.1", host.gateway),
            trusted_networks=(f"{host.address}/32",),
        ) as postgres,
        EmbeddedKafka(host=host.gateway) as kafka,
    ):
        url = postgres.url
        await asyncio.to_thread(upgrade, url)
        here = Settings(
            database_url=url,
            kafka_bootstrap_servers=kafka.bootstrap_servers,
            kafka_idempotence=False,
        )
        over_there = here.with_overrides(database_url=url.replace("127.0.0.1", host.gateway))
        await ensure_topics(here, [here.outbound_topic], partitions=3)
        far = launch.start("relay", over_there, wrapper=host.wrapper)
        near = launch.start("relay", here)

        async def shards_shared() -> None:
            far.assert_running()
            near.assert_running()
            owners = await shard_owners(url)
            assert owners.get(host.address, 0) >= SHARD_COUNT // 2, owners
            assert sum(owners.values()) == SHARD_COUNT, owners

        await eventually(shards_shared, within=60)
        engine = create_engine(here, pool_size=1)
        try:
            host.vanish()
            # Commits go on meanwhile: each NOTIFYs the vanished relay too, data the
            # server sends that is never acknowledged (the slower way to notice).
            committing = asyncio.create_task(commit_every(engine, here.outbound_topic, 0.25))

            async def near_owns_all() -> None:
                near.assert_running()
                assert await shard_owners(url) == {"127.0.0.1": SHARD_COUNT}

            try:
                await eventually(near_owns_all, within=TAKEOVER_DEADLINE_SECONDS, interval=0.2)
            finally:
                committing.cancel()
                await asyncio.gather(committing, return_exceptions=True)

            # What the vanished relay owned is published again: a message in every shard.
            async with session_factory(engine)() as session, session.begin():
                await add_messages(
                    session,
                    [
                        OutboxMessage(here.outbound_topic, f"key-{i}".encode(), b"{}")
                        for i in range(4 * SHARD_COUNT)
                    ],
                )

            async def all_published() -> None:
                async with engine.connect() as connection:
                    waiting = await connection.scalar(text("SELECT count(*) FROM outbox_pending"))
                assert waiting == 0

            await eventually(all_published, within=30)
        finally:
            await engine.dispose()
