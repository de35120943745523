"""``python -m framepipe.cli``: the command line."""

from framepipe.cli import main

__all__: list[str] = []

main()
