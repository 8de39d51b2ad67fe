"""An interleaving harness for the relay, on a real PostgreSQL and a real broker.

The relays are the real ``outbox.relay.Relay`` loop with its real statements; only its
waits are taken over. Each relay stops at *gates* (before a claim round, a floor round, a
fetch, the fencing round trip, a mark, before it looks at a batch's acks, and wherever
it would sleep), and runs on only when the scheduler lets it. Writers are transactions
on their own connections that add outbox rows through ``add_messages``, as the consumer
does. The producer holds every record batch the relay hands it until the scheduler
delivers it to the broker (and acks it), fails it, or delivers it and loses the ack.
Time is the scheduler's too: the relay's rounds are timed by a clock that moves only
when the scheduler says so.

So a schedule is a sequence of steps — begin, take a transaction id, insert rows of
chosen keys, commit or roll back, hold open; let a relay fetch, move its floor, send,
mark; deliver, fail or reorder acks; end a relay's session; wake a relay; let time pass;
start a second relay — and after each one the checks that matter are made:

- no row is marked published before the broker acknowledged it to that relay;
- no relay hands a record batch to the producer once its session has ended (the fence);
- once every writer has ended and the relays have drained, every committed row is
  published, and for every key the first occurrences on the topic are in id order.

``run_schedules`` draws schedules from a seeded random generator (one seed a schedule, so
a failure is reproduced by its seed); ``Script`` drives the same pieces step by step for
the tests of a single interleaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import create_engine, session_factory
from outbox import OutboxMessage, add_messages
from outbox.relay import Relay, RelayConfig, _InFlight, _Outgoing

#: Small record batches (a few rows each), so that a partition's share of a relay batch
#: fills one and the relay must cut the batch short.
RECORD_BATCH_BYTES = 1024
PAYLOAD_BYTES = 300
#: How long a relay may take from one gate to the next (real statements on a real
#: server) before the harness reports it stuck.
STEP_SECONDS = 30.0


class HarnessError(AssertionError):
    """The harness could not go on (a relay stuck outside a gate, say)."""


@dataclass
class Clock:
    now: float = 1000.0


class Gate:
    """Where a relay waits for the scheduler: ``waiting`` names the step it would take."""

    def __init__(self) -> None:
        self.waiting: str | None = None
        self.detail: Any = None
        self._arrived = asyncio.Event()
        self._go: asyncio.Future[None] | None = None

    async def arrive(self, step: str, detail: Any = None) -> None:
        go = self._go = asyncio.get_running_loop().create_future()
        self.waiting, self.detail = step, detail
        self._arrived.set()
        try:
            await go
        finally:
            if self._go is go:  # cancelled while waiting
                self.waiting, self.detail, self._go = None, None, None
                self._arrived.clear()

    def release(self) -> None:
        assert self._go is not None, "no relay waits at this gate"
        go = self._go
        self.waiting, self.detail, self._go = None, None, None
        self._arrived.clear()
        go.set_result(None)

    async def arrived(self) -> None:
        await self._arrived.wait()


@dataclass
class HeldSend:
    """A record batch a relay handed to the producer, held until the scheduler decides."""

    relay: HarnessRelay
    topic: str
    partition: int
    builder: BatchBuilder
    ids: list[int]
    future: asyncio.Future[Any]
    #: The relay batch it belongs to (its first row id).
    batch: int
    outcome: str = "held"  # then "delivered", "failed" or "ack lost"


class HeldProducer:
    """The relay's producer: builds batches with the real one, holds what it is handed."""

    def __init__(self, harness: Harness, relay: HarnessRelay) -> None:
        self._harness = harness
        self._relay = relay

    def create_batch(self) -> BatchBuilder:
        return self._harness.kafka.create_batch()

    async def partitions_for(self, topic: str) -> set[int]:
        refusal = self._harness.unplaceable.get(topic)
        if refusal is not None:
            raise refusal
        return set(await self._harness.kafka.partitions_for(topic))

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        return self._harness.hold(self._relay, batch, topic, partition)


class HarnessRelay(Relay):
    """The real relay, with its waits and its clock taken over by the harness."""

    def __init__(self, harness: Harness, name: str, config: RelayConfig) -> None:
        self.harness = harness
        self.name = name
        self.engine = create_engine(harness.settings, pool_size=1)
        super().__init__(self.engine, HeldProducer(harness, self), config)
        self.gate = Gate()
        self.stop = asyncio.Event()
        #: The backend pid of the session the relay serves through (None: not connected).
        self.pid: int | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(self.stop), name=self.name)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    # -- the seams -------------------------------------------------------------------------

    def _now(self) -> float:
        return self.harness.clock.now

    async def _listen(self, connection: AsyncConnection) -> None:
        # No LISTEN: the scheduler decides when a relay is woken ("notify").
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        self.pid = int(driver.get_server_pid())

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        await self.gate.arrive("idle")

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        await self.gate.arrive("backoff")

    async def _claim(self, connection: AsyncConnection) -> None:
        await self.gate.arrive("claim")
        await super()._claim(connection)

    async def _advance_floor(self, connection: AsyncConnection) -> None:
        await self.gate.arrive("floor")
        await super()._advance_floor(connection)

    async def _fetch(self, connection: AsyncConnection, in_flight: Sequence[int]) -> Any:
        await self.gate.arrive("fetch")
        return await super()._fetch(connection, in_flight)

    async def _probe(self, connection: AsyncConnection) -> None:
        await self.gate.arrive("probe")
        await super()._probe(connection)

    async def _send(self, outgoing: _Outgoing) -> _InFlight:
        self.harness.expect(self, outgoing)
        return await super()._send(outgoing)

    async def _acknowledged(self, batch: _InFlight) -> bool:
        await self.gate.arrive("ack", batch)
        acknowledged = await super()._acknowledged(batch)
        if acknowledged:
            self.harness.acknowledged(self, batch.ids)
        return acknowledged

    async def _mark(self, connection: AsyncConnection, batch: _InFlight) -> None:
        await self.gate.arrive("mark", batch)
        self.harness.check_mark(self, batch.ids)
        await super()._mark(connection, batch)

    async def _settle(self, connection: AsyncConnection, batch: _InFlight) -> None:
        await self.gate.arrive("settle", batch)
        await super()._settle(connection, batch)


@dataclass
class Writer:
    """One writer transaction, on a connection of its own."""

    name: str
    session: AsyncSession
    has_xid: bool = False
    #: Keys written in this transaction: no other writer may write them until it ends
    #: (the consumer holds the order's row lock for as long).
    keys: set[bytes] = field(default_factory=set)
    tokens: list[str] = field(default_factory=list)


@dataclass
class Row:
    token: str
    key: bytes
    id: int
    committed: bool = False


class Harness:
    """Relays, writers and held record batches for one database and one topic."""

    def __init__(
        self,
        settings: Settings,
        kafka: AIOKafkaProducer,
        topic: str,
        log_end: dict[int, int] | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.topic = topic
        self.clock = Clock()
        self.engine = create_engine(settings, pool_size=8)
        self.sessions: async_sessionmaker[AsyncSession] = session_factory(self.engine)
        self.partitioner = DefaultPartitioner()
        self.partitions: list[int] = []
        self.relays: list[HarnessRelay] = []
        self.writers: list[Writer] = []
        self.held: list[HeldSend] = []
        self.rows: dict[str, Row] = {}
        self.violations: list[str] = []
        #: Topics the producer cannot place a message in, and what it raises for them.
        self.unplaceable: dict[str, Exception] = {}
        #: What the broker appended: partition -> end offset (one past the last record).
        self.log_end: dict[int, int] = log_end if log_end is not None else {}
        self._expected: dict[int, tuple[list[int], int]] = {}
        self._acked: dict[str, set[int]] = defaultdict(set)
        self._ended_sessions: set[int] = set()
        self._names = itertools.count(1)
        self._admin: asyncpg.Connection | None = None

    async def open(self) -> None:
        self.partitions = sorted(await self.kafka.partitions_for(self.topic))
        self._admin = await asyncpg.connect(_plain(self.settings.database_url))

    async def reset(self) -> None:
        """Start from an empty outbox (rows of earlier schedules are gone)."""
        assert self._admin is not None
        await self._admin.execute("TRUNCATE outbox_messages, outbox_pending, outbox_throughput")

    async def close(self) -> None:
        for writer in self.writers:
            await writer.session.close()
        self.writers.clear()
        if self._admin is not None:
            await self._admin.close()
        await self.engine.dispose()

    # -- bookkeeping of sends ----------------------------------------------------------------

    def partition_of(self, key: bytes | None) -> int:
        return int(self.partitioner(key, self.partitions, self.partitions))

    def expect(self, relay: HarnessRelay, outgoing: _Outgoing) -> None:
        """Note which row ids each record batch of ``outgoing`` carries (in hand-over
        order, a partition's rows go to its record batches in turn)."""
        pending: dict[int, list[int]] = defaultdict(list)
        for row in outgoing.rows:
            pending[self.partition_of(row.key)].append(row.id)
        first = outgoing.rows[0].id
        for _topic, partition, builder in outgoing.record_batches:
            count = builder.record_count()
            ids, pending[partition] = pending[partition][:count], pending[partition][count:]
            self._expected[id(builder)] = (ids, first)

    def hold(
        self, relay: HarnessRelay, builder: BatchBuilder, topic: str, partition: int
    ) -> asyncio.Future[Any]:
        if relay.pid is None or relay.pid in self._ended_sessions:
            self.violations.append(
                f"{relay.name} handed a record batch to the producer after its session "
                f"(pid {relay.pid}) ended"
            )
        ids, batch = self._expected.pop(id(builder))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.held.append(HeldSend(relay, topic, partition, builder, ids, future, batch))
        return future

    def heads(self) -> list[HeldSend]:
        """The held sends that may be settled next: a producer settles a partition's
        record batches in the order it was handed them."""
        seen: set[tuple[str, str, int]] = set()
        heads = []
        for send in self.held:
            lane = (send.relay.name, send.topic, send.partition)
            if lane not in seen:
                seen.add(lane)
                heads.append(send)
        return heads

    async def settle(self, send: HeldSend, outcome: str) -> None:
        """Deliver ``send`` to the broker and ack it, fail it, or deliver it and fail it
        ("ack lost": appended, but the relay is told it failed)."""
        self.held.remove(send)
        send.outcome = outcome
        if outcome in ("delivered", "ack lost"):
            delivery = await self.kafka.send_batch(
                send.builder, send.topic, partition=send.partition
            )
            metadata = await delivery
            end = metadata.offset + len(send.ids)
            self.log_end[send.partition] = max(self.log_end.get(send.partition, 0), end)
        if outcome == "delivered":
            send.future.set_result(None)
        else:
            send.future.set_exception(KafkaTimeoutError(f"no ack ({outcome}, harness)"))

    def acknowledged(self, relay: HarnessRelay, ids: Sequence[int]) -> None:
        self._acked[relay.name].update(ids)

    def check_mark(self, relay: HarnessRelay, ids: Sequence[int]) -> None:
        unacked = sorted(set(ids) - self._acked[relay.name])
        if unacked:
            self.violations.append(f"{relay.name} marks rows {unacked} it got no ack for")

    # -- relays ----------------------------------------------------------------------------

    def add_relay(self, config: RelayConfig, *, seed: object = 0) -> HarnessRelay:
        relay = HarnessRelay(self, f"relay-{len(self.relays) + 1}", config)
        relay._random.seed(f"{seed}/{relay.name}")  # where its claim rounds start
        self.relays.append(relay)
        relay.start()
        return relay

    async def quiesce(self) -> None:
        """Until every relay waits at a gate or has ended."""
        for relay in self.relays:
            assert relay.task is not None
            if relay.task.done() or relay.gate.waiting is not None:
                continue
            arrived = asyncio.ensure_future(relay.gate.arrived())
            try:
                done, _ = await asyncio.wait(
                    {arrived, relay.task}, timeout=STEP_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                arrived.cancel()
            if not done:
                raise HarnessError(f"{relay.name} reached no gate within {STEP_SECONDS} s")
            if relay.task.done() and not relay.task.cancelled() and relay.task.exception():
                raise HarnessError(f"{relay.name} failed") from relay.task.exception()

    def may_release(self, relay: HarnessRelay) -> bool:
        """Whether ``relay``'s next step can be taken now (a batch's acks are looked at
        only once all of its record batches are settled)."""
        if relay.gate.waiting is None:
            return False
        if relay.gate.waiting in ("ack", "settle"):
            batch: _InFlight = relay.gate.detail
            return not any(send.relay is relay and send.batch == batch.ids[0] for send in self.held)
        return True

    async def release(self, relay: HarnessRelay) -> None:
        relay.gate.release()
        await self.quiesce()

    async def run_until(self, relay: HarnessRelay, step: str, *, limit: int = 100) -> None:
        """Release ``relay`` until it waits at ``step``, delivering what it sends."""
        await self.quiesce()
        for _ in range(limit):
            if relay.gate.waiting == step:
                return
            mine = [send for send in self.heads() if send.relay is relay]
            if not self.may_release(relay) and mine:
                await self.settle(mine[0], "delivered")
                continue
            if not self.may_release(relay):
                raise HarnessError(f"{relay.name} waits at {relay.gate.waiting}, not {step}")
            await self.release(relay)
        raise HarnessError(f"{relay.name} did not reach {step} in {limit} steps")

    async def end_session(self, relay: HarnessRelay) -> None:
        """Terminate the relay's database session (and wait until its backend is gone)."""
        assert self._admin is not None
        assert relay.pid is not None
        await self._admin.execute("SELECT pg_terminate_backend($1, 10000)", relay.pid)
        self._ended_sessions.add(relay.pid)

    def session_alive(self, relay: HarnessRelay) -> bool:
        return relay.pid is not None and relay.pid not in self._ended_sessions

    async def stop_relays(self) -> None:
        """Stop every relay: settle what they send, release them until ``run`` returns."""
        for relay in self.relays:
            relay.stop.set()
        for _ in range(10_000):
            await self.quiesce()
            if not any(relay.running for relay in self.relays):
                break
            if self.held:
                await self.settle(self.held[0], "delivered")
                continue
            for relay in self.relays:
                if relay.running and self.may_release(relay):
                    relay.gate.release()
        else:
            raise HarnessError("the relays did not stop")
        for relay in self.relays:
            assert relay.task is not None
            with contextlib.suppress(Exception):
                relay.task.result()
            await relay.engine.dispose()
        self.relays.clear()

    # -- writers ---------------------------------------------------------------------------

    def begin(self) -> Writer:
        writer = Writer(f"writer-{next(self._names)}", self.sessions())
        self.writers.append(writer)
        return writer

    async def take_xid(self, writer: Writer) -> None:
        if not writer.session.in_transaction():
            await writer.session.begin()
        await writer.session.execute(text("SELECT pg_current_xact_id()"))
        writer.has_xid = True

    def free_keys(self, keys: Sequence[bytes], writer: Writer) -> list[bytes]:
        """The keys ``writer`` may write: its own, and those no open writer holds."""
        held = set().union(*(other.keys for other in self.writers if other is not writer))
        return [key for key in keys if key not in held]

    async def insert(self, writer: Writer, keys: Sequence[bytes]) -> list[Row]:
        if not writer.session.in_transaction():
            await writer.session.begin()
        assert set(self.free_keys(keys, writer)) == set(keys), "a key another writer holds"
        tokens = [uuid.uuid4().hex for _ in keys]
        await add_messages(
            writer.session,
            [
                OutboxMessage(
                    self.topic,
                    key,
                    token.encode().ljust(PAYLOAD_BYTES, b"."),
                    (("token", token),),
                )
                for key, token in zip(keys, tokens, strict=True)
            ],
        )
        found = await writer.session.execute(
            text(
                "SELECT id, convert_from(rtrim(payload, '.'), 'UTF8') FROM outbox_messages "
                "WHERE rtrim(payload, '.') = ANY(CAST(:tokens AS bytea[]))"
            ),
            {"tokens": [token.encode() for token in tokens]},
        )
        ids = dict((token, row_id) for row_id, token in found)
        rows = [Row(token, key, ids[token]) for key, token in zip(keys, tokens, strict=True)]
        for row in rows:
            self.rows[row.token] = row
        writer.keys.update(keys)
        writer.tokens += tokens
        writer.has_xid = True
        return rows

    async def commit(self, writer: Writer) -> None:
        await writer.session.commit()
        for token in writer.tokens:
            self.rows[token].committed = True
        await self._end(writer)

    async def roll_back(self, writer: Writer) -> None:
        await writer.session.rollback()
        for token in writer.tokens:
            del self.rows[token]
        await self._end(writer)

    async def _end(self, writer: Writer) -> None:
        await writer.session.close()
        self.writers.remove(writer)

    async def drain(self, *, patience: float = 30.0) -> None:
        """Run the relays until every committed row is published: settle what they send
        (delivered), take their steps, and let time pass while they wait idle. Once the
        clock has moved ``patience`` seconds with the relays idle, nothing held and no
        progress, a committed row is stranded: that is a violation."""
        assert not self.writers, "end the writers first"
        last: list[int] | None = None
        since = self.clock.now
        for _ in range(10_000):
            await self.quiesce()
            if self.held:
                await self.settle(self.held[0], "delivered")
                continue
            busy = [
                relay
                for relay in self.relays
                if relay.running and relay.gate.waiting != "idle" and self.may_release(relay)
            ]
            if busy:
                await self.release(busy[0])
                continue
            waiting = await self.unpublished()
            if not waiting:
                return
            if waiting != last:
                last, since = waiting, self.clock.now
            elif self.clock.now - since > patience:
                self.violations.append(f"committed rows {waiting} are never published")
                return
            self.clock.now += 1.0
            for relay in self.relays:
                if relay.running and relay.gate.waiting == "idle":
                    relay.gate.release()
        self.violations.append("the drain did not end")

    # -- outcome ---------------------------------------------------------------------------

    async def unpublished(self) -> list[int]:
        assert self._admin is not None
        records = await self._admin.fetch("SELECT id FROM outbox_pending ORDER BY id")
        return [record[0] for record in records]

    async def check_topic(self, reader: AIOKafkaConsumer, start: dict[int, int]) -> None:
        """Read what this schedule appended (from ``start`` to the log end) and check it:
        every committed row is there, and each key's first occurrences are in id order."""
        by_token = {row.token: row for row in self.rows.values()}
        sequences: dict[bytes, list[int]] = defaultdict(list)
        for partition in self.partitions:
            end = self.log_end.get(partition, 0)
            if end <= start.get(partition, 0):
                continue
            tp = TopicPartition(self.topic, partition)
            reader.seek(tp, start.get(partition, 0))
            position = start.get(partition, 0)
            while position < end:
                batch = await reader.getmany(tp, timeout_ms=2000)
                records = batch.get(tp, [])
                if not records:
                    raise HarnessError(f"partition {partition}: read to {position} of {end}")
                for record in records:
                    if record.offset >= end:
                        break
                    token = dict(record.headers)["token"].decode()
                    row = by_token.get(token)
                    if row is None:
                        self.violations.append(f"offset {record.offset}: a row never committed")
                    else:
                        assert record.key is not None
                        sequences[record.key].append(row.id)
                position = records[-1].offset + 1
        committed: dict[bytes, list[int]] = defaultdict(list)
        for row in self.rows.values():
            if row.committed:
                committed[row.key].append(row.id)
        for key, ids in sorted(committed.items()):
            firsts = list(dict.fromkeys(sequences.get(key, [])))
            if firsts != sorted(ids):
                self.violations.append(
                    f"key {key.decode()}: first occurrences on the topic {firsts}, "
                    f"committed {sorted(ids)}"
                )


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


# -- random schedules ------------------------------------------------------------------------


@dataclass
class Outcome:
    seed: int
    steps: int
    violations: list[str]


Action = Callable[[], Awaitable[None]]


class RandomSchedule:
    """One schedule drawn from ``seed``: a random phase, then a drain, then the checks."""

    def __init__(self, harness: Harness, seed: int, *, steps: int) -> None:
        self.harness = harness
        self.seed = seed
        self.rng = random.Random(seed)
        self.steps = steps
        self.keys = [f"s{seed}-k{i}".encode() for i in range(self.rng.randint(3, 12))]
        self.config = RelayConfig(
            batch_size=self.rng.choice([1, 2, 3, 5, 8]),
            poll_interval=1.0,
            claim_interval=2.0,
            # 0: a floor round every time round the loop (in real time, many turns fit in
            # one floor interval, so any two of them may be consecutive floor rounds).
            floor_interval=self.rng.choice([0.0, 0.0, 0.25]),
            prune_interval=10.0**9,
        )
        self.weights = _swarm(self.rng)
        #: Most writers open at once.
        self.writers = self.rng.randint(2, 4)
        #: How often a writer takes its transaction id as it begins, before any outbox
        #: row, as the consumer does (its first statement locks the order rows).
        self.early_xid = self.rng.choice([0.0, 0.5, 1.0])
        #: Whether steps come in phases (see ``step``).
        self.phases = self.rng.random() < 0.5
        self.writing = True
        self.taken = 0

    def actions(self, *, draining: bool) -> list[tuple[float, str, str, Action]]:
        harness = self.harness
        rng = self.rng
        weight = self.weights
        choices: list[tuple[float, str, str, Action]] = []

        def offer(kind: str, label: str, action: Action) -> None:
            if weight.get(kind, 0.0) > 0.0:
                choices.append((weight[kind], kind, label, action))

        for relay in harness.relays:
            if relay.running and harness.may_release(relay):
                label = f"{relay.name} {relay.gate.waiting}"
                offer("release", label, _bind(harness.release, relay))
        for send in harness.heads():
            label = f"{send.relay.name} p{send.partition} {send.ids}"
            offer("deliver", f"deliver {label}", _bind(harness.settle, send, "delivered"))
            if not draining:
                offer("fail", f"fail {label}", _bind(harness.settle, send, "failed"))
                offer("lose ack", f"lose ack {label}", _bind(harness.settle, send, "ack lost"))
        for writer in list(harness.writers):
            if draining:
                end = harness.commit if rng.random() < 0.85 else harness.roll_back
                choices.append((4.0, "commit", f"{writer.name} ends", _bind(end, writer)))
                continue
            if not writer.has_xid:
                offer("xid", f"{writer.name} xid", _bind(harness.take_xid, writer))
            free = harness.free_keys(self.keys, writer)
            if free:
                keys = [rng.choice(free) for _ in range(rng.randint(1, 2))]
                offer("insert", f"{writer.name} insert", _bind(harness.insert, writer, keys))
            offer("commit", f"{writer.name} commit", _bind(harness.commit, writer))
            offer("rollback", f"{writer.name} rollback", _bind(harness.roll_back, writer))
        if not draining and len(harness.writers) < self.writers:
            offer("begin", "begin", self._begin)
        for relay in harness.relays:
            if relay.running:
                offer("notify", f"notify {relay.name}", _bind(self._notify, relay))
            if not draining and relay.running and harness.session_alive(relay):
                label = f"end {relay.name}'s session"
                offer("end session", label, _bind(harness.end_session, relay))
        if not draining and len(harness.relays) < 2:
            offer("second relay", "start a second relay", self._second_relay)
        offer("time", "time passes", self._time_passes)
        return choices

    async def _begin(self) -> None:
        writer = self.harness.begin()
        if self.rng.random() < self.early_xid:
            await self.harness.take_xid(writer)

    async def _notify(self, relay: HarnessRelay) -> None:
        relay._wake.set()

    async def _time_passes(self) -> None:
        self.harness.clock.now += self.rng.choice([0.1, 0.3, 1.0, 2.1])

    async def _second_relay(self) -> None:
        self.harness.add_relay(self.config, seed=self.seed)
        await self.harness.quiesce()

    async def step(self, *, draining: bool) -> str:
        await self.harness.quiesce()
        choices = self.actions(draining=draining)
        if self.phases and not draining:
            # Runs of writer steps, then of relay and broker steps: a writer phase is a
            # stretch in which nothing is published, the other a stretch with no writer.
            if self.rng.random() < 0.1:
                self.writing = not self.writing
            phase = [choice for choice in choices if (choice[1] in _WRITER_STEPS) == self.writing]
            choices = phase or choices
        weights = [weight for weight, _, _, _ in choices]
        _, _, label, action = self.rng.choices(choices, weights)[0]
        await action()
        self.taken += 1
        return label

    async def run(self, reader: AIOKafkaConsumer) -> Outcome:
        harness = self.harness
        start = dict(harness.log_end)
        harness.add_relay(self.config, seed=self.seed)
        await harness.quiesce()
        trail: list[str] = []
        for _ in range(self.steps):
            trail.append(await self.step(draining=False))
            if harness.violations:
                break
        if not harness.violations:
            await self._drain(trail)
        await harness.stop_relays()
        if not harness.violations:
            await harness.check_topic(reader, start)
        violations = list(harness.violations)
        if violations:
            violations.append("steps: " + " | ".join(trail[-80:]))
        return Outcome(self.seed, self.taken, violations)

    async def _drain(self, trail: list[str]) -> None:
        """End every writer (most commit), still interleaved with the relays; then drain."""
        while self.harness.writers:
            trail.append(await self.step(draining=True))
        await self.harness.drain()


#: Each kind of step, with its weight. A schedule scales every weight by its own random
#: factor and leaves out some of the optional kinds altogether ("swarm testing"): a
#: schedule without session ends or a second relay, or with writers that take their
#: transaction ids early, reaches corners a mix of everything rarely does.
_CORE_STEPS = {
    "release": 8.0,
    "deliver": 5.0,
    "insert": 4.0,
    "begin": 3.0,
    "commit": 1.5,
    "time": 2.0,
}
_OPTIONAL_STEPS = {
    "xid": 2.0,
    "notify": 1.0,
    "fail": 1.0,
    "lose ack": 0.5,
    "rollback": 0.5,
    "end session": 0.3,
    "second relay": 0.3,
}


#: Session ends and a second relay reset the scan floor: with them in every schedule, the
#: floor would rarely get far enough to pass a row it must not.
_OPTIONAL_ODDS = {"end session": 0.3, "second relay": 0.3}
_WRITER_STEPS = frozenset({"begin", "xid", "insert", "commit", "rollback"})


def _swarm(rng: random.Random) -> dict[str, float]:
    weights = {kind: weight * 2.0 ** rng.uniform(-1, 1) for kind, weight in _CORE_STEPS.items()}
    for kind, weight in _OPTIONAL_STEPS.items():
        if rng.random() < _OPTIONAL_ODDS.get(kind, 0.5):
            weights[kind] = weight * 2.0 ** rng.uniform(-1, 1)
    return weights


def _bind(function: Callable[..., Awaitable[Any]], *arguments: Any) -> Action:
    async def bound() -> None:
        await function(*arguments)

    return bound


@contextlib.asynccontextmanager
async def kafka_for(
    settings: Settings, topic: str
) -> AsyncIterator[tuple[AIOKafkaProducer, AIOKafkaConsumer]]:
    """The real producer the held record batches go out through, and a reader of ``topic``
    (its partitions assigned, no group)."""
    kafka = AIOKafkaProducer(
        bootstrap_servers=settings.require_kafka(),
        enable_idempotence=False,
        acks="all",
        linger_ms=0,
        max_batch_size=RECORD_BATCH_BYTES,
    )
    reader = AIOKafkaConsumer(
        bootstrap_servers=settings.require_kafka(),
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="none",
    )
    await kafka.start()
    try:
        await reader.start()
        try:
            partitions = await kafka.partitions_for(topic)
            reader.assign([TopicPartition(topic, partition) for partition in sorted(partitions)])
            yield kafka, reader
        finally:
            await reader.stop()
    finally:
        await kafka.stop()


@contextlib.asynccontextmanager
async def harness_for(
    settings: Settings, kafka: AIOKafkaProducer, topic: str, log_end: dict[int, int]
) -> AsyncIterator[Harness]:
    """A harness on an empty outbox; its relays stopped and its writers ended at the end."""
    harness = Harness(settings, kafka, topic, log_end)
    try:
        await harness.open()
        await harness.reset()
        yield harness
    finally:
        with contextlib.suppress(Exception):
            await harness.stop_relays()
        await harness.close()


async def run_schedules(
    settings: Settings, topic: str, seeds: Sequence[int], *, steps: int
) -> list[Outcome]:
    """Run one random schedule per seed; the outcomes of those that found a violation."""
    failed: list[Outcome] = []
    log_end: dict[int, int] = {}
    async with kafka_for(settings, topic) as (kafka, reader):
        for seed in seeds:
            async with harness_for(settings, kafka, topic, log_end) as harness:
                outcome = await RandomSchedule(harness, seed, steps=steps).run(reader)
            if outcome.violations:
                failed.append(outcome)
    return failed
