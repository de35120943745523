"""A stand-in model for tests and demos: :class:`MockModel` writes generated frames, with
progress, reproducibly (the same ``seed`` and ``style`` give the same images)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from framepipe.errors import ModelError
from framepipe.frames import Image
from framepipe.processors.adapters.base import ModelAdapter, ModelResult

__all__ = ["MockModel"]


class MockModel(ModelAdapter):
    """Writes ``frames`` generated images of ``size`` (width, height) as ``frame_0000.png``
    (or ``.jpg`` with ``fmt="jpg"``) into ``output_dir/frames``, reporting progress after each,
    waiting ``delay`` seconds per frame (cancellable). The images depend on ``seed`` and
    ``style`` (a colour gradient and a moving square), so runs are reproducible. The input file
    is not read. Each frame is drawn and written in a thread, never on the event loop. For
    tests and demos."""

    def __init__(
        self,
        frames: int = 10,
        size: tuple[int, int] = (320, 240),
        *,
        delay: float = 0.0,
        fmt: str = "png",
        name: str | None = None,
        timeout: float | None = None,
        max_retries: int = 0,
    ) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, not {frames}")
        if size[0] < 8 or size[1] < 8:
            raise ValueError(f"size must be at least 8x8, not {size}")
        if fmt not in ("png", "jpg"):
            raise ValueError(f"fmt must be 'png' or 'jpg', not {fmt!r}")
        super().__init__(name=name, timeout=timeout, max_retries=max_retries)
        self.frames = frames
        self.size = size
        self.delay = delay
        self.fmt = fmt

    @property
    def target(self) -> str:
        return f"{self.frames} frames {self.size[0]}x{self.size[1]}"

    def render(self, index: int, *, seed: int = 0, style: str = "default") -> Image:
        """Frame ``index`` as a BGR image."""
        w, h = self.size
        tint = (seed * 37 + sum(style.encode())) % 256
        x = np.linspace(0, 255, w, dtype=np.float32)
        y = np.linspace(0, 255, h, dtype=np.float32)
        image = np.empty((h, w, 3), np.uint8)
        image[..., 0] = np.broadcast_to(x[None, :], (h, w)).astype(np.uint8)
        image[..., 1] = np.broadcast_to(y[:, None], (h, w)).astype(np.uint8)
        image[..., 2] = tint
        side = max(2, min(w, h) // 6)
        left = (index * 7) % max(1, w - side)
        image[h // 2 - side // 2 : h // 2 + side // 2, left : left + side] = 255
        return image

    def _write(self, path: Path, index: int, seed: int, style: str) -> None:
        """Render frame ``index`` and write it to ``path`` (in a thread: off the event loop)."""
        import cv2

        # encoded in memory, written by Python: OpenCV given a path that is not valid UTF-8
        # (an output folder's name) crashes the process
        ok, encoded = cv2.imencode(path.suffix, self.render(index, seed=seed, style=style))
        if not ok:
            raise ModelError(f"{self.describe()}: cannot write {path}", model=self.describe())
        path.write_bytes(encoded.tobytes())

    async def _infer_once(
        self,
        input_path: Path,
        *,
        prompt: str,
        style: str,
        seed: int,
        output_dir: Path,
        progress: Callable[[float], None],
        options: Mapping[str, Any],
    ) -> ModelResult:
        frames_dir = output_dir / "frames"
        await asyncio.to_thread(frames_dir.mkdir, parents=True, exist_ok=True)
        started = time.monotonic()
        progress(0)
        for i in range(self.frames):
            if self.delay:
                await asyncio.sleep(self.delay)
            path = frames_dir / f"frame_{i:04d}.{self.fmt}"
            await asyncio.to_thread(self._write, path, i, seed, style)
            progress(100 * (i + 1) / self.frames)
        return ModelResult(
            frames_dir,
            {
                "frames": self.frames,
                "prompt": prompt,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
