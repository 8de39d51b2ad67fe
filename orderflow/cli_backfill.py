"""Operator commands: backfill snapshots, replay outbox/topic, dlq list/redrive."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
