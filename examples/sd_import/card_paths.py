"""Which paths of files on a card the SD import accepts: the one rule, used on both sides;
and where a card file's copy goes in the shared folder (:func:`copy_dest`).

The backend checks every ``sd:file_list`` entry and every import's ``files`` input with it
(``sd_messages.FileEntry``), and refuses a whole list holding one path it refuses. The
detector (``detector.py``) checks each file and folder it finds on a card with the same
function and skips, with a warning naming it, what the backend would refuse, so one odd name
on a card never stops the rest of the card from importing.

This module imports nothing of the backend (no server, no media libraries), so the detector,
a small host process, can use it as it is.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

from framepipe.confined import relative_parts
from framepipe.errors import InvalidInputError

__all__ = ["MAX_NAME_BYTES", "MAX_PATH", "card_path", "copy_dest", "copy_dests"]

MAX_PATH = 1000
"""The longest path (in characters, relative to the card) the backend accepts."""
MAX_NAME_BYTES = 255
"""The longest file name (UTF-8 bytes) of the usual file systems: a copy's name fits in it."""


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


def copy_dest(card_id: str, path: str, size: int, fingerprint: str) -> str:
    """Where the copy of the card file ``path`` (``size`` bytes, content ``fingerprint``) of
    the card ``card_id`` goes in the shared folder, relative to it:
    ``<card_id>/<folders>/<stem>-<hash><suffix>``
    (``GOPRO1-3363ebe26b2d/DCIM/100GOPRO/GX000002-5c1d93a0e7f2.MP4``).

    The hash (12 hex digits of BLAKE2b) is of the file's identity, its size and content
    fingerprint (what the ledger knows it by), so the name says which content it holds, as
    the object keys do: a card used again whose ``GX000002.MP4`` now holds another video
    (a camera that restarted its numbering, a clip filmed again) gets its copy beside the
    first import's, never over it, and the retention records (keyed by the copy) stay apart;
    the same file inserted again has the same name, so its copy is found there and not made
    twice. The folders and the name's stem and suffix are the card's (a stem too long for a
    :data:`MAX_NAME_BYTES` name with the hash is cut)."""
    digest = hashlib.blake2b(f"{int(size)}:{fingerprint}".encode(), digest_size=6).hexdigest()
    folders, _, name = card_path(path).rpartition("/")
    pure = PurePosixPath(name)
    stem, suffix = (pure.stem, pure.suffix) if pure.suffix else (name, "")
    tail = f"-{digest}{suffix}"
    while len((stem + tail).encode()) > MAX_NAME_BYTES:
        if stem:
            stem = stem[:-1]
        else:  # the suffix alone is too long: cut it, the hash stays
            tail = tail[:-1]
    return "/".join(p for p in (card_id, folders, stem + tail) if p)


def copy_dests(card_id: str, entry: object) -> tuple[str, ...]:
    """Every name the copy of the file list ``entry`` (``path``, ``size``, ``fingerprint``)
    of card ``card_id`` may have in the shared folder: :func:`copy_dest`'s, and the plain
    ``<card_id>/<path>`` that imports made before copies were named by their content (so
    checks that must not miss a copy an unfinished import may still read find both). Empty
    for an entry that names no valid file."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return ()
    try:
        legacy = f"{card_id}/{card_path(entry['path'])}"
    except ValueError:
        return ()
    size, fingerprint = entry.get("size"), entry.get("fingerprint")
    if not isinstance(size, int) or not isinstance(fingerprint, str):
        return (legacy,)
    return (copy_dest(card_id, str(entry["path"]), size, fingerprint), legacy)
