"""Observing commands: outbox stats."""

from __future__ import annotations

from typing import Annotated

import typer

from orderflow.cli.support import DatabaseUrl, command_group, load_settings, run

outbox_app = command_group("Inspect the transactional outbox.")


@outbox_app.command("stats")
def outbox_stats_command(
    database_url: DatabaseUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per topic.")] = False,
) -> None:
    """Per topic: unpublished backlog, age of the oldest unpublished message, and messages
    published in the last minute."""
    settings = load_settings(database_url=database_url)

    async def main() -> None:
        from orderflow.runtime.wiring import check_database, create_engine
        from outbox.stats import outbox_stats

        engine = create_engine(settings, pool_size=1)
        try:
            await check_database(engine)
            async with engine.connect() as connection:
                stats = await outbox_stats(connection)
        finally:
            await engine.dispose()
        if as_json:
            import orjson

            for line in stats:
                age = line.oldest_unpublished_age
                print(
                    orjson.dumps(
                        {
                            "topic": line.topic,
                            "backlog": line.backlog,
                            "oldest_unpublished_age_seconds": (
                                None if age is None else round(age.total_seconds(), 3)
                            ),
                            "published_last_minute": line.published_last_minute,
                        }
                    ).decode()
                )
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("topic", "backlog", "oldest unpublished", "published last minute")
        for line in stats:
            age = line.oldest_unpublished_age
            table.add_row(
                line.topic,
                str(line.backlog),
                "-" if age is None else f"{age.total_seconds():.1f} s",
                str(line.published_last_minute),
            )
        if not stats:
            table.add_row("(no messages waiting or published in the last minute)", "", "", "")
        Console().print(table)

    run(main())
