"""A face-recognition processor: a :class:`~framepipe.processors.ProcessorClient` with dlib.

Capabilities ``face_detection`` and ``face_recognition``; results go to the ``faces:detected``
stream (not namespaced: the client publishes to the stream name as given). Models come from the
``face_recognition_models`` package (dlib's HOG detector, the 5- or 68-point shape predictor and
``dlib_face_recognition_resnet_model_v1.dat``) and are loaded once, before registering; nothing
is ever downloaded. dlib comes from the ``dlib-bin`` wheel::

    pip install dlib-bin face_recognition_models
    python examples/processor_fleet/face_processor.py --known faces/    # faces/<name>.jpg

Each frame: the JPEG is decoded, small images (narrower than ``--upscale-below`` px, default
300) are upscaled x2 so that HOG finds small faces, faces are detected, their 128-d encodings
computed and, when known faces were given, matched by Euclidean distance (``--tolerance``, 0.6).
The dlib work is :class:`framepipe.processors.faces.FaceAnalyzer`'s (shared with the doorbell
example); a known-face image that is unreadable or shows no face is skipped with a warning, and
of several faces the largest is taken. The work runs in a worker thread, off the event loop.
dlib 20's ``compute_face_descriptor`` holds the GIL, so more threads in one process do not add
throughput: run more processes (``--id face-recognition-2`` ...) and the registry spreads frames
over them by free capacity.

SIGTERM or Ctrl-C stops it gracefully (frames in flight finish, then it deregisters; exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from framepipe.errors import FramepipeError
from framepipe.logs import configure_logging
from framepipe.processors import ProcessorClient
from framepipe.processors.faces import (
    MODEL_FILES,
    Face,
    FaceAnalyzer,
    FaceMatcher,
    KnownFace,
    load_known_faces,
    model_path,
)
from framepipe.processors.fleet.arguments import add_client_arguments, client_arguments

__all__ = [
    "CAPABILITIES",
    "MODEL_FILES",
    "RESULT_STREAM",
    "FaceRecognitionProcessor",
    "KnownFace",
    "main",
    "model_path",
]

CAPABILITIES = ("face_detection", "face_recognition")
RESULT_STREAM = "faces:detected"
DEFAULT_ID = "face-recognition-1"


class FaceRecognitionProcessor(ProcessorClient):
    """Detects faces (dlib HOG), computes 128-d encodings (dlib ResNet) and names the known
    ones. See the module docstring; the result of one frame is::

        {"frame_id", "camera_id", "seq", "faces_detected",
         "faces": [{"box": [l, t, r, b], "score", "name": str | None, "distance": float | None,
                    "encoding": [128 floats] (with include_encodings)}],
         "image_size": [w, h], "processor_id", "timestamp"}

    ``name`` is the closest known face within ``tolerance`` (None otherwise) and ``distance``
    its Euclidean distance (None when no known faces are loaded). ``known_dir`` holds
    ``<name>.jpg`` (or ``.png``) images of one face each. ``threads`` model sets work in
    parallel threads (dlib 20 holds the GIL while encoding: 1 is usually right; scale out
    with processes). ``upsample`` is the HOG detector's own extra upsampling (slower).
    """

    def __init__(
        self,
        processor_id: str = DEFAULT_ID,
        *,
        capacity: int = 10,
        result_stream: str = RESULT_STREAM,
        redis_url: str | None = None,
        namespace: str | None = None,
        health_interval: float = 5.0,
        known_dir: str | os.PathLike[str] | None = None,
        tolerance: float = 0.6,
        upscale_below: int = 300,
        landmarks: int = 5,
        threads: int = 1,
        upsample: int = 0,
        include_encodings: bool = False,
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
        if landmarks not in (5, 68):
            raise ValueError(f"landmarks must be 5 or 68, not {landmarks}")
        if threads < 1 or upsample < 0 or tolerance <= 0:
            raise ValueError("threads must be >= 1, upsample >= 0 and tolerance > 0")
        self.known_dir = Path(known_dir) if known_dir is not None else None
        self.tolerance = tolerance
        self.upscale_below = upscale_below
        self.landmarks = landmarks
        self.threads = threads
        self.upsample = upsample
        self.include_encodings = include_encodings
        self.known: list[KnownFace] = []
        self.matcher = FaceMatcher((), tolerance)
        self.analyzer = FaceAnalyzer(
            model="hog",
            landmarks=landmarks,
            upscale_below=upscale_below,
            upsample=upsample,
            sets=threads,
        )
        self._executor: ThreadPoolExecutor | None = None
        self.frames_with_faces = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def setup(self) -> None:
        """Load the models (one set per thread) and the known faces; before registering."""
        if self._executor is not None:
            return
        started = time.perf_counter()
        executor = ThreadPoolExecutor(self.threads, thread_name_prefix=self.processor_id)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self.analyzer.load)
            if self.known_dir is not None:
                self.known = await loop.run_in_executor(executor, self._load_known, self.known_dir)
                self.matcher = FaceMatcher(self.known, self.tolerance)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        self._executor = executor
        self.log.info(
            "Models loaded in %.2fs (%d thread(s), %d-point landmarks); %d known face(s)%s",
            time.perf_counter() - started,
            self.threads,
            self.landmarks,
            len(self.known),
            f": {', '.join(k.name for k in self.known)}" if self.known else "",
        )

    async def start(self) -> None:
        """Load the models, then register and process frames until stopped."""
        await self.setup()
        try:
            await super().start()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None

    # -- known faces --------------------------------------------------------------------------

    def _load_known(self, directory: Path) -> list[KnownFace]:
        """Encode the face in each ``<name>.jpg``/``.png`` of ``directory`` (the largest one
        when there are several); an unusable image is skipped with a warning."""
        if not directory.is_dir():
            raise FileNotFoundError(f"known faces directory {directory} does not exist")
        loaded = load_known_faces(directory, self.analyzer, multiple="largest")
        for rejected in loaded.rejected:
            self.log.warning("Known face %s: %s; skipped", rejected.source, rejected.reason)
        return loaded.faces

    def match(self, encoding: Any) -> tuple[str | None, float | None]:
        """The closest known face within ``tolerance`` (or None) and its distance (None when
        no faces are known)."""
        return self.matcher.match(encoding)

    # -- frames -------------------------------------------------------------------------------

    def _analyse_frame(self, frame_data: dict[bytes, bytes]) -> tuple[list[Face], tuple[int, int]]:
        """Decode, upscale, detect and encode (in a worker thread)."""
        bgr = self.decode_image(frame_data)
        return self.analyzer.analyse(bgr), (int(bgr.shape[1]), int(bgr.shape[0]))

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        """Detect, encode and name the faces of one frame (see the class docstring)."""
        if self._executor is None:
            raise RuntimeError("FaceRecognitionProcessor.setup() has not run")
        loop = asyncio.get_running_loop()
        detections, size = await loop.run_in_executor(
            self._executor, self._analyse_frame, frame_data
        )
        faces: list[dict[str, Any]] = []
        for detection in detections:
            name, distance = self.match(detection.encoding)
            face: dict[str, Any] = {
                "box": detection.box.as_list(),
                "score": round(detection.box.score, 4),
                "name": name,
                "distance": None if distance is None else round(distance, 4),
            }
            if self.include_encodings:
                face["encoding"] = [round(float(v), 6) for v in detection.encoding]
            faces.append(face)
        if faces:
            self.frames_with_faces += 1
        seq: Any = None
        with contextlib.suppress(ValueError, TypeError):
            seq = self.metadata(frame_data).get("seq")
        return {
            "frame_id": frame_data[b"frame_id"].decode(),
            "camera_id": frame_data.get(b"camera_id", b"").decode(),
            "seq": seq,
            "faces_detected": len(faces),
            "faces": faces,
            "image_size": list(size),
            "processor_id": self.processor_id,
            "timestamp": time.time(),
        }


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (defaults from the environment where noted)."""
    parser = argparse.ArgumentParser(
        description="Face detection and recognition processor (dlib) for framepipe."
    )
    add_client_arguments(parser, default_id=DEFAULT_ID, result_stream=RESULT_STREAM)
    parser.add_argument(
        "--known", type=Path, default=None, help="directory of <name>.jpg images of known faces"
    )
    parser.add_argument(
        "--tolerance", type=float, default=0.6, help="largest encoding distance of a match (0.6)"
    )
    parser.add_argument(
        "--upscale-below",
        type=int,
        default=300,
        help="upscale images narrower than this x2 (0: never; 300)",
    )
    parser.add_argument(
        "--landmarks", type=int, choices=(5, 68), default=5, help="shape predictor (5 or 68 points)"
    )
    parser.add_argument("--threads", type=int, default=1, help="model sets / threads (1)")
    parser.add_argument(
        "--upsample",
        type=int,
        default=0,
        help="extra HOG upsampling passes (slower, finds smaller faces)",
    )
    parser.add_argument(
        "--include-encodings",
        action="store_true",
        help="put each face's 128-d encoding in the result",
    )
    return parser


async def serve(args: argparse.Namespace) -> None:
    """Build the processor from parsed options and run it until SIGTERM/SIGINT."""
    processor = FaceRecognitionProcessor(
        args.id,
        **client_arguments(args),
        known_dir=args.known,
        tolerance=args.tolerance,
        upscale_below=args.upscale_below,
        landmarks=args.landmarks,
        threads=args.threads,
        upsample=args.upsample,
        include_encodings=args.include_encodings,
    )
    await processor.run()  # installs the SIGTERM/SIGINT handlers, loads models, serves


def main(argv: Sequence[str] | None = None) -> int:
    """Run the processor; 0 after a graceful stop, 1 on a start-up error."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level.upper(), stream=sys.stderr)
    try:
        asyncio.run(serve(args))
    except (FramepipeError, FileNotFoundError, ValueError) as exc:
        print(f"face_processor: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
