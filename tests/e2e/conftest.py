"""Fixtures of the end-to-end tests: real ``orderflow`` processes, never left behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.processes import Launcher, Start


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()


@pytest.fixture
def orderflow(launch: Launcher) -> Start:
    """``orderflow(command, settings, **env)`` starts a process (``launch.start``)."""
    return launch.start
