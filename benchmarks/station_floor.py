"""The machine's floor for an order station: the same work as the example's station, written
as a plain program with no framework, for ``station_scale.py`` to measure beside framepipe.

Each station is one thread that plays its camera's video in real time, looped (PyAV, one
decoding thread, as the stations' ``decode_threads=1``), and for every frame:

* reads the QR order tag with zxing-cpp in the grey picture at 1/``reduce`` of the size (the
  luma plane area-averaged, or an MJPEG camera's JPEG decoded already scaled by libjpeg);
* keeps an order open from its tag until ``timeout`` seconds pass without it;
* writes every frame of an open order as a JPEG file, atomically (a temporary file renamed):
  H.264 frames encoded straight from their planes (``floor_jpeg``), an MJPEG camera's JPEG as
  it came; and at an order's end writes a copy of its ``best`` sharpest frames (the variance
  of the Laplacian over the tag, the example's own measure), as the example's ``FrameStore``
  does.

No health, events, queues or stages: what a hand-written station that does only this would
cost. It is a floor, not a rival: it has none of the supervision a deployment needs.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import zxingcpp
from floor_jpeg import planes_to_jpeg
from tags import _sharpness  # the station's own measure (the example's, not framepipe's)

_REDUCED_GREY = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


@dataclass
class FloorCounts:
    """What the floor's stations did: frames handled by each station (each station adds to
    its own slot), and every order as ``[started at (monotonic), completed]``."""

    frames: list[int]
    orders: list[list[float | bool]] = field(default_factory=list)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class FloorStation:
    """One station of the floor (see the module docstring); ``run`` until ``stop`` is set."""

    def __init__(
        self,
        index: int,
        video: Path,
        mjpeg: bool,
        reduce: int,
        root: Path,
        counts: FloorCounts,
        stop: threading.Event,
        *,
        fps: float = 10.0,
        timeout: float = 1.0,
        best: int = 3,
    ) -> None:
        self.index, self.video, self.mjpeg, self.reduce = index, video, mjpeg, reduce
        self.counts, self.stop = counts, stop
        self.fps, self.timeout, self.best = fps, timeout, best
        self.folder = root / f"station_{index + 1}"
        (self.folder / "selected").mkdir(parents=True, exist_ok=True)
        self.order: list[float | bool] | None = None  # the open order's entry in counts
        self.order_id = ""
        self.order_dir = self.folder
        self.last_tag = 0.0
        self.kept: list[tuple[float, int, bytes]] = []  # (sharpness, seq, jpeg): the best
        self.seq = 0
        self.started = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            with av.open(str(self.video)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "NONE"
                stream.codec_context.thread_count = 1
                for packet in container.demux(stream):
                    if self.stop.is_set():
                        return
                    if self.mjpeg:
                        if packet.size:
                            self.frame(bytes(packet), None)
                    else:
                        for decoded in packet.decode():
                            self.frame(None, decoded.to_ndarray())

    def grey(self, jpeg: bytes | None, planes: np.ndarray | None) -> np.ndarray:
        if jpeg is not None:
            return cv2.imdecode(np.frombuffer(jpeg, np.uint8), _REDUCED_GREY[self.reduce])
        assert planes is not None
        height = planes.shape[0] * 2 // 3
        luma = planes[:height]
        if self.reduce == 1:
            return luma
        size = (luma.shape[1] // self.reduce, height // self.reduce)
        return cv2.resize(luma, size, interpolation=cv2.INTER_AREA)

    def frame(self, jpeg: bytes | None, planes: np.ndarray | None) -> None:
        self.seq += 1
        delay = self.started + self.seq / self.fps - time.monotonic()
        if delay > 0:
            self.stop.wait(delay)  # played in real time, as a camera sends it
        grey = self.grey(jpeg, planes)
        codes = zxingcpp.read_barcodes(grey, formats=zxingcpp.BarcodeFormat.QRCode)
        tag = next((c for c in codes if c.valid and c.text), None)
        now = time.monotonic()
        if self.order is not None and (
            (tag is not None and tag.text != self.order_id) or now - self.last_tag > self.timeout
        ):
            self.close()
        if tag is not None:
            if self.order is None:
                self.order, self.order_id = [now, False], tag.text
                self.order_dir = self.folder / f"{tag.text}-{self.seq}"
                self.order_dir.mkdir(exist_ok=True)
                self.counts.orders.append(self.order)
            self.last_tag = now
        if self.order is not None:
            if jpeg is None:
                assert planes is not None
                height = planes.shape[0] * 2 // 3
                jpeg = planes_to_jpeg(planes, height, planes.shape[1], False)
            _write(self.order_dir / f"{self.seq:06d}.jpg", jpeg)
            if tag is not None:
                entry = (_sharpness(grey, tag.position), self.seq, jpeg)
                if len(self.kept) < self.best:
                    heapq.heappush(self.kept, entry)
                else:
                    heapq.heappushpop(self.kept, entry)
        self.counts.frames[self.index] += 1

    def close(self) -> None:
        """End the open order: its best frames copied to ``selected/``."""
        for _score, number, data in self.kept:
            _write(self.folder / "selected" / f"{self.order_id}-{number:06d}.jpg", data)
        assert self.order is not None
        self.order[1] = True
        self.order, self.kept = None, []


def start_floor(
    n: int, video: Path, mjpeg: bool, reduce: int, root: Path
) -> tuple[FloorCounts, threading.Event, list[threading.Thread]]:
    """Start ``n`` floor stations in threads; set the event to stop them."""
    counts = FloorCounts([0] * n)
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=FloorStation(i, video, mjpeg, reduce, root, counts, stop).run,
            name=f"floor-station-{i + 1}",
            daemon=True,
        )
        for i in range(n)
    ]
    for thread in threads:
        thread.start()
    return counts, stop, threads
