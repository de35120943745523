"""Whether a local file can ever be captured as a video: :func:`unreadable_video`.

A capture that fails at every start because its file is not a video (a recording without
its index, a text file, an audio file) must be told from a camera that is down: the first
can be reported once and left alone, the second is retried until it is back.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

import av
import av.error

__all__ = ["unreadable_video"]

_OPEN_TIMEOUT = 10.0  # seconds; a local file answers in milliseconds


def unreadable_video(path: str, input_options: Mapping[str, str] | None = None) -> str | None:
    """Why the local file ``path`` can never be captured as it is, or None when it opens with
    a video stream, or when it fails in a way that may pass (an I/O error, a timeout).

    The reason reads after the file's name (``video file 'x.mp4' does not exist``): it does
    not exist, is not a regular file, cannot be read (permissions), is
    empty, is not a readable video (unknown format, no index, corrupt header: FFmpeg's words
    follow), or has no video stream (its streams are named). ``input_options`` are the
    capture's FFmpeg input options (``f`` is taken as the demuxer's name, as ffmpeg's ``-f``
    does)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except PermissionError as exc:
        return f"cannot be read: {exc.strerror}"
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_size == 0:
        return "is empty (0 bytes)"
    options = dict(input_options or {})
    demuxer = options.pop("f", None)
    try:
        with av.open(path, options=options, format=demuxer, timeout=_OPEN_TIMEOUT) as container:
            if not container.streams.video:
                kinds = ", ".join(s.type for s in container.streams) or "none"
                return f"has no video stream (streams: {kinds})"
    except av.error.InvalidDataError as exc:
        return f"is not a readable video (unknown format, corrupt or truncated): {exc}"
    except PermissionError as exc:
        return f"cannot be read: {exc}"
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    return None
