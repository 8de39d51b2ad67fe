"""Operator commands: parked list, parked expire."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from orderflow.cli.support import (
    DatabaseUrl,
    DlqTopic,
    DryRun,
    command_group,
    fail,
    load_settings,
    note,
    open_database,
    parse_duration,
    run,
    when,
    wide_console,
)

if TYPE_CHECKING:
    from consumer.models import ParkedEvent

parked_app = command_group(
    "Parked events: inbound events that wait for earlier events of their order."
)

Order = Annotated[
    str | None,
    typer.Option("--order", help="Only the events of this order id.", show_default=False),
]


def _order(text: str | None) -> uuid.UUID | None:
    if text is None:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        fail(f"--order: {text!r} is not an order id (a UUID)")


@parked_app.command("list")
def parked_list_command(
    order: Order = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Show at most this many (the oldest first).")
    ] = 100,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per parked event.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Show what waits: order, event id and type, why, since when, from where.

    An event waits (is parked) when it cannot apply yet: its order does not exist, or
    it applies from a status the order can still reach. It is applied right after the
    event it needs, or dead-lettered once it waited ORDERFLOW_PARK_TIMEOUT_S.
    """
    order_id = _order(order)
    settings = load_settings(database_url=database_url)

    async def main() -> None:
        import orjson

        from consumer.parking import list_parked
        from orderflow.runtime.wiring import session_factory

        async with (
            open_database(settings, pool_size=1) as engine,
            session_factory(engine)() as session,
        ):
            rows = await list_parked(session, order_id=order_id, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        if as_json:
            for row in rows:
                print(orjson.dumps(_as_json(row)).decode())
        else:
            _print_parked(rows)
        note(f"{len(rows)} parked events" + (f" (the oldest {limit}; more wait)" if more else ""))

    run(main())


def _as_json(row: ParkedEvent) -> dict[str, object]:
    return {
        "order_id": str(row.order_id),
        "event_id": str(row.event_id),
        "event_type": row.event_type,
        "reason": row.reason,
        "message": row.message,
        "parked_at": row.parked_at,
        "group": row.group_id,
        "source": {"topic": row.topic, "partition": row.partition, "offset": row.offset},
    }


def _print_parked(rows: Sequence[ParkedEvent]) -> None:
    from rich.table import Table

    table = Table("since", "order", "event type", "event id", "reason", "source")
    for row in rows:
        table.add_row(
            when(row.parked_at),
            str(row.order_id),
            row.event_type,
            str(row.event_id),
            row.reason,
            f"{row.topic}:{row.partition}:{row.offset}",
        )
    wide_console().print(table)


@parked_app.command("expire")
def parked_expire_command(
    order: Order = None,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Only events parked at least this long: 90s, 30m, 2h, 7d or seconds.",
        ),
    ] = "0s",
    dry_run: DryRun = False,
    database_url: DatabaseUrl = None,
    dlq_topic: DlqTopic = None,
) -> None:
    """Dead-letter parked events now, when you know they will never be released.

    Each goes to the dead-letter topic as an expired one would: its original key and
    value, the reason it was parked for, and error.parked_ms. Safe while consumers run: an
    event that a consumer applies at the same moment ends one way, once.
    """
    order_id = _order(order)
    waited = parse_duration(older_than, "--older-than")
    if order_id is None and not dry_run:
        note(
            "no --order given: every parked event"
            + (f" older than {older_than}" if waited else "")
            + " is dead-lettered"
        )
    settings = load_settings(database_url=database_url, dlq_topic=dlq_topic)

    async def main() -> None:
        from datetime import UTC, datetime

        from consumer.parking import expire_where
        from orderflow.runtime.wiring import session_factory
        from orderflow.tools.progress import Summary

        async with open_database(settings, pool_size=1) as engine:
            expired, matched = await expire_where(
                session_factory(engine),
                dead_letter_topic=settings.dlq_topic,
                order_id=order_id,
                older_than=waited,
                now=datetime.now(UTC),
                dry_run=dry_run,
            )
        summary = Summary("parked expire", "matched", "dead-lettered")
        summary.add("matched", len(matched))
        summary.add("dead-lettered", expired.count)
        summary.print(dry_run=dry_run)

    run(main())
