"""Shared by the operator and upstream commands: a rate limit, a progress bar, a summary.

Long commands (backfill, replay, import, redrive, loadgen) all show items/s and an ETA
while they run, publish no faster than ``--rate``, and end with one summary of what
happened to every item.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class RateLimiter:
    """At most ``rate`` items per second on average (``None``: no limit).

    A token bucket holding at most one second's worth, so a pause is not made up
    for with a burst larger than that.
    """

    def __init__(self, rate: float | None) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self._rate = rate
        self._tokens = 0.0 if rate is None else min(rate, 1.0)
        self._last = time.monotonic()

    async def acquire(self, count: int = 1) -> None:
        """Wait until ``count`` more items may go."""
        if self._rate is None:
            return
        capacity = max(self._rate, float(count))
        while True:
            now = time.monotonic()
            self._tokens = min(capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens >= count:
                self._tokens -= count
                return
            await asyncio.sleep((count - self._tokens) / self._rate)


@contextmanager
def progress_bar(
    description: str, total: int | None, *, console: Console | None = None
) -> Iterator[ProgressHandle]:
    """A progress bar with items done, items/s and ETA, on stderr (stdout stays clean).

    ``total`` may be ``None`` when unknown (then no ETA). Hidden when stderr is not a
    terminal, so logs and CI output are not flooded with redraws.
    """
    console = console or Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, rate="")
        yield ProgressHandle(progress, task)


class ProgressHandle:
    def __init__(self, progress: Progress, task: object) -> None:
        self._progress = progress
        self._task = task
        self._started = time.monotonic()
        self.done = 0

    def advance(self, count: int = 1) -> None:
        self.done += count
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._progress.update(
            self._task,  # type: ignore[arg-type]
            advance=count,
            rate=f"{self.done / elapsed:,.0f} items/s",
        )

    def set_total(self, total: int | None) -> None:
        self._progress.update(self._task, total=total)  # type: ignore[arg-type]


class Summary:
    """Counts per outcome (``published``, ``applied``, ``skipped``, ``rejected``, ...)."""

    def __init__(self, title: str, *outcomes: str) -> None:
        self.title = title
        self.counts: Counter[str] = Counter({outcome: 0 for outcome in outcomes})
        self._started = time.monotonic()

    def add(self, outcome: str, count: int = 1) -> None:
        self.counts[outcome] += count

    def __getitem__(self, outcome: str) -> int:
        return self.counts[outcome]

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def render(self, *, dry_run: bool = False) -> str:
        """One line: ``backfill snapshots: published=10 skipped=2 (1.2 s)``."""
        elapsed = time.monotonic() - self._started
        parts = " ".join(f"{name}={count}" for name, count in self.counts.items())
        note = " (dry run: nothing was written)" if dry_run else ""
        return f"{self.title}: {parts} in {elapsed:.1f} s{note}"

    def print(self, *, dry_run: bool = False) -> None:
        """The summary on stdout, as a small table on a terminal and one line otherwise."""
        console = Console()
        if not console.is_terminal:
            print(self.render(dry_run=dry_run), file=sys.stdout, flush=True)
            return
        table = Table(title=self.title + (" (dry run: nothing was written)" if dry_run else ""))
        table.add_column("outcome")
        table.add_column("count", justify="right")
        for name, count in self.counts.items():
            table.add_row(name, f"{count:,}")
        console.print(table)
