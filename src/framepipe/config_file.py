"""The config file: which one is read (:func:`config_file`) and its top-level keys
(:func:`config_file_values`).

Guarantees: ``FRAMEPIPE_CONFIG`` names the file, and must name one that exists; without it
``./framepipe.toml`` is read when present, and no file at all is no error. A file that is not
valid TOML, or cannot be read, is a :class:`~framepipe.errors.ConfigError` naming the file.
The values are returned as TOML gives them: each settings class checks its own
(:mod:`framepipe.config_sections`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from framepipe.errors import ConfigError

__all__ = ["config_file", "config_file_values"]


def config_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The config file: ``FRAMEPIPE_CONFIG`` in ``env`` (default ``os.environ``; it must
    exist), else ``./framepipe.toml`` when present, else None. Raises :class:`ConfigError` for
    a ``FRAMEPIPE_CONFIG`` that is not a file."""
    explicit = (os.environ if env is None else env).get("FRAMEPIPE_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"FRAMEPIPE_CONFIG={explicit}: no such file")
        return path
    default = Path("framepipe.toml")
    return default if default.is_file() else None


def config_file_values(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The top-level keys and values of :func:`config_file` (empty without a file). Raises
    :class:`ConfigError` naming the file when it is not valid TOML."""
    path = config_file(env)
    if path is None:
        return {}
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
