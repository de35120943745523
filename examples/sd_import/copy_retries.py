"""How often the backend has a failed copy tried again: the ``copy`` step's retries.

A copy fails when the detector is gone (disconnected, or not back within the hub's wait), the
copy in the shared folder is short or has another fingerprint, or the card's file differs from
its listing; the step is then tried again, up to :attr:`CopyRetries.retries` times, the first
retry :attr:`CopyRetries.delay` seconds after the failure and each further one twice as long
after the one before (with jitter), never longer than the setting
``FRAMEPIPE_RETRY_MAX_DELAY``. A copy the detector refuses or finds vanished is not retried.

The operator's values come from ``SD_IMPORT_COPY_RETRIES`` and ``SD_IMPORT_COPY_RETRY_DELAY``
(:func:`copy_retries_from_env`), read when the pipeline is loaded: by the backend, and by each
``framepipe worker`` (which runs the copies when the steps run on workers), so each is given
the same values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from env_numbers import non_negative_number

from framepipe.errors import ConfigError

__all__ = ["CopyRetries", "copy_retries_from_env"]


@dataclass(frozen=True)
class CopyRetries:
    """The retries of a failed copy."""

    retries: int = 4
    """How many times a failed copy is tried again (0: never)."""
    delay: float = 1.0
    """Seconds before the first retry; each further wait doubles (with jitter)."""

    def describe(self) -> str:
        return f"a failed copy is tried again {self.retries} time(s), first after {self.delay:g} s"


def copy_retries_from_env(environ: Mapping[str, str] | None = None) -> CopyRetries:
    """The retries of ``SD_IMPORT_COPY_RETRIES`` (a whole number >= 0; empty or unset: 4) and
    ``SD_IMPORT_COPY_RETRY_DELAY`` (seconds >= 0, fractions allowed; empty or unset: 1). A
    malformed value is a :class:`~framepipe.errors.ConfigError` naming the variable."""
    env = os.environ if environ is None else environ
    default = CopyRetries()
    raw_retries = env.get("SD_IMPORT_COPY_RETRIES", "").strip()
    retries = default.retries
    if raw_retries:
        if not (raw_retries.isascii() and raw_retries.isdigit()):
            raise ConfigError(
                f"SD_IMPORT_COPY_RETRIES={raw_retries!r}: use a whole number of retries >= 0 "
                f"(e.g. 6), or leave it unset for {default.retries}"
            )
        retries = int(raw_retries)
    delay = non_negative_number(
        env,
        "SD_IMPORT_COPY_RETRY_DELAY",
        f"use a number of seconds >= 0 (e.g. 5, or 0.5), or leave it unset for {default.delay:g}",
    )
    return CopyRetries(retries, default.delay if delay is None else delay)
