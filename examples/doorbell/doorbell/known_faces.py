"""The doorbell's known faces: ``<name>.jpg`` / ``.jpeg`` / ``.png`` images in a folder, one
person each, encoded by :func:`load_known`.

The rules are framepipe's (:mod:`framepipe.processors.face_photos`, applied by
:func:`~framepipe.processors.faces.load_known_faces`): whatever the folder holds, loading never
crashes or stalls the doorbell; an image that cannot be used is left out with the reason
(``RejectedFace``), the others still work:

* a file name that is not valid UTF-8 or holds a control character is refused (the name is
  the person's, shown in events, logs and the web interface); no file is ever handed to OpenCV
  by name (OpenCV crashes the process on a name that is not UTF-8): each is read as bytes;
* a link (or a path) that leads out of the folder is refused, as is anything but a regular file;
* a file over ``max_bytes`` or a PNG over ``max_pixels`` (read from its header, before it is
  decoded) is refused; a larger-than-needed photo is scaled down to ``max_side`` pixels on
  its long side before detection (a baseline JPEG decoded at a reduced scale, so a
  200-megapixel one costs about what a 4-megapixel one does; a progressive JPEG counts whole
  against ``max_pixels``);
* an unreadable image, no face, or several faces are refused as before.

:func:`shown_path` is how a path is shown (bytes that are not UTF-8 as ``\\xNN``).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

from framepipe.processors.face_photos import (
    MAX_BYTES,
    MAX_PIXELS,
    MAX_SIDE,
    image_size,
    shown_path,
)
from framepipe.processors.faces import FaceAnalyzer, KnownFace, KnownFaces, load_known_faces

__all__ = [
    "MAX_BYTES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "Reloader",
    "encode_known",
    "image_size",
    "load_known",
    "shown_path",
]


def load_known(
    folder: str | os.PathLike[str],
    analyzer: FaceAnalyzer,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> KnownFaces:
    """Encode every image of ``folder`` (in name order), one face each, see the module
    docstring. Raises :class:`~framepipe.errors.MediaError` only when ``folder`` is not a
    directory."""
    return load_known_faces(
        folder,
        analyzer,
        multiple="reject",
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        max_side=max_side,
    )


def encode_known(
    path: str | os.PathLike[str],
    analyzer: FaceAnalyzer,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> KnownFace:
    """The one face of the image at ``path``, named after the file; the file is read as
    bytes, never opened by OpenCV by name. Raises :class:`~framepipe.errors.MediaError`
    (naming the file as :func:`shown_path` shows it) when the file cannot be read, the file
    or image is too large, it is not a readable image, or it shows no face or several."""
    return analyzer.encode_known(
        path, multiple="reject", max_bytes=max_bytes, max_pixels=max_pixels, max_side=max_side
    )


class Reloader:
    """Calls ``reload()`` (the known faces encoded again) on a thread of its own each time
    ``wanted`` is set (by SIGHUP: a signal handler must not run seconds of dlib); signals that
    arrive during a reload make one more reload, not one each. Each reload is said on stderr:
    ``[doorbell] known faces reloaded: 2 known (alice, bob), 1 rejected``, or why it failed
    (the doorbell then keeps the faces it had)."""

    def __init__(self, reload: Callable[[], KnownFaces]) -> None:
        self.reload = reload
        self.wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="doorbell-reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Wait for a reload under way, then end the thread."""
        self._stopping = True
        self.wanted.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self.wanted.wait()
            self.wanted.clear()
            if self._stopping:
                return
            try:
                known = self.reload()
            except Exception as exc:  # reported; the doorbell keeps the faces it had
                print(f"[doorbell] known faces not reloaded: {exc}", file=sys.stderr, flush=True)
                continue
            print(
                f"[doorbell] known faces reloaded: {len(known.faces)} known "
                f"({', '.join(known.names) or '-'}), {len(known.rejected)} rejected",
                file=sys.stderr,
                flush=True,
            )
