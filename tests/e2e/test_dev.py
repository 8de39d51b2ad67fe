"""``orderflow dev`` runs the whole system from nothing and leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{entry.name}: {command}")
    return found


def test_dev_runs_the_whole_flow_and_cleans_up(tmp_path: Path) -> None:
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    for variable in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS"):
        environment.pop(variable, None)  # dev needs nothing configured
    result = subprocess.run(
        [sys.executable, "-m", "orderflow", "dev", "--duration", "12", "--rate", "60"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = re.findall(r"^produced=.*$", result.stdout, flags=re.MULTILINE)
    assert summaries, result.stdout
    last = dict(part.split("=") for part in summaries[-1].split())
    counts = {name: int(value) for name, value in last.items()}
    assert counts["produced"] >= 200
    assert counts["applied"] > 0
    assert counts["dead_lettered"] > 0  # the sample stream mixes poison in
    # Every message ends applied, skipped, dead-lettered or waiting (parked: racing
    # producers are in the stream); a few may be in flight at stop.
    assert counts["parked"] > 0
    assert counts["released"] > 0
    handled = counts["applied"] + counts["duplicates"] + counts["dead_lettered"] + counts["waiting"]
    assert counts["produced"] - 60 <= handled <= counts["produced"]
    assert counts["published"] >= counts["applied"] - 60
    assert counts["updates_read"] > 0
    assert "stopped: no process left behind" in result.stdout
    assert _processes_mentioning(str(tmp_path)) == []
