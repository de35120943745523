"""``PatternSource``: synthetic frames for tests and demos, no camera or file needed.

Colour bars (or noise) with a white box that moves every frame, so a motion detector sees
motion; an optional ``draw(image, seq)`` hook paints more (a QR code, a label) into each frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Literal

import numpy as np
import numpy.typing as npt

from framepipe.frames import Frame, now_ms
from framepipe.sources.base import Source, StartedCallback

__all__ = ["DrawHook", "PatternSource"]

Image = npt.NDArray[np.uint8]
DrawHook = Callable[[Image, int], None]
"""Paints into ``image`` (BGR, writable, modified in place) for frame number ``seq``."""

# SMPTE-like colour bars, BGR: white, yellow, cyan, green, magenta, red, blue
_BARS = (
    np.array(
        [
            [255, 255, 255],
            [0, 255, 255],
            [255, 255, 0],
            [0, 255, 0],
            [255, 0, 255],
            [0, 0, 255],
            [255, 0, 0],
        ],
        dtype=np.uint8,
    )
    * 3
    // 4
)


class PatternSource(Source):
    """Synthetic BGR frames of ``width`` x ``height``.

    ``pattern`` is ``"bars"`` (seven colour bars, 75 % intensity) or ``"noise"`` (new random
    pixels every frame; two sources made with the same ``seed`` give the same noise). With
    ``moving_box`` a white square moves a few pixels per frame, bouncing off the edges.
    ``draw(image, seq)`` is called on every frame after the pattern is painted. ``count``
    frames are produced, then the iterator returns (``None``: endless). With ``realtime``
    frames are paced at ``fps`` (on the event loop's clock, without drift; a consumer more than
    1 s behind re-anchors the clock instead of receiving a burst); otherwise they come as fast
    as the consumer takes them. Frame ``i`` of a session (from 0) has ``pts = i / fps``.
    ``started(None)`` is called first. ``live`` is True only for an endless pattern.
    """

    def __init__(
        self,
        source_id: str,
        *,
        width: int = 320,
        height: int = 240,
        fps: float = 25.0,
        count: int | None = None,
        realtime: bool = True,
        pattern: Literal["bars", "noise"] = "bars",
        moving_box: bool = True,
        draw: DrawHook | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(source_id)
        if width < 8 or height < 8:
            raise ValueError(f"pattern size must be at least 8x8, not {width}x{height}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, not {fps}")
        if pattern not in ("bars", "noise"):
            raise ValueError(f"pattern must be 'bars' or 'noise', not {pattern!r}")
        self.width = width
        self.height = height
        self.fps = float(fps)  # nominal rate, see Source.fps
        self.live = count is None  # an endless pattern restarts; a counted one ends
        self._period = 1.0 / self.fps
        self.count = count
        self.realtime = realtime
        self.pattern = pattern
        self.moving_box = moving_box
        self.draw = draw
        self._rng = np.random.default_rng(seed)
        columns = np.arange(width) * len(_BARS) // width
        self._bars: Image = np.ascontiguousarray(
            np.broadcast_to(_BARS[columns], (height, width, 3))
        )

    @property
    def paced(self) -> bool:
        """Paced only with ``realtime`` (otherwise frames are made as fast as taken)."""
        return self.realtime

    def describe(self) -> str:
        """Pattern, size, rate and count."""
        count = "endless" if self.count is None else f"{self.count} frames"
        return f"{self.pattern} {self.width}x{self.height} @ {1 / self._period:g} fps, {count}"

    def render(self, index: int) -> Image:
        """The pattern of frame ``index`` (0-based) of a session, before the draw hook."""
        if self.pattern == "bars":
            image = self._bars.copy()
        else:
            image = self._rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8)
        if self.moving_box:
            side = max(4, min(self.width, self.height) // 6)
            x = _bounce(index * 4, self.width - side)
            y = _bounce(index * 3, self.height - side)
            image[y : y + side, x : x + side] = 255
        return image

    async def frames(self, started: StartedCallback | None = None) -> AsyncGenerator[Frame, None]:
        """One session of ``count`` frames (or endless); see the class docstring."""
        if started is not None:
            started(None)
        loop = asyncio.get_running_loop()
        start = loop.time()
        index = 0
        while self.count is None or index < self.count:
            if self.realtime:
                delay = start + index * self._period - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -1.0:  # far behind a slow consumer: re-anchor, do not burst
                    start = loop.time() - index * self._period
            seq = self.next_seq()
            image = self.render(index)
            if self.draw is not None:
                self.draw(image, seq)
            yield Frame(
                image=image,
                source_id=self.source_id,
                seq=seq,
                ts_ms=now_ms(),
                pts=index * self._period,
            )
            index += 1
            if not self.realtime and index % 64 == 0:
                await asyncio.sleep(0)  # let other tasks run when unpaced


def _bounce(distance: int, span: int) -> int:
    """Position after travelling ``distance`` back and forth over ``[0, span]``."""
    if span <= 0:
        return 0
    phase = distance % (2 * span)
    return phase if phase <= span else 2 * span - phase
