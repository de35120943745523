"""Which paths of files on a card the SD import accepts: the one rule, used on both sides.

The backend checks every ``sd:file_list`` entry and every import's ``files`` input with it
(``sd_pipeline.FileEntry``), and refuses a whole list holding one path it refuses. The
detector (``detector.py``) checks each file and folder it finds on a card with the same
function and skips, with a warning naming it, what the backend would refuse, so one odd name
on a card never stops the rest of the card from importing.

This module imports nothing of the backend (no server, no media libraries), so the detector,
a small host process, can use it as it is.
"""

from __future__ import annotations

from framepipe.confined import relative_parts
from framepipe.errors import InvalidInputError

__all__ = ["MAX_PATH", "card_path"]

MAX_PATH = 1000
"""The longest path (in characters, relative to the card) the backend accepts."""


def card_path(value: object) -> str:
    """``value`` as the backend keeps it (``a/b/c``) if it may name a file on a card, else
    :class:`ValueError` saying why.

    Accepted: text of valid Unicode (no lone surrogate, no NUL) of at most :data:`MAX_PATH`
    characters, relative to the card with ``/`` between plain names: not empty, no leading
    ``/``, no drive (``C:``), no ``.``, ``..`` or empty segment (a doubled ``/`` counts as
    one), no backslash, and no ``:`` in any name."""
    try:
        parts = relative_parts(value, "path", max_length=MAX_PATH)
    except InvalidInputError as exc:
        raise ValueError(exc.reason) from None
    if any(":" in part for part in parts):
        raise ValueError(f"{value!r} holds a ':'; paths on a card have none")
    return "/".join(parts)
