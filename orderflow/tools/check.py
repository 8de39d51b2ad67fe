"""``orderflow check``: a preflight for a real deployment.

It connects to the database and the brokers exactly as ``consume``, ``relay`` and ``api``
do (the same settings, TLS and SASL, through :func:`~orderflow.runtime.wiring.create_engine`
and :func:`~orderflow.runtime.wiring.kafka_common`) and judges what it finds. Each
:class:`Check` is ``pass``, ``warn``, ``fail`` or ``unknown`` with a one-line detail and,
unless it passed, a one-line fix. ``unknown`` means the service did not answer the
question (a broker that does not report a topic's configuration, say): never a pass by
default, never a crash.

The decisions are pure functions of the facts (``*_check``), so that each rule is tested
on its own; :func:`run_checks` gathers the facts.

It writes nothing: no topic is created (the brokers' metadata is asked for *every* topic,
so a broker that auto-creates the topics a client names creates none), no offset is
committed, no row is written. The only side effect is a producer id, when idempotence is
on: the short-lived idempotent producer that finds out whether the brokers grant one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.errors import for_code
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orderflow.runtime.settings import Settings, redacted
from orderflow.runtime.wiring import (
    StartupError,
    check_database,
    create_engine,
    create_producer,
    kafka_common,
    start_kafka_client,
)


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    #: The service did not answer the question; neither a pass nor a fail.
    UNKNOWN = "unknown"


#: Worst first: the order in which a check's findings decide its status.
_SEVERITY: Final = {Status.FAIL: 3, Status.WARN: 2, Status.UNKNOWN: 1, Status.PASS: 0}


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def as_json(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "fix": self.fix,
        }


#: The checks, in the order they are reported (the JSON list has every one, always).
NAMES: Final = (
    "database",
    "server version",
    "schema",
    "connections",
    "database tls",
    "brokers",
    "kafka security",
    "inbound topic",
    "outbound topic",
    "dead-letter topic",
    "dead-letter size",
    "outbound retention",
    "idempotent producer",
    "consumer group",
    "consumer lag",
)


def failed(checks: Sequence[Check]) -> bool:
    return any(check.status is Status.FAIL for check in checks)


def summary(checks: Sequence[Check]) -> str:
    counts = {status: 0 for status in Status}
    for check in checks:
        counts[check.status] += 1
    return ", ".join(f"{counts[status]} {status.value}" for status in Status)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class Plan:
    """The instances an operator means to run, and so the connections they will hold."""

    consumers: int = 1
    relays: int = 1
    apis: int = 0
    #: Each ``consume``'s pool (``ORDERFLOW_DB_POOL_SIZE``).
    consumer_pool: int = 8
    #: Each ``api``'s pool (its ``--pool-size``, ``ORDERFLOW_DB_POOL_SIZE`` by default).
    api_pool: int = 8
    #: Whether ``consume`` and ``relay`` serve the health endpoint (``--metrics-port``),
    #: which holds a database connection of its own.
    health: bool = False

    def connections(self) -> int:
        extra = 1 if self.health else 0
        return (
            self.consumers * (self.consumer_pool + extra)
            + self.relays * (1 + extra)
            + self.apis * self.api_pool
        )

    def arithmetic(self) -> str:
        """The sum, spelled out: ``2 consume × (8 pool + 1 health) + 2 relay × (1 + 1
        health) + 1 api × 8 pool = 30``."""
        if self.health:
            parts = [
                f"{self.consumers} consume × ({self.consumer_pool} pool + 1 health)",
                f"{self.relays} relay × (1 + 1 health)",
            ]
        else:
            parts = [
                f"{self.consumers} consume × {self.consumer_pool} pool",
                f"{self.relays} relay × 1",
            ]
        if self.apis:
            parts.append(f"{self.apis} api × {self.api_pool} pool")
        return " + ".join(parts) + f" = {self.connections()}"


# --------------------------------------------------------------------------- database rules

#: The relay uses pg_current_xact_id(), pg_snapshot_xmin() and the xid8 type: 13 and newer.
MINIMUM_SERVER_VERSION: Final = 130000
#: The relay sets client_connection_check_interval (14 and newer) on its session.
RECOMMENDED_SERVER_VERSION: Final = 140000
#: Above this share of the connections available, "near the limit".
CONNECTIONS_NEAR: Final = 0.8


def server_version_check(version_num: int, version: str) -> Check:
    name = "server version"
    shown = f"PostgreSQL {version.split()[0] if version.strip() else version_num}"
    if version_num < MINIMUM_SERVER_VERSION:
        return Check(
            name,
            Status.FAIL,
            f"{shown}: the relay needs 13 or newer (pg_current_xact_id, pg_snapshot_xmin, "
            "the xid8 type)",
            "upgrade PostgreSQL to 14 or newer",
        )
    if version_num < RECOMMENDED_SERVER_VERSION:
        return Check(
            name,
            Status.WARN,
            f"{shown} works, but lacks client_connection_check_interval (14+): a relay's "
            "statement does not notice within 2 s that its host vanished (keepalives still "
            "free its shards in 6-12 s); and 13 is past its end of life (November 2025)",
            "upgrade PostgreSQL to 14 or newer",
        )
    return Check(name, Status.PASS, shown)


def schema_check(current: str | None, head: str, behind: int | None) -> Check:
    """``behind``: how many revisions ``current`` is behind ``head`` (None: unknown here)."""
    name = "schema"
    if current is None:
        return Check(
            name,
            Status.FAIL,
            f"no orderflow schema (no alembic_version); the newest revision is {head}",
            "run `orderflow migrate`",
        )
    if current == head:
        return Check(name, Status.PASS, f"at the newest revision, {head}")
    if behind is not None:
        return Check(
            name,
            Status.FAIL,
            f"at revision {current}, {behind} behind the newest, {head}: consume, relay and "
            "api refuse to start",
            "run `orderflow migrate`",
        )
    return Check(
        name,
        Status.FAIL,
        f"at revision {current}, which this orderflow does not know (its newest is {head}): "
        "migrated by a newer orderflow?",
        "deploy the orderflow version that migrated this database (or a newer one)",
    )


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What the server allows, and what is connected now (this check's own connection
    not counted)."""

    max_connections: int
    superuser_reserved: int
    #: PostgreSQL 16's reserved_connections (for pg_use_reserved_connections); 0 before.
    reserved: int = 0
    in_use: int = 0
    role: str = ""
    #: The role's CONNECTION LIMIT (-1: none) and its connections now.
    role_limit: int = -1
    role_in_use: int = 0
    database: str = ""
    #: The database's CONNECTION LIMIT (-1: none) and its connections now.
    database_limit: int = -1
    database_in_use: int = 0


def connections_check(limits: ConnectionLimits, plan: Plan) -> Check:
    """The planned connections against each limit that applies: the server's (minus the
    slots reserved for superusers), the role's and the database's CONNECTION LIMIT.
    Over a limit even with nothing else connected: fail. Over it counting what is connected
    now, or above 80 % of it: warn. The tightest limit is the one reported."""
    name = "connections"
    planned = plan.connections()
    server = limits.max_connections - limits.superuser_reserved - limits.reserved
    server_text = (
        f"max_connections {limits.max_connections} − {limits.superuser_reserved} "
        "superuser_reserved_connections"
        + (f" − {limits.reserved} reserved_connections" if limits.reserved else "")
        + f" = {server}"
    )
    scopes = [(server, limits.in_use, server_text)]
    if limits.role_limit >= 0:
        scopes.append(
            (limits.role_limit, limits.role_in_use, f"role {limits.role} CONNECTION LIMIT")
        )
    if limits.database_limit >= 0:
        scopes.append(
            (
                limits.database_limit,
                limits.database_in_use,
                f"database {limits.database} CONNECTION LIMIT",
            )
        )
    judged = []
    for limit, in_use, limit_text in scopes:
        if planned > limit:
            status = Status.FAIL
        elif planned + in_use > limit or planned + in_use > CONNECTIONS_NEAR * limit:
            status = Status.WARN
        else:
            status = Status.PASS
        headroom = limit - planned - in_use
        judged.append((_SEVERITY[status], -headroom, status, limit, in_use, limit_text))
    _, _, status, limit, in_use, limit_text = max(judged)
    total = planned + in_use
    share = f" ({100 * total / limit:.0f} %)" if limit > 0 else ""
    detail = (
        f"planned {plan.arithmetic()}; available: {limit_text}"
        + ("" if limit_text.endswith(f"= {limit}") else f" {limit}")
        + f"; in use now {in_use} -> {total} of {limit}{share}"
    )
    if status is Status.FAIL:
        return Check(
            name,
            status,
            detail + f": {planned - limit} more than the limit",
            "plan fewer instances (--consumers, --relays, --api) or a smaller "
            "ORDERFLOW_DB_POOL_SIZE, or raise the limit (max_connections needs a restart)",
        )
    if status is Status.WARN:
        why = (
            ": does not fit beside the connections open now (fine if they are the instances "
            "this plan replaces)"
            if total > limit
            else f": above {CONNECTIONS_NEAR:.0%} of the limit"
        )
        return Check(
            name,
            status,
            detail + why,
            "leave room for restarts and operators' sessions: fewer instances or a smaller "
            "ORDERFLOW_DB_POOL_SIZE, or a higher limit",
        )
    return Check(name, status, detail)


def is_local(host: str | None) -> bool:
    """A loopback address, ``localhost`` or a Unix socket (no host, or a path)."""
    if not host or host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def database_tls_check(
    host: str | None,
    sslmode: str | None,
    root_cert: str | None,
    client_cert: bool,
    encrypted: bool | None,
    tls_version: str | None,
) -> Check:
    """What the connection actually uses (pg_stat_ssl), against what was asked for."""
    name = "database tls"
    asked = f"sslmode {sslmode}" if sslmode else "sslmode prefer (the default)"
    if root_cert:
        asked += f", CA {'the system CAs' if root_cert == 'system' else root_cert}"
    if client_cert:
        asked += ", client certificate set"
    if encrypted is None:
        return Check(
            name, Status.UNKNOWN, f"{asked}; the server does not say whether this session is TLS"
        )
    used = f"this connection uses {tls_version or 'TLS'}" if encrypted else "not encrypted"
    detail = f"{asked}; {used}"
    if is_local(host):
        return Check(name, Status.PASS, detail + " (a local server)")
    if not encrypted:
        return Check(
            name,
            Status.WARN,
            detail + f": traffic to {host}, the password included, is readable on the way",
            "set ORDERFLOW_DB_SSLMODE=verify-full (and ORDERFLOW_DB_SSLROOTCERT)",
        )
    if sslmode not in {"verify-ca", "verify-full"} and root_cert is None:
        return Check(
            name,
            Status.WARN,
            detail + ": the server's certificate is not verified (anyone in the way can "
            "pose as it)",
            "set ORDERFLOW_DB_SSLMODE=verify-full and ORDERFLOW_DB_SSLROOTCERT",
        )
    return Check(name, Status.PASS, detail)


# --------------------------------------------------------------------------- Kafka rules

#: Room above a dead letter's value: its key, the dead-letter headers (error.message,
#: source.*, traceparent, tracestate) and the record batch's framing.
DEAD_LETTER_HEADROOM_BYTES: Final = 16 * 1024


def kafka_security_check(settings: Settings, hosts: Sequence[str]) -> Check:
    """The protocol, mechanism and files the clients are given (never a password)."""
    name = "kafka security"
    protocol = settings.kafka_security_protocol
    parts = [protocol]
    if protocol.startswith("SASL_"):
        parts.append(f"SASL {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username}")
    if protocol.endswith("SSL"):
        parts.append(f"CA {settings.kafka_ssl_cafile or 'the system CAs'}")
        if settings.kafka_ssl_certfile:
            parts.append(
                "client certificate set"
                + (" (key password set)" if settings.kafka_ssl_key_password else "")
            )
        else:
            parts.append("no client certificate")
    detail = ", ".join(parts)
    remote = [host for host in hosts if not is_local(host)]
    if protocol.endswith("SSL") or not remote:
        return Check(name, Status.PASS, detail + ("" if remote else " (local brokers)"))
    if protocol == "SASL_PLAINTEXT" and settings.kafka_sasl_mechanism == "PLAIN":
        why = ": not encrypted, and SASL PLAIN sends the password as it is"
    else:
        why = ": traffic to the brokers is not encrypted"
    return Check(
        name,
        Status.WARN,
        detail + why,
        "use KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SSL) if the brokers offer it",
    )


@dataclass(frozen=True, slots=True)
class TopicFacts:
    name: str
    partitions: int
    #: The smallest replica count over the partitions.
    replication: int
    #: Partitions that answered with an error or without a leader.
    unhealthy: tuple[int, ...] = ()


def topic_check(
    check_name: str,
    variable: str,
    topic: str,
    facts: TopicFacts | None,
    *,
    brokers: int,
    consumers: int | None = None,
) -> Check:
    """A topic exists; its partitions (against the planned consumers, for the inbound
    topic), their leaders, and its replication on a cluster of several brokers."""
    if facts is None:
        return Check(
            check_name,
            Status.FAIL,
            f"{topic} ({variable}) does not exist",
            "create it: `orderflow topics create` (choose --partitions and "
            "--replication-factor), or as your cluster's topics are created",
        )
    detail = (
        f"{topic}: {facts.partitions} partition{'s' * (facts.partitions != 1)}, "
        f"replication factor {facts.replication}"
    )
    if facts.unhealthy:
        listed = ", ".join(str(partition) for partition in facts.unhealthy)
        return Check(
            check_name,
            Status.WARN,
            detail + f"; partitions without a leader: {listed}",
            "check the brokers that host them",
        )
    if facts.replication < 2 <= brokers:
        return Check(
            check_name,
            Status.WARN,
            detail + f" on {brokers} brokers: losing one broker loses this topic's data",
            "increase the replication factor to 3 (kafka-reassign-partitions)",
        )
    if consumers is not None and consumers > facts.partitions:
        return Check(
            check_name,
            Status.WARN,
            detail + f"; {consumers} consumers planned: {consumers - facts.partitions} "
            "will stand by, idle",
            "add partitions (while the lag is 0: keys move) or plan fewer consumers",
        )
    return Check(check_name, Status.PASS, detail)


def dead_letter_size_check(
    dlq: str,
    dlq_limit: int | None,
    inbound: str,
    inbound_limit: int | None,
    max_message_bytes: int,
    *,
    not_checked: str | None = None,
) -> Check:
    """A dead letter carries the original value untouched, and every inbound message may
    become one (those over ``ORDERFLOW_MAX_MESSAGE_BYTES`` too: that is why they are dead
    letters). So the dead-letter topic's ``max.message.bytes`` must take:

    - the largest value the consumer accepts, or the value alone does not fit: fail (the
      relay would retry that dead letter forever, holding back its shard);
    - the largest inbound message (the inbound topic's limit, when the broker says it, or
      else the consumer's) plus :data:`DEAD_LETTER_HEADROOM_BYTES` for its key, headers
      and framing, or a dead letter near the limit may not fit: warn.

    ``dlq_limit`` None: the broker did not say (unknown, never a pass)."""
    name = "dead-letter size"
    if not_checked is not None:
        return Check(name, Status.UNKNOWN, f"not checked: {not_checked}")
    largest = max(max_message_bytes, inbound_limit or 0)
    needed = largest + DEAD_LETTER_HEADROOM_BYTES
    fix = (
        f"set max.message.bytes={needed} on {dlq} (kafka-configs --alter --entity-type topics "
        f"--entity-name {dlq} --add-config max.message.bytes={needed}), or lower "
        "ORDERFLOW_MAX_MESSAGE_BYTES"
    )
    accepted = max_message_bytes if inbound_limit is None else min(max_message_bytes, inbound_limit)
    source = f"ORDERFLOW_MAX_MESSAGE_BYTES {max_message_bytes:,}"
    if inbound_limit is not None:
        source += f", max.message.bytes of {inbound} {inbound_limit:,}"
    if dlq_limit is None:
        return Check(
            name,
            Status.UNKNOWN,
            f"the broker reports no max.message.bytes for {dlq} (some Kafka-protocol brokers "
            f"report only the settings a topic was created with); it needs {needed:,} "
            f"({source})",
            f"check it by hand (kafka-configs --describe --entity-type topics --entity-name "
            f"{dlq}); it needs at least {needed}",
        )
    detail = f"{dlq} takes {dlq_limit:,} bytes; {source}"
    if dlq_limit < accepted:
        return Check(
            name,
            Status.FAIL,
            detail + f": a dead letter of an accepted {accepted:,}-byte value cannot be "
            "written (the relay would retry it forever, holding back its shard)",
            fix,
        )
    if dlq_limit < needed:
        return Check(
            name,
            Status.WARN,
            detail + f": a dead letter of a {largest:,}-byte message, with its key and "
            f"headers (up to {DEAD_LETTER_HEADROOM_BYTES:,} bytes), may not fit",
            fix,
        )
    return Check(
        name,
        Status.PASS,
        detail + f": room for the largest ({largest:,} bytes) with its key and headers",
    )


def outbound_retention_check(
    topic: str,
    configs: Mapping[str, str] | None,
    outbox_retention_hours: float,
    *,
    not_checked: str | None = None,
) -> Check:
    """The outbound topic should keep updates at least as long as the outbox keeps the
    published rows (``ORDERFLOW_OUTBOX_RETENTION_HOURS``), or keep the latest of every
    order (``cleanup.policy=compact``: the updates are state-carried). Shorter: warn, as a
    subscriber away longer than the topic keeps updates can only be caught up with
    ``orderflow replay outbox``. What the broker does not report is unknown."""
    name = "outbound retention"
    if not_checked is not None:
        return Check(name, Status.UNKNOWN, f"not checked: {not_checked}")
    configs = configs or {}
    outbox_ms = outbox_retention_hours * 3_600_000
    outbox_text = f"the outbox keeps published rows {_hours(outbox_ms)}"
    policy = configs.get("cleanup.policy")
    if policy is None:
        return Check(
            name,
            Status.UNKNOWN,
            f"the broker reports no cleanup.policy for {topic} (some Kafka-protocol brokers "
            f"report only the settings a topic was created with); {outbox_text}",
            f"check it by hand: cleanup.policy=compact, or retention.ms at least {outbox_ms:.0f}",
        )
    policies = {part.strip() for part in policy.split(",")}
    if "delete" not in policies:
        return Check(
            name,
            Status.PASS,
            f"{topic}: cleanup.policy={policy}: the latest update of every order stays",
        )
    raw_ms = configs.get("retention.ms")
    if raw_ms is None:
        return Check(
            name,
            Status.UNKNOWN,
            f"{topic}: cleanup.policy={policy}, but the broker reports no retention.ms; "
            f"{outbox_text}",
            f"check it by hand: retention.ms at least {outbox_ms:.0f}",
        )
    try:
        retention_ms = int(raw_ms)
    except ValueError:
        return Check(name, Status.UNKNOWN, f"{topic}: retention.ms is {raw_ms!r}, not a number")
    kept = "forever" if retention_ms < 0 else _hours(retention_ms)
    detail = f"{topic}: cleanup.policy={policy}, retention.ms={retention_ms} (keeps {kept})"
    fix = f"set retention.ms={outbox_ms:.0f} (or -1) on {topic}, or cleanup.policy=compact"
    if 0 <= retention_ms < outbox_ms:
        return Check(
            name,
            Status.WARN,
            detail + f", less than the {_hours(outbox_ms)} the outbox keeps published rows: "
            f"a subscriber away longer than {kept} can only be caught up with "
            "`orderflow replay outbox`",
            fix,
        )
    raw_bytes = configs.get("retention.bytes")
    if raw_bytes is not None and raw_bytes.lstrip("-").isdigit() and int(raw_bytes) >= 0:
        return Check(
            name,
            Status.WARN,
            detail + f", but retention.bytes={raw_bytes} may delete updates sooner",
            f"set retention.bytes=-1 on {topic}",
        )
    return Check(name, Status.PASS, detail + f"; {outbox_text}")


def _hours(milliseconds: float) -> str:
    hours = milliseconds / 3_600_000
    return f"{hours:g} h" if hours >= 1 else f"{milliseconds / 60_000:g} min"


@dataclass(frozen=True, slots=True)
class GroupFacts:
    """The consumer group as the broker describes it."""

    exists: bool
    state: str = ""
    protocol_type: str = "consumer"
    members: int = 0
    #: The topics the members subscribe to, and the inbound partitions assigned to them;
    #: None when the broker does not report the members' metadata and assignments.
    subscriptions: frozenset[str] | None = None
    assigned: frozenset[int] | None = None


def group_check(group: str, inbound: str, partitions: int | None, facts: GroupFacts) -> Check:
    name = "consumer group"
    if not facts.exists or facts.state == "Dead":
        return Check(name, Status.PASS, f"{group} does not exist yet: the first consume creates it")
    if facts.protocol_type != "consumer":
        return Check(
            name,
            Status.WARN,
            f"{group} is a {facts.protocol_type or 'non-consumer'} group, not a consumer group",
            "choose another ORDERFLOW_CONSUMER_GROUP",
        )
    detail = f"{group}: {facts.state}, {facts.members} member{'s' * (facts.members != 1)}"
    if facts.members and facts.subscriptions is None:
        if facts.state in {"PreparingRebalance", "CompletingRebalance"}:
            detail += " (the broker reports no member's subscription)"
        else:
            # Such a broker (Tansu) may also go on listing members that left long ago.
            return Check(
                name,
                Status.UNKNOWN,
                detail + " as the broker reports it, but it reports no member's subscription "
                "or assignment: whether they are orderflow consumers, and still alive, is "
                "unknown",
            )
    if facts.subscriptions is not None and facts.subscriptions - {inbound}:
        others = ", ".join(sorted(facts.subscriptions - {inbound}))
        return Check(
            name,
            Status.WARN,
            detail + f"; its members also read {others}: another application uses this group",
            "give orderflow its own ORDERFLOW_CONSUMER_GROUP",
        )
    if facts.state in {"PreparingRebalance", "CompletingRebalance"}:
        return Check(
            name,
            Status.WARN,
            detail + ": rebalancing now",
            "run the check again in a few seconds; if it keeps rebalancing, look for a "
            "member that restarts in a loop",
        )
    if facts.state == "Stable" and facts.assigned is not None and partitions is not None:
        if len(facts.assigned) < partitions:
            return Check(
                name,
                Status.WARN,
                detail + f"; {len(facts.assigned)} of {inbound}'s {partitions} partitions assigned",
                "check the running consumers' ORDERFLOW_INBOUND_TOPIC",
            )
        detail += f"; all {partitions} partitions of {inbound} assigned"
    if facts.state not in {"Empty", "Stable"}:
        return Check(name, Status.UNKNOWN, detail + ": a state this check does not know")
    return Check(name, Status.PASS, detail)


def lag_check(
    group: str,
    inbound: str,
    stored: Mapping[int, int] | None,
    ends: Mapping[int, int | None] | None,
    *,
    not_checked: str | None = None,
) -> Check:
    """The lag as the consumer sees it: its next offsets, stored in the database (the
    truth; Kafka's copy only feeds lag tools), against each partition's high watermark
    from a fetch response. A listed end offset (ListOffsets) is never used alone: some
    Kafka-protocol brokers (Tansu) list one that trails the log. A partition without a
    high watermark makes the lag unknown rather than wrong."""
    name = "consumer lag"
    if not_checked is not None or stored is None or ends is None:
        return Check(name, Status.UNKNOWN, f"not checked: {not_checked or 'no facts'}")
    unknown = sorted(partition for partition, end in ends.items() if end is None)
    if unknown:
        return Check(
            name,
            Status.UNKNOWN,
            f"no fetch answered for partitions {_list(unknown)} of {inbound}: their end is "
            "unknown (the broker's listed end offsets are not trusted alone)",
        )
    lag = 0
    never: list[tuple[int, int]] = []
    ahead: list[tuple[int, int, int]] = []
    for partition, end in sorted(ends.items()):
        assert end is not None
        if partition not in stored:
            never.append((partition, end))
        elif stored[partition] > end:
            ahead.append((partition, stored[partition], end))
        else:
            lag += end - stored[partition]
    consumed = len(ends) - len(never)
    source = f"database offsets against the broker's high watermarks, {len(ends)} partitions"
    waiting = [(partition, end) for partition, end in never if end > 0]
    if consumed:
        detail = f"lag {lag:,} on {inbound} for {group} ({source})"
        if waiting:
            detail += (
                f"; partitions {_list(p for p, _ in waiting)} never consumed: up to "
                f"{sum(end for _, end in waiting):,} records wait there"
            )
    elif waiting:
        detail = (
            f"{group} has consumed nothing yet: up to {sum(end for _, end in waiting):,} "
            f"records wait on {inbound} ({source})"
        )
    else:
        detail = f"lag 0: {inbound} is empty and {group} has consumed nothing yet ({source})"
    if ahead:
        where = "; ".join(
            f"partition {partition}: stored {offset:,}, end {end:,}"
            for partition, offset, end in ahead
        )
        return Check(
            name,
            Status.WARN,
            detail + f"; the database is ahead of the topic ({where}): the topic was "
            "recreated, or this database belongs to another cluster",
            "check DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS name the same deployment",
        )
    return Check(name, Status.PASS, detail)


def _list(items: Iterator[int] | Sequence[int]) -> str:
    return ", ".join(str(item) for item in items)


def idempotence_check(enabled: bool, error: str | None) -> Check:
    """``error``: the one-line start-up error of an idempotent producer (None: it started)."""
    name = "idempotent producer"
    if not enabled:
        return Check(
            name,
            Status.PASS,
            "off (ORDERFLOW_KAFKA_IDEMPOTENCE=false): not tried; a retried relay batch may "
            "repeat messages (same event_id)",
        )
    if error is None:
        return Check(name, Status.PASS, "the brokers granted a producer id (InitProducerId)")
    if "InitProducerId" in error:
        return Check(
            name,
            Status.FAIL,
            error.split("; set ORDERFLOW_KAFKA_IDEMPOTENCE")[0],
            "set ORDERFLOW_KAFKA_IDEMPOTENCE=false for a broker without it",
        )
    return Check(name, Status.UNKNOWN, f"an idempotent producer did not start: {error}")


# --------------------------------------------------------------------------- secrets


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Every secret the settings hold: the database password (in the URL's user part or
    its query), the SASL password and the key's pass phrase."""
    found: list[str | None] = [settings.kafka_sasl_password, settings.kafka_ssl_key_password]
    if settings.database_url:
        with contextlib.suppress(Exception):
            url = make_url(settings.database_url)
            found.append(None if url.password is None else str(url.password))
            for name in ("password", "sslpassword"):
                value = url.query.get(name)
                found.extend([value] if isinstance(value, str) else list(value or ()))
    return tuple(secret for secret in found if secret)


#: Shorter secrets are not searched for: they would mangle ordinary words, and nothing
#: here prints a secret in the first place (this is the last line of defence).
_SHORTEST_SCRUBBED: Final = 4


def scrub(checks: Sequence[Check], secrets: Sequence[str]) -> list[Check]:
    """``checks`` with every secret replaced by ``***``."""
    hidden = sorted(
        (secret for secret in secrets if len(secret) >= _SHORTEST_SCRUBBED), key=len, reverse=True
    )

    def clean(value: str | None) -> str | None:
        if value is None:
            return None
        for secret in hidden:
            value = value.replace(secret, "***")
        return value

    return [
        replace(check, detail=clean(check.detail) or "", fix=clean(check.fix)) for check in checks
    ]


# --------------------------------------------------------------------------- gathering facts

#: How long the lag probe waits for a fetch answer from every inbound partition.
HIGH_WATERMARK_WAIT_SECONDS: Final = 5.0


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


@dataclass
class _Findings:
    """Checks by name as they are decided; every name of :data:`NAMES` gets one."""

    checks: dict[str, Check] = field(default_factory=dict)

    def add(self, check: Check) -> None:
        self.checks[check.name] = check

    def skip(self, names: Sequence[str], reason: str) -> None:
        for name in names:
            self.checks.setdefault(name, Check(name, Status.UNKNOWN, f"not checked: {reason}"))

    @contextlib.asynccontextmanager
    async def guard(self, *names: str) -> AsyncIterator[None]:
        """An unexpected error while deciding ``names`` makes them unknown, not a crash."""
        try:
            yield
        except Exception as error:
            for name in names:
                self.checks.setdefault(
                    name,
                    Check(name, Status.UNKNOWN, f"the check itself failed: {_one_line(error)}"),
                )


@dataclass
class _DatabaseFacts:
    findings: _Findings
    stored_offsets: dict[int, int] | None = None
    why_no_offsets: str | None = "the database was not read"


@dataclass
class _KafkaFacts:
    findings: _Findings
    partitions: int | None = None
    ends: dict[int, int | None] | None = None
    why_no_ends: str | None = "the brokers were not asked"


async def run_checks(settings: Settings, plan: Plan) -> list[Check]:
    """Every check of :data:`NAMES`, in that order, secrets scrubbed.

    A bad setting (no DATABASE_URL, an unreadable certificate) raises ``SettingsError``
    before anything connects, as at any command's start."""
    engine = create_engine(settings, pool_size=1)
    kafka_common(settings)  # TLS files and SASL settings checked before anything connects
    try:
        with _quiet_kafka_logs():
            database, kafka = await asyncio.gather(
                _check_database(settings, engine, plan), _check_kafka(settings, plan)
            )
    finally:
        await engine.dispose()
    findings = _Findings({**database.findings.checks, **kafka.findings.checks})
    not_checked = None
    if database.stored_offsets is None:
        not_checked = database.why_no_offsets
    elif kafka.ends is None:
        not_checked = kafka.why_no_ends
    findings.add(
        lag_check(
            settings.consumer_group,
            settings.inbound_topic,
            database.stored_offsets,
            kafka.ends,
            not_checked=not_checked,
        )
    )
    findings.skip(NAMES, "no facts")
    return scrub([findings.checks[name] for name in NAMES], secrets_of(settings))


@contextlib.contextmanager
def _quiet_kafka_logs() -> Iterator[None]:
    """aiokafka logs what goes wrong (a refused connection, an InitProducerId error) as it
    happens; here each such fault is a check's result, so its lines would say it twice.
    At DEBUG they stay."""
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    if not kafka_log.isEnabledFor(logging.DEBUG):
        kafka_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        kafka_log.setLevel(level)


_DATABASE_DEPENDENTS: Final = ("server version", "schema", "connections", "database tls")


async def _check_database(settings: Settings, engine: AsyncEngine, plan: Plan) -> _DatabaseFacts:
    found = _DatabaseFacts(_Findings())
    findings = found.findings
    where = redacted(engine.url)
    try:
        await check_database(engine, require_schema=False)
    except StartupError as error:
        findings.add(
            Check(
                "database",
                Status.FAIL,
                str(error),
                "check DATABASE_URL (host, port, user, password, database) and that "
                "PostgreSQL accepts connections from here",
            )
        )
        findings.skip(_DATABASE_DEPENDENTS, "no connection to the database")
        found.why_no_offsets = "no connection to the database"
        return found
    async with findings.guard("database", *_DATABASE_DEPENDENTS), engine.connect() as connection:
        user = (await connection.execute(text("SELECT current_user"))).scalar_one()
        findings.add(Check("database", Status.PASS, f"reached {where} as {user}"))
        async with findings.guard("server version"):
            version_num, version = (
                await connection.execute(
                    text(
                        "SELECT current_setting('server_version_num')::int, "
                        "current_setting('server_version')"
                    )
                )
            ).one()
            findings.add(server_version_check(version_num, version))
        async with findings.guard("schema"):
            current = await _schema_revision(connection)
            from orderflow.runtime.migrate import head_revision

            findings.add(schema_check(current, head_revision(), _revisions_behind(current)))
        async with findings.guard("connections"):
            findings.add(connections_check(await _connection_limits(connection), plan))
        async with findings.guard("database tls"):
            url, tls = settings.database_tls()
            encrypted, tls_version = await _session_tls(connection)
            findings.add(
                database_tls_check(
                    url.host or _query_host(url.query),
                    tls.mode,
                    tls.root_cert,
                    tls.cert is not None,
                    encrypted,
                    tls_version,
                )
            )
        if findings.checks["schema"].status is Status.PASS:
            try:
                found.stored_offsets = await _stored_offsets(connection, settings)
                found.why_no_offsets = None
            except Exception as error:
                found.why_no_offsets = f"the stored offsets were not read: {_one_line(error)}"
        else:
            found.why_no_offsets = "the database has no up-to-date schema"
    return found


def _query_host(query: Mapping[str, Any]) -> str | None:
    host = query.get("host")
    return host if isinstance(host, str) else None


async def _schema_revision(connection: AsyncConnection) -> str | None:
    present = (
        await connection.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL"))
    ).scalar_one()
    if not present:
        return None
    revision = (
        await connection.execute(text("SELECT version_num FROM alembic_version"))
    ).scalar_one_or_none()
    return None if revision is None else str(revision)


def _revisions_behind(current: str | None) -> int | None:
    """How many revisions ``current`` is behind the newest (None: not one of ours)."""
    if current is None:
        return None
    from alembic.script import ScriptDirectory

    from orderflow.runtime.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    for behind, revision in enumerate(script.walk_revisions()):
        if revision.revision == current:
            return behind
    return None


async def _connection_limits(connection: AsyncConnection) -> ConnectionLimits:
    row = (
        await connection.execute(
            text(
                """
                SELECT current_setting('max_connections')::int,
                       current_setting('superuser_reserved_connections')::int,
                       coalesce(current_setting('reserved_connections', true), '0')::int,
                       (SELECT count(*) FROM pg_stat_activity
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()),
                       current_user,
                       (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),
                       (SELECT count(*) FROM pg_stat_activity
                         WHERE usename = current_user AND backend_type = 'client backend'
                           AND pid <> pg_backend_pid()),
                       current_database(),
                       (SELECT datconnlimit FROM pg_database
                         WHERE datname = current_database()),
                       (SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND backend_type = 'client backend'
                           AND pid <> pg_backend_pid())
                """
            )
        )
    ).one()
    return ConnectionLimits(
        max_connections=row[0],
        superuser_reserved=row[1],
        reserved=row[2],
        in_use=row[3],
        role=row[4],
        role_limit=-1 if row[5] is None else row[5],
        role_in_use=row[6],
        database=row[7],
        database_limit=-1 if row[8] is None else row[8],
        database_in_use=row[9],
    )


async def _session_tls(connection: AsyncConnection) -> tuple[bool | None, str | None]:
    row = (
        await connection.execute(
            text("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        )
    ).one_or_none()
    if row is None:
        return None, None
    return bool(row[0]), row[1]


async def _stored_offsets(connection: AsyncConnection, settings: Settings) -> dict[int, int]:
    from consumer.models import ConsumerOffset

    rows = await connection.execute(
        select(ConsumerOffset.partition, ConsumerOffset.next_offset).where(
            ConsumerOffset.group_id == settings.consumer_group,
            ConsumerOffset.topic == settings.inbound_topic,
        )
    )
    return {int(partition): int(offset) for partition, offset in rows}


_KAFKA_DEPENDENTS: Final = (
    "inbound topic",
    "outbound topic",
    "dead-letter topic",
    "dead-letter size",
    "outbound retention",
    "idempotent producer",
    "consumer group",
)


async def _check_kafka(settings: Settings, plan: Plan) -> _KafkaFacts:
    found = _KafkaFacts(_Findings())
    findings = found.findings
    hosts = [server.rpartition(":")[0] for server in settings.require_kafka()]
    findings.add(kafka_security_check(settings, hosts))
    # A group-less consumer, started as consume starts its own (same one-line error); it
    # also fetches the high watermarks for the lag.
    consumer = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100, **kafka_common(settings)
    )
    try:
        await start_kafka_client(consumer, settings)
    except StartupError as error:
        findings.add(
            Check(
                "brokers",
                Status.FAIL,
                str(error),
                "check KAFKA_BOOTSTRAP_SERVERS, KAFKA_SECURITY_PROTOCOL and the SASL/TLS "
                "settings, and that the brokers accept connections from here",
            )
        )
        findings.skip(_KAFKA_DEPENDENTS, "no connection to the brokers")
        found.why_no_ends = "no connection to the brokers"
        return found
    try:
        admin = AIOKafkaAdminClient(**kafka_common(settings))
        try:
            await admin.start()
            await _check_cluster(settings, plan, admin, consumer, found)
        except Exception as error:
            findings.skip(
                ("brokers", *_KAFKA_DEPENDENTS),
                f"the admin client failed: {_one_line(error)}",
            )
            if found.ends is None:
                found.why_no_ends = f"the admin client failed: {_one_line(error)}"
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()
    async with findings.guard("idempotent producer"):
        findings.add(await _try_idempotence(settings))
    return found


async def _check_cluster(
    settings: Settings,
    plan: Plan,
    admin: AIOKafkaAdminClient,
    consumer: AIOKafkaConsumer,
    found: _KafkaFacts,
) -> None:
    findings = found.findings
    cluster = await admin.describe_cluster()
    brokers = cluster.get("brokers") or []
    findings.add(
        Check(
            "brokers",
            Status.PASS,
            f"{len(brokers)} broker{'s' * (len(brokers) != 1)} at "
            f"{settings.kafka_bootstrap_servers} (cluster {cluster.get('cluster_id')}, "
            f"controller {cluster.get('controller_id')})",
        )
    )
    # Every topic: naming ours would make a broker that auto-creates topics create them.
    described = {
        entry["topic"]: entry for entry in await admin.describe_topics() if not entry["error_code"]
    }
    facts = {
        topic: _topic_facts(described[topic])
        for topic in (settings.inbound_topic, settings.outbound_topic, settings.dlq_topic)
        if topic in described
    }
    inbound = facts.get(settings.inbound_topic)
    found.partitions = None if inbound is None else inbound.partitions
    for name, variable, topic, consumers in (
        ("inbound topic", "ORDERFLOW_INBOUND_TOPIC", settings.inbound_topic, plan.consumers),
        ("outbound topic", "ORDERFLOW_OUTBOUND_TOPIC", settings.outbound_topic, None),
        ("dead-letter topic", "ORDERFLOW_DLQ_TOPIC", settings.dlq_topic, None),
    ):
        findings.add(
            topic_check(
                name, variable, topic, facts.get(topic), brokers=len(brokers), consumers=consumers
            )
        )

    async with findings.guard("dead-letter size", "outbound retention"):
        configs, errors = await _topic_configs(admin, list(facts))

        def why_not(topic: str) -> str | None:
            if topic not in facts:
                return f"{topic} does not exist"
            if topic in errors:
                return f"the broker answered DescribeConfigs for {topic} with {errors[topic]}"
            return None

        dlq = settings.dlq_topic
        findings.add(
            dead_letter_size_check(
                dlq,
                _int_config(configs.get(dlq, {}), "max.message.bytes"),
                settings.inbound_topic,
                _int_config(configs.get(settings.inbound_topic, {}), "max.message.bytes"),
                settings.max_message_bytes,
                not_checked=why_not(dlq),
            )
        )
        outbound = settings.outbound_topic
        findings.add(
            outbound_retention_check(
                outbound,
                configs.get(outbound),
                settings.outbox_retention_hours,
                not_checked=why_not(outbound),
            )
        )

    async with findings.guard("consumer group"):
        findings.add(
            group_check(
                settings.consumer_group,
                settings.inbound_topic,
                found.partitions,
                await _group_facts(admin, settings),
            )
        )

    if inbound is None:
        found.why_no_ends = f"{settings.inbound_topic} does not exist"
        return
    try:
        found.ends = await _high_watermarks(consumer, settings.inbound_topic, inbound.partitions)
        found.why_no_ends = None
    except Exception as error:
        found.why_no_ends = f"the high watermarks were not fetched: {_one_line(error)}"


def _topic_facts(entry: Mapping[str, Any]) -> TopicFacts:
    partitions = entry.get("partitions") or []
    replicas = [len(partition.get("replicas") or ()) for partition in partitions]
    unhealthy = tuple(
        sorted(
            int(partition["partition"])
            for partition in partitions
            if partition.get("error_code") or partition.get("leader", -1) < 0
        )
    )
    return TopicFacts(
        name=str(entry["topic"]),
        partitions=len(partitions),
        replication=min(replicas, default=0),
        unhealthy=unhealthy,
    )


async def _topic_configs(
    admin: AIOKafkaAdminClient, topics: Sequence[str]
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Each topic's configuration, as far as the broker reports it, and the error it gave
    instead for the others (an authorization error, say).

    Every entry is asked for (no names): Apache Kafka then lists defaults too, and some
    other brokers (Tansu) drop the connection when given names."""
    if not topics:
        return {}, {}
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
    )
    configs: dict[str, dict[str, str]] = {}
    errors: dict[str, str] = {}
    for response in responses:
        for resource in response.to_object().get("resources", []):
            topic = str(resource["resource_name"])
            code = resource.get("error_code")
            if code:
                errors[topic] = f"error {code} ({for_code(code).__name__})"
                continue
            entries = configs.setdefault(topic, {})
            for entry in resource.get("config_entries") or []:
                key = entry.get("config_names", entry.get("config_name"))
                value = entry.get("config_value")
                if key is not None and value is not None:
                    entries[str(key)] = str(value)
    return configs, errors


def _int_config(configs: Mapping[str, str], key: str) -> int | None:
    value = configs.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


async def _group_facts(admin: AIOKafkaAdminClient, settings: Settings) -> GroupFacts:
    group = settings.consumer_group
    # Listed first: some brokers (Tansu) answer DescribeGroups for an unknown group with an
    # error instead of the state Dead.
    listed = {str(entry[0]) for entry in await admin.list_consumer_groups()}
    if group not in listed:
        return GroupFacts(exists=False)
    responses = await admin.describe_consumer_groups([group])
    for response in responses:
        for described in response.to_object().get("groups", []):
            if described.get("group") != group:
                continue
            if described.get("error_code"):
                raise RuntimeError(f"DescribeGroups answered error {described['error_code']}")
            return _described_group(described, settings.inbound_topic)
    raise RuntimeError(f"DescribeGroups did not describe {group}")


def _described_group(described: Mapping[str, Any], inbound: str) -> GroupFacts:
    members = described.get("members") or []
    subscriptions: set[str] = set()
    assigned: set[int] = set()
    reported = True
    for member in members:
        metadata, assignment = member.get("member_metadata"), member.get("member_assignment")
        if not metadata or not assignment:
            reported = False
            continue
        try:
            subscriptions.update(ConsumerProtocolMemberMetadata.decode(metadata).subscription)
            for topic, partitions in ConsumerProtocolMemberAssignment.decode(assignment).assignment:
                if topic == inbound:
                    assigned.update(partitions)
        except Exception:
            reported = False
    return GroupFacts(
        exists=True,
        state=str(described.get("state") or ""),
        protocol_type=str(described.get("protocol_type") or ""),
        members=len(members),
        subscriptions=frozenset(subscriptions) if reported and members else None,
        assigned=frozenset(assigned) if reported and members else None,
    )


async def _high_watermarks(
    consumer: AIOKafkaConsumer, topic: str, partitions: int
) -> dict[int, int | None]:
    """Each partition's high watermark, from a fetch response: fetched at the listed end
    offset (always a valid position, at or before the real end), so that at most the
    records the listed end trails by come back, and are dropped."""
    assigned = [TopicPartition(topic, partition) for partition in range(partitions)]
    consumer.assign(assigned)
    listed = await consumer.end_offsets(assigned)
    for partition in assigned:
        consumer.seek(partition, listed[partition])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HIGH_WATERMARK_WAIT_SECONDS
    while loop.time() < deadline and any(consumer.highwater(p) is None for p in assigned):
        await consumer.getmany(*assigned, timeout_ms=200)
    return {partition.partition: consumer.highwater(partition) for partition in assigned}


async def _try_idempotence(settings: Settings) -> Check:
    if not settings.kafka_idempotence:
        return idempotence_check(False, None)
    producer = create_producer(settings)
    try:
        await start_kafka_client(producer, settings)
    except StartupError as error:
        return idempotence_check(True, str(error))
    with contextlib.suppress(Exception):
        await producer.stop()
    return idempotence_check(True, None)
