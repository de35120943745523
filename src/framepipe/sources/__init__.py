"""Sources of frames: one contract (:class:`Source`), three families.

* :class:`VideoSource`: files, RTSP/TCP/HTTP streams and devices through PyAV, decoded in a
  thread; files can be paced at their native rate and looped.
* :class:`CommandSource`: one persistent subprocess (gst-launch-1.0, ffmpeg) writing MJPEG or
  raw video to its stdout.
* :class:`PatternSource`: synthetic frames (colour bars or noise with a moving box).

:func:`capture_source` picks one for a video file or stream URL: gst-launch-1.0 where it can
play the input, else ffmpeg (or PyAV on request), with a recording's end as the end.

Each ``source.frames(started)`` call is one capture session, an async iterator of
:class:`~framepipe.frames.Frame`. Close it with ``aclose()`` (or ``contextlib.aclosing``) when
you stop early: a bare ``break`` leaves the clean-up (thread, subprocess) to the garbage
collector's async-generator finaliser.
"""

from framepipe.sources.av import VideoSource
from framepipe.sources.base import InvalidSourceError, Source, StartedCallback
from framepipe.sources.capture import Capture, capture_source
from framepipe.sources.command import CommandSource
from framepipe.sources.pattern import PatternSource

__all__ = [
    "Capture",
    "CommandSource",
    "InvalidSourceError",
    "PatternSource",
    "Source",
    "StartedCallback",
    "VideoSource",
    "capture_source",
]
