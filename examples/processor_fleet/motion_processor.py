"""A motion processor: a :class:`~framepipe.processors.ProcessorClient` doing frame differencing.

Capability ``motion_detection``; results go to the ``motion:detected`` stream (not namespaced).
For each camera it keeps the previous frame (grey, downscaled to at most ``--max-width`` px
and blurred) and scores a frame by the fraction of pixels whose brightness changed by more
than ``--pixel-threshold``; ``moving`` is ``motion >= --moving-threshold``. The first frame of a
camera scores 0. Needs only OpenCV (a framepipe dependency)::

    python examples/processor_fleet/motion_processor.py --redis-url redis://127.0.0.1:6379/0

The differencing is cheap and runs on the event loop, so frames are scored in the order they
arrive. Frames of one camera should go to one motion processor (with several, each would
difference the subset it receives). SIGTERM or Ctrl-C stops it gracefully (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from framepipe.errors import FramepipeError
from framepipe.logs import configure_logging
from framepipe.processors import ProcessorClient
from framepipe.processors.fleet.arguments import add_client_arguments, client_arguments

__all__ = ["CAPABILITIES", "RESULT_STREAM", "MotionProcessor", "main"]

CAPABILITIES = ("motion_detection",)
RESULT_STREAM = "motion:detected"
DEFAULT_ID = "motion-1"

Grey = npt.NDArray[np.uint8]


class MotionProcessor(ProcessorClient):
    """Frame differencing per camera; the result of one frame is
    ``{"frame_id", "camera_id", "seq", "motion": float 0-1, "moving": bool, "processor_id",
    "timestamp"}`` (see the module docstring)."""

    def __init__(
        self,
        processor_id: str = DEFAULT_ID,
        *,
        capacity: int = 4,
        result_stream: str = RESULT_STREAM,
        redis_url: str | None = None,
        namespace: str | None = None,
        health_interval: float = 5.0,
        pixel_threshold: int = 25,
        moving_threshold: float = 0.01,
        max_width: int = 320,
        blur: int = 5,
        **client_options: Any,
    ) -> None:
        super().__init__(
            processor_id,
            list(CAPABILITIES),
            capacity=capacity,
            result_stream=result_stream,
            redis_url=redis_url,
            health_interval=health_interval,
            namespace=namespace,
            **client_options,
        )
        if not 0 <= pixel_threshold <= 255 or not 0 <= moving_threshold <= 1:
            raise ValueError("pixel_threshold must be 0-255 and moving_threshold 0-1")
        if max_width < 8 or blur < 0:
            raise ValueError("max_width must be >= 8 and blur >= 0")
        self.pixel_threshold = pixel_threshold
        self.moving_threshold = moving_threshold
        self.max_width = max_width
        self.blur = blur | 1 if blur else 0  # Gaussian kernels are odd
        self._previous: dict[str, Grey] = {}

    def grey(self, bgr: npt.NDArray[np.uint8]) -> Grey:
        """The comparable form of a frame: grey, at most ``max_width`` wide, blurred."""
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        if image.shape[1] > self.max_width:
            height = max(1, round(image.shape[0] * self.max_width / image.shape[1]))
            image = cv2.resize(image, (self.max_width, height), interpolation=cv2.INTER_AREA)
        if self.blur:
            image = cv2.GaussianBlur(image, (self.blur, self.blur), 0)
        return np.asarray(image, dtype=np.uint8)

    def score(self, camera_id: str, grey: Grey) -> float:
        """The fraction of changed pixels since this camera's previous frame (0 for the first,
        or after a size change); remembers ``grey`` as the camera's previous frame."""
        previous = self._previous.get(camera_id)
        self._previous[camera_id] = grey
        if previous is None or previous.shape != grey.shape:
            return 0.0
        changed = cv2.absdiff(previous, grey) > self.pixel_threshold
        return float(np.count_nonzero(changed)) / float(changed.size)

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        """Score one frame against its camera's previous frame."""
        camera_id = frame_data.get(b"camera_id", b"").decode()
        motion = self.score(camera_id, self.grey(self.decode_image(frame_data)))
        seq: Any = None
        with contextlib.suppress(ValueError, TypeError):
            seq = self.metadata(frame_data).get("seq")
        return {
            "frame_id": frame_data[b"frame_id"].decode(),
            "camera_id": camera_id,
            "seq": seq,
            "motion": round(motion, 6),
            "moving": motion >= self.moving_threshold,
            "processor_id": self.processor_id,
            "timestamp": time.time(),
        }


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (defaults from the environment where noted)."""
    parser = argparse.ArgumentParser(description="Motion (frame differencing) processor.")
    add_client_arguments(
        parser, default_id=DEFAULT_ID, result_stream=RESULT_STREAM, default_capacity=4
    )
    parser.add_argument(
        "--pixel-threshold",
        type=int,
        default=25,
        help="brightness change that counts a pixel as changed (25)",
    )
    parser.add_argument(
        "--moving-threshold",
        type=float,
        default=0.01,
        help="fraction of changed pixels that means motion (0.01)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the processor; 0 after a graceful stop, 1 on a start-up error."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level.upper(), stream=sys.stderr)
    try:
        processor = MotionProcessor(
            args.id,
            **client_arguments(args),
            pixel_threshold=args.pixel_threshold,
            moving_threshold=args.moving_threshold,
        )
        asyncio.run(processor.run())
    except (FramepipeError, ValueError) as exc:
        print(f"motion_processor: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
