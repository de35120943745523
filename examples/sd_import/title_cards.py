"""The title cards ``render`` makes when no ``intro`` or ``splash`` is given."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from media_limits import limits

from framepipe.media import stitch
from framepipe.media.frames import write_image

__all__ = ["title_card"]


def title_card(
    dst: Path, lines: Sequence[str], size: tuple[int, int], *, fps: float = 25, seconds: float = 1.0
) -> Path:
    """A still title card (white text on dark blue) of ``seconds`` as an H.264 MP4."""
    width, height = size
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = (90, 40, 20)
    scale = max(0.3, height / 360)
    thickness = max(1, round(2 * scale))
    step = int(40 * scale)
    top = height // 2 - step * (len(lines) - 1) // 2
    for i, line in enumerate(lines):
        (tw, _), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        cv2.putText(
            image,
            line,
            (max(0, (width - tw) // 2), top + i * step),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )
    still = write_image(dst.with_suffix(".png"), image)
    count = max(1, round(seconds * fps))
    return stitch([still] * count, dst, fps=fps, preset="ultrafast", **limits())
