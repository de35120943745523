"""``framepipe db upgrade | current | prune-events``: the state database's schema and the
retention of the live apps' events."""

import typer

from framepipe.backends.state import SCHEMA_HEAD
from framepipe.cli.common import (
    OlderThanOpt,
    console,
    errors,
    older_than_seconds,
    open_store,
    say,
    settings_of,
)

__all__ = ["db_app"]

db_app = typer.Typer(no_args_is_help=True, help="The state database's schema.")
"""The ``db`` command group."""


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the state database's schema."""
    with errors():
        settings = settings_of(ctx)
        with open_store(settings, migrate=False) as store:
            before = store.current_revision()
            store.migrate()
            after = store.current_revision()
            url = store.safe_url
    out = console()
    if before == after:
        say(out, f"database {url} is at revision {after} (head)")
    else:
        say(out, f"database {url} upgraded from revision {before or 'none'} to {after}", "green")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Print the state database's schema revision and URL."""
    with errors():
        settings = settings_of(ctx)
        with open_store(settings, migrate=False) as store:
            revision = store.current_revision()
            url = store.safe_url
    note = (
        "(head)"
        if revision == SCHEMA_HEAD
        else f"(head is {SCHEMA_HEAD}: run `framepipe db upgrade`)"
    )
    out = console()
    say(out, f"revision {revision or 'none'} {note}")
    say(out, f"url {url}")


@db_app.command("prune-events")
def db_prune_events(ctx: typer.Context, *, older_than: OlderThanOpt) -> None:
    """Delete live apps' events (orders, visits, sources) older than --older-than; events of
    executions stay with their executions."""
    from framepipe.backends.state.retention import prune_events

    with errors():
        seconds = older_than_seconds(older_than)
        settings = settings_of(ctx)
        with open_store(settings) as store:
            deleted = prune_events(store, seconds)
    say(console(), f"deleted {deleted} event(s) older than {older_than}")
