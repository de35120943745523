"""One persistent capture of a video file or stream URL: gst-launch-1.0 where it can do the job,
ffmpeg where it cannot, or PyAV in this process.

:func:`capture_source` builds the :class:`~framepipe.sources.Source` of one camera or recording.
Its rules:

* ``capture="auto"`` (the default) runs ``gst-launch-1.0`` when it is installed and can play
  the input, else ``ffmpeg``; ``ffmpeg`` too for an input whose pictures it copies as they
  are (see below), which gst-launch-1.0 would decode and encode again. For a file, "can
  play" is tested by decoding its first frame with the same elements (a fraction of a second,
  once per file version); for a URL, by GStreamer having a source for its scheme and the
  elements the pipeline needs; what a stream sends is known only once GStreamer tries it, so
  a stream whose first gst-launch-1.0 fails before its first frame for want of a plug-in
  (``Missing decoder: MPEG-2 Transport Stream``: :func:`gst_cannot_play`) is captured with
  ffmpeg from its next start on, with a warning saying why. A stream gst-launch-1.0 hangs
  on (opened, no frame, no exit: an MJPEG camera over HTTP, held in buffering) is tried with
  ffmpeg for one session after three sessions in a row stalled before their first frame, and
  captured with ffmpeg from then on when that session delivers a frame (see
  :class:`~framepipe.sources.command.Fallback`).
  ``capture="gst"`` and ``capture="ffmpeg"`` force one (a clear error when it cannot run);
  ``capture="av"`` decodes with PyAV in this process.
* A file is a recording: played once, its end (exit code 0) ends the stream. A stream URL and
  a camera's device node (``/dev/video0``: ``v4l2src``, ``ffmpeg -f v4l2``, or PyAV's v4l2)
  are live: every end of them is a death, restarted by the supervisor.
* A file that the capture fails to play before its first frame, and that can never be
  captured as it is (gone, empty, not a video, no video stream:
  :func:`~framepipe.sources.files.unreadable_video`), fails its capture with
  :class:`~framepipe.errors.InvalidSourceError` naming it and why, whichever capture
  reads it: a supervisor does not restart it, looped or not.
* ``loop=True`` plays a file forever: ffmpeg loops it itself (``-stream_loop -1``, one
  process for good); gst-launch-1.0 cannot seek back, so each pass is one process and the
  next pass starts at once when one ends (:attr:`~framepipe.sources.Source.loops`).
* ``realtime=True`` paces a file at its own rate; ``False`` reads it as fast as the machine
  decodes (a URL is paced by its sender either way). The first stage's queue then holds the
  capture back, so no frame is lost.
* ``decode_threads`` bounds the decoder's threads (PyAV, and ffmpeg's decoder; when given,
  ffmpeg's MJPEG encoder's too) by :func:`~framepipe.sources.base.decoder_threads`: by
  default one for a camera, a stream or a file replayed in real time (no frame held back by
  frame threads, the least CPU per frame), the decoder's own choice for a file read as fast
  as it decodes; 0 always leaves it to the decoder. gst-launch-1.0 keeps GStreamer's
  choice.
* The frames of a file carry their time in the recording (``pts``, from the file's frame
  rate, or ``fps`` when it resamples), whichever capture reads it: a recording read faster
  than real time keeps its own clock. A stream URL's frames have the wall clock only.
* ``env`` is added to the capture process's environment (``STATION_ID`` for a DL Streamer
  callback, for example).
* An input whose pictures are already JPEG (an MJPEG file, by a probe of its codec; a
  camera asked for ``input_format=mjpeg``) is copied by ffmpeg, not decoded and encoded
  again (``-c:v copy``), unless ``fps`` resamples it. Pictures without their own Huffman
  tables (USB cameras, some AVI MJPEG) get them from ``mjpeg2jpeg``; that filter stops at
  the end of a file's first pass, so a looped file without tables is encoded again. PyAV
  passes such pictures on undecoded too; gst-launch-1.0 re-encodes them, so ``auto`` picks
  ffmpeg for them.
* ``input_options`` are FFmpeg's options for opening the input, the same for PyAV and the
  ffmpeg command (``-key value`` before ``-i``): a USB camera asked for MJPEG, its size and
  rate (``{"input_format": "mjpeg", "video_size": "1280x720", "framerate": "30"}``), a
  demuxer's rate for a raw stream, an RTSP transport. A file's rate is read with them too.
  gst-launch-1.0 does not take them: ``auto`` then captures with ffmpeg, and ``gst`` is
  refused. A name that is not a plain option name (letters, digits, ``_``), or ``i`` (a
  second input), is refused.
* A URL with a NUL, a control character or malformed Unicode, or a path with a NUL or
  malformed Unicode, is refused at once (:func:`check_spec`), as are such input options'
  values, with a :class:`~framepipe.errors.ConfigError` naming the source, rather than
  failing at every start of the capture.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import av.error

from framepipe.errors import ConfigError
from framepipe.logs import get_logger
from framepipe.sources.av import VideoSource
from framepipe.sources.base import Source, check_decode_threads, decoder_threads
from framepipe.sources.command import CommandSource, Fallback
from framepipe.sources.devices import is_device
from framepipe.sources.files import unreadable_video
from framepipe.sources.stderr_lines import gst_cannot_play
from framepipe.sources.url_schemes import gst_schemes, unread_scheme
from framepipe.urls import safe_url

__all__ = [
    "Capture",
    "capture_source",
    "check_input_options",
    "check_spec",
    "ffmpeg_argv",
    "file_rate",
    "file_url_path",
    "gst_argv",
    "gst_cannot_play",
    "gst_problem",
    "is_stream_url",
]

Capture = Literal["auto", "gst", "ffmpeg", "av"]
CAPTURES: tuple[Capture, ...] = ("auto", "gst", "ffmpeg", "av")

GST = "gst-launch-1.0"
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
_PROBE_SECONDS = 10.0


def is_stream_url(spec: str) -> bool:
    """True for ``rtsp://``, ``http://``, ``udp://`` ... (``file:`` URLs are files)."""
    return _URL.match(spec) is not None and not spec.lower().startswith("file:")


def file_url_path(spec: str) -> str | None:
    """The local path of a ``file:`` URL (``file:///abs/clip.mp4``, ``file://localhost/...``,
    ``file:clip.mp4``; percent-escapes decoded), or None when ``spec`` is not one.

    Raises :class:`ValueError` for a ``file:`` URL naming another host, or with a query or a
    fragment (a ``?`` or ``#`` in a file name is written ``%3F``, ``%23``)."""
    if not spec.lower().startswith("file:"):
        return None
    parts = urllib.parse.urlsplit(spec)
    if parts.netloc not in ("", "localhost"):
        host = parts.netloc.rpartition("@")[2]
        raise ValueError(f"{safe_url(spec)!r} names the host {host!r}: only local files are read")
    if parts.query or parts.fragment or spec.endswith(("?", "#")):
        raise ValueError(f"{safe_url(spec)!r} has a query or a fragment: not a file's path")
    if not parts.path:
        raise ValueError(f"{safe_url(spec)!r} names no file")
    return urllib.request.url2pathname(parts.path)


def gst_argv(
    spec: str, *, fps: float | None = None, realtime: bool = True, device: bool = False
) -> list[str]:
    """The ``gst-launch-1.0`` command writing ``spec`` to stdout as MJPEG (``device``: a
    camera's device node, see :func:`~framepipe.sources.devices.is_device`)."""
    if device:
        head = ["v4l2src", f"device={spec}", "!", "decodebin"]
    elif not is_stream_url(spec):
        head = ["filesrc", f"location={spec}", "!", "decodebin"]
    elif spec.lower().startswith("rtsp"):
        head = ["rtspsrc", f"location={spec}", "latency=200", "!", "decodebin"]
    else:
        head = ["uridecodebin", f"uri={spec}"]
    rate = ["!", "videorate", "!", f"video/x-raw,framerate={round(fps * 1000)}/1000"] if fps else []
    sync = "true" if realtime and not (device or is_stream_url(spec)) else "false"
    tail = ["jpegenc", "quality=90", "!", "fdsink", "fd=1", f"sync={sync}"]
    return [GST, "-q", *head, "!", "videoconvert", *rate, "!", *tail]


_OPTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def check_input_options(options: Mapping[str, str] | None, where: str) -> dict[str, str]:
    """``options`` as a dict of strings, or a :class:`ConfigError` naming ``where`` and the
    first name that is not a plain FFmpeg option name (or is ``i``, which would add an
    input), or the first value with a NUL, a control character or malformed Unicode (it
    would fail in the capture's argv or FFmpeg's dictionary instead)."""
    checked: dict[str, str] = {}
    for name, value in (options or {}).items():
        if not isinstance(name, str) or not _OPTION_NAME.fullmatch(name) or name == "i":
            raise ConfigError(
                f"{where}: input option {name!r} is not an FFmpeg option name "
                "(letters, digits and '_', not 'i')"
            )
        text = str(value)
        if not text.isprintable():  # NUL, control characters and lone surrogates alike
            raise ConfigError(
                f"{where}: input option {name!r} has a value with a NUL, a control character "
                f"or malformed Unicode: {text!r}"
            )
        checked[name] = text
    return checked


def check_spec(spec: str, where: str) -> None:
    """A :class:`ConfigError` naming ``where`` when ``spec`` could reach no capture: a URL
    (``scheme://``, ``file:``) with a NUL, a control character or malformed Unicode (a URL
    writes them percent-escaped), or a path with a NUL or malformed Unicode (a lone surrogate
    that is not an undecodable byte of a file name). They would fail at every start of the
    capture (``embedded null byte``, ``UnicodeEncodeError``) instead. A URL is shown by
    :func:`~framepipe.urls.safe_url`."""
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: the video to capture must be text, not {spec!r}")
    if _URL.match(spec) or spec.lower().startswith("file:"):
        if not spec.isprintable():  # NUL, control characters and lone surrogates alike
            raise ConfigError(
                f"{where}: URL {safe_url(spec)!r} has a NUL, a control character or "
                "malformed Unicode"
            )
        return
    bad = "\0" in spec
    if not bad:
        try:
            os.fsencode(spec)
        except UnicodeEncodeError:
            bad = True
    if bad:
        raise ConfigError(f"{where}: path {spec!r} has a NUL or malformed Unicode")


def ffmpeg_argv(
    spec: str,
    *,
    fps: float | None = None,
    loop: bool = False,
    realtime: bool = True,
    threads: int | None = None,
    device: bool = False,
    input_options: Mapping[str, str] | None = None,
    copy_jpeg: bool = False,
    add_tables: bool = True,
) -> list[str]:
    """The ``ffmpeg`` command writing ``spec`` to stdout as MJPEG (``threads``: the decoder's
    thread count, by :func:`~framepipe.sources.base.decoder_threads`, and when given the
    MJPEG encoder's; ``device``: a camera's device node; ``input_options``: ``-name value``
    before ``-i``, checked by :func:`check_input_options`; ``copy_jpeg``: the input's
    pictures are JPEG, copied unless ``fps`` resamples them, with ``add_tables`` through
    ``mjpeg2jpeg``)."""
    argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin"]
    url = is_stream_url(spec)
    count = decoder_threads(threads, paced=realtime or device or url)
    argv += ["-threads", str(count)] if count else []
    if device:
        argv += ["-f", "v4l2"]
    elif not url:
        argv += ["-re"] if realtime else []
        argv += ["-stream_loop", "-1"] if loop else []
    options = check_input_options(input_options, f"ffmpeg capture of {safe_url(spec)}")
    if spec.lower().startswith("rtsp") and url:
        options.setdefault("rtsp_transport", "tcp")
    for name, value in options.items():
        argv += [f"-{name}", value]
    argv += ["-i", spec, "-an"]
    if copy_jpeg and not fps:
        tables = ["-bsf:v", "mjpeg2jpeg"] if add_tables else []
        return [*argv, "-c:v", "copy", *tables, "-f", "mjpeg", "-"]
    if fps:
        argv += ["-vf", f"fps={fps:g}"]
    encoder = ["-threads", str(threads)] if threads else []  # slice threads: no frame held
    return [*argv, *encoder, "-f", "mjpeg", "-q:v", "3", "-"]


def gst_problem(spec: str, *, fps: float | None = None, device: bool = False) -> str | None:
    """Why ``gst-launch-1.0`` cannot capture ``spec`` (None: it can).

    A file is probed by decoding its first frame through the capture's own elements; a URL by
    GStreamer having a source for its scheme. Results are cached per file version (path, size,
    modification time) and per scheme."""
    if shutil.which(GST) is None:
        return f"{GST} is not installed"
    needed = ("decodebin", "videoconvert", "jpegenc", "fdsink", *(("videorate",) if fps else ()))
    missing = [name for name in needed if not _gst_has(name)]
    if missing:
        return f"GStreamer has no {', '.join(missing)} element"
    if is_stream_url(spec):
        match = _URL.match(spec)
        assert match is not None
        scheme = match.group(1).lower()
        if scheme.startswith("rtsp"):
            return None if _gst_has("rtspsrc") else "GStreamer has no rtspsrc element"
        if scheme not in gst_schemes():
            return f"GStreamer has no source for {scheme}:// URLs"
        return None
    if device:
        return None if _gst_has("v4l2src") else "GStreamer has no v4l2src element"
    try:
        st = os.stat(spec)
    except OSError as exc:
        return f"cannot read {spec}: {exc.strerror}"
    return _probe_file(str(Path(spec).resolve()), st.st_size, st.st_mtime_ns)


@functools.cache
def _gst_has(element: str) -> bool:
    try:
        done = subprocess.run(
            ["gst-inspect-1.0", "--exists", element],
            capture_output=True,
            check=False,
            timeout=_PROBE_SECONDS,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@functools.lru_cache(maxsize=256)
def _probe_file(path: str, _size: int, _mtime_ns: int) -> str | None:
    argv = [GST, "-q", "filesrc", f"location={path}", "!", "decodebin", "!", "videoconvert"]
    argv += ["!", "identity", "eos-after=1", "!", "jpegenc", "!", "fakesink"]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            check=False,
            text=True,
            timeout=_PROBE_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"{GST} did not decode a frame of {path} within {_PROBE_SECONDS:g}s"
    except OSError as exc:
        return f"cannot run {GST}: {exc}"
    if done.returncode == 0:
        return None
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    detail = errors[0] if errors else f"exit code {done.returncode}"
    return f"{GST} cannot decode {path}: {detail}"


def capture_source(
    spec: str,
    source_id: str,
    *,
    capture: Capture = "auto",
    fps: float | None = None,
    loop: bool = False,
    realtime: bool = True,
    env: Mapping[str, str] | None = None,
    decode_threads: int | None = None,
    input_options: Mapping[str, str] | None = None,
) -> Source:
    """The capture of ``spec`` (a video file or a stream URL); see the module docstring.

    A ``file:`` URL is read as the file it names (:func:`file_url_path`).

    Raises :class:`~framepipe.errors.ConfigError` naming the source when ``spec`` cannot be
    opened (:func:`check_spec`), when the file does not exist, when ``capture`` is unknown,
    or when the forced capture cannot run."""
    if capture not in CAPTURES:
        raise ConfigError(
            f"source {source_id}: capture must be one of {', '.join(CAPTURES)}, not {capture!r}"
        )
    check_spec(spec, f"source {source_id}")
    try:
        path = file_url_path(spec)
    except ValueError as exc:
        raise ConfigError(f"source {source_id}: {exc}") from None
    if path is not None:
        check_spec(path, f"source {source_id}")  # its percent-escapes decoded
        spec = path
    url = is_stream_url(spec)
    if (
        url
        and capture in ("auto", "ffmpeg")
        and (unread := unread_scheme(spec, gst=capture == "auto"))
    ):
        raise ConfigError(f"source {source_id}: {unread}")
    device = not url and is_device(spec)
    live = url or device  # a stream or a camera: every end of it is a death
    if not live and not Path(spec).is_file():
        what = "is not a video file nor a camera" if Path(spec).exists() else "does not exist"
        raise ConfigError(f"source {source_id}: video file {spec!r} {what}")
    try:
        check_decode_threads(decode_threads, f"source {source_id}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = check_input_options(input_options, f"source {source_id}")
    invalid = None if live else functools.partial(_file_problem, spec, options)
    if capture == "av":
        return VideoSource(
            spec,
            source_id,
            realtime=realtime and not live,
            loop=loop and not live,
            decode_threads=decode_threads,
            options=options,
        )
    rate = fps if fps or live else file_rate(spec, options)
    copy_jpeg, add_tables = _jpeg_copy(spec, live, loop, options)
    if capture in ("auto", "gst"):
        problem = (
            "gst-launch-1.0 does not take FFmpeg input options"
            if options
            else gst_problem(spec, fps=fps, device=device)
        )
        if problem is None and capture == "auto" and copy_jpeg and not fps:
            problem = "the input's pictures are JPEG: ffmpeg copies them, gst-launch-1.0 re-encodes"
        if problem is None:
            fallback = None
            if capture == "auto" and url and shutil.which("ffmpeg") is not None:
                # what a stream sends is known once GStreamer tries it
                fallback = Fallback(
                    ffmpeg_argv(spec, fps=fps, realtime=realtime, threads=decode_threads),
                    gst_cannot_play,
                )
            return CommandSource(
                gst_argv(spec, fps=fps, realtime=realtime, device=device),
                source_id,
                env=env,
                fps=rate,
                live=live,
                loop=loop and not live,
                timestamps=bool(rate) and not live,
                invalid_input=invalid,
                fallback=fallback,
            )
        if capture == "gst":
            raise ConfigError(f"source {source_id}: capture 'gst' cannot run: {problem}")
        get_logger(source_id).info("capturing with ffmpeg: %s", problem)
    if shutil.which("ffmpeg") is None:
        raise ConfigError(f"source {source_id}: ffmpeg is not installed (nor usable gst-launch)")
    return CommandSource(
        ffmpeg_argv(
            spec,
            fps=fps,
            loop=loop,
            realtime=realtime,
            threads=decode_threads,
            device=device,
            input_options=options,
            copy_jpeg=copy_jpeg,
            add_tables=add_tables,
        ),
        source_id,
        env=env,
        fps=rate,
        live=live or loop,
        timestamps=bool(rate) and not live,
        invalid_input=invalid,
    )


def _file_problem(path: str, options: Mapping[str, str]) -> str | None:
    """``video file 'path' <why>`` when the file can never be captured as it is, else None."""
    reason = unreadable_video(path, options)
    return None if reason is None else f"video file {path!r} {reason}"


def file_rate(path: str, input_options: Mapping[str, str] | None = None) -> float | None:
    """The frame rate of a video file as the capture opens it, with ``input_options`` (None
    when its header states none or it cannot be read: the capture then says why). Cached per
    file version and options."""
    return _probe(path, input_options).rate


def _jpeg_copy(spec: str, live: bool, loop: bool, options: Mapping[str, str]) -> tuple[bool, bool]:
    """``ffmpeg_argv``'s ``(copy_jpeg, add_tables)`` for ``spec`` (see the module
    docstring)."""
    if live:
        return options.get("input_format") == "mjpeg", True
    probe = _probe(spec, options)
    if probe.codec != "mjpeg":
        return False, True
    if probe.jpeg_tables:
        return True, False
    return not loop, True


@dataclass(frozen=True)
class _Probe:
    rate: float | None = None
    codec: str | None = None
    jpeg_tables: bool = False  # an MJPEG file's first picture has its own Huffman tables


def _probe(path: str, input_options: Mapping[str, str] | None) -> _Probe:
    try:
        st = os.stat(path)
    except OSError:
        return _Probe()
    options = tuple(sorted((input_options or {}).items()))
    return _probe_version(path, st.st_size, st.st_mtime_ns, options)


@functools.lru_cache(maxsize=256)
def _probe_version(
    path: str, _size: int, _mtime_ns: int, options: tuple[tuple[str, str], ...]
) -> _Probe:
    try:
        with av.open(path, options=dict(options)) as container:
            if not container.streams.video:
                return _Probe()
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            codec = stream.codec_context.name
            tables = False
            if codec == "mjpeg":
                first = next((bytes(p) for p in container.demux(stream) if p.size), b"")
                scan = first.find(b"\xff\xda")
                tables = b"\xff\xc4" in first[: scan if scan >= 0 else len(first)]
    except (av.error.FFmpegError, OSError, ValueError):
        return _Probe()
    return _Probe(float(rate) if rate else None, str(codec) if codec else None, tables)
