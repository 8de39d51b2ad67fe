"""Running ``consume`` and ``relay`` from settings: wiring, checks, graceful stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from consumer.apply import Destinations
from consumer.intake import ConsumerConfig, OrderConsumer
from consumer.tracing import NO_TRACING, SpanTracing
from orderflow.runtime.health import serve_health
from orderflow.runtime.metrics import ConsumerMetrics, RelayMetrics
from orderflow.runtime.settings import Settings
from orderflow.runtime.tracing import tracer_provider
from orderflow.runtime.wiring import (
    ServiceError,
    StartupError,
    check_database,
    create_consumer,
    create_engine,
    create_producer,
    session_factory,
    start_kafka_client,
)
from outbox.faults import Backoff
from outbox.relay import ProducerBroken, PublishForbidden, Relay, RelayConfig
from outbox.tracing import NO_RELAY_TRACING, SpanRelayTracing

T = TypeVar("T")

log = logging.getLogger("orderflow")

#: After a stop request, the most a process waits for in-flight work before giving up.
#: Whatever is not committed by then is rolled back by the database and redone by the
#: partition's next owner.
SHUTDOWN_TIMEOUT_SECONDS = 30.0


def consumer_config(settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        group_id=settings.consumer_group,
        inbound_topic=settings.inbound_topic,
        destinations=Destinations(
            updates_topic=settings.outbound_topic, dead_letter_topic=settings.dlq_topic
        ),
        max_batch=settings.consumer_batch_size,
        concurrency=settings.db_pool_size,
        max_message_bytes=settings.max_message_bytes,
        park_timeout=settings.park_timeout_s,
    )


def relay_config(settings: Settings) -> RelayConfig:
    return RelayConfig(
        batch_size=settings.relay_batch_size,
        retention=timedelta(hours=settings.outbox_retention_hours),
    )


async def run_consumer(
    settings: Settings,
    stop: asyncio.Event,
    *,
    ready: Callable[[OrderConsumer], Awaitable[None] | None] | None = None,
) -> None:
    settings.require_kafka()  # every setting is checked before any service is contacted
    metrics = ConsumerMetrics()
    # No ping per checkout: a transaction on a connection the server dropped fails as a
    # transient fault and is retried on a fresh one (the failed connection is discarded).
    engine = create_engine(settings, pre_ping=False)
    try:
        with tracer_provider("consume") as provider:
            tracing = NO_TRACING if provider is None else SpanTracing(_tracer(provider))
            async with serve_health(settings, metrics, stop):
                await check_database(engine)
                kafka = create_consumer(settings)
                order_consumer = OrderConsumer(
                    kafka,
                    session_factory(engine),
                    consumer_config(settings),
                    observer=metrics,
                    tracing=tracing,
                )
                metrics.watch(order_consumer, kafka)
                order_consumer.subscribe()
                await start_kafka_client(kafka, settings)
                try:
                    log.info(
                        "consuming %s as group %s",
                        settings.inbound_topic,
                        settings.consumer_group,
                    )
                    await _announce(ready, order_consumer)
                    await _until_stopped(order_consumer.run(stop), stop)
                finally:
                    await _stop_client(kafka, "consumer")
    finally:
        await engine.dispose()


async def run_relay(
    settings: Settings,
    stop: asyncio.Event,
    *,
    ready: Callable[[Relay], Awaitable[None] | None] | None = None,
) -> None:
    settings.require_kafka()
    metrics = RelayMetrics()
    engine = create_engine(settings, pool_size=1)
    try:
        with tracer_provider("relay") as provider:
            tracing = NO_RELAY_TRACING if provider is None else SpanRelayTracing(_tracer(provider))
            async with serve_health(settings, metrics, stop):
                await check_database(engine)
                producer = create_producer(settings)
                await start_kafka_client(producer, settings)
                relay = Relay(
                    engine, producer, relay_config(settings), observer=metrics, tracing=tracing
                )
                try:
                    metrics.watch(relay)
                    log.info("relaying the outbox")
                    await _announce(ready, relay)
                    await _relay_until_stopped(relay, settings, stop)
                finally:
                    await _stop_client(relay.producer, "producer")
    finally:
        await engine.dispose()


def _tracer(provider: Any) -> Any:
    from orderflow import __version__

    return provider.get_tracer("orderflow", __version__)


async def _relay_until_stopped(relay: Relay, settings: Settings, stop: asyncio.Event) -> None:
    """Run ``relay`` until ``stop``: a producer that breaks for good is replaced (its shards
    released meanwhile); a broker that refuses the relay ends it with one line."""
    replacements = Backoff(maximum=10.0)
    while not stop.is_set():
        published = relay.stats.published
        try:
            await _until_stopped(relay.run(stop), stop)
        except ProducerBroken as error:
            # run() has released the relay's shards: others publish meanwhile.
            log.warning("%s; starting a new producer", error)
            await _stop_client(relay.producer, "producer")
            if relay.stats.published > published:
                replacements.reset()  # it worked for a while: not a loop
            replacement = await _new_producer(settings, stop, replacements)
            if replacement is None:
                return  # stopped meanwhile
            relay.producer = replacement
        except PublishForbidden as error:
            raise ServiceError(
                f"{error}: allow this client to write to {settings.outbound_topic}"
                f" and {settings.dlq_topic} (and any other topic outbox rows name)"
            ) from error


async def _new_producer(
    settings: Settings, stop: asyncio.Event, backoff: Backoff
) -> AIOKafkaProducer | None:
    """A started producer, after a backoff (one that breaks again at once is not replaced
    in a tight loop) and retried while the broker is unreachable; None once ``stop`` is
    set (a start that hangs, waiting for a producer id say, does not hold up the stop)."""
    while True:
        await backoff.sleep(stop)
        if stop.is_set():
            return None
        producer = create_producer(settings)
        starting = asyncio.ensure_future(start_kafka_client(producer, settings))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
            await _stop_client(producer, "producer")
            return None
        error = starting.exception()
        if error is None:
            return producer
        if not isinstance(error, StartupError):
            raise error
        log.warning("%s; retrying", error)


async def _announce(ready: Callable[[T], Awaitable[None] | None] | None, component: T) -> None:
    """Tell the caller (tests, ``dev``, benchmarks) the component runs; await its answer."""
    if ready is not None:
        result = ready(component)
        if result is not None:
            await result


#: How long closing a Kafka client may take (it leaves the group, flushes, closes sockets).
CLIENT_STOP_SECONDS = 10.0


async def _stop_client(client: AIOKafkaConsumer | AIOKafkaProducer, what: str) -> None:
    """Close a Kafka client without letting an unreachable broker turn a clean stop into a
    crash: aiokafka's stop() can hang, or fail with its own internal CancelledError, while
    the broker is down. It runs as its own task, so its failure is not ours."""
    closing = asyncio.create_task(client.stop())
    done, _ = await asyncio.wait({closing}, timeout=CLIENT_STOP_SECONDS)
    if not done:
        closing.cancel()
        await asyncio.wait({closing})
        log.warning("the Kafka %s did not close within %.0f s", what, CLIENT_STOP_SECONDS)
    elif closing.cancelled() or closing.exception() is not None:
        log.warning("the Kafka %s did not close cleanly (is the broker reachable?)", what)


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> None:
    """Run ``work``; once ``stop`` is set, give it a bounded time to finish."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=SHUTDOWN_TIMEOUT_SECONDS)
        if not task.done():
            log.error(
                "in-flight work did not finish within %.0fs of the stop request; abandoning it "
                "(the database rolls it back)",
                SHUTDOWN_TIMEOUT_SECONDS,
            )
            task.cancel()
            await asyncio.wait({task})
            return
        task.result()
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
