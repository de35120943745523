"""The shared folder as the backend's steps read it: where it is, and each copy in it.

The shared folder is read only through :func:`shared_file`: every copy is opened below
``shared_dir`` without following a symbolic link at any level
(:func:`framepipe.confined.open_beneath`), and what reads it (the size and fingerprint check,
the QR scan, probing, rendering) reads that opened file and nothing else. A link (or anything
but a regular file) where a copy should be, planted by whoever can write to the share, is
never followed: :class:`~framepipe.confined.LinkRefusedError` names it, relative to the shared
folder, and neither the size nor the content of what it points to is read or told. The folder
itself is the execution's ``shared_dir`` input, checked against its recorded ``input_roots``
each time a step asks for it (:func:`shared_dir_of`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from framepipe import StepContext
from framepipe.confined import fd_path, open_beneath, relative_parts
from framepipe.errors import InvalidInputError, MediaError
from framepipe.jobs.inputs import local_input
from framepipe.jobs.ledger import file_fingerprint

__all__ = ["measure_copy", "shared_dir_of", "shared_file"]


def shared_dir_of(ctx: StepContext) -> Path:
    """The execution's shared folder, checked against its recorded ``input_roots`` again
    (:func:`~framepipe.jobs.inputs.local_input`: a
    :class:`~framepipe.errors.PathNotAllowedError` outside them)."""
    value = ctx.inputs.get("shared_dir")
    if not isinstance(value, str):
        raise InvalidInputError("the shared folder is missing", where="inputs.shared_dir")
    folder = local_input(ctx, value, where="inputs.shared_dir", declared=True)
    if folder is None:
        raise InvalidInputError("must be an absolute local path", where="inputs.shared_dir")
    return folder


@contextlib.contextmanager
def shared_file(shared_dir: str | os.PathLike[str], dest: str) -> Iterator[Path]:
    """The copy ``dest`` (relative, ``/``) in the shared folder, opened below ``shared_dir``
    without following any link, as a path naming that open file (``/proc/self/fd/N``): a
    library given it reads this file, whatever is renamed or linked in the share meanwhile.

    Raises :class:`~framepipe.confined.LinkRefusedError` naming the link (or the entry that is
    not a regular file) relative to the shared folder, ``FileNotFoundError`` when there is no
    copy; a :class:`~framepipe.errors.MediaError` about the file is raised again naming
    ``dest`` instead of the internal path (in its reason too)."""
    parts = relative_parts(dest, "dest")
    fd = open_beneath(shared_dir, parts, os.O_RDONLY, where="in the shared folder")
    try:
        path = Path(fd_path(fd))
        try:
            yield path
        except MediaError as exc:
            if exc.path != path:
                raise
            raise MediaError(dest, exc.reason.replace(str(path), dest)) from None
    finally:
        os.close(fd)


def measure_copy(shared_dir: Path, dest: str) -> tuple[int, str]:
    """Size and fingerprint of the copy ``dest`` (see :func:`shared_file`)."""
    with shared_file(shared_dir, dest) as local:
        return local.stat().st_size, file_fingerprint(local)
