"""The benchmarks still run and check what they measure: each, at a tiny size, against the
tests' services, must exit 0 (their own checks passed) and end with its ``RESULT`` line.
Speed itself is never asserted here: the benchmarks print ratios, on a quiet machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import Services

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(services: Services, script: str, *args: str) -> list[str]:
    """The benchmark's output lines; fails with its output if it exits non-zero."""
    environment = {
        **os.environ,
        "DATABASE_URL": services.admin_database_url,
        "KAFKA_BOOTSTRAP_SERVERS": services.bootstrap_servers,
        "ORDERFLOW_KAFKA_IDEMPOTENCE": "true" if services.kafka_idempotence else "false",
        "ORDERFLOW_KAFKA_SESSION_TIMEOUT_MS": str(services.session_timeout_ms),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    lines = done.stdout.strip().splitlines()
    assert lines, output[-4000:]
    assert lines[-1].startswith("RESULT "), output[-4000:]
    return lines


@pytest.mark.timeout(600)
def test_the_relay_benchmark_checks_every_record_it_counts(services: Services) -> None:
    lines = run_benchmark(services, "relay.py", "--rows", "3000", "--relays", "1,2")
    assert any(line.startswith("checks: ") and "all sound" in line for line in lines)
    assert "ratio=" in lines[-1]


@pytest.mark.timeout(600)
def test_the_consumer_benchmark_runs(services: Services) -> None:
    lines = run_benchmark(services, "consumer.py", "--events", "600", "--rounds", "1")
    assert "ratio_vs_baseline=" in lines[-1]


@pytest.mark.timeout(600)
def test_the_latency_benchmark_times_every_stage(services: Services) -> None:
    lines = run_benchmark(services, "latency.py", "--rate", "50", "--seconds", "3")
    assert "baseline_p99_ms=" in lines[-1]
    assert "floor_p99_ms=" in lines[-1]  # every floor event came back, too
    # The relay's log lines were found and matched to the events (else "-").
    [acks] = [line for line in lines if "-> every ack of that batch" in line]
    assert "p50" in acks
    [handed] = [line for line in lines if "hands" in line]
    assert "p50" in handed
    # So were the consumer's: the first stage split for the first record of each batch.
    [fetched] = [line for line in lines if "send -> the consumer has it" in line]
    assert "p50" in fetched
    [queued] = [line for line in lines if "-> its batch starts" in line]
    assert "p50" in queued


@pytest.mark.timeout(600)
def test_the_retention_benchmark_runs(services: Services) -> None:
    lines = run_benchmark(services, "retention.py", "--retained", "5000", "--rows", "2000")
    assert "retained_ratio=" in lines[-1]
    assert "retained_db_cost_ratio=" in lines[-1]
    assert "stalled" not in "\n".join(lines)


@pytest.mark.timeout(600)
def test_the_designs_benchmark_publishes_every_row_once_in_each_design(
    services: Services,
) -> None:
    # It exits non-zero (PROBLEM) when a design fetched a row twice, skipped one, or left
    # its state saying a row is still unpublished.
    lines = run_benchmark(
        services, "designs.py", "--writes", "100", "--rows", "2000", "--rounds", "1"
    )
    assert "PROBLEM" not in "\n".join(lines)
    for design in ("hot_update", "pending_delete", "pending_trigger", "shard_position"):
        assert f"{design}_publishing_ratio=" in lines[-1]
