"""What the benchmarks share: services (from the environment, or embedded) and databases."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
from sqlalchemy.engine import make_url

from orderflow.devstand.embedded import EmbeddedKafka, EmbeddedPostgres
from orderflow.runtime.migrate import upgrade
from orderflow.runtime.settings import async_database_url, redacted

#: What ``ORDERFLOW_KAFKA_IDEMPOTENCE`` takes as true.
TRUE = frozenset({"1", "true", "yes", "on"})


def say(text: str = "") -> None:
    print(text, flush=True)


@dataclass(frozen=True)
class Services:
    admin_url: str  # plain postgresql:// URL of a database we may CREATE/DROP others from
    bootstrap_servers: str
    kafka_idempotence: bool
    session_timeout_ms: int
    origin: str


def plain_url(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@contextlib.contextmanager
def provide_services(
    postgres_settings: tuple[tuple[str, str], ...] = (),
    *,
    broker: bool = True,
) -> Iterator[Services]:
    """The services of ``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS``, or embedded ones
    (``postgres_settings``: more server settings for an embedded PostgreSQL; ``broker``
    False: PostgreSQL only, ``bootstrap_servers`` empty)."""
    database_url = os.environ.get("DATABASE_URL")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    with contextlib.ExitStack() as stack:
        if database_url:
            pg_origin = f"PostgreSQL {redacted(async_database_url(database_url))} (DATABASE_URL)"
        else:
            postgres = stack.enter_context(
                EmbeddedPostgres(durable=True, server_settings=postgres_settings)
            )
            database_url = postgres.url
            pg_origin = "embedded PostgreSQL (durable: fsync on)"
        if not broker:
            bootstrap, kafka_origin = "", "no broker"
            idempotence, session_timeout_ms = False, 3000
        elif bootstrap:
            kafka_origin = f"Kafka {bootstrap} (KAFKA_BOOTSTRAP_SERVERS)"
            idempotence, session_timeout_ms = True, 10000
        else:
            tansu = stack.enter_context(EmbeddedKafka())
            bootstrap = tansu.bootstrap_servers
            kafka_origin = "embedded Tansu"
            idempotence, session_timeout_ms = False, 3000
        # As orderflow's own settings would: a broker without idempotence (Tansu given by
        # address, say), or a session timeout of its own.
        if os.environ.get("ORDERFLOW_KAFKA_IDEMPOTENCE"):
            idempotence = os.environ["ORDERFLOW_KAFKA_IDEMPOTENCE"].strip().lower() in TRUE
        if os.environ.get("ORDERFLOW_KAFKA_SESSION_TIMEOUT_MS"):
            session_timeout_ms = int(os.environ["ORDERFLOW_KAFKA_SESSION_TIMEOUT_MS"])
        yield Services(
            admin_url=plain_url(database_url),
            bootstrap_servers=bootstrap,
            kafka_idempotence=idempotence,
            session_timeout_ms=session_timeout_ms,
            origin=f"{pg_origin}; {kafka_origin}",
        )


async def admin(services: Services, *statements: str) -> None:
    connection = await asyncpg.connect(services.admin_url)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def create_database(services: Services, name: str) -> str:
    await admin(services, f'CREATE DATABASE "{name}"')
    url = plain_url(services.admin_url, name)
    # Alembic's env runs its own event loop: give it a thread.
    await asyncio.to_thread(upgrade, url)
    return url


def cpu_by_role() -> Counter[str]:
    """CPU seconds (user + system) used so far by this process and its descendants, by
    role: ``consume``, ``relay``, ``forwarder`` and ``floor`` (the latency benchmark's
    baselines), ``postgres``, ``broker`` and ``benchmark`` (this process: whatever it runs
    itself: producers, subscribers, in-process consumers and relays).

    Read from ``/proc`` (Linux); empty elsewhere. Processes of other programs on the machine
    are not counted, however busy they keep it.
    """
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    found: dict[int, tuple[str, str, float]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat_file:
                    stat = stat_file.read()
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline_file:
                    cmdline = cmdline_file.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            pid = int(entry)
            parents[pid] = int(fields[1])
            found[pid] = (name, cmdline, (int(fields[11]) + int(fields[12])) / ticks)
    me = os.getpid()

    def descends(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == me:
                return True
            pid, seen = parents.get(pid, 0), seen + 1
        return False

    totals: Counter[str] = Counter()
    for pid, (name, cmdline, seconds) in found.items():
        if pid == me:
            role = "benchmark"
        elif not descends(pid):
            continue
        elif name.startswith("postgres"):
            role = "postgres"
        elif "tansu" in name or "tansu" in cmdline:
            role = "broker"
        elif "--forward" in cmdline:
            role = "forwarder"
        elif "--floor" in cmdline:
            role = "floor"
        elif " consume" in cmdline:
            role = "consume"
        elif " relay" in cmdline:
            role = "relay"
        else:
            role = "other"
        totals[role] += seconds
    return totals
