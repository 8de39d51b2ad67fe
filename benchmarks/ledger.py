"""Acked produces, and a topic checked against them record by record.

The relay benchmark counted records and distinct ``event_id`` headers on the topic. A
shortfall said that something was missing, not what: a record batch the broker acked and
lost (or wrote over), one the reader skipped, or a row the relay marked without an ack.
This module keeps the evidence that tells them apart:

* :class:`RecordingProducer` wraps an ``AIOKafkaProducer`` as the relay sees it
  (``create_batch``, ``send_batch``, ``partitions_for``) and records every record batch
  it hands over: producer, topic, partition, the ``event_id`` of each record in order,
  when it was handed over, and how it settled (the acked base offset, or the error). It
  changes nothing of what is sent: the relay's own batches go to the real producer.
* :func:`check_acks`: per partition, the acked ranges [base, base + count) must be
  pairwise disjoint and together cover the log from 0 to its end.
* :func:`read_log` reads the topic back from offset 0 (partitions assigned explicitly,
  no group; ``auto_offset_reset="none"``, so nothing is silently reset) and records every
  offset it is given with the record's ``event_id``.
* :func:`compare` holds the read against the acks: acked offsets missing from the log,
  offsets read more than once, records whose ``event_id`` is not the one acked at that
  offset, and records at offsets no ack covers.
* :func:`reread_ranges`: for each acked range the comparison found wrong, what the broker
  returns when read from that range's own base offset (a second opinion that does not
  depend on the first read's position).
* :func:`check_earliest`: the earliest offset the broker lists for each partition
  against where the log read from 0 starts. Tansu can list a later batch's base offset
  (docs/broker-notes.md), and a reader starting "from the beginning" then skips records
  that are there; reported apart from the problems, since nothing is lost.

Tansu's list-offsets answers are wrong, so the log's end is taken from the acks, never
from the broker's end offsets.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.producer.message_accumulator import BatchBuilder

#: Reading a topic back stops once nothing arrived for this long.
READ_IDLE_SECONDS = 3.0
#: Once every partition reached the end its acks give, keep reading this long, so that
#: records past it (written, never acked) show up too.
READ_SETTLE_SECONDS = 1.0
#: At most this many problems of each kind are spelled out (all are counted).
SHOWN = 8

EventId = bytes | None


def event_id_of(headers: Iterable[tuple[str, bytes]] | None) -> EventId:
    for name, value in headers or ():
        if name == "event_id":
            return bytes(value)
    return None


@dataclass(frozen=True, slots=True)
class Produce:
    """One record batch handed to a producer, and how it settled."""

    producer: str
    topic: str
    partition: int
    #: The ``event_id`` of each record, in the batch's order.
    event_ids: tuple[EventId, ...]
    #: Seconds since the ledger began: handed over, and settled.
    handed: float
    settled: float
    #: The acked base offset; None if the batch failed or its future was cancelled.
    base: int | None
    error: str | None = None

    @property
    def count(self) -> int:
        return len(self.event_ids)

    @property
    def end(self) -> int:
        """One past the last acked offset."""
        assert self.base is not None
        return self.base + self.count

    def describe(self) -> str:
        where = f"{self.topic}[{self.partition}]"
        if self.base is None:
            outcome = f"not acked ({self.error})"
        else:
            outcome = f"acked offsets {self.base}-{self.end - 1}"
        return (
            f"{self.producer}: {self.count} records to {where}, {outcome}; "
            f"handed over at {self.handed:.3f} s, settled at {self.settled:.3f} s"
        )


@dataclass
class Ledger:
    """Every record batch handed over during one stage, acked or not."""

    began: float = field(default_factory=time.perf_counter)
    produces: list[Produce] = field(default_factory=list)

    def clock(self) -> float:
        return time.perf_counter() - self.began

    def acked(self, topic: str) -> list[Produce]:
        return [p for p in self.produces if p.topic == topic and p.base is not None]

    def unacked(self, topic: str) -> list[Produce]:
        return [p for p in self.produces if p.topic == topic and p.base is None]

    def add_ack(
        self,
        producer: str,
        topic: str,
        partition: int,
        base: int,
        event_ids: Sequence[EventId],
        handed: float | None = None,
    ) -> None:
        now = self.clock()
        self.produces.append(
            Produce(
                producer,
                topic,
                partition,
                tuple(event_ids),
                now if handed is None else handed,
                now,
                base,
            )
        )

    def settled(
        self,
        producer: str,
        topic: str,
        partition: int,
        event_ids: tuple[EventId, ...],
        handed: float,
        future: asyncio.Future[Any],
    ) -> None:
        """Done callback of a delivery future: record the ack or the failure."""
        now = self.clock()
        if future.cancelled():
            base, error = None, "its future was cancelled before it settled"
        elif (exception := future.exception()) is not None:
            base, error = None, f"{type(exception).__name__}: {exception}"
        else:
            base, error = int(future.result().offset), None
        self.produces.append(
            Produce(producer, topic, partition, event_ids, handed, now, base, error)
        )


class RecordingBatch:
    """A ``BatchBuilder`` that remembers the ``event_id`` of each record appended."""

    __slots__ = ("builder", "event_ids")

    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder
        self.event_ids: list[EventId] = []

    def append(
        self,
        *,
        timestamp: float | None,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> Any:
        metadata = self.builder.append(timestamp=timestamp, key=key, value=value, headers=headers)
        if metadata is not None:
            self.event_ids.append(event_id_of(headers))
        return metadata

    def record_count(self) -> int:
        return int(self.builder.record_count())

    def size(self) -> int:
        return int(self.builder.size())

    def close(self) -> None:
        self.builder.close()

    def closed(self) -> bool:
        return bool(self.builder.closed())


class RecordingProducer:
    """The part of ``AIOKafkaProducer`` the relay uses, recording each batch in a ledger.

    What is sent is exactly what the caller built: ``send_batch`` hands the wrapped
    ``BatchBuilder`` itself to the real producer and returns the real delivery future.
    ``create_batch`` returns a :class:`RecordingBatch` typed as the ``BatchBuilder`` it
    wraps (callers only ``append`` to it, ``close`` it and hand it back), so that this class is an
    ``outbox.relay.Producer`` as it stands.
    """

    def __init__(self, producer: Any, ledger: Ledger, name: str) -> None:
        self._producer = producer
        self._ledger = ledger
        self.name = name

    def create_batch(self) -> BatchBuilder:
        return cast(BatchBuilder, RecordingBatch(self._producer.create_batch()))

    async def send_batch(
        self, batch: BatchBuilder, topic: str, *, partition: int
    ) -> asyncio.Future[Any]:
        if not isinstance(batch, RecordingBatch):
            raise TypeError("send_batch takes the batches of this producer's create_batch")
        handed = self._ledger.clock()
        future: asyncio.Future[Any] = await self._producer.send_batch(
            batch.builder, topic, partition=partition
        )
        future.add_done_callback(
            functools.partial(
                self._ledger.settled,
                self.name,
                topic,
                partition,
                tuple(batch.event_ids),
                handed,
            )
        )
        return future

    async def partitions_for(self, topic: str) -> set[int]:
        return set(await self._producer.partitions_for(topic))


# --------------------------------------------------------------------------- checks


def ranges(offsets: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted offsets as inclusive runs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for offset in sorted(set(offsets)):
        if runs and offset == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], offset)
        else:
            runs.append((offset, offset))
    return runs


def spell(runs: Sequence[tuple[int, int]]) -> str:
    shown = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:SHOWN])
    more = f", ... ({len(runs) - SHOWN} more runs)" if len(runs) > SHOWN else ""
    return shown + more


@dataclass
class Findings:
    """What one check found: problems (data lost or wrong), broker answers that would
    mislead a reader (the records are there, see ``check_earliest``), and notes (allowed,
    shown)."""

    problems: list[str] = field(default_factory=list)
    broker: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Acked produces whose records did not read back as acked (for ``reread_ranges``).
    suspects: list[Produce] = field(default_factory=list)

    def extend(self, other: Findings) -> None:
        self.problems += other.problems
        self.broker += other.broker
        self.notes += other.notes
        self.suspects += other.suspects


def partition_ends(acked: Sequence[Produce]) -> dict[int, int]:
    ends: dict[int, int] = {}
    for produce in acked:
        ends[produce.partition] = max(ends.get(produce.partition, 0), produce.end)
    return ends


def check_acks(ledger: Ledger, topic: str, partitions: Iterable[int]) -> Findings:
    """Per partition: the acked ranges are pairwise disjoint and cover 0 to the end."""
    findings = Findings()
    acked = ledger.acked(topic)
    by_partition: dict[int, list[Produce]] = defaultdict(list)
    for produce in acked:
        by_partition[produce.partition].append(produce)
    for partition in sorted(set(partitions) | set(by_partition)):
        produces = sorted(by_partition.get(partition, []), key=lambda p: (p.base, p.handed))
        covered_to = 0
        latest: Produce | None = None  # the produce that reaches furthest so far
        overlaps = 0
        gaps: list[tuple[int, int]] = []
        for produce in produces:
            assert produce.base is not None
            if produce.base < covered_to and latest is not None:
                overlaps += 1
                if overlaps <= SHOWN:
                    findings.problems.append(
                        f"{topic}[{partition}]: two acks for offsets "
                        f"{produce.base}-{min(covered_to, produce.end) - 1}:\n"
                        f"      {latest.describe()}\n      {produce.describe()}"
                    )
                findings.suspects += [latest, produce]
            elif produce.base > covered_to:
                gaps.append((covered_to, produce.base - 1))
            if produce.end > covered_to:
                covered_to, latest = produce.end, produce
        if overlaps > SHOWN:
            findings.problems.append(
                f"{topic}[{partition}]: {overlaps - SHOWN} more overlapping acks not shown"
            )
        if gaps:
            findings.problems.append(
                f"{topic}[{partition}]: no ack covers offsets {spell(gaps)} (of 0-{covered_to - 1})"
            )
    return findings


@dataclass
class Log:
    """What reading a topic from offset 0 gave: per partition, (offset, event_id) in order."""

    topic: str
    records: dict[int, list[tuple[int, EventId]]]
    seconds: float
    #: Per partition: the reader's position when it stopped.
    positions: dict[int, int]

    @property
    def count(self) -> int:
        return sum(len(records) for records in self.records.values())

    def event_ids(self) -> set[bytes]:
        return {
            event_id
            for records in self.records.values()
            for _, event_id in records
            if event_id is not None
        }


async def read_log(
    bootstrap_servers: str,
    topic: str,
    partitions: Iterable[int],
    ends: dict[int, int],
    *,
    within: float = 300.0,
) -> Log:
    """Every record of ``partitions`` from offset 0, until each reached ``ends`` (then
    ``READ_SETTLE_SECONDS`` more) or nothing arrived for ``READ_IDLE_SECONDS``."""
    began = time.perf_counter()
    wanted = sorted(set(partitions) | set(ends))
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none",
        request_timeout_ms=15000,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await reader.start()
    records: dict[int, list[tuple[int, EventId]]] = {p: [] for p in wanted}
    positions: dict[int, int] = {}
    try:
        assigned = [TopicPartition(topic, p) for p in wanted]
        reader.assign(assigned)
        for tp in assigned:
            reader.seek(tp, 0)
        idle_since = time.monotonic()
        settle_until: float | None = None
        deadline = time.monotonic() + within
        while True:
            now = time.monotonic()
            if settle_until is not None and now >= settle_until:
                break
            if now - idle_since >= READ_IDLE_SECONDS or now >= deadline:
                break
            batches = await reader.getmany(timeout_ms=200, max_records=10000)
            for tp, batch in batches.items():
                if batch:
                    idle_since = time.monotonic()
                records[tp.partition].extend(
                    (record.offset, event_id_of(record.headers)) for record in batch
                )
            if settle_until is None and await _reached(reader, assigned, ends):
                settle_until = time.monotonic() + READ_SETTLE_SECONDS
        for tp in assigned:
            positions[tp.partition] = await reader.position(tp)
    finally:
        await reader.stop()
    return Log(topic, records, time.perf_counter() - began, positions)


async def _reached(
    reader: AIOKafkaConsumer, assigned: Sequence[TopicPartition], ends: dict[int, int]
) -> bool:
    for tp in assigned:
        if await reader.position(tp) < ends.get(tp.partition, 0):
            return False
    return True


def compare(ledger: Ledger, log: Log) -> Findings:
    """The log read back against the acks, offset by offset."""
    findings = Findings()
    acked = ledger.acked(log.topic)
    expected: dict[int, dict[int, tuple[EventId, Produce]]] = defaultdict(dict)
    for produce in acked:
        assert produce.base is not None
        for index, event_id in enumerate(produce.event_ids):
            # With overlapping acks the later one wins here; check_acks reports both.
            expected[produce.partition][produce.base + index] = (event_id, produce)
    for partition in sorted(set(expected) | set(log.records)):
        wanted = expected.get(partition, {})
        seen: dict[int, list[EventId]] = defaultdict(list)
        for offset, event_id in log.records.get(partition, []):
            seen[offset].append(event_id)
        where = f"{log.topic}[{partition}]"
        missing = [offset for offset in wanted if offset not in seen]
        if missing:
            runs = ranges(missing)
            findings.problems.append(
                f"{where}: {len(missing)} acked offsets not read back: {spell(runs)}"
            )
            for a, b in runs[:SHOWN]:
                for produce in {id(p): p for p in (wanted[o][1] for o in (a, b))}.values():
                    findings.notes.append(f"{where}: offsets {a}-{b} were {produce.describe()}")
                    findings.suspects.append(produce)
        repeated = [offset for offset, ids in seen.items() if len(ids) > 1]
        if repeated:
            findings.problems.append(
                f"{where}: {len(repeated)} offsets read more than once: {spell(ranges(repeated))}"
            )
        wrong = [
            offset
            for offset, ids in seen.items()
            if offset in wanted and any(event_id != wanted[offset][0] for event_id in ids)
        ]
        if wrong:
            runs = ranges(wrong)
            findings.problems.append(
                f"{where}: {len(wrong)} offsets hold another record than the one acked there: "
                f"{spell(runs)}"
            )
            for a, _ in runs[:SHOWN]:
                produce = wanted[a][1]
                findings.notes.append(
                    f"{where}: offset {a} holds event_id {_text(seen[a][0])}, acked with "
                    f"{_text(wanted[a][0])} by {produce.describe()}"
                )
                findings.suspects.append(produce)
        extra = [offset for offset in seen if offset not in wanted]
        if extra:
            # Written but never acked to anyone: a produce that failed or timed out on the
            # client after the broker had taken it (at least once allows that).
            findings.problems.append(
                f"{where}: {len(extra)} records at offsets no ack covers: {spell(ranges(extra))}"
            )
    return findings


async def listed_earliest(
    bootstrap_servers: str, topic: str, partitions: Iterable[int]
) -> dict[int, int]:
    """The earliest offset of each partition as the broker lists it (ListOffsets with
    timestamp -2: what ``seek_to_beginning`` and ``auto_offset_reset="earliest"`` use)."""
    reader = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, group_id=None, request_timeout_ms=15000
    )
    await reader.start()
    try:
        listed = await reader.beginning_offsets([TopicPartition(topic, p) for p in partitions])
    finally:
        await reader.stop()
    return {tp.partition: int(offset) for tp, offset in listed.items()}


def check_earliest(ledger: Ledger, log: Log, listed: dict[int, int]) -> Findings:
    """A partition whose log, read from offset 0, starts below the earliest offset the
    broker lists: a reader that starts "from the beginning" would skip those records.

    Tansu (memory storage) lists as earliest the base offset of the batch *written*
    first, not of the lowest one; two producers writing one partition at once can write
    the higher batch first (see docs/broker-notes.md).
    """
    findings = Findings()
    acked = ledger.acked(log.topic)
    for partition, earliest in sorted(listed.items()):
        first = min((offset for offset, _ in log.records.get(partition, [])), default=None)
        if first is None or earliest <= first:
            continue
        below = sum(1 for offset, _ in log.records[partition] if offset < earliest)
        where = f"{log.topic}[{partition}]"
        lines = [
            f"{where}: the broker lists {earliest} as the earliest offset, but the log read "
            f"from offset 0 starts at {first}: a reader starting from the beginning skips "
            f"{below} records"
        ]
        for produce in acked:
            if (
                produce.partition == partition
                and produce.base is not None
                and (produce.base == first or produce.base <= earliest < produce.end)
            ):
                lines.append(f"      {produce.describe()}")
        findings.broker.append("\n".join(lines))
    return findings


def check_duplicates(log: Log) -> Findings:
    """Records that appear at more than one offset (allowed: at least once), as a note."""
    findings = Findings()
    count: dict[bytes, int] = defaultdict(int)
    for records in log.records.values():
        for _, event_id in records:
            if event_id is not None:
                count[event_id] += 1
    repeated = sum(1 for n in count.values() if n > 1)
    if repeated:
        findings.notes.append(f"{log.topic}: {repeated} event_ids appear at more than one offset")
    return findings


async def reread_ranges(
    bootstrap_servers: str, suspects: Sequence[Produce], *, limit: int = SHOWN
) -> list[str]:
    """For each suspect acked range: what the broker returns when read from its base."""
    lines: list[str] = []
    unique = list({(p.topic, p.partition, p.base, p.handed): p for p in suspects}.values())
    for produce in unique[:limit]:
        if produce.base is None:
            continue
        tp = TopicPartition(produce.topic, produce.partition)
        reader = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="none",
            request_timeout_ms=15000,
        )
        await reader.start()
        got: list[tuple[int, EventId]] = []
        try:
            reader.assign([tp])
            reader.seek(tp, produce.base)
            idle_since = time.monotonic()
            while len(got) < produce.count and time.monotonic() - idle_since < READ_IDLE_SECONDS:
                batch = await reader.getmany(tp, timeout_ms=200, max_records=produce.count)
                for record in batch.get(tp, []):
                    idle_since = time.monotonic()
                    got.append((record.offset, event_id_of(record.headers)))
        finally:
            await reader.stop()
        got = got[: produce.count]
        matching = sum(
            1
            for offset, event_id in got
            if 0 <= offset - produce.base < produce.count
            and produce.event_ids[offset - produce.base] == event_id
        )
        first = f"first offset read {got[0][0]}" if got else "nothing read"
        lines.append(
            f"re-read {produce.topic}[{produce.partition}] from {produce.base}: {len(got)} "
            f"records ({first}), {matching} of {produce.count} as acked "
            f"({produce.producer}'s batch)"
        )
    return lines


def _text(event_id: EventId) -> str:
    return "none" if event_id is None else event_id.decode(errors="replace")


@dataclass
class Audit:
    """One stage's topic, checked against its acks (and, for the relays, the outbox)."""

    name: str
    topic: str
    acked: list[Produce]
    unacked: list[Produce]
    log: Log
    findings: Findings
    reread: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings.problems

    @property
    def verdict(self) -> str:
        if not self.ok:
            return "PROBLEM"
        return "ok, but BROKER listed a wrong earliest offset" if self.findings.broker else "ok"

    @property
    def acked_records(self) -> int:
        return sum(p.count for p in self.acked)

    def summary(self) -> str:
        ends = partition_ends(self.acked)
        return (
            f"  {self.name}: {len(self.acked)} acked batches, {self.acked_records} acked "
            f"records, {len(self.unacked)} batches not acked; log read back: {self.log.count} "
            f"records in {self.log.seconds:.1f} s; ends by the acks "
            f"{dict(sorted(ends.items()))}, reader stopped at "
            f"{dict(sorted(self.log.positions.items()))}; {self.verdict}"
        )


async def audit(
    name: str,
    bootstrap_servers: str,
    ledger: Ledger,
    topic: str,
    partitions: Iterable[int],
) -> Audit:
    """Check the acks, read the topic back, compare; re-read what came back wrong."""
    partitions = sorted(partitions)
    acked = ledger.acked(topic)
    findings = check_acks(ledger, topic, partitions)
    log = await read_log(bootstrap_servers, topic, partitions, partition_ends(acked))
    findings.extend(compare(ledger, log))
    findings.extend(
        check_earliest(ledger, log, await listed_earliest(bootstrap_servers, topic, partitions))
    )
    findings.extend(check_duplicates(log))
    unacked = ledger.unacked(topic)
    for produce in unacked[:SHOWN]:
        findings.notes.append(produce.describe())
    reread = await reread_ranges(bootstrap_servers, findings.suspects) if findings.problems else []
    return Audit(
        name=name,
        topic=topic,
        acked=acked,
        unacked=unacked,
        log=log,
        findings=findings,
        reread=reread,
    )
