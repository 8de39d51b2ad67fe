"""Creating the three topics (for ``dev``, tests and ``orderflow topics create``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from orderflow.runtime.settings import Settings
from orderflow.runtime.wiring import StartupError, kafka_common


async def ensure_topics(
    settings: Settings,
    names: Iterable[str] | None = None,
    *,
    partitions: int = 3,
    replication_factor: int = 1,
) -> list[str]:
    """Create the topics that don't exist yet; return the names created."""
    wanted = list(names or [settings.inbound_topic, settings.outbound_topic, settings.dlq_topic])
    admin = AIOKafkaAdminClient(**kafka_common(settings))
    try:
        await admin.start()
    except (KafkaError, OSError) as error:
        raise StartupError(
            f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {error}"
        ) from error
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # raced with someone: fine
                await admin.create_topics(
                    [
                        NewTopic(
                            name, num_partitions=partitions, replication_factor=replication_factor
                        )
                        for name in missing
                    ]
                )
        return missing
    finally:
        await admin.close()
