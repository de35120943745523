"""Which folders are cards at one poll of the SD-card detector, each with its folder's identity.

:func:`card_roots` guarantees:

* every subfolder of a ``--watch`` folder that is a folder itself is a card root, checked
  without following a link: a symbolic link (or a Windows junction) there is never a card,
  wherever it points, and is returned among the links, for the caller to name once;
* names starting with ``.`` in a ``--watch`` folder are left out;
* each ``--card`` folder (the operator's own path, a link or not) is a card root while it is a
  folder that holds anything;
* a folder that cannot be read is left out of this poll, never raised: the next poll tries it
  again;
* each root comes with the identity (device and inode) of the folder the poll saw, so a
  listing or a copy can refuse a folder that is not that one any more.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from sd_cards import is_junction

from framepipe.confined import FolderIdentity, folder_identity

__all__ = ["Seen", "card_roots"]


class Seen(NamedTuple):
    """A card's root as a poll saw it: its identity and whether it is in a ``--watch``
    folder (see :class:`sd_cards.Card`)."""

    identity: FolderIdentity
    watched: bool


def card_roots(
    watch: Iterable[Path], card_dirs: Iterable[Path]
) -> tuple[dict[Path, Seen], set[Path]]:
    """The card roots now (see the module docstring), and the links found in the
    ``watch`` folders."""
    roots: dict[Path, Seen] = {}
    links: set[Path] = set()
    for folder in watch:
        with contextlib.suppress(OSError), os.scandir(folder) as found:
            for entry in found:
                if entry.name.startswith("."):
                    continue
                with contextlib.suppress(OSError):
                    path = folder / entry.name
                    if entry.is_symlink() or is_junction(entry):
                        links.add(path)
                    elif entry.is_dir(follow_symlinks=False):
                        st = os.stat(path, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):  # still a folder, not a link now
                            roots[path] = Seen(folder_identity(st), watched=True)
    for card in card_dirs:
        with contextlib.suppress(OSError):
            if card.is_dir() and any(card.iterdir()):
                roots[card] = Seen(folder_identity(os.stat(card)), watched=False)
    return roots, links
