"""What a live pipeline's log says of its processors' failed frames: a
:class:`ProcessorErrorLog` for each run (every failed frame is also a ``processor.error``
event, which is not this module's concern).

Guarantees:

* A stage's first failed frame of a kind (the class of the exception that caused it) is logged
  at once; another kind of failure of the same stage is logged at once too.
* After it, at most one line per :data:`ERROR_LOG_EVERY` seconds for that stage and kind, which
  says how many of its frames failed since the last such line: a store outage that fails
  every frame gives a line every few seconds, not ten a second.
* The failures held back when the run ends are logged then (:meth:`ProcessorErrorLog.flush`),
  one line per stage and kind with their count; none is left unsaid.
* Thread-safe: a failure may be reported from any of the stage's threads.
* A line names its source once: where the log's component is the source's id (a station),
  the error's own ``[source]`` prefix is left out (``[station_1] stage 'frame_store', frame
  71: ...``, not ``[station_1] [station_1] stage ...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import Logger, LoggerAdapter
from typing import Any

from framepipe.errors import ProcessorError
from framepipe.logs import Repeats

__all__ = ["ERROR_LOG_EVERY", "ProcessorErrorLog"]

ERROR_LOG_EVERY = 10.0
"""Seconds between two log lines of one stage's failed frames (each is an event all the same)."""


class ProcessorErrorLog:
    """The failed frames of one run, logged on ``log``."""

    def __init__(self, log: Logger | LoggerAdapter[Any]) -> None:
        self._log = log
        extra = log.extra if isinstance(log, LoggerAdapter) else None
        self._component = extra.get("component") if isinstance(extra, Mapping) else None
        self._repeats = Repeats(ERROR_LOG_EVERY)

    def failed(self, error: ProcessorError) -> None:
        """A frame failed in ``error.stage``: log it, or hold it back and count it."""
        cause = error.__cause__ if error.__cause__ is not None else error
        held = self._repeats.admit(f"{error.stage}\0{type(cause).__name__}")
        if held is not None:
            more = f" (and {held} more of its frames failed since the last such line)"
            text = str(error)
            if error.source_id and error.source_id == self._component:
                text = text.removeprefix(f"[{error.source_id}] ")
            self._log.warning("%s%s", text, more if held else "")

    def flush(self) -> None:
        """Log the failures held back, one line per stage and kind."""
        for key, count in self._repeats.held().items():
            stage, _, kind = key.partition("\0")
            self._log.warning(
                "stage %r: %d more frame(s) failed with %s since its last such line "
                "(each is a processor.error event)",
                stage,
                count,
                kind,
            )
