"""``python -m framepipe.cli``: the command line."""

from framepipe.cli import main

main()
