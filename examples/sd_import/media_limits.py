"""The limits the import's steps give the media functions, read from the settings."""

from __future__ import annotations

from typing import Any

from framepipe.config import load_settings
from framepipe.media import limits_from

__all__ = ["limits"]


def limits(*, length: bool = True) -> dict[str, Any]:
    """The limits these steps give the media functions: the settings ``media_max_pixels``,
    ``media_max_duration`` and ``media_max_frame_count`` (``FRAMEPIPE_MEDIA_MAX_*``; not the
    length ones for ``probe``, which takes none), read when a step runs."""
    return limits_from(load_settings(), length=length)
