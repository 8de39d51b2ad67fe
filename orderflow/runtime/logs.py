"""Structured logs: one event name plus fields per line, JSON for machines, text for people.

Every log line of the process goes through one formatter, whatever produced it: our
modules (standard ``logging`` with ``extra={...}`` fields), aiokafka, SQLAlchemy, or
``structlog.get_logger()``. The format is JSON lines when stderr is not a terminal (a
container, a service manager, a pipe) and readable colored text on a terminal;
``ORDERFLOW_LOG_FORMAT=json|console`` forces one.

A JSON line carries ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` (the
sentence) and the fields (``component``, ``topic``, ``partition``, ``offset``,
``event_id``, ``order_id``, ``reason``, ...), plus ``exception`` with the traceback when
there is one. As a last line of defence, anything that looks like a password in a URL
(``scheme://user:password@``) is replaced by ``***`` before a line is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, Final, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from orderflow.runtime.settings import LOG_FORMATS, SettingsError, log_format_from_env

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: ``scheme://user:password@`` -> ``scheme://user:***@`` (the password may hold anything
#: but ``@``, ``/`` and white space).
_URL_PASSWORD: Final = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)[^@/\s]+@")


def configure(
    level: str = "INFO", log_format: str | None = None, *, stream: TextIO | None = None
) -> None:
    """Send every log line of the process to ``stream`` (stderr) in one format.

    ``log_format``: ``json`` or ``console``; None reads ``ORDERFLOW_LOG_FORMAT``, and
    without it picks JSON unless the stream is a terminal. A bad level or format is a
    one-line error and exit code 2, like any other bad setting.
    """
    stream = sys.stderr if stream is None else stream
    try:
        chosen = _format(log_format, stream)
        numeric_level = _level(level)
    except SettingsError as error:
        print(f"orderflow: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    renderer: Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        # Plain tracebacks: rich's would print local variables, and a local may be a secret.
        renderer = structlog.dev.ConsoleRenderer(
            colors=_is_terminal(stream), exception_formatter=structlog.dev.plain_traceback
        )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # The traceback becomes text first, so that it is scrubbed like the rest.
            structlog.processors.format_exc_info,
            _scrub,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # aiokafka is chatty at INFO about group joins; keep its warnings.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, numeric_level))
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _format(log_format: str | None, stream: TextIO) -> str:
    if log_format is not None:
        lowered = log_format.strip().lower()
        if lowered not in LOG_FORMATS:
            raise SettingsError(
                f"the log format must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}"
            )
        return lowered
    from_env = log_format_from_env()
    if from_env is not None:
        return from_env
    return "console" if _is_terminal(stream) else "json"


def _level(level: str) -> int:
    upper = level.strip().upper()
    if upper not in LEVELS:
        raise SettingsError(f"--log-level must be one of {', '.join(LEVELS)}; got {level!r}")
    return int(getattr(logging, upper))


def _is_terminal(stream: TextIO) -> bool:
    isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` password replaced by ``***``."""
    if "://" not in text:
        return text
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def _scrub(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = redact_text(value)
    return event_dict


def _dumps(event_dict: MutableMapping[str, Any], **_: Any) -> str:
    """orjson (fast, exact); the standard library for what orjson refuses (huge ints)."""
    try:
        return orjson.dumps(event_dict, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(event_dict, default=str, ensure_ascii=False)
