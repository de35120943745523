"""How the import names a card file: its ledger identity, and the object key of its render.

A file is identified by its size and content fingerprint (:func:`identity`), not its path: a
card mounted elsewhere is the same card. The backend and every step know files by it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from framepipe.jobs.keys import step_key

__all__ = ["identity", "output_key"]


def identity(entry: Mapping[str, Any]) -> str:
    """A file's ledger identity: its size and content fingerprint."""
    return f"{int(entry['size'])}:{entry['fingerprint']}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def output_key(booking_id: str, dest: str, entry: Mapping[str, Any]) -> str:
    """The object key of the rendered video of the copy ``dest`` (:func:`card_paths.copy_dest`:
    ``<card_id>/<folders>/<stem>-<hash><suffix>``, or ``<card_id>/<path>`` before, in the
    shared folder) of the card file ``entry``: ``bookings/<booking>/<stem>-<hash>.mp4``
    (``bookings/B1001/GX000002-3f09c1d2ab47.mp4``).

    The hash is the one step keys use (:func:`framepipe.jobs.keys.step_key`: BLAKE2b of the
    canonical JSON, 12 hex digits) of the video's identity: its copy ``dest`` and its
    :func:`identity` (size and content fingerprint). So the same file of the same card always
    renders to the same key (a retried render replaces its own upload, nothing else), and two
    videos of one booking never share a key, whether they differ by folder
    (``100GOPRO/GX000002.MP4`` and ``101GOPRO/GX000002.MP4``), by card (two cameras' cards
    for one jump) or by content. The stem, the card file's name without its extension (ASCII
    letters, digits, ``_ . -``; other runs become ``_``), only makes the key readable."""
    digest = step_key("output", {"copy": dest, "identity": identity(entry)}).partition(":")[2]
    stem = PurePosixPath(str(entry.get("path") or dest)).stem  # the card's name, not the copy's
    return f"bookings/{_safe(booking_id)}/{_safe(stem)}-{digest}.mp4"
