"""The ``framepipe`` command line: its Typer app, one module per command group, and ``main``."""

from framepipe.cli.commands import app
from framepipe.cli.run import parse_inputs

__all__ = ["app", "main", "parse_inputs"]


def main() -> None:
    """The ``framepipe`` console script."""
    app(prog_name="framepipe")
