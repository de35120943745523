"""What a capture command's stderr says: the lines that tell why it failed, among the noise
gst-launch-1.0 and ffmpeg print around them.

Guarantees:

* :func:`telling_line` picks one line of a failed capture's stderr tail to name in its error:
  gst-launch-1.0's first element error (``Could not open resource for reading and writing``,
  not the ``pipeline doesn't want to preroll`` that follows it), else the last line that is
  not a known follow-up or progress line (ffmpeg's ``Protocol not found``, not the ``Did you
  mean file:...?`` hint after it), else the last line.
* :func:`gst_cannot_play` tells a missing plug-in from any other failure.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["gst_cannot_play", "telling_line"]

_GST_ELEMENT_ERROR = re.compile(r"^ERROR: from element \S+: (.+)$")
_FOLLOW_UPS = (
    "did you mean ",
    "error: pipeline doesn't want to preroll",
    "error: pipeline doesn't want to pause",
    "setting pipeline to",
    "freeing pipeline",
    "additional debug info",
    "execution ended after",
    "got eos from element",
    "handling interrupt",
    "interrupt: stopping pipeline",
    "redistribute latency",
    "progress: ",
    "pipeline is ",
    "prerolled",
)


def telling_line(tail: Sequence[str]) -> str | None:
    """The line of ``tail`` (a failed capture's last stderr lines, oldest first) that says
    best why it failed; None for an empty tail."""
    for line in tail:
        if match := _GST_ELEMENT_ERROR.match(line.strip()):
            return match.group(1)
    telling = [line for line in tail if not line.strip().lower().startswith(_FOLLOW_UPS)]
    if telling:
        return telling[-1]
    return tail[-1] if tail else None


_GST_MISSING = ("missing a plug-in", "missing decoder", "missing element", "no suitable plugins")


def gst_cannot_play(stderr: Sequence[str]) -> str | None:
    """What gst-launch-1.0's ``stderr`` says it lacks to play its input (a decoder, a demuxer
    for what a stream sends: ``Missing decoder: MPEG-2 Transport Stream ...``), or None when it
    failed for another reason (the camera away)."""
    found = [line.strip() for line in stderr if any(m in line.lower() for m in _GST_MISSING)]
    if not found:
        return None
    precise = [line for line in found if line.lower().startswith(("missing", "no suitable"))]
    return (precise or found)[-1]
