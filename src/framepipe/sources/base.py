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

from framepipe.errors import InvalidSourceError
from framepipe.frames import Frame

__all__ = [
    "InvalidSourceError",
    "Source",
    "StartedCallback",
    "check_decode_threads",
    "decoder_threads",
]

StartedCallback = Callable[[int | None], None]


def check_decode_threads(requested: int | None, where: str) -> None:
    """A :class:`ValueError` naming ``where`` unless ``requested`` is None or a count >= 0."""
    if requested is not None and (
        isinstance(requested, bool) or not isinstance(requested, int) or requested < 0
    ):
        raise ValueError(
            f"{where}: decode_threads must be a count >= 0 (0: the decoder's own choice) "
            f"or None, not {requested!r}"
        )


def decoder_threads(requested: int | None, *, paced: bool) -> int:
    """The thread count a capture gives its decoder; 0 means the decoder's own choice
    (FFmpeg: frame and slice threads, about one per core).

    ``requested`` when given; else 1 for a paced input (a camera, a network stream, a file
    replayed in real time) and 0 for a file read as fast as it decodes. A paced input decodes
    in one thread because FFmpeg's frame threads each hold a frame back: with N of them every
    frame leaves the decoder N - 1 frame intervals late (200 ms at 10 fps on 2 cores), and each
    frame costs more CPU (about 15% more for 720p H.264 here). One stream needs a fraction of
    a core, and many cameras share a machine whose every capture already runs in its own
    thread or process. An input heavier than one core can decode in real time (4K HEVC at 30
    fps) asks for 0 or a count."""
    if requested is not None:
        return requested
    return 1 if paced else 0


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
        self.emit: Callable[..., None] | None = None
        """Set by the pipeline that runs the source: ``emit(kind, **data)`` announces an
        event of the source itself (the pipeline's ``source.<kind>``), on the event loop."""

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
