"""Telling transient infrastructure faults from real errors.

A transient fault (connection refused or cut, server shutting down, failover, deadlock,
serialisation failure, pool exhausted) is retried with backoff and never turns a message
into a dead letter. Anything else is a real error about the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Final

from sqlalchemy import exc as sa_exc

#: SQLSTATE classes and codes that mean "try again later", not "this data is bad".
_TRANSIENT_SQLSTATE_PREFIXES: Final = ("08", "53", "57P", "58")
_TRANSIENT_SQLSTATES: Final = frozenset({"40001", "40P01", "55P03", "25006"})


def _sqlstate(error: BaseException) -> str | None:
    code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return code if isinstance(code, str) else None


def is_transient(error: BaseException) -> bool:
    """True when ``error`` (or anything in its cause chain) is an infrastructure fault."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, sa_exc.TimeoutError | sa_exc.InterfaceError):
            return True
        if isinstance(current, OSError | TimeoutError | ConnectionError | EOFError):
            return True
        code = _sqlstate(current)
        if code is not None and (
            code in _TRANSIENT_SQLSTATES or code.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
        ):
            return True
        name = type(current).__name__
        # asyncpg's connection-level errors carry no SQLSTATE.
        if name in {"ConnectionDoesNotExistError", "InterfaceError", "InternalClientError"}:
            return True
        if isinstance(current, sa_exc.StatementError):
            current = current.orig
        else:
            current = current.__cause__ or current.__context__
    return False


def is_data_error(error: BaseException) -> bool:
    """True when the database refused the data itself (SQLSTATE class 22 or 23).

    Only such errors may turn a message into a dead letter. Anything that is neither
    transient nor a data error is a bug: it must stop the process loudly, not be hidden
    in the dead-letter topic.
    """
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa_exc.DataError | sa_exc.IntegrityError):
            return True
        code = _sqlstate(current)
        if code is not None and code.startswith(("22", "23")):
            return True
        if isinstance(current, sa_exc.StatementError):
            current = current.orig
        else:
            current = current.__cause__ or current.__context__
    return False


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, initial: float = 0.1, maximum: float = 5.0) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * (2**self._attempt))
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    async def sleep(self, stop: asyncio.Event | None = None) -> None:
        """Wait the next delay, or less if ``stop`` is set meanwhile."""
        delay = self.next_delay()
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
