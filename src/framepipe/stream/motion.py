"""The motion gate: lets only moving frames through (OpenCV)."""

from __future__ import annotations

import threading
from typing import Any, Literal

import cv2
import numpy as np

from framepipe.frames import Frame
from framepipe.pixels import REDUCTIONS
from framepipe.processors.base import Processor

__all__ = ["MotionGate"]


class MotionGate(Processor):
    """Passes a frame when the fraction of its pixels that changed reaches ``threshold``.

    ``method="diff"`` compares each frame with the previous one of the same source (after
    greyscale, downscale to ``width`` pixels and a blur); ``"mog2"`` uses OpenCV's
    BackgroundSubtractorMOG2 per source (robust to slow light changes, needs a few frames to
    learn). A changed pixel differs by more than ``pixel_delta`` (0-255). The score goes to
    ``frame.meta["motion"]``; with ``pass_all`` every frame passes, annotated. The first frame of
    a source counts as still, and so does the first after its picture size changed (a camera
    restarted at another resolution), with both methods: the comparison starts again from it.
    Keeps per-source state: run it with one worker, in order.
    """

    def __init__(
        self,
        threshold: float = 0.01,
        *,
        method: Literal["diff", "mog2"] = "diff",
        pixel_delta: int = 25,
        width: int = 320,
        pass_all: bool = False,
    ) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"motion threshold is a fraction of pixels (0-1), got {threshold}")
        if method not in ("diff", "mog2"):
            raise ValueError(f"motion method must be 'diff' or 'mog2', got {method!r}")
        self.threshold = threshold
        self.method = method
        self.pixel_delta = pixel_delta
        self.width = width
        self.pass_all = pass_all
        self.name = "motion_gate"
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _small(self, frame: Frame) -> np.ndarray[Any, Any]:
        reduce = 1
        while reduce < REDUCTIONS[-1] and frame.width // (reduce * 2) >= self.width:
            reduce *= 2
        grey: np.ndarray[Any, Any] = frame.small_gray(reduce)  # a JPEG is decoded scaled
        h, w = grey.shape[:2]
        if w > self.width:
            grey = cv2.resize(
                grey, (self.width, max(1, h * self.width // w)), interpolation=cv2.INTER_AREA
            )
        return cv2.GaussianBlur(grey, (5, 5), 0)

    def score(self, frame: Frame) -> float:
        """Fraction of pixels that moved since the previous frame of ``frame.source_id``."""
        small = self._small(frame)
        with self._lock:
            state = self._state.get(frame.source_id)
            if self.method == "mog2":
                model, shape = state if state is not None else (None, None)
                if model is None or shape != small.shape:  # first frame, or a new picture size
                    model = cv2.createBackgroundSubtractorMOG2(history=200, detectShadows=False)
                    self._state[frame.source_id] = (model, small.shape)
                    model.apply(small, learningRate=1.0)  # the first frame is the background
                    return 0.0
                mask = model.apply(small)
                return float(np.count_nonzero(mask > 0) / mask.size)
            self._state[frame.source_id] = small
        if state is None or state.shape != small.shape:
            return 0.0
        moved = cv2.absdiff(state, small) > self.pixel_delta
        return float(np.count_nonzero(moved) / moved.size)

    def process(self, item: Any) -> Any:
        frame: Frame = item
        value = self.score(frame)
        frame.meta["motion"] = round(value, 5)
        return frame if self.pass_all or value >= self.threshold else None
