"""Which paths are cameras: the one rule the captures share."""

from __future__ import annotations

import os
import stat

__all__ = ["is_device"]

_V4L2_MAJOR = 81  # Linux's device number for video4linux (cameras, capture cards)


def is_device(spec: str) -> bool:
    """True for a camera's device node: a video4linux character device, or a path named as
    one (``/dev/video0``, ``/dev/v4l/by-id/...``) whose camera may be unplugged right now (a
    live source, retried until it is back). Other devices (``/dev/zero``, a terminal) are not
    cameras: read as a video they would never end or never make sense."""
    if spec.startswith(("/dev/video", "/dev/v4l/")):
        return True
    try:
        st = os.stat(spec)
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == _V4L2_MAJOR
