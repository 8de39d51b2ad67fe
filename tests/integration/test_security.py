"""Hardening against real services: PostgreSQL TLS modes, the inbound size limit, and a
batch of arbitrary messages through the real consumer with nothing lost."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from consumer.models import ConsumerOffset
from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import StartupError, check_database, create_engine, kafka_common
from tests.events import Message, cancelled, delivered, key, paid, placed, shipped
from tests.helpers import (
    TestEnv,
    applied_count,
    eventually,
    expected_outcome,
    header_map,
    orders_by_id,
    outbox_rows,
    produce,
    read_topic,
    running_consumer,
    running_relay,
)
from tests.unit.test_decode_property import JSON_VALUES, dumps, nearly_valid

pytestmark = pytest.mark.integration

#: A password put into the database URL (with trust authentication it is not checked).
SECRET = "tls-s3cret-pw"


def with_password(url: str) -> tuple[str, str]:
    """``url`` carrying a password, and that password (the URL's own, if it has one)."""
    parsed = make_url(url)
    if parsed.password:
        return url, str(parsed.password)
    return parsed.set(password=SECRET).render_as_string(hide_password=False), SECRET


async def server_has_tls(settings: Settings) -> bool:
    url = make_url(settings.require_database()).set(drivername="postgresql")
    connection = await asyncpg.connect(url.render_as_string(hide_password=False), ssl=False)
    try:
        return bool(
            await connection.fetchval("SELECT setting = 'on' FROM pg_settings WHERE name = 'ssl'")
        )
    finally:
        await connection.close()


# --- PostgreSQL TLS -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["url", "environment"])
async def test_sslmode_require_against_a_server_without_tls_is_one_clear_line(
    env: TestEnv, where: str
) -> None:
    if await server_has_tls(env.settings):
        pytest.skip("this PostgreSQL offers TLS")
    url, password = with_password(str(env.settings.database_url))
    if where == "url":
        settings = env.with_settings(database_url=f"{url}?sslmode=require")
    else:
        settings = env.with_settings(database_url=url, db_sslmode="require")
    engine = create_engine(settings, pool_size=1)
    try:
        with pytest.raises(StartupError) as excinfo:
            await check_database(engine)
    finally:
        await engine.dispose()
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("cannot reach PostgreSQL at postgresql+asyncpg://")
    assert "the server does not support TLS" in message
    assert password not in message
    assert "***" in message


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
async def test_sslmodes_that_allow_plaintext_work_against_a_server_without_tls(
    env: TestEnv, mode: str
) -> None:
    url, _ = with_password(str(env.settings.database_url))
    settings = env.with_settings(database_url=f"{url}?sslmode={mode}")
    engine = create_engine(settings, pool_size=1)
    try:
        await check_database(engine)
        async with engine.connect() as connection:
            encrypted = await connection.scalar(
                text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            )
        if mode == "disable":
            assert encrypted is False
    finally:
        await engine.dispose()


# --- the inbound size limit ---------------------------------------------------------------------


async def produce_large(settings: Settings, messages: list[Message]) -> None:
    """Like ``produce``, with a producer that sends records of a few MB."""
    producer = AIOKafkaProducer(
        **kafka_common(settings),
        enable_idempotence=settings.kafka_idempotence,
        acks="all",
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    try:
        for message_key, value in messages:
            await (await producer.send(settings.inbound_topic, key=message_key, value=value))
    finally:
        await producer.stop()


async def test_an_oversized_message_mid_stream_is_dead_lettered_and_the_rest_applied(
    env: TestEnv,
) -> None:
    order_id = uuid.uuid4()
    # A valid event padded to 2,000,000 bytes: it would apply if it were parsed at all.
    event_key, event_value = shipped(order_id)
    assert event_value is not None
    huge = b" " * (2_000_000 - len(event_value)) + event_value
    stream = [placed(order_id), paid(order_id), (event_key, huge), shipped(order_id)]
    stream.append(delivered(order_id))
    await produce_large(env.settings, stream)

    async with running_consumer(env.settings) as consumer:

        async def all_consumed() -> None:
            assert consumer.stats.applied + consumer.stats.dead_letters.total() == len(stream)

        await eventually(all_consumed, within=60)
        assert consumer.stats.dead_letters == Counter({"schema_violation": 1})

    orders = await orders_by_id(env.sessions)
    assert (orders[order_id].status, orders[order_id].version) == ("delivered", 4)
    (dead_letter,) = await outbox_rows(env.sessions, env.settings.dlq_topic)
    headers = header_map(dead_letter.headers)
    assert headers["error.reason"] == "schema_violation"
    assert headers["error.message"] == (
        "message is 2,000,000 bytes; the limit is 1,048,576 (ORDERFLOW_MAX_MESSAGE_BYTES)"
    )
    assert (headers["source.topic"], headers["source.offset"]) == (env.settings.inbound_topic, "2")
    assert dead_letter.key == event_key
    assert dead_letter.payload == huge  # the original bytes, untouched (the contract)

    # The relay publishes the 2 MB dead letter as it is.
    async with running_relay(env.settings):
        records = await read_topic(env.settings, env.settings.dlq_topic, 1)
    (record,) = records
    assert record.value == huge
    assert dict(record.headers)["error.reason"] == b"schema_violation"


async def test_the_limit_is_a_setting(env: TestEnv) -> None:
    order_id = uuid.uuid4()
    small = placed(order_id)
    large = cancelled(order_id)
    assert small[1] is not None
    assert large[1] is not None
    padded = (large[0], large[1] + b" " * 300)
    settings = env.with_settings(max_message_bytes=len(padded[1]) - 1)
    await produce(env.settings, [small, padded])
    async with running_consumer(settings) as consumer:

        async def both_consumed() -> None:
            assert consumer.stats.applied + consumer.stats.dead_letters.total() == 2

        await eventually(both_consumed)
    (dead_letter,) = await outbox_rows(env.sessions, env.settings.dlq_topic)
    assert header_map(dead_letter.headers)["error.message"] == (
        f"message is {len(padded[1]):,} bytes; the limit is {len(padded[1]) - 1:,} "
        "(ORDERFLOW_MAX_MESSAGE_BYTES)"
    )
    assert (await orders_by_id(env.sessions))[order_id].status == "pending"


# --- arbitrary messages through the real consumer -----------------------------------------------

ORDER_IDS = [uuid.UUID(int=index + 1) for index in range(4)]
MESSAGE_COUNT = 200


def valid_events() -> st.SearchStrategy[Message]:
    builders = [
        lambda order: placed(order),
        lambda order: placed(order),
        lambda order: paid(order),
        lambda order: shipped(order),
        lambda order: delivered(order),
        lambda order: cancelled(order),
    ]
    return st.builds(
        lambda build, order: build(order), st.sampled_from(builders), st.sampled_from(ORDER_IDS)
    )


#: Every message has a key, so that all of one order's messages share a partition and the
#: outcome is exactly predictable (a null key would be spread at random).
KEYS = st.one_of(
    st.sampled_from(ORDER_IDS).map(key),
    st.sampled_from(ORDER_IDS).map(key),
    st.binary(min_size=1, max_size=16),
)
#: Half valid events of a few orders (so that transitions, duplicates and the state-based
#: rejections happen), half anything at all.
ARBITRARY: st.SearchStrategy[Message] = st.one_of(
    valid_events(),
    valid_events(),
    valid_events(),
    st.tuples(KEYS, st.binary(max_size=300)),
    st.tuples(
        KEYS,
        st.builds(
            lambda value, ascii_only: dumps(value, ascii_only=ascii_only),
            JSON_VALUES,
            st.booleans(),
        ),
    ),
    st.tuples(KEYS, nearly_valid()),
)


def arbitrary_messages() -> list[Message]:
    """Fixed-seed Hypothesis examples of ``ARBITRARY``, each message then delivered twice at
    random places (a duplicate must count once, whatever came in between)."""
    drawn: list[Message] = []

    @seed(20261127)
    @settings(
        max_examples=MESSAGE_COUNT // 2,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(ARBITRARY)
    def collect(message: Message) -> None:
        drawn.append(message)

    collect()
    order = random.Random(20261127)
    messages = drawn + [order.choice(drawn) for _ in range(MESSAGE_COUNT - len(drawn))]
    order.shuffle(messages)
    return messages


async def test_arbitrary_messages_each_end_applied_duplicate_or_dead_lettered(
    env: TestEnv,
) -> None:
    messages = arbitrary_messages()
    assert len(messages) == MESSAGE_COUNT
    expected = expected_outcome(messages)
    print("DIVERSITY", len(expected.applied), expected.duplicates, expected.dead_letters)
    await produce(env.settings, messages)

    async with running_consumer(env.with_settings(consumer_batch_size=37)) as consumer:

        async def everything_consumed() -> None:
            async with env.sessions() as session:
                consumed = await session.scalar(
                    select(func.coalesce(func.sum(ConsumerOffset.next_offset), 0))
                )
            assert consumed == MESSAGE_COUNT

        await eventually(everything_consumed, within=60)
        stats = consumer.stats

    dead_letters = await outbox_rows(env.sessions, env.settings.dlq_topic)
    reasons = Counter(header_map(row.headers)["error.reason"] for row in dead_letters)
    applied = await applied_count(env.sessions)
    # Nothing lost, nothing counted twice: every message has exactly one outcome.
    assert applied + stats.duplicates + len(dead_letters) == MESSAGE_COUNT
    assert (applied, stats.duplicates, reasons) == (
        len(expected.applied),
        expected.duplicates,
        expected.dead_letters,
    )
    for row in dead_letters:
        headers = header_map(row.headers)
        assert headers["error.message"].strip()
        assert headers["source.topic"] == env.settings.inbound_topic
    updates = await outbox_rows(env.sessions, env.settings.outbound_topic)
    assert len(updates) == applied
    orders = await orders_by_id(env.sessions)
    assert {order_id: order.version for order_id, order in orders.items()} == {
        order_id: state.version for order_id, state in expected.orders.items()
    }
    kinds: dict[str, Any] = Counter(orjson.loads(row.payload)["change"] for row in updates)
    assert sum(kinds.values()) == applied
