"""``orderflow check``'s rules, each on the facts it decides from (no services): where
pass ends and warn or fail begins, and that what a service does not say is unknown."""

from __future__ import annotations

import pytest
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from orderflow.runtime.migrate import head_revision
from orderflow.runtime.settings import Settings
from orderflow.tools.check import (
    DEAD_LETTER_HEADROOM_BYTES,
    NAMES,
    Check,
    ConnectionLimits,
    GroupFacts,
    Plan,
    Status,
    TopicFacts,
    _described_group,
    _revisions_behind,
    connections_check,
    database_tls_check,
    dead_letter_size_check,
    failed,
    group_check,
    idempotence_check,
    is_local,
    kafka_security_check,
    lag_check,
    outbound_retention_check,
    schema_check,
    scrub,
    secrets_of,
    server_version_check,
    summary,
    topic_check,
)

MIB = 1024 * 1024
#: Apache Kafka's default max.message.bytes (1 MiB + 12).
KAFKA_DEFAULT = 1_048_588


# --------------------------------------------------------------------------- connections


def test_the_plan_counts_each_process_pool_and_health_endpoint() -> None:
    plan = Plan(consumers=2, relays=2, apis=1, consumer_pool=8, api_pool=4, health=True)
    assert plan.connections() == 2 * 9 + 2 * 2 + 4
    assert plan.arithmetic() == (
        "2 consume × (8 pool + 1 health) + 2 relay × (1 + 1 health) + 1 api × 4 pool = 26"
    )
    assert Plan(consumers=1, relays=1).arithmetic() == "1 consume × 8 pool + 1 relay × 1 = 9"


LIMITS = ConnectionLimits(max_connections=100, superuser_reserved=3, in_use=0)


@pytest.mark.parametrize(
    ("consumers", "in_use", "status"),
    [
        (8, 0, Status.PASS),  # 8 × 8 + 1 = 65 of 97
        (9, 0, Status.PASS),  # 73 of 97: 75 %
        (10, 0, Status.WARN),  # 81 of 97: above 80 %
        (12, 0, Status.WARN),  # 97 of 97: fits exactly, no room
        (12, 1, Status.WARN),  # 97 + 1 now: fits only if those go away
        (13, 0, Status.FAIL),  # 105 > 97
    ],
)
def test_connections_warn_near_the_limit_and_fail_over_it(
    consumers: int, in_use: int, status: Status
) -> None:
    check = connections_check(
        ConnectionLimits(max_connections=100, superuser_reserved=3, in_use=in_use),
        Plan(consumers=consumers, relays=1, consumer_pool=8),
    )
    assert check.status is status, check.detail
    assert "max_connections 100 − 3 superuser_reserved_connections = 97" in check.detail
    assert f"in use now {in_use}" in check.detail
    assert (check.fix is None) == (status is Status.PASS)


def test_connections_say_the_arithmetic() -> None:
    check = connections_check(LIMITS, Plan(consumers=1000, relays=2, consumer_pool=8))
    assert check.status is Status.FAIL
    assert check.detail.startswith(
        "planned 1000 consume × 8 pool + 2 relay × 1 = 8002; available: max_connections 100 − "
        "3 superuser_reserved_connections = 97; in use now 0 -> 8002 of 97"
    )
    assert "7905 more than the limit" in check.detail


def test_the_tightest_limit_decides_and_reserved_connections_count() -> None:
    limits = ConnectionLimits(
        max_connections=500,
        superuser_reserved=3,
        reserved=2,
        in_use=40,
        role="orderflow",
        role_limit=20,
        role_in_use=5,
    )
    check = connections_check(limits, Plan(consumers=2, relays=1, consumer_pool=8))  # 17
    assert check.status is Status.WARN  # 17 + 5 > 20
    assert "role orderflow CONNECTION LIMIT 20" in check.detail
    roomy = connections_check(
        ConnectionLimits(max_connections=500, superuser_reserved=3, reserved=2),
        Plan(consumers=2, relays=1),
    )
    assert roomy.status is Status.PASS
    assert "− 2 reserved_connections = 495" in roomy.detail


# --------------------------------------------------------------------------- server, schema


@pytest.mark.parametrize(
    ("number", "text", "status"),
    [
        (120017, "12.17", Status.FAIL),
        (130020, "13.20", Status.WARN),
        (140013, "14.13", Status.PASS),
        (180006, "18.6 (Debian 18.6-1.pgdg12+1)", Status.PASS),
    ],
)
def test_server_version(number: int, text: str, status: Status) -> None:
    check = server_version_check(number, text)
    assert check.status is status
    assert check.detail.startswith(f"PostgreSQL {text.split()[0]}")


def test_the_schema_must_be_at_the_newest_revision() -> None:
    head = head_revision()
    assert schema_check(head, head, 0).status is Status.PASS
    unmigrated = schema_check(None, head, None)
    assert unmigrated.status is Status.FAIL
    assert unmigrated.fix == "run `orderflow migrate`"
    behind = schema_check("0001", head, _revisions_behind("0001"))
    assert behind.status is Status.FAIL
    assert behind.fix == "run `orderflow migrate`"
    assert f"at revision 0001, {_revisions_behind('0001')} behind the newest, {head}" in (
        behind.detail
    )
    newer = schema_check("9999_future", head, _revisions_behind("9999_future"))
    assert newer.status is Status.FAIL
    assert "does not know" in newer.detail


def test_revisions_behind_walks_the_migrations() -> None:
    assert _revisions_behind(head_revision()) == 0
    assert _revisions_behind("0001") == int(head_revision()[:4]) - 1
    assert _revisions_behind("nope") is None
    assert _revisions_behind(None) is None


# --------------------------------------------------------------------------- TLS, SASL


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("::1", True),
        ("[::1]", True),
        (None, True),
        ("/var/run/postgresql", True),
        ("db.example.com", False),
        ("10.0.0.5", False),
    ],
)
def test_is_local(host: str | None, local: bool) -> None:
    assert is_local(host) is local


def test_database_tls_reports_what_the_session_uses() -> None:
    local = database_tls_check("127.0.0.1", None, None, False, False, None)
    assert local.status is Status.PASS
    assert "not encrypted" in local.detail
    plain = database_tls_check("db.example.com", "disable", None, False, False, None)
    assert plain.status is Status.WARN
    assert "ORDERFLOW_DB_SSLMODE=verify-full" in (plain.fix or "")
    unverified = database_tls_check("db.example.com", "require", None, False, True, "TLSv1.3")
    assert unverified.status is Status.WARN
    assert "TLSv1.3" in unverified.detail
    verified = database_tls_check("db.example.com", "verify-full", "ca.pem", True, True, "TLSv1.3")
    assert verified.status is Status.PASS
    assert "CA ca.pem, client certificate set; this connection uses TLSv1.3" in verified.detail
    silent = database_tls_check("db.example.com", "require", None, False, None, None)
    assert silent.status is Status.UNKNOWN


def test_kafka_security_names_the_settings_never_the_password() -> None:
    sasl = Settings(
        database_url=None,
        kafka_bootstrap_servers="kafka-1:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="orderflow",
        kafka_sasl_password="sasl-s3cret",
    )
    check = kafka_security_check(sasl, ["kafka-1"])
    assert check.status is Status.PASS
    assert check.detail == (
        "SASL_SSL, SASL SCRAM-SHA-512 as orderflow, CA the system CAs, no client certificate"
    )
    assert "s3cret" not in check.detail
    plain = Settings(database_url=None, kafka_bootstrap_servers="kafka-1:9092")
    assert kafka_security_check(plain, ["kafka-1"]).status is Status.WARN
    assert kafka_security_check(plain, ["127.0.0.1"]).status is Status.PASS
    clear_password = Settings(
        database_url=None,
        kafka_bootstrap_servers="kafka-1:9092",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="orderflow",
        kafka_sasl_password="sasl-s3cret",
    )
    warned = kafka_security_check(clear_password, ["kafka-1"])
    assert warned.status is Status.WARN
    assert "sends the password as it is" in warned.detail


def test_every_secret_is_scrubbed() -> None:
    settings = Settings(
        database_url="postgresql://orderflow:db-s3cret@db:5432/orders?password=query-s3cret",
        kafka_bootstrap_servers="kafka:9092",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="orderflow",
        kafka_sasl_password="sasl-s3cret",
    )
    secrets = secrets_of(settings)
    assert set(secrets) == {"db-s3cret", "query-s3cret", "sasl-s3cret"}
    leaky = [Check("x", Status.FAIL, "db-s3cret and sasl-s3cret", "use query-s3cret")]
    (clean,) = scrub(leaky, secrets)
    assert clean == Check("x", Status.FAIL, "*** and ***", "use ***")


# --------------------------------------------------------------------------- topics


def test_a_missing_topic_fails() -> None:
    check = topic_check("inbound topic", "ORDERFLOW_INBOUND_TOPIC", "t", None, brokers=3)
    assert check.status is Status.FAIL
    assert check.detail == "t (ORDERFLOW_INBOUND_TOPIC) does not exist"
    assert "orderflow topics create" in (check.fix or "")


def test_topic_partitions_leaders_and_replication() -> None:
    healthy = TopicFacts("t", partitions=12, replication=3)
    assert topic_check("inbound topic", "V", "t", healthy, brokers=3, consumers=4).status is (
        Status.PASS
    )
    idle = topic_check("inbound topic", "V", "t", healthy, brokers=3, consumers=14)
    assert idle.status is Status.WARN
    assert "14 consumers planned: 2 will stand by, idle" in idle.detail
    single = TopicFacts("t", partitions=3, replication=1)
    assert topic_check("outbound topic", "V", "t", single, brokers=1).status is Status.PASS
    assert topic_check("outbound topic", "V", "t", single, brokers=3).status is Status.WARN
    leaderless = TopicFacts("t", partitions=3, replication=3, unhealthy=(1,))
    assert topic_check("outbound topic", "V", "t", leaderless, brokers=3).status is Status.WARN


@pytest.mark.parametrize(
    ("dlq", "inbound", "status"),
    [
        (1000, None, Status.FAIL),  # even the value alone does not fit
        (MIB - 1, KAFKA_DEFAULT, Status.FAIL),
        (KAFKA_DEFAULT, KAFKA_DEFAULT, Status.WARN),  # the value fits, its headers may not
        (KAFKA_DEFAULT, None, Status.WARN),
        (2 * MIB, KAFKA_DEFAULT, Status.PASS),
        (2 * MIB, 5 * MIB, Status.WARN),  # oversized inbound messages are dead letters too
        (None, KAFKA_DEFAULT, Status.UNKNOWN),  # the broker did not say: never a pass
    ],
)
def test_the_dead_letter_topic_holds_the_largest_inbound_message(
    dlq: int | None, inbound: int | None, status: Status
) -> None:
    check = dead_letter_size_check("dlq", dlq, "in", inbound, MIB)
    assert check.status is status, check.detail
    needed = max(MIB, inbound or 0) + DEAD_LETTER_HEADROOM_BYTES
    if status is not Status.PASS:
        assert str(needed) in (check.fix or ""), check.fix


def test_the_dead_letter_size_is_not_judged_without_the_topic() -> None:
    check = dead_letter_size_check("dlq", None, "in", None, MIB, not_checked="dlq does not exist")
    assert check == Check("dead-letter size", Status.UNKNOWN, "not checked: dlq does not exist")


WEEK_MS = 168 * 3_600_000


@pytest.mark.parametrize(
    ("configs", "status"),
    [
        ({"cleanup.policy": "compact"}, Status.PASS),
        ({"cleanup.policy": "delete", "retention.ms": str(WEEK_MS)}, Status.PASS),
        ({"cleanup.policy": "delete", "retention.ms": "-1"}, Status.PASS),
        ({"cleanup.policy": "delete", "retention.ms": str(WEEK_MS - 1)}, Status.WARN),
        ({"cleanup.policy": "compact,delete", "retention.ms": "3600000"}, Status.WARN),
        (
            {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "1000"},
            Status.WARN,
        ),
        ({"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}, Status.PASS),
        ({"cleanup.policy": "delete"}, Status.UNKNOWN),
        ({}, Status.UNKNOWN),  # a broker that reports only what a topic was created with
    ],
)
def test_outbound_retention_against_the_outbox(configs: dict[str, str], status: Status) -> None:
    check = outbound_retention_check("updates", configs, 168)
    assert check.status is status, check.detail


def test_a_short_outbound_retention_says_what_it_costs() -> None:
    check = outbound_retention_check(
        "updates", {"cleanup.policy": "delete", "retention.ms": "86400000"}, 168
    )
    assert check.status is Status.WARN
    assert "keeps 24 h" in check.detail
    assert "less than the 168 h the outbox keeps published rows" in check.detail
    assert "orderflow replay outbox" in check.detail
    assert check.fix == "set retention.ms=604800000 (or -1) on updates, or cleanup.policy=compact"


# --------------------------------------------------------------------------- group, lag


def _member(subscription: list[str], assignment: list[tuple[str, list[int]]]) -> dict[str, object]:
    return {
        "member_id": "m",
        "member_metadata": ConsumerProtocolMemberMetadata(0, subscription, b"").encode(),
        "member_assignment": ConsumerProtocolMemberAssignment(0, assignment, b"").encode(),
    }


def test_the_group_as_kafka_describes_it() -> None:
    described = {
        "group": "g",
        "state": "Stable",
        "protocol_type": "consumer",
        "members": [_member(["in"], [("in", [0, 1])]), _member(["in"], [("in", [2])])],
    }
    facts = _described_group(described, "in")
    assert facts == GroupFacts(
        exists=True,
        state="Stable",
        members=2,
        subscriptions=frozenset({"in"}),
        assigned=frozenset({0, 1, 2}),
    )
    check = group_check("g", "in", 3, facts)
    assert check.status is Status.PASS
    assert check.detail == "g: Stable, 2 members; all 3 partitions of in assigned"
    assert group_check("g", "in", 4, facts).status is Status.WARN


def test_a_group_shared_with_another_application_warns() -> None:
    facts = _described_group(
        {"group": "g", "state": "Stable", "protocol_type": "consumer",
         "members": [_member(["in", "payments"], [("in", [0])])]},
        "in",
    )  # fmt: skip
    check = group_check("g", "in", 1, facts)
    assert check.status is Status.WARN
    assert "also read payments" in check.detail


def test_group_states() -> None:
    assert group_check("g", "in", 3, GroupFacts(exists=False)).status is Status.PASS
    assert group_check("g", "in", 3, GroupFacts(exists=True, state="Dead")).status is Status.PASS
    assert group_check("g", "in", 3, GroupFacts(exists=True, state="Empty")).status is Status.PASS
    rebalancing = GroupFacts(exists=True, state="PreparingRebalance", members=2)
    assert group_check("g", "in", 3, rebalancing).status is Status.WARN
    odd = GroupFacts(exists=True, state="Sleeping")
    assert group_check("g", "in", 3, odd).status is Status.UNKNOWN
    other = GroupFacts(exists=True, state="Stable", protocol_type="connect")
    assert group_check("g", "in", 3, other).status is Status.WARN


def test_members_without_metadata_are_unknown() -> None:
    """Tansu describes members with empty metadata and assignments, and keeps listing a
    member that left: the state is reported, the members are not vouched for."""
    facts = _described_group(
        {"group": "g", "state": "Stable", "protocol_type": "consumer",
         "members": [{"member_id": "m", "member_metadata": b"", "member_assignment": b""}]},
        "in",
    )  # fmt: skip
    assert facts.subscriptions is None
    assert facts.assigned is None
    check = group_check("g", "in", 3, facts)
    assert check.status is Status.UNKNOWN
    assert "g: Stable, 1 member as the broker reports it" in check.detail


def test_lag_is_the_database_offsets_against_the_high_watermarks() -> None:
    check = lag_check("g", "in", {0: 10, 1: 20, 2: 5}, {0: 10, 1: 25, 2: 12})
    assert check.status is Status.PASS
    assert check.detail.startswith("lag 12 on in for g")
    partly = lag_check("g", "in", {0: 10}, {0: 15, 1: 7, 2: 0})
    assert partly.status is Status.PASS
    assert "lag 5" in partly.detail
    assert "partitions 1 never consumed: up to 7 records wait there" in partly.detail
    fresh = lag_check("g", "in", {}, {0: 3, 1: 0})
    assert "g has consumed nothing yet: up to 3 records wait on in" in fresh.detail
    empty = lag_check("g", "in", {}, {0: 0})
    assert empty.detail.startswith("lag 0: in is empty")


def test_lag_without_a_trustworthy_end_is_unknown() -> None:
    check = lag_check("g", "in", {0: 10, 1: 0}, {0: 10, 1: None})
    assert check.status is Status.UNKNOWN
    assert "partitions 1" in check.detail
    assert lag_check("g", "in", None, None, not_checked="x").status is Status.UNKNOWN


def test_a_database_ahead_of_the_topic_warns() -> None:
    check = lag_check("g", "in", {0: 500}, {0: 450})
    assert check.status is Status.WARN
    assert "partition 0: stored 500, end 450" in check.detail


# --------------------------------------------------------------------------- idempotence


def test_idempotence() -> None:
    assert idempotence_check(False, None).status is Status.PASS
    assert idempotence_check(True, None).status is Status.PASS
    refused = idempotence_check(
        True,
        "the Kafka broker at k:9092 refused the idempotent producer (InitProducerId failed: "
        "[Error -1] UnknownError): it does not support it, or does not allow it to this "
        "client; set ORDERFLOW_KAFKA_IDEMPOTENCE=false for a broker without it",
    )
    assert refused.status is Status.FAIL
    assert refused.fix == "set ORDERFLOW_KAFKA_IDEMPOTENCE=false for a broker without it"
    assert refused.detail.endswith("does not allow it to this client")
    assert idempotence_check(True, "cannot reach Kafka").status is Status.UNKNOWN


# --------------------------------------------------------------------------- the whole


def test_failed_and_summary() -> None:
    checks = [Check(name, Status.PASS, "ok") for name in NAMES]
    assert not failed(checks)
    checks[3] = Check(NAMES[3], Status.FAIL, "no")
    checks[4] = Check(NAMES[4], Status.UNKNOWN, "?")
    assert failed(checks)
    assert summary(checks) == f"{len(NAMES) - 2} pass, 0 warn, 1 fail, 1 unknown"
