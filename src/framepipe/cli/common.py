"""What every command shares: settings from the global options, the state store, one-line
errors with the documented exit codes, and the pieces of output (consoles, times, statuses).

Guarantees: inside :func:`errors`, a usage problem, a bad pipeline definition, bad settings or
bad inputs exit 2, any other framepipe or state-database error exits 1 and Ctrl-C exits 130,
each as one red line on stderr; logging goes to whatever ``sys.stderr`` is at the time of the
write (Rich's live display, a test runner's capture).
"""

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import sqlalchemy as sa
import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from framepipe.backends.state import StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import (
    ConfigError,
    FramepipeError,
    InvalidInputError,
    MissingDependencyError,
    PipelineDefinitionError,
)
from framepipe.logs import configure_logging
from framepipe.tracing import flush_tracing

__all__ = [
    "STATUS_STYLE",
    "ConcurrencyOpt",
    "Globals",
    "JsonOpt",
    "QuietOpt",
    "UsageError",
    "console",
    "die",
    "dump_json",
    "duration",
    "errors",
    "first_line",
    "flush_std",
    "home_option",
    "open_store",
    "print_table",
    "say",
    "settings_of",
    "status_text",
    "when",
]

STATUS_STYLE = {
    "pending": "dim",
    "ready": "blue",
    "running": "cyan",
    "retrying": "yellow",
    "completed": "green",
    "failed": "red",
    "cancelled": "magenta",
    "interrupted": "yellow",
}
"""The Rich style of each execution and step status."""

ConcurrencyOpt = Annotated[
    int | None,
    typer.Option("--concurrency", "-c", min=1, help="Steps run at once (default: the setting)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
OlderThanOpt = Annotated[
    str,
    typer.Option(
        "--older-than",
        metavar="DURATION",
        help="An age: seconds, or 30m, 12h, 7d, 2w.",
    ),
]
"""The age option of the pruning commands; :func:`older_than_seconds` reads it."""


def older_than_seconds(text: str) -> float:
    """``--older-than``'s seconds; a :class:`UsageError` naming the option otherwise."""
    from framepipe.backends.state.retention import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None


class UsageError(Exception):
    """A CLI usage problem: printed as one line, exit code 2."""


@dataclass
class Globals:
    """The global options (``--home``, ``--database-url``, ``--log-level``) given, as setting
    overrides; the root callback stores it as the context's object."""

    overrides: dict[str, Any] = field(default_factory=dict)


def home_option(value: str | None, option: str = "--home") -> Path | None:
    """A home option's folder (None when not given); a blank one exits 2 naming ``option``,
    where a blank ``FRAMEPIPE_HOME`` is unset: as a path it would be the current folder."""
    if value is None:
        return None
    if not value.strip():
        die(
            f"{option} is blank: give the home folder, or leave {option} out for "
            "FRAMEPIPE_HOME (else ./.framepipe)",
            2,
        )
    return Path(value)


class _StderrProxy:
    """A stream that always writes to the current ``sys.stderr``, so log lines go through Rich's
    live-display redirection (and through test runners that swap the stream)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


PIPED_WIDTH = 200
"""The width of tables written to a pipe or a file (``COLUMNS`` unset): not a terminal's 80,
which cut every cell of an 11-column table short."""


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (results) or stderr (progress and messages), without highlighting.
    Not a terminal (a pipe, a file) and ``COLUMNS`` unset: :data:`PIPED_WIDTH` wide."""
    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out.width = PIPED_WIDTH
    return out


FLEXIBLE_MIN_WIDTH = 20
"""The fewest characters a table's flexible column (one with a ``ratio``: an error) keeps
when the other columns take the rest of a line."""

_UNBOUNDED = 1_000_000


def _natural_width(out: Console, table: Table) -> int:
    return Measurement.get(out, out.options.update_width(_UNBOUNDED), table).maximum


def print_table(out: Console, table: Table) -> None:
    """Print ``table`` with every column whole but its flexible ones (those with a ``ratio``,
    such as an error), which take the width that is left and are cut short there.

    Guarantees: a table that fits is printed at its own width (a terminal's full width); one
    that does not is spread over the width, the flexible columns cut. In a pipe or a file, a
    table whose other columns need more than the width (less :data:`FLEXIBLE_MIN_WIDTH` for
    each flexible column) is printed on lines as wide as they need: no column is shrunk or
    dropped, so an id can always be copied from it."""
    natural = _natural_width(out, table)
    if natural <= out.width:
        table.expand = out.is_terminal
        out.print(table)
        return
    table.expand = True
    if out.is_terminal:
        out.print(table)
        return
    flexible = [column for column in table.columns if column.ratio]
    limits = [column.max_width for column in flexible]
    for column in flexible:
        column.max_width = FLEXIBLE_MIN_WIDTH
    try:
        needed = _natural_width(out, table)
    finally:
        for column, limit in zip(flexible, limits, strict=True):
            column.max_width = limit
    width = out.width
    out.width = max(width, needed)
    try:
        out.print(table)
    finally:
        out.width = width


def say(out: Console, message: str, style: str | None = None) -> None:
    """Print ``message`` as plain text (no markup), wrapped only by the terminal."""
    out.print(Text(message, style=style or ""), soft_wrap=True)


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def die(message: str, code: int) -> NoReturn:
    """Print ``message`` as one red ``error:`` line on stderr and exit with ``code``."""
    say(console(stderr=True), f"error: {_one_line(message)}", "red")
    raise typer.Exit(code)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn framepipe's errors into one red line on stderr and the documented exit code."""
    try:
        yield
    except UsageError as exc:
        die(str(exc), 2)
    except (ConfigError, PipelineDefinitionError, MissingDependencyError, InvalidInputError) as exc:
        die(str(exc), 2)
    except FramepipeError as exc:
        die(str(exc), 1)
    except sa.exc.SQLAlchemyError as exc:
        die(f"state database error: {getattr(exc, 'orig', None) or exc}", 1)
    except KeyboardInterrupt:
        die("interrupted", 130)


def settings_of(ctx: typer.Context, **extra: Any) -> Settings:
    """The settings with the global options and ``extra`` (those not None) applied, logging
    configured from them."""
    globals_ = ctx.find_object(Globals) or Globals()
    overrides = {**globals_.overrides, **{k: v for k, v in extra.items() if v is not None}}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level, stream=_StderrProxy())
    return settings


def open_store(settings: Settings, *, migrate: bool = True) -> StateStore:
    """The state store (for the schema commands and the service; executions go through the
    job client, which opens its own)."""
    return StateStore(
        settings.resolved_database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        migrate=migrate,
    )


def flush_std() -> None:
    """Flush framepipe's log handlers, traces, stdout and stderr (before an ``os._exit``)."""
    flush_tracing()
    for handler in logging.getLogger("framepipe").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def when(ts: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """A timestamp in local time, ``-`` for none."""
    return datetime.fromtimestamp(ts).strftime(fmt) if ts else "-"


def duration(seconds: float | None) -> str:
    """``1.25s``, ``3m07s`` or ``2h03m07s``; ``-`` for none."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def first_line(text: str | None) -> str:
    """The first non-blank line of ``text``, stripped; ``""`` for none."""
    if not text:
        return ""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def status_text(status: str) -> Text:
    """``status`` in its style."""
    return Text(status, style=STATUS_STYLE.get(status, ""))


def dump_json(value: Any) -> None:
    """Print ``value`` as indented JSON on stdout (what JSON cannot hold as its ``str``)."""
    typer.echo(json.dumps(value, default=str, indent=2))
