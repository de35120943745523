"""``python -m framepipe``: the command line."""

from framepipe.cli import main

main()
