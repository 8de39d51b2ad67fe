"""Structured logs: JSON lines off a terminal, text on one, every logger through one format,
one line per batch at info, and no password ever written."""

from __future__ import annotations

import io
import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from aiokafka import TopicPartition

from consumer.apply import BatchOutcome, InboundMessage
from consumer.errors import DeadLetterReason, MalformedJson, UnknownOrder
from consumer.events import decode_event
from consumer.intake import _log_batch
from orderflow.runtime import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure() replaces the root handlers: give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    kafka_level = logging.getLogger("aiokafka").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(kafka_level)
    structlog.reset_defaults()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = stream.getvalue().splitlines()
    return [orjson.loads(line) for line in lines]


def configured(log_format: str | None = "json", level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    logs.configure(level, log_format, stream=stream)
    return stream


def test_json_lines_carry_time_level_logger_event_and_fields() -> None:
    stream = configured()
    logging.getLogger("orderflow.consumer").info(
        "batch applied", extra={"partition": 2, "first_offset": 10, "reasons": {"a": 1}}
    )
    (line,) = json_lines(stream)
    assert line["event"] == "batch applied"
    assert line["level"] == "info"
    assert line["logger"] == "orderflow.consumer"
    assert line["timestamp"].endswith("Z")
    assert (line["partition"], line["first_offset"], line["reasons"]) == (2, 10, {"a": 1})


def test_percent_arguments_are_rendered() -> None:
    stream = configured()
    logging.getLogger("orderflow").warning("transient fault at offset %d: %s", 7, "boom")
    assert json_lines(stream)[0]["event"] == "transient fault at offset 7: boom"


def test_aiokafka_goes_through_the_same_formatter_and_is_quiet_at_info() -> None:
    stream = configured()
    kafka = logging.getLogger("aiokafka.consumer.group_coordinator")
    kafka.info("joined group")  # chatty: not shown at INFO
    kafka.warning("heartbeat failed for group %s", "g")
    (line,) = json_lines(stream)
    assert line["logger"] == "aiokafka.consumer.group_coordinator"
    assert line["level"] == "warning"
    assert line["event"] == "heartbeat failed for group g"


def test_structlog_loggers_write_the_same_lines() -> None:
    stream = configured()
    structlog.get_logger("orderflow.api").info("request", order_id="o-1")
    structlog.get_logger("orderflow.api").debug("not shown at info")
    (line,) = json_lines(stream)
    assert (line["event"], line["order_id"], line["level"]) == ("request", "o-1", "info")
    assert line["logger"] == "orderflow.api"


def test_an_exception_stays_on_its_one_json_line() -> None:
    stream = configured()
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        logging.getLogger("orderflow").exception("consumer stopped")
    (line,) = json_lines(stream)
    assert line["level"] == "error"
    assert "RuntimeError: kaput" in line["exception"]
    assert "Traceback" in line["exception"]


def test_values_json_cannot_hold_do_not_break_a_line() -> None:
    stream = configured()
    logging.getLogger("orderflow").info(
        "odd",
        extra={"huge": 2**100, "id": uuid.UUID(int=1), "reason": DeadLetterReason.MALFORMED_JSON},
    )
    (line,) = json_lines(stream)
    assert line["huge"] == 2**100
    assert line["id"] == str(uuid.UUID(int=1))
    assert line["reason"] == "malformed_json"


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_passwords_in_urls_are_never_written(log_format: str) -> None:
    stream = configured(log_format)
    log = logging.getLogger("orderflow")
    log.warning("cannot reach postgresql://orderflow:pw-s3cret@db:5432/orders")
    log.warning("retrying", extra={"url": "postgresql+asyncpg://u:other-s3cret@h/db?x=1"})
    try:
        raise OSError("connect to kafka://user:exc-s3cret@broker:9093 failed")
    except OSError:
        log.exception("failed")
    text = stream.getvalue()
    for secret in ("pw-s3cret", "other-s3cret", "exc-s3cret"):
        assert secret not in text
    assert "postgresql://orderflow:***@db:5432/orders" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("a postgres://:p@h b", "a postgres://:***@h b"),
        ("https://example.com/path@x", "https://example.com/path@x"),
        ("no url here: a:b@c", "no url here: a:b@c"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert logs.redact_text(text) == expected


def test_console_format_is_readable_text() -> None:
    stream = configured("console")
    logging.getLogger("orderflow.relay").info("batch published", extra={"messages": 5})
    text = stream.getvalue()
    assert "batch published" in text
    assert "messages=5" in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text.splitlines()[0])


def test_json_when_not_on_a_terminal_and_text_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERFLOW_LOG_FORMAT", raising=False)
    piped = configured(None)
    logging.getLogger("orderflow").info("hello")
    assert json_lines(piped)[0]["event"] == "hello"

    terminal = Terminal()
    logs.configure("INFO", stream=terminal)
    logging.getLogger("orderflow").info("hello")
    assert "hello" in terminal.getvalue()
    assert not terminal.getvalue().startswith("{")


def test_the_environment_forces_a_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERFLOW_LOG_FORMAT", "json")
    terminal = Terminal()
    logs.configure("INFO", stream=terminal)
    logging.getLogger("orderflow").info("hello")
    assert orjson.loads(terminal.getvalue().splitlines()[0])["event"] == "hello"


@pytest.mark.parametrize(
    ("environment", "level", "named"),
    [("xml", "INFO", "ORDERFLOW_LOG_FORMAT"), ("json", "LOUD", "--log-level")],
)
def test_a_bad_format_or_level_is_one_line_and_exit_2(
    environment: str,
    level: str,
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("ORDERFLOW_LOG_FORMAT", environment)
    with pytest.raises(SystemExit) as excinfo:
        logs.configure(level, stream=io.StringIO())
    assert excinfo.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("orderflow: error: ")
    assert named in line


def test_levels_are_case_insensitive() -> None:
    stream = configured(level="debug")
    logging.getLogger("orderflow").debug("shown")
    assert json_lines(stream)[0]["event"] == "shown"


# --- the consumer's batch line ------------------------------------------------------------------

ORDER_ID = "0b6c6a53-2222-4a57-8f44-6d1b1c9e2a10"
EVENT_ID = "7d9f0c1e-1111-4f6e-9d5c-0a7c2b8f9e01"
PAID = orjson.dumps(
    {
        "event_id": EVENT_ID,
        "event_type": "OrderPaid",
        "schema_version": 1,
        "occurred_at": "2026-11-24T10:15:00Z",
        "order_id": ORDER_ID,
        "payload": {"payment_id": "p", "amount": "1.00"},
    }
)


def batch_with_dead_letters() -> tuple[list[InboundMessage], BatchOutcome]:
    def message(offset: int, value: bytes) -> InboundMessage:
        return InboundMessage("orders.events", 4, offset, ORDER_ID.encode(), value)

    messages = [message(offset, PAID) for offset in range(100, 110)]
    messages[3] = message(103, b'{"event_id": "not-a-uuid", "order_id": "x", ')
    outcome = BatchOutcome(next_offset=110, applied=7, duplicates=1)
    outcome.dead_letters = Counter(
        {DeadLetterReason.MALFORMED_JSON: 1, DeadLetterReason.UNKNOWN_ORDER: 1}
    )
    outcome.rejections = [
        (messages[3], MalformedJson("the value is not valid UTF-8 JSON"), None),
        (messages[7], UnknownOrder("no such order"), decode_event(None, PAID)),
    ]
    return messages, outcome


def test_one_info_line_per_batch_with_its_counts_and_range() -> None:
    stream = configured()
    messages, outcome = batch_with_dead_letters()
    _log_batch(TopicPartition("orders.events", 4), messages, outcome, 0.0123, 0.00456)
    (line,) = json_lines(stream)  # nothing per message at info
    assert line["event"] == "batch applied"
    assert line["level"] == "info"
    assert line["component"] == "consumer"
    assert (line["topic"], line["partition"]) == ("orders.events", 4)
    assert (line["first_offset"], line["last_offset"]) == (100, 109)
    assert (line["applied"], line["duplicates"], line["dead_lettered"]) == (7, 1, 2)
    assert (line["duration_ms"], line["queued_ms"]) == (12.3, 4.6)
    assert line["dead_letter_reasons"] == {"malformed_json": 1, "unknown_order": 1}
    assert line["dead_letter_offsets"] == [103, 107]


def test_each_dead_letter_in_detail_at_debug() -> None:
    stream = configured(level="DEBUG")
    messages, outcome = batch_with_dead_letters()
    _log_batch(TopicPartition("orders.events", 4), messages, outcome, 0.01)
    batch, malformed, unknown = json_lines(stream)
    assert batch["event"] == "batch applied"
    assert malformed["event"] == unknown["event"] == "event dead-lettered"
    assert malformed["level"] == "debug"
    assert (malformed["offset"], malformed["reason"]) == (103, "malformed_json")
    assert (malformed["topic"], malformed["partition"]) == ("orders.events", 4)
    assert malformed["event_id"] is None  # the value did not even parse
    assert (unknown["offset"], unknown["reason"]) == (107, "unknown_order")
    assert (unknown["event_id"], unknown["order_id"]) == (EVENT_ID, ORDER_ID)
    assert unknown["error"] == "no such order"


def test_a_clean_batch_line_has_no_dead_letter_fields() -> None:
    stream = configured()
    messages = [InboundMessage("t", 0, 5, None, PAID)]
    _log_batch(TopicPartition("t", 0), messages, BatchOutcome(next_offset=6, applied=1), 0.001)
    (line,) = json_lines(stream)
    assert line["dead_lettered"] == 0
    assert "dead_letter_reasons" not in line
