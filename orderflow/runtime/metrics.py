"""Prometheus metrics of ``orderflow consume`` and ``orderflow relay``.

Each component gets its own :class:`~prometheus_client.CollectorRegistry` (never the
global default one), so several components can run in one process, as the tests and
``orderflow dev`` do, without their metrics colliding.

Cost on the hot paths: the consume loop and the relay call their observer once per poll
and once per batch (see :mod:`consumer.observe`, :mod:`outbox.observe`), never per
message, except for the relay's latency histogram, which sorts a batch's latencies and
counts them with one ``bisect`` per bucket, in a histogram of its own that needs no lock.
Everything that is state rather than an event (lag, backlog, shards, retries) is read when
it is scraped or refreshed by :meth:`ComponentMetrics.refresh` every few seconds, off the
hot path.

Names follow the Prometheus conventions: an ``orderflow_`` prefix, base units
(``_seconds``), ``_total`` on counters. docs/operations.md lists them all.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence, Set
from dataclasses import dataclass
from operator import attrgetter
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from consumer.apply import BatchOutcome
from consumer.errors import DeadLetterReason
from consumer.events import EventType
from consumer.intake import OrderConsumer
from consumer.parking import Expired, parked_summary
from outbox.enqueue import SHARD_COUNT
from outbox.observe import PublishedMessage
from outbox.relay import Relay
from outbox.stats import outbox_stats

#: Records in one transaction (the consumer) or one publish batch (the relay).
BATCH_SIZE_BUCKETS: Final = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
#: One consumer transaction, decode to commit.
TRANSACTION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Outbox commit to broker ack: milliseconds normally, minutes during a broker outage.
PUBLISH_LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Serving:
    """The component's own readiness: is it doing its work, and a few words on it."""

    check: str
    ok: bool
    detail: str


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orderflow")
    except PackageNotFoundError:
        return "unknown"


class ComponentMetrics:
    """What every component exports: build info, readiness, the process's own metrics."""

    #: ``consume`` or ``relay``: the command that runs the component.
    component: str = ""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        Info(
            "orderflow_build", "The running orderflow version and command.", registry=self.registry
        ).info({"version": _version(), "component": self.component})
        self._ready = Gauge(
            "orderflow_ready",
            "1 when /readyz would answer 200: database and broker reachable, and the component "
            "is serving (partitions assigned, or relay membership held).",
            registry=self.registry,
        )
        # process_* (CPU, memory, open files, start time) and python_info, as the default
        # registry would have them; the garbage-collector metrics are left out (noise).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def set_ready(self, ready: bool) -> None:
        self._ready.set(1 if ready else 0)

    def serving(self) -> Serving:
        """Whether the component does its work (the component's part of /readyz)."""
        raise NotImplementedError

    async def refresh(self, database: AsyncEngine) -> None:
        """Refresh the metrics that are state (lag, backlog), through ``database`` (a small
        engine of the health endpoint's own, never the component's pool)."""


class ConsumerMetrics(ComponentMetrics):
    """The consumer's metrics; it is also the :class:`consumer.observe.ConsumerObserver`."""

    component = "consume"

    def __init__(self) -> None:
        super().__init__()
        registry = self.registry
        self._consumed = Counter(
            "orderflow_events_consumed",
            "Records received from the inbound topic (records fetched again after a "
            "rebalance or a seek count again).",
            registry=registry,
        )
        self._applied = Counter(
            "orderflow_events_applied",
            "Inbound events applied to the database (committed).",
            registry=registry,
        )
        self._duplicates = Counter(
            "orderflow_events_duplicates",
            "Inbound events skipped because their event_id was applied before (committed).",
            registry=registry,
        )
        dead_lettered = Counter(
            "orderflow_events_dead_lettered",
            "Inbound events dead-lettered (committed), by the error.reason header they carry.",
            ["reason"],
            registry=registry,
        )
        # Every reason exists from the start, at 0: rate() and alerts see a series at once.
        self._dead_lettered = {
            reason: dead_lettered.labels(reason.value) for reason in DeadLetterReason
        }
        self._parked = Counter(
            "orderflow_events_parked",
            "Inbound events parked (committed): they could not apply yet, and wait for the "
            "events of their order they need, by event type.",
            ["event_type"],
            registry=registry,
        )
        self._released = Counter(
            "orderflow_events_released",
            "Parked events applied once the events they needed had (committed), by event type.",
            ["event_type"],
            registry=registry,
        )
        self._expired = Counter(
            "orderflow_events_expired",
            "Parked events dead-lettered after waiting ORDERFLOW_PARK_TIMEOUT_S (committed), "
            "by event type.",
            ["event_type"],
            registry=registry,
        )
        for family in (self._parked, self._released, self._expired):
            for event_type in EventType:
                family.labels(event_type.value)  # every series exists from the start, at 0
        self._waiting: tuple[int, float] = (0, 0.0)
        self._batch_size = Histogram(
            "orderflow_consumer_batch_size",
            "Records per committed transaction (one partition's records, in offset order).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self._transaction = Histogram(
            "orderflow_consumer_transaction_seconds",
            "Time to apply one batch: decode, then one database transaction up to its commit.",
            buckets=TRANSACTION_BUCKETS,
            registry=registry,
        )
        self._queued = Histogram(
            "orderflow_consumer_queue_seconds",
            "How long the oldest record of a committed batch waited in the consumer, from its "
            "fetch to the start of the batch (for its partition's previous batch, and a core).",
            buckets=TRANSACTION_BUCKETS,
            registry=registry,
        )
        self._consumer: OrderConsumer | None = None
        self._kafka: AIOKafkaConsumer | None = None
        self._assignment: frozenset[TopicPartition] | None = None
        self._lag: dict[tuple[str, int], int] = {}
        registry.register(_ConsumerStateCollector(self))

    def watch(self, consumer: OrderConsumer, kafka: AIOKafkaConsumer) -> None:
        """Read state (stats, offsets, assignment) from these from now on."""
        self._consumer = consumer
        self._kafka = kafka

    # -- ConsumerObserver -----------------------------------------------------------------

    def fetched(self, count: int) -> None:
        self._consumed.inc(count)

    def batch_committed(
        self, outcome: BatchOutcome, *, size: int, seconds: float, queued: float | None = None
    ) -> None:
        if outcome.applied:
            self._applied.inc(outcome.applied)
        if outcome.duplicates:
            self._duplicates.inc(outcome.duplicates)
        for reason, count in outcome.dead_letters.items():
            self._dead_lettered[reason].inc(count)
        for event_type, count in outcome.parked.items():
            self._parked.labels(event_type).inc(count)
        for event_type, count in outcome.released.items():
            self._released.labels(event_type).inc(count)
        self._batch_size.observe(size)
        self._transaction.observe(seconds)
        if queued is not None:
            self._queued.observe(queued)

    def parked_expired(self, outcome: Expired) -> None:
        for event_type, count in outcome.expired.items():
            self._expired.labels(event_type).inc(count)
        for reason, count in outcome.dead_letters.items():
            self._dead_lettered[reason].inc(count)

    def partitions_assigned(self, partitions: Set[TopicPartition]) -> None:
        self._assignment = frozenset(partitions)
        # Lag of partitions this member no longer holds is someone else's to report.
        self._lag = {
            key: lag
            for key, lag in self._lag.items()
            if TopicPartition(key[0], key[1]) in self._assignment
        }

    # -- state ----------------------------------------------------------------------------

    def serving(self) -> Serving:
        """Ready once the group assigned this member its partitions. An empty assignment
        (more members than partitions) is ready too: a standby that takes partitions over
        in the next rebalance."""
        if self._consumer is None:
            return Serving("partitions", False, "starting: not connected yet")
        if self._assignment is None:
            return Serving("partitions", False, "waiting for the group to assign partitions")
        if not self._assignment:
            return Serving(
                "partitions", True, "none assigned (standby: more members than partitions)"
            )
        return Serving("partitions", True, f"{len(self._assignment)} assigned")

    async def refresh(self, database: AsyncEngine) -> None:
        """Lag per partition: the broker's end offset minus the next offset to apply; and
        the group's parked events (every member reports the same table)."""
        consumer, kafka = self._consumer, self._kafka
        if consumer is None or kafka is None:
            return
        async with database.connect() as connection:
            self._waiting = await parked_summary(connection, consumer.config.group_id)
        assigned = list(kafka.assignment())
        if not assigned:
            self._lag = {}
            return
        ends: dict[TopicPartition, int] = await kafka.end_offsets(assigned)
        applied = consumer.next_offsets()
        lag: dict[tuple[str, int], int] = {}
        for partition, listed in ends.items():
            # Both are lower bounds of the true end: the fetch's high watermark is exact but
            # stale while the partition is paused or idle; the listed end offset is fresh,
            # but some Kafka-protocol brokers (Tansu) list the last batch's base offset + 1.
            end = max(listed, kafka.highwater(partition) or 0)
            position = applied.get(partition)
            if position is None:
                # Nothing applied by this member yet: it reads from its fetch position
                # (everything before it is applied, by this member or a previous owner).
                try:
                    position = await kafka.position(partition)
                except IllegalStateError:
                    continue  # revoked meanwhile
            lag[(partition.topic, partition.partition)] = max(0, end - position)
        self._lag = lag

    def collect_state(self) -> Iterator[Metric]:
        assigned = GaugeMetricFamily(
            "orderflow_consumer_assigned_partitions",
            "Partitions of the inbound topic this member holds now.",
            labels=["topic"],
        )
        partitions = GaugeMetricFamily(
            "orderflow_consumer_topic_partitions",
            "Partitions the inbound topic has (from the broker's metadata); every one should "
            "be assigned to some member.",
            labels=["topic"],
        )
        if self._kafka is not None:
            held: dict[str, int] = {}
            for partition in self._kafka.assignment():
                held[partition.topic] = held.get(partition.topic, 0) + 1
            for topic in sorted(set(self._kafka.subscription()) | held.keys()):
                assigned.add_metric([topic], held.get(topic, 0))
                known = self._kafka.partitions_for_topic(topic)
                if known is not None:
                    partitions.add_metric([topic], len(known))
        yield assigned
        yield partitions
        lag = GaugeMetricFamily(
            "orderflow_consumer_lag",
            "Records of a partition not applied yet: the broker's end offset minus the next "
            "offset to apply (refreshed every few seconds, by the member holding it).",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(self._lag.items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
        waiting, oldest = self._waiting
        yield GaugeMetricFamily(
            "orderflow_parked_events",
            "Inbound events of this consumer group parked now, waiting for earlier events "
            "of their orders (refreshed every few seconds; every member reports the same).",
            value=waiting,
        )
        yield GaugeMetricFamily(
            "orderflow_parked_oldest_age_seconds",
            "How long the oldest parked event of this consumer group has waited (0: none).",
            value=oldest,
        )
        stats = self._consumer.stats if self._consumer is not None else None
        yield CounterMetricFamily(
            "orderflow_consumer_transient_retries",
            "Batches retried after a transient fault (database or broker unreachable, "
            "deadlock, serialisation failure); never dead-lettered.",
            value=stats.retries if stats is not None else 0,
        )
        yield CounterMetricFamily(
            "orderflow_consumer_fenced_batches",
            "Batches rolled back because another member had advanced the partition's stored "
            "offset (a rebalance this member learnt of late).",
            value=stats.fenced if stats is not None else 0,
        )


class _ConsumerStateCollector(Collector):
    def __init__(self, metrics: ConsumerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics.collect_state())


class _LatencyHistogram:
    """A histogram for many observations at once, without a lock.

    prometheus_client's ``Histogram.observe`` takes a lock and a bucket search per value;
    the relay observes every message of a batch (hundreds), so this one takes a batch at
    once. It is only touched from the event loop (the relay and the metrics endpoint share
    it), so it needs no lock.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(bound) for bound in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, values: list[float]) -> None:
        """Add ``values`` (sorted in place): one ``bisect`` per bucket, not per value."""
        values.sort()
        below = 0
        for index, bound in enumerate(self.bounds):
            # le is "less than or equal": a value on a bound belongs to its bucket.
            upto = bisect_right(values, bound, lo=below)
            self.counts[index] += upto - below
            below = upto
        self.counts[-1] += len(values) - below
        self.sum += math.fsum(values)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append((_float_text(bound), cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


_topic: Final = attrgetter("topic")


def _float_text(bound: float) -> str:
    if bound == math.inf:
        return "+Inf"
    return repr(bound)


class RelayMetrics(ComponentMetrics):
    """The relay's metrics; it is also the :class:`outbox.observe.RelayObserver`."""

    component = "relay"

    def __init__(self) -> None:
        super().__init__()
        registry = self.registry
        self._published = Counter(
            "orderflow_relay_messages_published",
            "Outbox messages the broker acknowledged, by destination topic (a crash between "
            "ack and mark publishes a batch again: it counts again).",
            ["topic"],
            registry=registry,
        )
        self._published_by_topic: dict[str, Counter] = {}
        self._batch_size = Histogram(
            "orderflow_relay_batch_size",
            "Messages per acknowledged publish batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self._latency = _LatencyHistogram(PUBLISH_LATENCY_BUCKETS)
        self._relay: Relay | None = None
        self._member = False
        self._backlog: dict[str, tuple[int, float]] = {}
        registry.register(_RelayStateCollector(self))

    def watch(self, relay: Relay) -> None:
        self._relay = relay

    # -- RelayObserver --------------------------------------------------------------------

    def joined(self) -> None:
        self._member = True

    def left(self) -> None:
        self._member = False

    def published(self, messages: Sequence[PublishedMessage], *, waited: float) -> None:
        self._latency.observe([message.age + waited for message in messages])
        for topic, count in Tally(map(_topic, messages)).items():
            self._published_counter(topic).inc(count)
        self._batch_size.observe(len(messages))

    def _published_counter(self, topic: str) -> Counter:
        child = self._published_by_topic.get(topic)
        if child is None:
            child = self._published_by_topic[topic] = self._published.labels(topic)
        return child

    # -- state ----------------------------------------------------------------------------

    def serving(self) -> Serving:
        """Ready while the relay holds its membership lock: it then owns its fair share of
        the shards within seconds, or, when the other relays own them all, stands by to
        take over theirs (a standby is ready: it is doing its job)."""
        if self._relay is None:
            return Serving("shards", False, "starting: not connected yet")
        if not self._member:
            return Serving("shards", False, "not registered as a relay (no database session)")
        owned = len(self._relay.owned_shards)
        if not owned:
            return Serving(
                "shards", True, f"owns 0 of {SHARD_COUNT} (standby, or claiming its share)"
            )
        return Serving("shards", True, f"owns {owned} of {SHARD_COUNT}")

    async def refresh(self, database: AsyncEngine) -> None:
        """Outbox backlog per topic (the same query as ``orderflow outbox stats``)."""
        async with database.connect() as connection:
            stats = await outbox_stats(connection)
        backlog = {
            line.topic: (
                line.backlog,
                0.0
                if line.oldest_unpublished_age is None
                else line.oldest_unpublished_age.total_seconds(),
            )
            for line in stats
        }
        # A topic drained a while ago drops out of the stats: it stays, at 0.
        for topic in self._backlog.keys() - backlog.keys():
            backlog[topic] = (0, 0.0)
        self._backlog = backlog
        for topic in backlog:
            # Its published counter exists (at 0) before the first publish: rate() and
            # increase() see the first messages too.
            self._published_counter(topic)

    def collect_state(self) -> Iterator[Metric]:
        owned = self._relay.owned_shards if self._relay is not None else frozenset()
        yield GaugeMetricFamily(
            "orderflow_relay_shards_owned",
            "Outbox shards this relay owns (publishes) now.",
            value=len(owned),
        )
        per_shard = GaugeMetricFamily(
            "orderflow_relay_shard_owned",
            "1 for each outbox shard this relay owns, 0 for the others.",
            labels=["shard"],
        )
        for shard in range(SHARD_COUNT):
            per_shard.add_metric([str(shard)], 1 if shard in owned else 0)
        yield per_shard
        yield GaugeMetricFamily(
            "orderflow_outbox_shards",
            "Number of outbox shards; all of them should be owned by some relay.",
            value=SHARD_COUNT,
        )
        yield GaugeMetricFamily(
            "orderflow_relay_member",
            "1 while this relay holds its membership lock (it serves, or stands by).",
            value=1 if self._member else 0,
        )
        yield self._latency.family(
            "orderflow_relay_publish_latency_seconds",
            "Per message: from the start of the transaction that wrote it to the outbox to "
            "the broker's acknowledgement.",
        )
        backlog = GaugeMetricFamily(
            "orderflow_outbox_backlog",
            "Unpublished outbox messages, by destination topic (refreshed every few seconds; "
            "every relay reports the same table).",
            labels=["topic"],
        )
        oldest = GaugeMetricFamily(
            "orderflow_outbox_oldest_unpublished_age_seconds",
            "Age of the oldest unpublished outbox message, by destination topic (0: none).",
            labels=["topic"],
        )
        for topic, (count, age) in sorted(self._backlog.items()):
            backlog.add_metric([topic], count)
            oldest.add_metric([topic], age)
        yield backlog
        yield oldest
        stats = self._relay.stats if self._relay is not None else None
        yield CounterMetricFamily(
            "orderflow_relay_failures",
            "Failed publish attempts and lost database connections; each is retried.",
            value=stats.failures if stats is not None else 0,
        )
        yield CounterMetricFamily(
            "orderflow_outbox_pruned_messages",
            "Published outbox messages deleted after the retention period.",
            value=stats.pruned if stats is not None else 0,
        )


class _RelayStateCollector(Collector):
    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics.collect_state())
