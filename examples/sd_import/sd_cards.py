"""The SD-card detector's cards: which folders are cards, what a card's listing holds, and
the card's id and label.

A listing (:func:`list_card`) reads the card from its root opened once
(:func:`framepipe.confined.open_root`), the very folder the poll saw, never through a link; it
holds only the paths the backend accepts (the rule of ``card_paths.py``), and skips, with a
warning naming it, any other file, so the rest of the card still imports; what it skipped
goes with the listing (:attr:`Listing.skipped`) to the backend, whose import reports it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from card_paths import MAX_PATH, card_path
from sd_folders import AT, OpenFolder

from framepipe.confined import (
    FolderIdentity,
    LinkRefusedError,
    RootChangedError,
    folder_identity,
    open_root,
)

__all__ = [
    "MAX_DEPTH",
    "VIDEO_SUFFIXES",
    "Card",
    "Listing",
    "as_text",
    "card_id_of",
    "card_label",
    "is_junction",
    "list_card",
    "open_card_root",
]

log = logging.getLogger("sd_detector")

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mts", ".m2ts", ".m4v", ".mkv", ".insv", ".360")
_IGNORED_DIRS = {"system volume information", "$recycle.bin", "lost+found"}


MAX_DEPTH = 32
"""The deepest folder below a card's root that :func:`list_card` looks into (camera cards use
two or three levels, ``DCIM/100GOPRO``)."""


class Listing(list[dict[str, Any]]):
    """A card's listing (its entries, as a list) and what it left out: :attr:`skipped` holds
    ``{"path", "reason"}`` for each file or folder skipped because the backend would refuse
    its path, it lies too deep or it is a link, the path as valid Unicode (:func:`as_text`),
    at most :data:`~card_paths.MAX_PATH` characters and an ellipsis. :attr:`unlogged` holds
    those of them not logged while listing (links), which the detector logs once when it
    announces the card."""

    def __init__(
        self,
        entries: Iterable[dict[str, Any]] = (),
        skipped: list[dict[str, str]] | None = None,
        unlogged: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(entries)
        self.skipped: list[dict[str, str]] = skipped if skipped is not None else []
        self.unlogged: list[dict[str, str]] = unlogged if unlogged is not None else []

    def skip(self, shown: str, reason: str, *, logged: bool = True) -> None:
        """Record ``shown`` (a path as text) as skipped for ``reason``; ``logged=False``:
        nobody logged it yet (see :attr:`unlogged`)."""
        path = shown if len(shown) <= MAX_PATH else shown[:MAX_PATH] + "\u2026"
        entry = {"path": path, "reason": as_text(reason)[:1000]}
        self.skipped.append(entry)
        if not logged:
            self.unlogged.append(entry)


def list_card(
    root: Path,
    suffixes: tuple[str, ...] = VIDEO_SUFFIXES,
    *,
    max_depth: int = MAX_DEPTH,
    identity: FolderIdentity | None = None,
    watched: bool = False,
) -> Listing:
    """The video files of a card: ``path`` (relative, ``/``), ``size``, ``mtime``, and
    ``fingerprint``; hidden files and system folders skipped; sorted by path. What it leaves
    out because of its path or depth is in the listing's :attr:`~Listing.skipped`.

    The root is opened once (:func:`open_card_root`: with ``watched``, a subfolder of a
    ``--watch`` folder, without following a link in its place; with ``identity``, only if it
    is that folder) and every folder below is reached from it; a root that is not there, a
    link, or another folder raises (``FileNotFoundError``, :class:`LinkRefusedError`,
    :class:`RootChangedError`) and nothing is listed.

    Guarantees, whatever the card holds:

    * only regular files are listed, reached without following a link (a link on the card,
      to a file or a folder, is skipped: what it points to is not on the card); a link named
      as a video, or with no suffix as folders are, is in :attr:`~Listing.skipped` with the
      reason (and :attr:`~Listing.unlogged`), so the import reports it;
    * every listed path is one the backend accepts (:func:`card_paths.card_path`, the rule
      its ``sd:file_list`` check uses), so the list is never refused as a whole: a file it
      would refuse (a ``:`` or a backslash in a name, a name that is not valid UTF-8, a path
      over 1000 characters) is skipped with a warning naming it, and so is a folder below
      which it would refuse every path;
    * folders more than ``max_depth`` levels below the root are not looked into (a warning
      names the first of them); the walk keeps its own stack, so no tree, however deep,
      raises :class:`RecursionError`;
    * a file or folder that vanishes or turns into a link while it is listed is left out
      (the next poll sees the truth)."""
    out: list[dict[str, Any]] = []
    skipped = Listing()
    stack: list[tuple[str, ...]] = [()]
    top = open_card_root(root, identity=identity, watched=watched)
    try:
        while stack:
            rel = stack.pop()
            try:
                with OpenFolder(root, rel, where="the card", top=top) as here:
                    links: list[str] = []
                    folders, files = here.entries(links)
                    stack.extend(_folders_to_walk(rel, folders, max_depth, skipped))
                    out.extend(_listed(here, rel, files, suffixes, skipped))
                    _links_skipped(rel, links, suffixes, skipped)
            except OSError:  # the folder vanished or was replaced by a link while listing
                continue
    finally:
        if top is not None:
            os.close(top)
    return Listing(
        sorted(out, key=lambda e: e["path"]),
        sorted(skipped.skipped, key=lambda e: e["path"]),
        sorted(skipped.unlogged, key=lambda e: e["path"]),
    )


def open_card_root(root: Path, *, identity: FolderIdentity | None, watched: bool) -> int | None:
    """The card's root folder, opened once for a listing or a copy: a descriptor every walk
    of the card starts from (the caller closes it), or None where the platform has no
    ``dir_fd`` (Windows: there the root is checked by path, a check a racing writer could
    defeat, and used by path).

    ``watched`` (a subfolder of a ``--watch`` folder, where others may write): its last
    segment is opened relative to the watch folder without following a link
    (:func:`framepipe.confined.open_root`), so a link put in its place is a
    :class:`LinkRefusedError`; otherwise (a ``--card`` folder, the operator's own path) the
    path is followed. ``identity``: the folder's ``(st_dev, st_ino)`` when the poll saw it;
    another folder there now is a :class:`RootChangedError`. ``FileNotFoundError`` when the
    card is gone."""
    where = f"the card {card_label(root)}"
    if AT:
        return open_root(root, where=where, follow=not watched, identity=identity)
    if watched and (root.is_symlink() or getattr(root, "is_junction", lambda: False)()):
        raise LinkRefusedError(
            f"{root.name!r} is a symbolic link or not a folder; a link in its place is not "
            "followed",
            where=where,
        )
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(root))
    if identity is not None and folder_identity(os.stat(root)) != identity:
        raise RootChangedError(
            f"{root.name or str(root)!r} is not the folder it was when it was checked "
            "(replaced or mounted again since)",
            where=where,
        )
    return None


def _folders_to_walk(
    rel: tuple[str, ...], names: list[str], max_depth: int, skipped: Listing
) -> list[tuple[str, ...]]:
    """The subfolders ``names`` of the card's folder ``rel`` that :func:`list_card` walks;
    the others it would have walked are added to ``skipped``."""
    wanted = []
    for name in names:
        if name.startswith(".") or name.lower() in _IGNORED_DIRS:
            continue
        shown = as_text("/".join((*rel, name)))
        # The shortest path below the folder: when the backend refuses it, it refuses all.
        try:
            card_path("/".join((*rel, name, "\u2026")))
        except ValueError as exc:
            log.warning("skipped folder %s: the backend accepts no path in it (%s)", shown, exc)
            skipped.skip(shown + "/", f"the backend accepts no path in this folder ({exc})")
            continue
        if len(rel) + 1 > max_depth:
            log.warning(
                "skipped folder %s: it is more than %d folders below the card", shown, max_depth
            )
            skipped.skip(shown + "/", f"it is more than {max_depth} folders below the card")
            continue
        wanted.append((*rel, name))
    return wanted


def _listed(
    here: OpenFolder,
    rel: tuple[str, ...],
    names: list[str],
    suffixes: tuple[str, ...],
    skipped: Listing,
) -> Iterator[dict[str, Any]]:
    """The entries of :func:`list_card` for the regular files ``names`` of folder ``here``;
    a video whose path the backend would refuse is added to ``skipped``."""
    for name in names:
        if name.startswith(".") or not name.lower().endswith(suffixes):
            continue
        path = "/".join((*rel, name))
        try:
            card_path(path)
        except ValueError as exc:
            log.warning("skipped %s: the backend would refuse its path (%s)", as_text(path), exc)
            skipped.skip(as_text(path), f"the backend would refuse its path ({exc})")
            continue
        try:
            fd = here.open_file(name)
        except OSError:  # a link, vanished: the next poll sees the truth
            continue
        try:
            st = os.fstat(fd)
            fingerprint = here.fingerprint(fd, name)
        except OSError:
            continue
        finally:
            os.close(fd)
        yield {"path": path, "size": st.st_size, "mtime": st.st_mtime, "fingerprint": fingerprint}


def _links_skipped(
    rel: tuple[str, ...], names: list[str], suffixes: tuple[str, ...], skipped: Listing
) -> None:
    """Add to ``skipped`` each link ``names`` of the card's folder ``rel`` that may stand for
    something the import would take: a link named as a video, or one with no suffix (as
    camera folders are named: ``DCIM``, ``100GOPRO``), which may point to a folder. Links are
    never followed (what one points to is not on the card, and may be anywhere on the host);
    other links (``notes.txt``) are left out as other files are. Not logged here: a card is
    listed more than once before it is announced, and the detector says each once."""
    for name in names:
        if name.startswith(".") or name.lower() in _IGNORED_DIRS:
            continue
        shown = as_text("/".join((*rel, name)))
        if name.lower().endswith(suffixes):
            skipped.skip(
                shown,
                "it is a symbolic link; links on a card are not followed, so the video it "
                "points to is not imported (put the file itself on the card)",
                logged=False,
            )
        elif not PurePath(name).suffix:
            skipped.skip(
                shown,
                "it is a symbolic link (to a folder?); links on a card are not followed, so "
                "nothing it points to is imported (put the files themselves on the card)",
                logged=False,
            )


def as_text(text: str) -> str:
    """``text`` as valid Unicode: bytes of a name that are not UTF-8 (Python keeps them as
    lone surrogates, which the backend refuses) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def card_label(root: PurePath) -> str:
    """The folder's name, or the drive's letter for a drive root (``E:\\`` -> ``E``), as
    valid Unicode (see :func:`as_text`)."""
    return as_text(root.name or root.drive.rstrip(":\\/") or "card")


def card_id_of(label: str, files: list[dict[str, Any]]) -> str:
    """A stable id of a card: its label and the oldest file's identity (adding files to a card
    keeps its id; another card with the same label gets another)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "card"
    if not files:
        return f"{safe}-empty"
    first = min(files, key=lambda e: (e["mtime"], e["path"]))
    digest = hashlib.blake2b(
        f"{first['path']}|{first['size']}|{first['fingerprint']}".encode(), digest_size=6
    ).hexdigest()
    return f"{safe}-{digest}"


@dataclass
class Card:
    """One inserted card and its session (one per insertion).

    ``at_start``: the card was in the reader when the detector started (its first poll saw
    it), so its announcement is the detector's, not an insertion.

    ``watched``: the card is a subfolder of a ``--watch`` folder (its root is never reached
    through a link); ``identity``: its root's ``(st_dev, st_ino)`` when the poll saw it, which
    every later open of the root checks (None: not checked)."""

    root: Path
    label: str
    card_id: str
    files: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    """What the listing left out (:attr:`Listing.skipped`), told with the file list."""
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    acknowledged: bool = False
    removed: bool = False
    watched: bool = False
    identity: FolderIdentity | None = None
    at_start: bool = False
    announced_on: object = None
    """The connection the card was last announced on: once per connection."""

    def inserted(self) -> dict[str, Any]:
        return {
            "type": "detector:sd_inserted",
            "session_id": self.session_id,
            "card_id": self.card_id,
            "label": self.label,
            "root": as_text(str(self.root)),
            "file_count": len(self.files),
        }

    def file_list(self) -> dict[str, Any]:
        return {
            "type": "sd:file_list",
            "session_id": self.session_id,
            "card_id": self.card_id,
            "label": self.label,
            "files": self.files,
            "at_start": self.at_start,
            "skipped": self.skipped,
        }


def is_junction(entry: os.DirEntry[str]) -> bool:
    """A Windows junction (a link that ``is_symlink`` does not tell; Python 3.12+)."""
    return bool(getattr(entry, "is_junction", lambda: False)())
