"""The source contract: an async iterator of frames from one camera, file, stream or command.

One call of :meth:`Source.frames` is one capture session. It calls ``started(pid)`` once the
capture is open (``pid`` of the capture subprocess, or None), then yields frames. It returns when
the stream ends normally (a file without ``loop``) and raises :class:`SourceError` (or a
subclass) when the capture fails; a :class:`Supervisor` then decides whether to start a new
session. Closing the iterator (``aclose``, or cancelling the consumer) releases everything the
session holds: threads, subprocesses, sockets. ``seq`` keeps increasing across sessions.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Callable

from framepipe.frames import Frame

__all__ = ["Source", "StartedCallback"]

StartedCallback = Callable[[int | None], None]


class Source(abc.ABC):
    """A producer of :class:`Frame` objects for one ``source_id``.

    ``live`` sources (cameras, network streams, capture commands, looped files) are restarted
    when a session ends; a finite source (a file played once) ends its pipeline. A session of
    a live source that returns normally is a death (restarted with backoff) unless ``loops``.
    ``fps`` is the nominal frame rate when known (health compares the achieved rate with it)."""

    live: bool = True
    loops: bool = False
    """True when each session plays a recording once and the source is looped by starting the
    next session at once when one ends normally (not counted as a failure)."""
    fps: float | None = None

    def __init__(self, source_id: str) -> None:
        self.source_id = source_id
        self._seq = 0

    @property
    def paced(self) -> bool:
        """True when the source makes frames at its own pace whether or not the pipeline takes
        them (a camera, a network stream, a file replayed in real time): health then counts
        the frames it made that the pipeline did not take. False for a source read as fast as
        the pipeline takes it (a file read on demand)."""
        return True

    def next_seq(self) -> int:
        """The next frame number of this source (1, 2, ...; continues across sessions)."""
        self._seq += 1
        return self._seq

    @abc.abstractmethod
    def frames(self, started: StartedCallback | None = None) -> AsyncGenerator[Frame, None]:
        """One capture session: call ``started(pid)`` when open, then yield frames."""

    def describe(self) -> str:
        """A short human description (URL, command line) for logs and health."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source_id!r}: {self.describe()})"
