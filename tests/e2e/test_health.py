"""The health and metrics endpoint of real ``orderflow consume`` and ``orderflow relay``
processes, as docker compose, Kubernetes and Prometheus use it: alive, ready once working,
not ready (503, saying why) while the database is cut off, ready again after, metrics that
Prometheus' parser reads, and a clean stop on SIGTERM that closes the port."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orderflow.devstand.embedded import free_port
from orderflow.runtime.settings import Settings
from tests.e2e.processes import ORDERFLOW, Launcher, Process, process_env
from tests.e2e.test_chaos import database_port, sigterm, via
from tests.events import key, paid, placed
from tests.helpers import TestEnv, eventually, produce
from tests.proxy import TcpProxy

pytestmark = pytest.mark.e2e


def start(
    launch: Launcher, logs: Path, settings: Settings, command: str, *flags: str, **env: str
) -> Process:
    """``orderflow <command> <flags>``, left to ``launch`` to kill at teardown."""
    log = logs / f"{len(launch.started):02d}-{command}.stderr"
    with log.open("wb") as stderr:
        popen = subprocess.Popen(
            [*ORDERFLOW, command, *flags],
            env=process_env(settings, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    process = Process(command, popen, log)
    launch.started.append(process)
    return process


async def get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def ready(process: Process, port: int) -> dict[str, Any]:
    process.assert_running()
    try:
        response = await get(port, "/readyz")
    except httpx.TransportError as error:
        raise AssertionError(f"no answer on port {port}: {error}") from None
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def not_ready(process: Process, port: int) -> dict[str, Any]:
    process.assert_running()
    response = await get(port, "/readyz")
    assert response.status_code == 503, response.text
    body: dict[str, Any] = response.json()
    return body


async def metrics(port: int) -> dict[str, float]:
    """Unlabelled samples and ``name{a="b"}`` keys for labelled ones, via Prometheus' parser."""
    response = await get(port, "/metrics")
    assert response.status_code == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def refused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.timeout(150)
async def test_consume_and_relay_report_health_and_metrics_through_a_database_cut(
    env: TestEnv, launch: Launcher, tmp_path: Path
) -> None:
    settings = env.settings
    consume_port, relay_port = free_port(), free_port()
    async with TcpProxy(database_port(settings)) as link:
        cut_off = settings.with_overrides(database_url=via(settings, link))
        consumer = start(launch, tmp_path, cut_off, "consume", "--metrics-port", str(consume_port))
        relay = start(launch, tmp_path, cut_off, "relay", ORDERFLOW_METRICS_PORT=str(relay_port))

        body = await eventually(lambda: ready(consumer, consume_port), within=60)
        assert body["component"] == "consume"
        assert body["checks"] == {"database": "ok", "broker": "ok", "partitions": "3 assigned"}

        async def owns_every_shard() -> dict[str, Any]:
            # Ready once it is a member, before its first claim round has taken the shards.
            body = await ready(relay, relay_port)
            assert body["checks"]["shards"] == "owns 64 of 64"
            return body

        await eventually(owns_every_shard, within=60)
        for port in (consume_port, relay_port):
            alive = await get(port, "/healthz")
            assert (alive.status_code, alive.json()["status"]) == (200, "alive")

        orders = [uuid.uuid4() for _ in range(3)]
        stream = [event for order in orders for event in (placed(order), paid(order))]
        await produce(settings, [*stream, (key(orders[0]), b"not json")])

        async def flowed() -> tuple[dict[str, float], dict[str, float]]:
            consumed, relayed = await metrics(consume_port), await metrics(relay_port)
            assert consumed["orderflow_events_applied_total"] == len(stream)
            assert consumed['orderflow_events_dead_lettered_total{reason="malformed_json"}'] == 1
            updates = (
                f'orderflow_relay_messages_published_total{{topic="{settings.outbound_topic}"}}'
            )
            dead = f'orderflow_relay_messages_published_total{{topic="{settings.dlq_topic}"}}'
            assert (relayed.get(updates), relayed.get(dead)) == (len(stream), 1)
            return consumed, relayed

        consumed, relayed = await eventually(flowed, within=60)
        inbound = settings.inbound_topic
        assert consumed[f'orderflow_consumer_assigned_partitions{{topic="{inbound}"}}'] == 3
        assert consumed["process_resident_memory_bytes"] > 0
        assert relayed["orderflow_relay_shards_owned"] == 64
        assert relayed["orderflow_relay_publish_latency_seconds_count"] == len(stream) + 1

        # The database link is cut: both stay alive, neither is ready, and they say why.
        await link.cut()
        body = await eventually(lambda: not_ready(consumer, consume_port), within=30)
        assert "database" in body["missing"]
        assert body["checks"]["database"] != "ok"
        assert body["checks"]["broker"] == "ok"

        async def relay_lost_its_membership() -> dict[str, Any]:
            body = await not_ready(relay, relay_port)
            # Its session held the membership and shard locks: gone with the link.
            assert body["missing"] == ["database", "shards"], body
            return body

        body = await eventually(relay_lost_its_membership, within=30)
        assert body["checks"]["database"] != "ok"
        for port in (consume_port, relay_port):
            assert (await get(port, "/healthz")).status_code == 200

        async def gauge_says_unready() -> None:
            assert (await metrics(consume_port))["orderflow_ready"] == 0

        await eventually(gauge_says_unready, within=30)

        # Back: ready again by themselves, and the work goes on.
        await link.restore()
        await eventually(lambda: ready(consumer, consume_port), within=60)
        await eventually(lambda: ready(relay, relay_port), within=60)
        more = uuid.uuid4()
        await produce(settings, [placed(more)])

        async def caught_up() -> None:
            consumed = await metrics(consume_port)
            assert consumed["orderflow_events_applied_total"] == len(stream) + 1

        await eventually(caught_up, within=60)

        await asyncio.gather(sigterm(consumer), sigterm(relay))
        assert refused(consume_port)
        assert refused(relay_port)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ORDERFLOW_METRICS_PORT", "0", "ORDERFLOW_METRICS_PORT must be at least 1"),
        ("ORDERFLOW_METRICS_PORT", "70000", "ORDERFLOW_METRICS_PORT must be between 1 and 65535"),
    ],
)
async def test_a_bad_metrics_port_is_a_one_line_error(
    env: TestEnv, variable: str, value: str, message: str
) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [*ORDERFLOW, "relay"],
        env=process_env(env.settings, **{variable: value}),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    assert message in lines[0]


async def test_a_metrics_port_in_use_is_a_one_line_error(env: TestEnv) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await asyncio.to_thread(
            subprocess.run,
            [*ORDERFLOW, "consume", "--metrics-port", str(port)],
            env=process_env(env.settings),
            capture_output=True,
            timeout=60,
        )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr.decode()
    assert f"cannot serve metrics and health on port {port}" in lines[0]
