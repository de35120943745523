"""How the SD import reads a number of seconds or days from its environment: one rule for
``SD_IMPORT_COPY_RETRY_DELAY`` and ``SHARED_VIDEOS_RETENTION_DAYS``."""

from __future__ import annotations

import math
from collections.abc import Mapping

from framepipe.errors import ConfigError

__all__ = ["non_negative_number"]


def non_negative_number(env: Mapping[str, str], name: str, hint: str) -> float | None:
    """The number in ``env[name]`` (fractions allowed), None when it is empty or unset; a
    :class:`~framepipe.errors.ConfigError` ``NAME='value': hint`` when it is not a finite
    number >= 0."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={raw!r}: {hint}")
    return value
