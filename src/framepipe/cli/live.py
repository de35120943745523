"""``framepipe sources`` and ``framepipe health``: the live apps running from this home, read
from the health snapshots they write (so from any terminal)."""

import typer

from framepipe.cli.common import JsonOpt, console, dump_json, errors, say, settings_of

__all__ = ["health", "sources"]


def sources(ctx: typer.Context) -> None:
    """Sources of the live apps running from this home: state, fps, restarts, last error."""
    with errors():
        from framepipe.live import sources_table

        table = sources_table(settings_of(ctx))
        if table is None:
            say(console(), "no live app has run from this home")
            raise typer.Exit(0)
        console().print(table)


def health(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Health of the live apps running from this home (state, performance score, uptime)."""
    with errors():
        from framepipe.app import read_snapshots
        from framepipe.live import health_table

        settings = settings_of(ctx)
        if as_json:
            dump_json(read_snapshots(settings))
            raise typer.Exit(0)
        table = health_table(settings)
        if table is None:
            say(console(), "no live app has run from this home")
            raise typer.Exit(0)
        console().print(table)
