"""Metrics and health of the consumer and the relay, run in-process on the real services
and read the way Prometheus reads them: over HTTP from ``--metrics-port``, parsed with
prometheus_client's own parser. Every value is checked against known traffic."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from consumer.errors import DeadLetterReason
from orderflow.devstand.embedded import free_port
from orderflow.runtime.settings import Settings
from outbox import OutboxMessage, add_messages
from outbox.enqueue import SHARD_COUNT
from outbox.relay import ADVISORY_LOCK_NAMESPACE
from tests.events import delivered, key, paid, placed, shipped
from tests.helpers import (
    TestEnv,
    applied_count,
    eventually,
    lock_waits,
    produce,
    read_topic,
    running_consumer,
    running_relay,
)

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, keyed by (sample name, labels)."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    found = samples.get((name, frozenset(labels.items())))
    assert found is not None, f"no sample {name}{labels or ''}"
    return found


def values(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: number for (sample, labels), number in samples.items() if sample == name}


async def get(port: int, path: str, **options: Any) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}{path}", **options)


def with_metrics(settings: Settings) -> tuple[Settings, int]:
    port = free_port()
    return settings.with_overrides(metrics_port=port), port


def plain_url(settings: Settings) -> str:
    url = make_url(settings.database_url or "").set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def offsets_locked(settings: Settings) -> AsyncIterator[None]:
    """Hold the row locks of the group's stored offsets: the consumer's next transaction on
    those partitions waits (its compare-and-set needs the row), so records pile up."""
    connection = await asyncpg.connect(plain_url(settings))
    try:
        transaction = connection.transaction()
        await transaction.start()
        locked = await connection.fetch(
            "SELECT partition FROM consumer_offsets WHERE group_id = $1 FOR UPDATE",
            settings.consumer_group,
        )
        assert locked, "no stored offset to lock"
        yield
        await transaction.rollback()
    finally:
        await connection.close()


@pytest.mark.timeout(120)
async def test_consumer_counts_every_outcome_and_reports_lag(env: TestEnv) -> None:
    settings, port = with_metrics(env.settings)
    order_id = uuid.uuid4()
    first = placed(order_id)
    poison = {
        DeadLetterReason.MALFORMED_JSON: (key(order_id), b'{"event_id": '),
        DeadLetterReason.SCHEMA_VIOLATION: paid(order_id, amount="-5"),
        DeadLetterReason.UNKNOWN_EVENT_TYPE: (
            key(order_id),
            placed(order_id)[1].replace(b"OrderPlaced", b"OrderLost"),
        ),
        DeadLetterReason.UNKNOWN_ORDER: shipped(uuid.uuid4()),
        DeadLetterReason.DUPLICATE_ORDER: placed(order_id),
        DeadLetterReason.INVALID_TRANSITION: shipped(order_id),
        DeadLetterReason.AMOUNT_MISMATCH: paid(order_id, amount="24.99"),
    }
    stream = [first, first, *poison.values(), paid(order_id)]  # the second `first`: a duplicate
    await produce(settings, stream)

    async with running_consumer(settings):

        async def counted() -> Samples:
            # Consumed counts at fetch, every outcome at commit: wait for the commit of every
            # partition's batch (the unknown order's event has a partition of its own).
            samples = await scrape(port)
            assert value(samples, "orderflow_consumer_batch_size_sum") == len(stream)
            return samples

        samples = await eventually(counted)
        assert value(samples, "orderflow_events_applied_total") == 2
        assert value(samples, "orderflow_events_consumed_total") == len(stream)
        assert value(samples, "orderflow_events_duplicates_total") == 1
        assert {
            dict(labels)["reason"]: number
            for labels, number in values(samples, "orderflow_events_dead_lettered_total").items()
        } == {reason.value: 1 for reason in DeadLetterReason}
        # Every record went through exactly one committed batch.
        batches = value(samples, "orderflow_consumer_batch_size_count")
        assert batches >= 1
        assert value(samples, "orderflow_consumer_transaction_seconds_count") == batches
        assert value(samples, "orderflow_consumer_transaction_seconds_sum") > 0
        assert value(samples, "orderflow_consumer_transient_retries_total") == 0
        assert value(samples, "orderflow_consumer_fenced_batches_total") == 0
        (build,) = values(samples, "orderflow_build_info")
        assert dict(build)["component"] == "consume"

        async def caught_up() -> dict[frozenset[tuple[str, str]], float]:
            samples = await scrape(port)
            topic = settings.inbound_topic
            assert value(samples, "orderflow_consumer_assigned_partitions", topic=topic) == 3
            assert value(samples, "orderflow_consumer_topic_partitions", topic=topic) == 3
            lag = values(samples, "orderflow_consumer_lag")
            assert {dict(labels)["partition"] for labels in lag} == {"0", "1", "2"}
            assert set(lag.values()) == {0}
            assert value(samples, "orderflow_ready") == 1
            return lag

        lag = await eventually(caught_up)
        assert {dict(labels)["topic"] for labels in lag} == {settings.inbound_topic}
        queue = "orderflow_consumer_queue_seconds"

        def waited_long(samples: Samples) -> float:
            """Batches whose oldest record waited over 0.25 s in the consumer."""
            return value(samples, f"{queue}_count") - value(samples, f"{queue}_bucket", le="0.25")

        assert value(samples, f"{queue}_count") == batches
        before = waited_long(await scrape(port))

        # Records that cannot be applied yet (their partition's offset row is locked) are
        # lag: exactly as many as were produced, on the order's partition only. The first
        # one's transaction waits for the offset row; the others arrive meanwhile, and wait
        # in the consumer for that transaction: queued.
        later = [shipped(order_id), delivered(order_id), (key(order_id), b"not json")]
        async with offsets_locked(settings):
            await produce(settings, later[:1])
            await lock_waits(env, "transactionid", 1)
            await produce(settings, later[1:])

            async def lagging() -> None:
                samples = await scrape(port)
                fetched = value(samples, "orderflow_events_consumed_total")
                assert fetched == len(stream) + len(later)
                lag = values(samples, "orderflow_consumer_lag")
                assert sorted(lag.values()) == [0, 0, len(later)]

            await eventually(lagging)
            await asyncio.sleep(0.3)  # they wait this long, and more
        await eventually(caught_up)
        samples = await scrape(port)
        # The first one's batch started at once; the other two's, after the lock.
        assert waited_long(samples) - before == 1
        assert value(samples, "orderflow_events_applied_total") == 4
        assert value(samples, "orderflow_events_consumed_total") == len(stream) + len(later)
        assert value(samples, "orderflow_events_dead_lettered_total", reason="malformed_json") == 2
    assert await applied_count(env.sessions) == 4


async def take_all_shards(settings: Settings) -> asyncpg.Connection:
    """A session owning every shard from outside the relay: a relay joins but can claim
    none (a standby) until the session closes, and its locks with it."""
    connection = await asyncpg.connect(plain_url(settings))
    await connection.execute(
        "SELECT pg_advisory_lock($1, shard) FROM generate_series(0, $2 - 1) AS shard",
        ADVISORY_LOCK_NAMESPACE,
        SHARD_COUNT,
    )
    return connection


@pytest.mark.timeout(120)
async def test_relay_reports_backlog_shards_and_publish_latency(env: TestEnv) -> None:
    settings, port = with_metrics(env.settings)
    topic = settings.outbound_topic
    count = 25
    owner = await take_all_shards(settings)
    try:
        async with env.sessions() as session, session.begin():
            await add_messages(
                session,
                [
                    OutboxMessage(topic=topic, key=f"k{i}".encode(), payload=b"{}")
                    for i in range(count)
                ],
            )
        async with running_relay(settings) as relay:

            async def standing_by() -> Samples:
                samples = await scrape(port)
                assert value(samples, "orderflow_relay_member") == 1
                assert value(samples, "orderflow_outbox_backlog", topic=topic) == count
                return samples

            samples = await eventually(standing_by)
            assert value(samples, "orderflow_relay_shards_owned") == 0
            assert set(values(samples, "orderflow_relay_shard_owned").values()) == {0}
            assert value(samples, "orderflow_outbox_shards") == SHARD_COUNT
            age = value(samples, "orderflow_outbox_oldest_unpublished_age_seconds", topic=topic)
            assert age > 0
            assert value(samples, "orderflow_relay_publish_latency_seconds_count") == 0
            assert value(samples, "orderflow_relay_messages_published_total", topic=topic) == 0
            # A standby is ready: standing by to take over from a dying relay is its job.
            response = await get(port, "/readyz")
            assert response.status_code == 200, response.text
            assert response.json()["checks"]["shards"].startswith("owns 0 of 64")

            # The outside owner goes away: the relay claims every shard, drains the backlog.
            await owner.close()

            async def drained() -> Samples:
                samples = await scrape(port)
                published = value(samples, "orderflow_relay_messages_published_total", topic=topic)
                assert published == count
                assert value(samples, "orderflow_outbox_backlog", topic=topic) == 0
                # The owner's locks go one by one as its session ends: a claim round may
                # have got some of them, and the next one the rest.
                assert value(samples, "orderflow_relay_shards_owned") == SHARD_COUNT
                assert sum(values(samples, "orderflow_relay_shard_owned").values()) == SHARD_COUNT
                assert relay.owned_shards == frozenset(range(SHARD_COUNT))
                return samples

            samples = await eventually(drained)
            age = value(samples, "orderflow_outbox_oldest_unpublished_age_seconds", topic=topic)
            assert age == 0
            # One latency per message; each waited for the standby to take over (at least
            # the seconds the backlog gauge took to show), so none is in the first buckets.
            latency = "orderflow_relay_publish_latency_seconds"
            assert value(samples, f"{latency}_count") == count
            assert value(samples, f"{latency}_bucket", le="0.1") == 0
            assert value(samples, f"{latency}_bucket", le="+Inf") == count
            assert value(samples, f"{latency}_sum") > count * 0.1
            assert value(samples, "orderflow_relay_batch_size_sum") == count
            assert value(samples, "orderflow_relay_failures_total") == 0
            records = await read_topic(settings, topic, count)
            assert len(records) == count
            await check_http_details(port)
    finally:
        await owner.close()


async def check_http_details(port: int) -> None:
    """What a scraper, a probe or a stray client meets at the endpoint."""
    healthz = await get(port, "/healthz")
    assert (healthz.status_code, healthz.json()["status"]) == (200, "alive")
    ready = await get(port, "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "component": "relay",
        "checks": {"database": "ok", "broker": "ok", "shards": "owns 64 of 64"},
    }
    missing = await get(port, "/nope")
    assert missing.status_code == 404
    assert "/metrics" in missing.json()["endpoints"]
    async with httpx.AsyncClient() as client:
        posted = await client.post(f"http://127.0.0.1:{port}/metrics")
        head = await client.head(f"http://127.0.0.1:{port}/healthz")
    assert (posted.status_code, posted.headers["allow"]) == (405, "GET, HEAD")
    assert (head.status_code, head.content) == (200, b"")
    # OpenMetrics when asked for, gzip when accepted: both as Prometheus would read them.
    openmetrics = await get(
        port,
        "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": ""},
    )
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(openmetrics.text)}
    assert {"orderflow_relay_messages_published", "orderflow_outbox_backlog"} <= names
    async with httpx.AsyncClient() as client:
        request = client.build_request("GET", f"http://127.0.0.1:{port}/metrics")
        request.headers["Accept-Encoding"] = "gzip"
        compressed = await client.send(request, stream=True)
        raw = b"".join([chunk async for chunk in compressed.aiter_raw()])
        await compressed.aclose()
    assert compressed.headers["content-encoding"] == "gzip"
    assert b"orderflow_relay_shards_owned" in gzip.decompress(raw)
