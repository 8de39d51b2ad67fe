"""The metrics objects and the endpoint's pure parts, without services: what each observer
hook counts, the relay's latency histogram, readiness of a standby, the port checks, and
how the endpoint reads requests. (tests/integration/test_metrics.py and
tests/e2e/test_health.py check the same against real services and processes.)"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import typer.main
from aiokafka import TopicPartition
from typer.testing import CliRunner

import orderflow.cli.main
from consumer.apply import BatchOutcome
from consumer.errors import DeadLetterReason
from consumer.observe import ConsumerObserver
from orderflow.devstand.embedded import free_port
from orderflow.runtime.health import (
    _BadRequest,
    _read_request,
    describe_error,
    listen_port,
    serve_health,
)
from orderflow.runtime.metrics import (
    PUBLISH_LATENCY_BUCKETS,
    ConsumerMetrics,
    RelayMetrics,
    _LatencyHistogram,
)
from orderflow.runtime.settings import Settings, SettingsError
from outbox.observe import RelayObserver


def settings(**overrides: object) -> Settings:
    return Settings(database_url=None, kafka_bootstrap_servers=None).with_overrides(**overrides)


# -- ports ------------------------------------------------------------------------------


def test_no_port_means_no_endpoint() -> None:
    assert listen_port(settings()) is None
    assert listen_port(settings(metrics_port=9100)) == 9100


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_a_port_that_cannot_be_one_is_refused(port: int) -> None:
    with pytest.raises(SettingsError, match="ORDERFLOW_METRICS_PORT must be between 1 and 65535"):
        listen_port(settings(metrics_port=port))


def test_the_environment_refuses_port_zero() -> None:
    with pytest.raises(SettingsError, match="ORDERFLOW_METRICS_PORT"):
        Settings.from_env({"ORDERFLOW_METRICS_PORT": "0"})
    assert Settings.from_env({"ORDERFLOW_METRICS_PORT": "9100"}).metrics_port == 9100


@pytest.mark.parametrize("command", ["consume", "relay"])
def test_the_flag_is_parsed_and_range_checked(command: str) -> None:
    group = typer.main.get_command(orderflow.cli.main.app)
    leaf = group.commands[command]  # type: ignore[attr-defined]
    context = leaf.make_context(command, ["--metrics-port", "9100"])
    assert context.params["metrics_port"] == 9100
    assert leaf.make_context(command, []).params["metrics_port"] is None
    result = CliRunner().invoke(orderflow.cli.main.app, [command, "--metrics-port", "0"])
    assert result.exit_code == 2
    assert "--metrics-port" in result.output


# -- the consumer's metrics -------------------------------------------------------------


def sample(metrics: ConsumerMetrics | RelayMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


def test_consumer_metrics_count_each_committed_outcome() -> None:
    metrics = ConsumerMetrics()
    observer: ConsumerObserver = metrics  # it is the observer the consume loop takes
    observer.fetched(7)
    observer.fetched(3)
    observer.batch_committed(
        BatchOutcome(
            next_offset=10,
            applied=6,
            duplicates=1,
            dead_letters=Counter(
                {DeadLetterReason.MALFORMED_JSON: 2, DeadLetterReason.UNKNOWN_ORDER: 1}
            ),
        ),
        size=10,
        seconds=0.02,
    )
    assert sample(metrics, "orderflow_events_consumed_total") == 10
    assert sample(metrics, "orderflow_events_applied_total") == 6
    assert sample(metrics, "orderflow_events_duplicates_total") == 1
    dead = {
        reason.value: sample(metrics, "orderflow_events_dead_lettered_total", reason=reason.value)
        for reason in DeadLetterReason
    }
    assert dead == {
        **{reason.value: 0.0 for reason in DeadLetterReason},
        "malformed_json": 2.0,
        "unknown_order": 1.0,
    }
    assert sample(metrics, "orderflow_consumer_batch_size_sum") == 10
    assert sample(metrics, "orderflow_consumer_batch_size_bucket", le="5.0") == 0
    assert sample(metrics, "orderflow_consumer_batch_size_bucket", le="10.0") == 1
    assert sample(metrics, "orderflow_consumer_transaction_seconds_sum") == pytest.approx(0.02)
    # Not watching a consumer yet: state metrics exist, at zero.
    assert metrics.registry.get_sample_value("orderflow_consumer_assigned_partitions") is None
    assert sample(metrics, "orderflow_consumer_transient_retries_total") == 0


def test_a_consumer_is_ready_once_assigned_even_with_no_partitions() -> None:
    metrics = ConsumerMetrics()
    assert not metrics.serving().ok
    metrics._consumer = object()  # type: ignore[assignment]  # as after watch()
    assert not metrics.serving().ok  # joined, but the group has not assigned yet
    metrics.partitions_assigned(frozenset())
    serving = metrics.serving()
    assert serving.ok
    assert "standby" in serving.detail
    metrics.partitions_assigned(frozenset({TopicPartition("t", 0), TopicPartition("t", 1)}))
    assert metrics.serving().detail == "2 assigned"


def test_two_components_in_one_process_keep_their_own_metrics() -> None:
    first, second = ConsumerMetrics(), ConsumerMetrics()
    first.fetched(5)
    assert sample(first, "orderflow_events_consumed_total") == 5
    assert sample(second, "orderflow_events_consumed_total") == 0


# -- the relay's metrics ----------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    topic: str
    age: float


def test_relay_metrics_count_per_topic_and_time_each_message() -> None:
    metrics = RelayMetrics()
    observer: RelayObserver = metrics
    observer.joined()
    observer.published(
        [Published("updates", 0.001), Published("updates", 0.2), Published("dlq", 4.0)],
        waited=0.003,
    )
    assert sample(metrics, "orderflow_relay_messages_published_total", topic="updates") == 2
    assert sample(metrics, "orderflow_relay_messages_published_total", topic="dlq") == 1
    latency = "orderflow_relay_publish_latency_seconds"
    assert sample(metrics, f"{latency}_count") == 3
    assert sample(metrics, f"{latency}_sum") == pytest.approx(0.004 + 0.203 + 4.003)
    assert sample(metrics, f"{latency}_bucket", le="0.005") == 1
    assert sample(metrics, f"{latency}_bucket", le="0.25") == 2
    assert sample(metrics, f"{latency}_bucket", le="2.5") == 2
    assert sample(metrics, f"{latency}_bucket", le="5.0") == 3
    assert sample(metrics, f"{latency}_bucket", le="+Inf") == 3
    assert sample(metrics, "orderflow_relay_batch_size_count") == 1
    assert sample(metrics, "orderflow_relay_member") == 1
    observer.left()
    assert sample(metrics, "orderflow_relay_member") == 0


def test_latency_buckets_are_inclusive_and_cumulative() -> None:
    histogram = _LatencyHistogram([1.0, 2.0])
    histogram.observe([0.5, 1.0, 1.5, 2.0, 3.0])
    family = histogram.family("x_seconds", "x")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets == {"1.0": 2, "2.0": 4, "+Inf": 5}  # le means "less than or equal"
    assert histogram.sum == pytest.approx(8.0)
    assert list(PUBLISH_LATENCY_BUCKETS) == sorted(PUBLISH_LATENCY_BUCKETS)
    assert not any(math.isinf(bound) for bound in PUBLISH_LATENCY_BUCKETS)


def test_a_relay_is_ready_while_a_member_standby_included() -> None:
    metrics = RelayMetrics()
    assert not metrics.serving().ok

    class Standby:
        owned_shards: frozenset[int] = frozenset()

    metrics._relay = Standby()  # type: ignore[assignment]  # as after watch()
    assert not metrics.serving().ok  # no membership: no database session
    metrics.joined()
    serving = metrics.serving()
    assert serving.ok
    assert serving.detail.startswith("owns 0 of 64")


# -- the endpoint's request reading -----------------------------------------------------


async def read(raw: bytes) -> tuple[str, str, dict[str, str]]:
    reader = asyncio.StreamReader(limit=1024)
    reader.feed_data(raw)
    reader.feed_eof()
    return await _read_request(reader)


async def test_a_request_is_read_with_lower_case_header_names() -> None:
    method, target, headers = await read(
        b"get /metrics?x=1 HTTP/1.1\r\nAccept: text/plain\r\nAccept-Encoding: gzip\r\n\r\n"
    )
    assert (method, target) == ("GET", "/metrics?x=1")
    assert headers == {"accept": "text/plain", "accept-encoding": "gzip"}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"hello\r\n\r\n", "not an HTTP/1.x request line"),
        (b"GET / SPDY/3\r\n\r\n", "not an HTTP/1.x request line"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 65 + b"\r\n", "more than 64 headers"),
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n", "too long"),
    ],
)
async def test_a_bad_request_is_refused(raw: bytes, problem: str) -> None:
    with pytest.raises(_BadRequest, match=problem):
        await read(raw)


async def test_a_request_cut_short_is_a_closed_connection() -> None:
    with pytest.raises(ConnectionError):
        await read(b"GET / HTTP/1.1\r\nAccept: x\r\n")


def test_check_failures_are_one_line() -> None:
    assert describe_error(ConnectionRefusedError(111, "Connection refused")) == (
        "connection refused"
    )
    assert describe_error(RuntimeError("first line\nsecond line")) == "first line"
    assert describe_error(RuntimeError()) == "RuntimeError"


# -- documentation ----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def documented_names() -> set[str]:
    """The names an operator looks for: what a query uses (``_total`` on counters)."""
    names = set()
    for metrics in (ConsumerMetrics(), RelayMetrics()):
        for family in metrics.registry.collect():
            if family.name.startswith(("process_", "python_")):
                continue
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            names.add(family.name + suffix)
    return names


@pytest.mark.parametrize("document", ["README.md", "docs/operations.md"])
def test_every_metric_is_documented(document: str) -> None:
    text = (ROOT / document).read_text(encoding="utf-8")
    names = documented_names()
    assert len(names) >= 20
    missing = sorted(name for name in names if f"`{name}`" not in text)
    assert not missing, f"{document} does not list {missing}"


# -- the endpoint's HTTP contract, on a real socket -----------------------------------------

#: What docs/operations.md promises for each answer: status, content type (its start).
_METRICS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def exchange(port: int, raw: bytes) -> Answer:
    """Send ``raw`` as it is, read the whole answer (the endpoint closes after each)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


@pytest.fixture
async def endpoint_port() -> AsyncIterator[int]:
    """A consumer's endpoint with nothing to check against: alive, never ready."""
    port = free_port()
    unreachable = settings(
        metrics_port=port,
        database_url=f"postgresql://orderflow@127.0.0.1:{free_port()}/orders",
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
    )
    async with serve_health(unreachable, ConsumerMetrics(), asyncio.Event()):
        yield port


@pytest.mark.parametrize(
    ("raw", "status", "content_type"),
    [
        pytest.param(b"GET /healthz HTTP/1.1\r\n\r\n", 200, "application/json", id="healthz"),
        pytest.param(b"HEAD /healthz HTTP/1.1\r\n\r\n", 200, "application/json", id="head"),
        pytest.param(b"GET /readyz HTTP/1.1\r\n\r\n", 503, "application/json", id="not-ready"),
        pytest.param(b"GET /metrics HTTP/1.1\r\n\r\n", 200, _METRICS_TEXT, id="metrics"),
        pytest.param(
            b"GET /metrics?x=1 HTTP/1.0\r\nAccept: application/openmetrics-text\r\n\r\n",
            200,
            _OPENMETRICS,
            id="openmetrics",
        ),
        pytest.param(b"GET /nope HTTP/1.1\r\n\r\n", 404, "application/json", id="unknown-path"),
        pytest.param(b"GET /metrics/ HTTP/1.1\r\n\r\n", 404, "application/json", id="slash"),
        pytest.param(b"POST /readyz HTTP/1.1\r\n\r\n", 405, "application/json", id="post"),
        pytest.param(b"BREW /metrics HTTP/1.1\r\n\r\n", 405, "application/json", id="brew"),
        pytest.param(b"hello\r\n\r\n", 400, "application/json", id="not-http"),
        pytest.param(b"GET /\x00\xff HTTP/1.1\r\nX\r\n\r\n", 400, "application/json", id="junk"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 65 + b"\r\n",
            400,
            "application/json",
            id="too-many-headers",
        ),
    ],
)
async def test_every_answer_is_a_documented_status_and_content_type(
    endpoint_port: int, raw: bytes, status: int, content_type: str
) -> None:
    """The statuses (200, 400, 404, 405, 503) and content types (JSON, or the metrics
    formats) of docs/operations.md, each with a body of the length it says, not cached."""
    answer = await exchange(endpoint_port, raw)
    assert (answer.status, answer.headers["content-type"]) == (status, content_type)
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["connection"] == "close"
    if raw.startswith(b"HEAD "):
        assert answer.body == b""
        return
    assert len(answer.body) == int(answer.headers["content-length"])
    if content_type == "application/json":
        assert isinstance(orjson.loads(answer.body), dict)
    if status == 405:
        assert answer.headers["allow"] == "GET, HEAD"
    if status == 503:
        assert orjson.loads(answer.body)["missing"] == ["database", "broker", "partitions"]
