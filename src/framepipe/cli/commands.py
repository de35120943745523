"""The ``framepipe`` Typer application: the global options and every command, registered in
the order ``--help`` lists them.

::

    framepipe run FILE.py:PIPELINE --input key=value ...   run one execution to its end
    framepipe jobs list | show | retry | cancel | prune       executions in the state store
    framepipe worker                                        run distributed job steps
    framepipe serve --pipeline FILE.py:NAME                 the HTTP API and live events
    framepipe sources | health                              the live apps of this home
    framepipe demo                                          the embedded demo
    framepipe db upgrade | current | prune-events           the state database's schema

Exit codes: 0 done; 1 the execution failed or was cancelled, or a framepipe error (unknown id,
not retryable ...); 2 bad usage, a bad pipeline definition or bad settings; 130 / 143 when
Ctrl-C / SIGTERM interrupted the execution (it stays resumable with ``framepipe jobs retry``).
Progress and messages go to stderr, results (summaries, tables, ``--json``) to stdout.
"""

from typing import Annotated

import typer

from framepipe import __version__
from framepipe.cli.common import Globals, home_option
from framepipe.cli.db import db_app
from framepipe.cli.demo import demo
from framepipe.cli.jobs import jobs_app
from framepipe.cli.live import health, sources
from framepipe.cli.run import run
from framepipe.cli.serve import serve
from framepipe.cli.worker import worker

__all__ = ["app"]

app = typer.Typer(
    name="framepipe",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",  # a docstring's lines are one paragraph, not kept as broken
    help="Video pipelines that keep running: batch jobs, embedded or distributed.",
)
"""The ``framepipe`` command."""


def _version(value: bool) -> None:
    if value:
        typer.echo(f"framepipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    home: Annotated[
        str | None,
        typer.Option(
            "--home",
            metavar="PATH",
            help="Folder of the embedded state and objects (FRAMEPIPE_HOME).",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="State database URL (FRAMEPIPE_DATABASE_URL)."),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR (FRAMEPIPE_LOG_LEVEL)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """framepipe: video pipelines that keep running."""
    overrides = {"home": home_option(home), "database_url": database_url, "log_level": log_level}
    ctx.obj = Globals({k: v for k, v in overrides.items() if v is not None})


app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")
for command in (run, worker, serve, sources, health, demo):
    app.command()(command)
