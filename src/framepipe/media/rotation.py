"""Rotation: how far a decoded frame must be turned to show upright, and turning it (frames
for an encoder, images for OpenCV), as players and FFmpeg's command line do."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from fractions import Fraction

import av
import av.filter
import av.video.stream
import cv2
import numpy as np

__all__ = ["Upright", "frame_rotation", "upright_image"]


def _rotation_tag(stream: av.video.stream.VideoStream) -> int | None:
    """The legacy ``rotate`` tag (clockwise degrees) as counter-clockwise degrees, or None."""
    value = dict(stream.metadata).get("rotate")
    if value is None:
        return None
    try:
        return (-int(float(value))) % 360
    except ValueError:
        return None


def frame_rotation(frame: av.VideoFrame | None, stream: av.video.stream.VideoStream) -> int:
    """How far a decoded frame must be turned counter-clockwise to be shown upright: 0, 90,
    180 or 270, from the frame's display matrix (FFmpeg attaches the stream's to every frame),
    else the stream's legacy ``rotate`` tag. Other angles are rounded to a quarter turn."""
    degrees = 0.0
    if frame is not None:
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            degrees = float(frame.rotation or 0)
    if not degrees:
        degrees = float(_rotation_tag(stream) or 0)
    return (round(degrees / 90) * 90) % 360


_TURN_FILTERS: dict[int, tuple[tuple[str, str | None], ...]] = {
    90: (("transpose", "cclock"),),
    180: (("hflip", None), ("vflip", None)),
    270: (("transpose", "clock"),),
}
_CV2_TURNS = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE}


def upright_image(image: np.ndarray, rotation: int) -> np.ndarray:
    """A decoded image (any channels) turned ``rotation`` degrees counter-clockwise."""
    if rotation % 360 == 0:
        return image
    return np.asarray(cv2.rotate(image, _CV2_TURNS[rotation % 360]))


class Upright:
    """Turns decoded frames upright (``rotation`` degrees counter-clockwise, as FFmpeg's
    command line does with its transpose/flip filters) and drops their display matrix, so an
    encoded output shows upright with no rotation of its own. ``rotation`` 0 passes frames
    through untouched. One filter graph per instance, built at the first frame."""

    def __init__(self, rotation: int) -> None:
        if rotation % 90:
            raise ValueError(f"rotation must be a multiple of 90, not {rotation}")
        self.rotation = rotation % 360
        self._graph: av.filter.Graph | None = None

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The upright size of a ``width`` x ``height`` frame."""
        return (height, width) if self.rotation in (90, 270) else (width, height)

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        if not self.rotation:
            return frame
        if self._graph is None:
            graph = av.filter.Graph()
            node = graph.add_buffer(
                width=frame.width,
                height=frame.height,
                format=frame.format,
                time_base=frame.time_base or Fraction(1, 1000),
            )
            for name, args in (
                *_TURN_FILTERS[self.rotation],
                ("sidedata", "mode=delete:type=DISPLAYMATRIX"),
            ):
                nxt = graph.add(name, args) if args is not None else graph.add(name)
                node.link_to(nxt)
                node = nxt
            node.link_to(graph.add("buffersink"))
            graph.configure()
            self._graph = graph
        self._graph.push(frame)
        out = self._graph.pull()
        assert isinstance(out, av.VideoFrame)
        return out

    def frames(self, frames: Iterable[av.VideoFrame]) -> Iterator[av.VideoFrame]:
        """Each of ``frames`` upright."""
        for frame in frames:
            yield self(frame)
