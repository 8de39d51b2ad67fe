"""A subscriber of ``orders.updates``, written to be copied. ``orderflow tail`` runs it.

Each ``OrderUpdated`` carries the whole state of one order as of one ``order_version``,
so a subscriber never has to merge changes: it keeps the latest version of each order.
What it must get right, and all it must get right:

1. **Decode tolerantly.** Ignore fields you don't know (new optional fields appear without
   notice) and don't fail on a ``change`` value you don't know. Refuse a
   ``schema_version`` other than 1 rather than guess (:func:`decode_update`).
2. **Drop repeats.** Delivery is at least once: after a relay crash the same update may
   come again, with the same ``event_id``.
3. **Keep the newest.** For each order, apply an update only if its ``order_version`` is
   above the one you hold. An order's versions arrive in increasing order, so this only
   ever drops repeats and stale backfill snapshots — but it keeps step 2 safe with a
   bounded memory of event ids, and it makes replays harmless.
4. **Notice gaps.** Versions grow by exactly 1. A jump means updates were missed (for
   example, the topic's retention deleted them before they were read): ask for a backfill.

:class:`LatestOrders` does steps 2-4 in memory, which is right for a tool. A real service
keeps the versions in its own table and does step 3 in the same transaction as its write,
for example in PostgreSQL::

    INSERT INTO my_orders (id, version, status, total, ...)
    VALUES (:id, :version, :status, :total, ...)
    ON CONFLICT (id) DO UPDATE SET version = excluded.version, status = excluded.status, ...
    WHERE my_orders.version < excluded.version

— which also drops every repeat, since a repeat never has a higher version.

Decoding uses :class:`orderflow.contracts.OrderUpdated` (a msgspec struct; the same shape
is published as ``schemas/OrderUpdated.json`` for other languages). Messages are read
with aiokafka. ``follow`` either joins a consumer group (offsets are
committed, so a restart goes on where it stopped) or, without a group, reads every
partition of the topic from its beginning or its end.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from orderflow.contracts import OrderUpdated
from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import StartupError, kafka_common, start_kafka_client

#: How many recent event ids are remembered to drop repeats (repeats come soon after the
#: original; the version check catches any older one).
REMEMBERED_EVENT_IDS: Final = 100_000

_decoder: Final = msgspec.json.Decoder(OrderUpdated)
_version_only: Final = msgspec.json.Decoder(dict[str, object])


class UnreadableUpdate(ValueError):
    """A message on the updates topic that is not an ``OrderUpdated`` this code understands."""


def decode_update(value: bytes | None) -> OrderUpdated:
    """Decode one message value; unknown fields are ignored.

    Raises :class:`UnreadableUpdate` with a one-line reason: not JSON, a required field
    missing or mistyped, or a ``schema_version`` other than 1.
    """
    if value is None:
        raise UnreadableUpdate("the message has no value")
    try:
        return _decoder.decode(value)
    except msgspec.ValidationError as error:
        version = _schema_version(value)
        if version is not None and version != 1:
            raise UnreadableUpdate(
                f"schema_version {version} is not understood (this subscriber reads version 1)"
            ) from error
        raise UnreadableUpdate(f"not a valid OrderUpdated: {error}") from error
    except msgspec.DecodeError as error:
        raise UnreadableUpdate(f"not JSON: {error}") from error


def _schema_version(value: bytes) -> object:
    try:
        return _version_only.decode(value).get("schema_version")
    except msgspec.MsgspecError:
        return None


class Verdict(enum.StrEnum):
    NEW = "new"
    """A newer version of the order: apply it."""
    REPEATED = "repeated"
    """An ``event_id`` seen before: delivered again, drop it."""
    STALE = "stale"
    """Not newer than the version held (e.g. an old snapshot): drop it."""


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    update: OrderUpdated
    #: Versions skipped before this one (0 unless updates were missed).
    missed: int = 0


class LatestOrders:
    """The latest ``order_version`` of each order, and the verdict on each update."""

    def __init__(self, *, remember_event_ids: int = REMEMBERED_EVENT_IDS) -> None:
        self.versions: dict[uuid.UUID, int] = {}
        self._recent: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._remember = remember_event_ids

    def offer(self, update: OrderUpdated) -> Outcome:
        if update.event_id in self._recent:
            return Outcome(Verdict.REPEATED, update)
        self._recent[update.event_id] = None
        if len(self._recent) > self._remember:
            self._recent.popitem(last=False)
        held = self.versions.get(update.order_id)
        if held is not None and update.order_version <= held:
            return Outcome(Verdict.STALE, update)
        self.versions[update.order_id] = update.order_version
        missed = 0 if held is None else update.order_version - held - 1
        return Outcome(Verdict.NEW, update, missed)


@dataclass(slots=True)
class SubscriberStats:
    read: int = 0
    new: int = 0
    repeated: int = 0
    stale: int = 0
    #: Updates that came after a gap, and how many versions were missing in all.
    gaps: int = 0
    missed_versions: int = 0
    unreadable: int = 0
    #: Updates of orders not asked for.
    other_orders: int = 0

    def count(self, outcome: Outcome) -> None:
        if outcome.verdict is Verdict.NEW:
            self.new += 1
            if outcome.missed:
                self.gaps += 1
                self.missed_versions += outcome.missed
        elif outcome.verdict is Verdict.REPEATED:
            self.repeated += 1
        else:
            self.stale += 1


OnUpdate = Callable[[Outcome, ConsumerRecord[bytes, bytes]], None]
OnUnreadable = Callable[[ConsumerRecord[bytes, bytes], str], None]


class Subscriber:
    """Feeds records through :func:`decode_update` and :class:`LatestOrders`.

    ``orders``: only these orders (empty: all). ``on_update`` hears of every readable
    update of those orders with its verdict; ``on_unreadable`` of every message it cannot
    read (a real subscriber alerts: something it can't apply is on its topic).
    """

    def __init__(
        self,
        *,
        on_update: OnUpdate,
        on_unreadable: OnUnreadable,
        orders: Collection[uuid.UUID] = (),
    ) -> None:
        self.latest = LatestOrders()
        self.stats = SubscriberStats()
        self._orders = frozenset(orders)
        self._on_update = on_update
        self._on_unreadable = on_unreadable

    def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if self._orders and not self._wanted_key(record.key):
            self.stats.other_orders += 1
            return
        self.stats.read += 1
        try:
            update = decode_update(record.value)
        except UnreadableUpdate as error:
            self.stats.unreadable += 1
            self._on_unreadable(record, str(error))
            return
        if self._orders and update.order_id not in self._orders:
            self.stats.read -= 1
            self.stats.other_orders += 1
            return
        outcome = self.latest.offer(update)
        self.stats.count(outcome)
        self._on_update(outcome, record)

    def _wanted_key(self, key: bytes | None) -> bool:
        """Skip other orders' records by their key, without decoding the value."""
        if key is None:
            return True  # can't tell: decode it and look at order_id
        try:
            return uuid.UUID(key.decode()) in self._orders
        except (UnicodeDecodeError, ValueError):
            return True


def _consumer(settings: Settings, *, group: str | None, from_beginning: bool) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        group_id=group,
        enable_auto_commit=group is not None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(100, min(3000, settings.kafka_session_timeout_ms // 5)),
        fetch_max_wait_ms=200,
        **kafka_common(settings),
    )


async def follow(
    settings: Settings,
    subscriber: Subscriber,
    stop: asyncio.Event,
    *,
    from_beginning: bool = False,
    group: str | None = None,
    on_ready: Callable[[int], None] = lambda partitions: None,
) -> None:
    """Read ``settings.outbound_topic`` into ``subscriber`` until ``stop`` is set.

    Without ``group``: every partition of the topic, from its beginning or its end; no
    offsets are committed. With ``group``: a member of that consumer group, committing its
    offsets; ``from_beginning`` then applies only when the group has no offsets yet.
    ``on_ready`` is called with the number of partitions once reading starts.
    """
    topic = settings.outbound_topic
    consumer = _consumer(settings, group=group, from_beginning=from_beginning)
    await start_kafka_client(consumer, settings)
    try:
        try:
            if topic not in await consumer.topics():
                raise StartupError(
                    f"topic {topic!r} does not exist on Kafka at "
                    f"{settings.kafka_bootstrap_servers} (is ORDERFLOW_OUTBOUND_TOPIC right?)"
                )
            partitions = sorted(consumer.partitions_for_topic(topic) or ())
            if group is None:
                assigned = [TopicPartition(topic, partition) for partition in partitions]
                consumer.assign(assigned)
                if from_beginning:
                    await consumer.seek_to_beginning(*assigned)
                else:
                    await consumer.seek_to_end(*assigned)
            else:
                consumer.subscribe([topic])
        except KafkaError as error:
            raise StartupError(
                f"cannot read topic {topic!r} on Kafka at {settings.kafka_bootstrap_servers}: "
                f"{type(error).__name__}: {error}"
            ) from error
        on_ready(len(partitions))
        while not stop.is_set():
            # A short wait, so that a stop is noticed within a fraction of a second.
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for records in batches.values():
                for record in records:
                    subscriber.handle(record)
    finally:
        await consumer.stop()
