"""For upstream teams: publish inbound events from a file, one event, or generated load.

Every event is checked with the consumer's own decoder (:func:`consumer.events.decode_event`)
before it is sent, so what these tools accept is exactly what ``orderflow consume``
accepts; an invalid event is reported and never sent. Events are keyed by their order id
(which keeps each order's events on one partition, in order) and sent with ``acks=all``.

Sending an event twice is harmless: the consumer skips an ``event_id`` it has applied.
That is what makes an interrupted or failed import safe to simply run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Final

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from consumer.errors import RejectedEvent, SchemaViolation
from consumer.events import EventType, InboundEvent, decode_event
from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import StartupError, create_producer, start_kafka_client
from orderflow.tools.progress import RateLimiter
from orderflow.tools.samples import SampleMessage, SampleStream

#: Sends awaiting the broker's ack at most; bounds memory on a file of any size.
MAX_IN_FLIGHT: Final = 2000
#: Lines validated between two chances for Ctrl-C (and the progress bar) to be noticed.
_YIELD_EVERY: Final = 500
_BYTE_ORDER_MARK: Final = b"\xef\xbb\xbf"
_PATH_SUFFIX: Final = re.compile(r" - at `(\$[^`]*)`$")
_GENERIC_PREFIX: Final = re.compile(r"^invalid (event|\w+ payload): ")


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one line (or event) would be dead-lettered, so it is not sent."""

    line: int
    reason: str
    message: str

    def render(self) -> str:
        """``line 17: $.payload.lines[0].quantity: Expected `int` >= 1 (schema_violation)``."""
        return f"line {self.line}: {self.message} ({self.reason})"


def explain(error: RejectedEvent) -> str:
    """The consumer's message with the JSON path first, when it names one."""
    text = error.message
    match = _PATH_SUFFIX.search(text)
    if match is None:
        return text
    return f"{match.group(1)}: {_GENERIC_PREFIX.sub('', text[: match.start()])}"


def check_event(value: bytes, max_bytes: int) -> InboundEvent:
    """Decode ``value`` exactly as the consumer would, or raise its ``RejectedEvent``.

    The key is not checked: these tools derive it from the event's ``order_id``.
    """
    return decode_event(None, value, max_bytes=max_bytes)


def order_key(event: InboundEvent) -> bytes:
    """The Kafka key of an inbound event: its order id as UTF-8 text (the contract)."""
    return str(event.order_id).encode()


@dataclass(frozen=True, slots=True)
class Line:
    """One non-blank line of a JSON Lines file, without its line end.

    ``value`` is None when the line is longer than the size limit: its bytes were skipped,
    not kept, so a file with a huge line can't exhaust memory.
    """

    number: int
    value: bytes | None


def read_lines(stream: IO[bytes], max_bytes: int) -> Iterator[Line]:
    """The non-blank lines of ``stream``, numbered from 1 as an editor shows them.

    Whitespace around a line, ``\\r\\n`` line ends and a UTF-8 byte-order mark at the start
    of the file are not part of the event.
    """
    number = 0
    while True:
        raw = stream.readline(max_bytes + 2)
        if not raw:
            return
        number += 1
        if number == 1 and raw.startswith(_BYTE_ORDER_MARK):
            raw = raw[len(_BYTE_ORDER_MARK) :]
        if not raw.endswith(b"\n") and len(raw) >= max_bytes + 2:
            while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                raw = stream.readline(65536)
            yield Line(number, None)
            continue
        value = raw.strip()
        if value:
            yield Line(number, value if len(value) <= max_bytes else None)


def validate_line(line: Line, max_bytes: int) -> InboundEvent | Rejection:
    if line.value is None:
        return Rejection(
            line.number,
            SchemaViolation.reason.value,
            f"the line is over the limit of {max_bytes:,} bytes (ORDERFLOW_MAX_MESSAGE_BYTES)",
        )
    try:
        return check_event(line.value, max_bytes)
    except RejectedEvent as error:
        return Rejection(line.number, error.reason.value, explain(error))


@dataclass(slots=True)
class Validation:
    """The outcome of the validation pass over a file."""

    valid: int = 0
    rejected: int = 0
    #: The first rejections, in line order (at most what is shown).
    rejections: list[Rejection] = field(default_factory=list)
    interrupted: bool = False


async def validate_file(
    stream: IO[bytes],
    max_bytes: int,
    *,
    on_rejection: Callable[[Rejection], None],
    on_line: Callable[[], None],
    stop: asyncio.Event,
) -> Validation:
    """Check every line; ``on_rejection`` hears of each invalid one as it is found."""
    outcome = Validation()
    for index, line in enumerate(read_lines(stream, max_bytes)):
        if index % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
            if stop.is_set():
                outcome.interrupted = True
                break
        checked = validate_line(line, max_bytes)
        if isinstance(checked, Rejection):
            outcome.rejected += 1
            on_rejection(checked)
        else:
            outcome.valid += 1
        on_line()
    return outcome


# --------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------


class PublishFailed(Exception):
    """The broker did not acknowledge an event; the message is the one line to print."""


class Publisher:
    """Sends events keyed by order id with ``acks=all``, at most ``rate`` per second.

    Sends are pipelined (up to :data:`MAX_IN_FLIGHT` awaiting their ack); each partition's
    messages still go out in the order they were handed over, so an order's events keep
    their order. ``published`` counts acknowledged events only.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, rate: float | None) -> None:
        self._producer = producer
        self.topic = topic
        self._limiter = RateLimiter(rate)
        self._pending: deque[tuple[str, asyncio.Future[RecordMetadata]]] = deque()
        self.published = 0
        self.on_published: Callable[[], None] = lambda: None

    async def send(self, key: bytes | None, value: bytes | None, *, label: str) -> None:
        """Hand one event over; ``label`` names it in an error (``line 17``)."""
        await self._limiter.acquire()
        try:
            delivery = await self._producer.send(self.topic, value=value, key=key)
        except KafkaError as error:
            raise PublishFailed(
                f"{label}: Kafka refused the event: {_kafka_reason(error)}"
            ) from error
        self._pending.append((label, delivery))
        while self._pending and (self._pending[0][1].done() or len(self._pending) > MAX_IN_FLIGHT):
            await self._settle_oldest()

    async def flush(self) -> None:
        """Wait for every ack; raise :class:`PublishFailed` for the first event not acked."""
        failure: PublishFailed | None = None
        while self._pending:
            try:
                await self._settle_oldest()
            except PublishFailed as error:
                failure = failure or error
        if failure is not None:
            raise failure

    async def _settle_oldest(self) -> None:
        label, delivery = self._pending.popleft()
        try:
            await delivery
        except KafkaError as error:
            raise PublishFailed(
                f"{label}: not acknowledged by Kafka: {_kafka_reason(error)}"
            ) from error
        self.published += 1
        self.on_published()

    async def abandon(self) -> None:
        """After a failure: wait for what is in flight (counting what still got through)."""
        with contextlib.suppress(PublishFailed):
            await self.flush()


def _kafka_reason(error: KafkaError) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.asynccontextmanager
async def open_producer(settings: Settings, topic: str) -> AsyncIterator[AIOKafkaProducer]:
    """A started producer (acks=all; idempotent unless the broker can't), ``topic`` checked."""
    producer = create_producer(settings)
    await start_kafka_client(producer, settings)
    try:
        try:
            await producer.partitions_for(topic)
        except KafkaError as error:
            raise StartupError(
                f"topic {topic!r} is not available on Kafka at {settings.kafka_bootstrap_servers} "
                f"({_kafka_reason(error)}); create it with `orderflow topics create`"
            ) from error
        yield producer
    finally:
        await producer.stop()


async def publish_one(settings: Settings, value: bytes) -> tuple[InboundEvent, RecordMetadata]:
    """Validate and send one event; wait for its ack. Raises ``RejectedEvent`` if invalid."""
    event = check_event(value, settings.max_message_bytes)
    async with open_producer(settings, settings.inbound_topic) as producer:
        try:
            metadata = await producer.send_and_wait(
                settings.inbound_topic, value=value, key=order_key(event)
            )
        except KafkaError as error:
            raise PublishFailed(f"not acknowledged by Kafka: {_kafka_reason(error)}") from error
    return event, metadata


# --------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------

_FINAL_EVENTS: Final = {EventType.ORDER_DELIVERED.value, EventType.ORDER_CANCELLED.value}


@dataclass(slots=True)
class LoadCounts:
    orders: int = 0
    events: int = 0
    duplicates: int = 0
    poison: int = 0


def order_lifecycles(
    stream: SampleStream, orders: int | None, counts: LoadCounts
) -> Iterator[SampleMessage]:
    """The stream's messages for at most ``orders`` orders, each to the end of its life.

    Orders are interleaved as in real traffic. With ``orders`` set the generator ends once
    every admitted order is delivered or cancelled, or (with mistakes mixed in) has had its
    mistake. Mistakes that concern no admitted order (malformed bytes, unknown types or
    orders) pass through as they come.
    """
    admitted: set[uuid.UUID] = set()
    open_orders: set[uuid.UUID] = set()
    for message in stream:
        if orders is not None and len(admitted) >= orders and not open_orders:
            return
        order_id = message.order_id
        if message.expect == "event":
            assert order_id is not None
            assert message.value is not None
            event_type = _event_type(message.value)
            if order_id not in admitted:
                if event_type != EventType.ORDER_PLACED.value:
                    continue  # an order that was not admitted
                if orders is not None and len(admitted) >= orders:
                    continue
                admitted.add(order_id)
                open_orders.add(order_id)
                counts.orders += 1
            if event_type in _FINAL_EVENTS:
                open_orders.discard(order_id)
            counts.events += 1
        elif message.expect == "duplicate":
            if order_id not in admitted:
                continue
            counts.duplicates += 1
        else:
            if order_id in admitted:
                open_orders.discard(order_id)  # its lifecycle ends with this mistake
            counts.poison += 1
        yield message


def _event_type(value: bytes) -> str:
    event = decode_event(None, value)
    return event.event_type.value


def sample_stream(seed: int, *, orders: int | None, faults: int) -> SampleStream:
    """Sample traffic stamped with the current time; ``faults``: every n-th a mistake."""
    open_orders = 20 if orders is None else max(1, min(orders, 20))
    return SampleStream(
        seed, open_orders=open_orders, fault_every=faults, clock=lambda: datetime.now(UTC)
    )


@dataclass(slots=True)
class LoadRun:
    """What ``orderflow loadgen`` did."""

    seed: int
    counts: LoadCounts
    published: int = 0
    interrupted: bool = False


async def generate_load(
    settings: Settings,
    *,
    seed: int,
    rate: float | None,
    orders: int | None,
    duration: float | None,
    faults: int,
    stop: asyncio.Event,
    on_published: Callable[[], None],
) -> LoadRun:
    """Publish sample order lifecycles to the inbound topic until one of the limits is hit.

    Stops after ``orders`` complete lifecycles, after ``duration`` seconds, or when
    ``stop`` is set, whichever comes first; waits for every ack before returning.
    """
    run = LoadRun(seed, LoadCounts())
    messages = order_lifecycles(
        sample_stream(seed, orders=orders, faults=faults), orders, run.counts
    )
    loop = asyncio.get_running_loop()
    async with open_producer(settings, settings.inbound_topic) as producer:
        publisher = Publisher(producer, settings.inbound_topic, rate)
        publisher.on_published = on_published
        deadline = None if duration is None else loop.time() + duration
        sent = 0
        try:
            while True:
                if stop.is_set():
                    run.interrupted = True
                    break
                if deadline is not None and loop.time() >= deadline:
                    break
                message = next(messages, None)
                if message is None:
                    break
                sent += 1
                await publisher.send(message.key, message.value, label=f"message {sent}")
            await publisher.flush()
        except PublishFailed:
            await publisher.abandon()
            raise
        finally:
            run.published = publisher.published
    return run
