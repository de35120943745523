"""Which URL schemes the capture commands read: GStreamer's source elements
(``gst-inspect-1.0 --uri-handlers``) and FFmpeg's input protocols (``ffmpeg -protocols``,
with the RTSP, SAT>IP and SAP demuxers, which open their own URLs; a nested scheme such as
``hls+http`` is FFmpeg's when its first part is).

Guarantees:

* :func:`unread_scheme` names a stream URL's scheme that no capture command installed here
  reads (a typo like ``rtps://`` fails at every start of the capture otherwise, as a camera
  that is down would), with the closest scheme that is read, if one is close; it says nothing
  when a command's list cannot be had (not installed, does not answer): the capture's own
  error says it then.
* Each list is asked for once per process.
"""

from __future__ import annotations

import difflib
import functools
import re
import shutil
import subprocess

from framepipe.urls import safe_url

__all__ = ["ffmpeg_schemes", "gst_schemes", "unread_scheme"]

_ASK_SECONDS = 10.0
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_FFMPEG_DEMUXER_SCHEMES = frozenset({"rtsp", "rtsps", "sap", "satip"})


@functools.cache
def gst_schemes() -> frozenset[str]:
    """The URI schemes that a GStreamer source element reads (empty when gst-inspect-1.0
    cannot tell)."""
    try:
        done = subprocess.run(
            ["gst-inspect-1.0", "--uri-handlers"],
            capture_output=True,
            check=False,
            text=True,
            timeout=_ASK_SECONDS,
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    schemes: set[str] = set()
    for line in done.stdout.splitlines():
        element, sep, protocols = line.partition(":")
        if sep and "(read" in element:
            schemes.update(p.strip().lower() for p in protocols.split(","))
    return frozenset(schemes)


@functools.cache
def ffmpeg_schemes() -> frozenset[str]:
    """The URL schemes ffmpeg opens for input: its input protocols and the schemes of its
    RTSP and SAP demuxers (empty when ffmpeg cannot tell)."""
    try:
        done = subprocess.run(
            ["ffmpeg", "-hide_banner", "-protocols"],
            capture_output=True,
            check=False,
            text=True,
            timeout=_ASK_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    listing = done.stdout.split("Input:", 1)[-1].split("Output:", 1)[0]
    protocols = {line.strip().lower() for line in listing.splitlines() if line.strip()}
    return frozenset(protocols | _FFMPEG_DEMUXER_SCHEMES) if protocols else frozenset()


def unread_scheme(spec: str, *, gst: bool) -> str | None:
    """Why no capture command that may run reads stream URL ``spec``'s scheme: ffmpeg, and
    with ``gst`` (``capture="auto"``, which takes whichever reads it) gst-launch-1.0 too; None
    when one does or a list cannot be had. A forced gst-launch-1.0 is not asked here: its own
    check names a scheme it has no source for."""
    match = _SCHEME.match(spec)
    if match is None:
        return None
    scheme = match.group(1).lower()
    lists: list[tuple[str, frozenset[str]]] = []
    if gst and shutil.which("gst-launch-1.0") is not None:
        lists.append(("GStreamer", gst_schemes()))
    if shutil.which("ffmpeg") is not None:
        ffmpeg = ffmpeg_schemes()
        lists.append(("FFmpeg", ffmpeg | {scheme} if scheme.split("+")[0] in ffmpeg else ffmpeg))
    if not lists or any(not schemes or scheme in schemes for _, schemes in lists):
        return None
    known = sorted(set().union(*(schemes for _, schemes in lists)))
    swapped = [k for k in known if sorted(k) == sorted(scheme)]  # rtps: rtsp, two letters swapped
    close = list(dict.fromkeys([*swapped, *difflib.get_close_matches(scheme, known, cutoff=0.6)]))
    close = close[:2]
    hint = f"; did you mean {' or '.join(f'{c}://' for c in close)}?" if close else ""
    names = [name for name, _ in lists]
    who = f"neither {' nor '.join(names)} can" if len(names) > 1 else f"{names[0]} cannot"
    return f"{who} read {scheme}:// URLs ({safe_url(spec)}){hint}"
