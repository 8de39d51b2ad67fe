"""Running real ``orderflow`` processes in tests, each configured by a test's Settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from orderflow.devstand.embedded import die_with_parent
from orderflow.runtime.settings import Settings

ORDERFLOW = (sys.executable, "-m", "orderflow")
#: What the processes read from the environment; the test's Settings decide all of it.
_SETTINGS_VARIABLES = ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of an ``orderflow`` process configured as ``settings``.

    Nothing leaks in from the caller's own DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS or
    ORDERFLOW_* variables; ``extra`` adds or overrides variables.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in _SETTINGS_VARIABLES and not name.startswith("ORDERFLOW_")
    }
    values = {
        "DATABASE_URL": settings.database_url,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "ORDERFLOW_INBOUND_TOPIC": settings.inbound_topic,
        "ORDERFLOW_OUTBOUND_TOPIC": settings.outbound_topic,
        "ORDERFLOW_DLQ_TOPIC": settings.dlq_topic,
        "ORDERFLOW_CONSUMER_GROUP": settings.consumer_group,
        "ORDERFLOW_DB_POOL_SIZE": str(settings.db_pool_size),
        "ORDERFLOW_KAFKA_IDEMPOTENCE": "true" if settings.kafka_idempotence else "false",
        "ORDERFLOW_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
        "ORDERFLOW_PARK_TIMEOUT_S": f"{settings.park_timeout_s:g}",
    }
    environment.update({name: value for name, value in values.items() if value is not None})
    environment.update(extra)
    return environment


@dataclass
class Process:
    """One running ``orderflow`` command; its stderr goes to ``log``."""

    command: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def describe(self) -> str:
        tail = "\n".join(self.stderr().splitlines()[-40:])
        return (
            f"orderflow {self.command} (pid {self.popen.pid}, exit code {self.popen.poll()}); "
            f"stderr ends with:\n{tail}"
        )

    def assert_running(self) -> None:
        if self.popen.poll() is not None:
            pytest.fail(f"{self.describe()}\nexited while it should be working")

    async def exit_code(self, *, within: float) -> int:
        try:
            return await asyncio.to_thread(self.popen.wait, within)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.describe()}\ndid not exit within {within:.0f} s")


Start = Callable[..., Process]


class Launcher:
    """Starts ``orderflow <command>`` processes; ``kill_all`` SIGKILLs what still runs."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self.started: list[Process] = []

    def start(
        self, command: str, settings: Settings, *, wrapper: Sequence[str] = (), **extra: str
    ) -> Process:
        """Start ``orderflow command`` (under ``wrapper``, a command that runs the rest:
        ``ip netns exec NAME``, say)."""
        log = self._logs / f"{len(self.started):02d}-{command}.stderr"
        with log.open("wb") as stderr:
            popen = subprocess.Popen(
                [*wrapper, *ORDERFLOW, command],
                env=process_env(settings, **extra),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own process group: teardown kills all of it
                # and if this test process dies first (killed by a timeout, say), so does it
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        process = Process(command, popen, log)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            if process.popen.poll() is None:  # not reaped yet: the group id is still ours
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait(timeout=30)
