"""Tansu (memory storage) can name a later batch as a partition's earliest offset.

Two producers, one record batch each, to the same empty partition at once: a large one
and a small one. Both are acked, at disjoint offsets, and both are in the log. Then the
broker is asked for the partition's earliest offset (ListOffsets, timestamp -2: what
``seek_to_beginning`` and ``auto_offset_reset="earliest"`` use). Kafka answers 0; Tansu
sometimes answers the base offset of the *other* batch, and a reader that starts "from
the beginning" silently skips every record below it.

    python docs/tansu_earliest_offset.py [--bootstrap 127.0.0.1:9092] [--trials 200]

Needs only aiokafka and a broker, e.g.
``tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url
tcp://127.0.0.1:9092``. Prints one line per trial where the earliest offset was not 0,
then a summary; exits 1 if that happened at all.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.producer.message_accumulator import BatchBuilder


def producer(bootstrap: str) -> AIOKafkaProducer:
    # Tansu fails aiokafka's idempotent producer: idempotence off.
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=False,
        max_batch_size=1024 * 1024,
        max_request_size=4 * 1024 * 1024,
    )


def batch(client: AIOKafkaProducer, tag: str, count: int) -> BatchBuilder:
    builder = client.create_batch()
    for n in range(count):
        value = f"{tag}-{n}".encode().ljust(700, b".")
        if builder.append(timestamp=None, key=f"{tag}-{n}".encode(), value=value) is None:
            raise RuntimeError("batch full")
    return builder


async def read_from(bootstrap: str, tp: TopicPartition, start: int | None, end: int) -> int:
    """Records read from ``start`` (None: from the beginning as the broker lists it)."""
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await reader.start()
    try:
        reader.assign([tp])
        if start is None:
            await reader.seek_to_beginning(tp)
        else:
            reader.seek(tp, start)
        got = 0
        for _ in range(50):
            records = await reader.getmany(tp, timeout_ms=100)
            got += len(records.get(tp, []))
            if await reader.position(tp) >= end:
                break
        return got
    finally:
        await reader.stop()


async def trial(
    bootstrap: str, admin: AIOKafkaAdminClient, one: AIOKafkaProducer, two: AIOKafkaProducer
) -> tuple[int, int, int, int, int, int]:
    topic = f"earliest-{uuid.uuid4().hex[:12]}"
    await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    try:
        tp = TopicPartition(topic, 0)
        for client in (one, two):
            await client.partitions_for(topic)
        large, small = batch(one, "large", 300), batch(two, "small", 1)
        futures = [
            await one.send_batch(large, topic, partition=0),
            await two.send_batch(small, topic, partition=0),
        ]
        acks = await asyncio.gather(*futures)
        end = 301
        reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await reader.start()
        try:
            earliest = (await reader.beginning_offsets([tp]))[tp]
        finally:
            await reader.stop()
        from_zero = await read_from(bootstrap, tp, 0, end)
        from_beginning = await read_from(bootstrap, tp, None, end)
        return acks[0].offset, acks[1].offset, earliest, from_zero, from_beginning, end
    finally:
        await admin.delete_topics([topic])


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap)
    one, two = producer(args.bootstrap), producer(args.bootstrap)
    await admin.start()
    await one.start()
    await two.start()
    wrong = 0
    try:
        for n in range(args.trials):
            large, small, earliest, from_zero, from_beginning, end = await trial(
                args.bootstrap, admin, one, two
            )
            if earliest != 0 or from_beginning != from_zero:
                wrong += 1
                print(
                    f"trial {n}: acked large batch (300 records) at {large}, small batch "
                    f"(1 record) at {small}; earliest offset listed: {earliest}; read from "
                    f"offset 0: {from_zero} of {end} records, from the beginning: "
                    f"{from_beginning}"
                )
    finally:
        await one.stop()
        await two.stop()
        await admin.close()
    print(f"{wrong} of {args.trials} trials listed an earliest offset other than 0")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
