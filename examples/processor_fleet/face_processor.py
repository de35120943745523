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
The work runs in a worker thread, off the event loop. dlib 20's ``compute_face_descriptor``
holds the GIL, so more threads in one process do not add throughput: run more processes
(``--id face-recognition-2`` ...) and the registry spreads frames over them by free capacity.

SIGTERM or Ctrl-C stops it gracefully (frames in flight finish, then it deregisters; exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import queue
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from framepipe.errors import FramepipeError
from framepipe.logs import configure_logging
from framepipe.processors import ProcessorClient

try:
    import dlib  # type: ignore[import-untyped]
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise SystemExit(f"dlib is missing ({_exc}): pip install dlib-bin face_recognition_models"
                     ) from _exc

__all__ = [
    "CAPABILITIES",
    "RESULT_STREAM",
    "FaceRecognitionProcessor",
    "KnownFace",
    "main",
    "model_path",
]

CAPABILITIES = ("face_detection", "face_recognition")
RESULT_STREAM = "faces:detected"
DEFAULT_ID = "face-recognition-1"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "framepipe:"
MODEL_FILES = {
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "encoder": "dlib_face_recognition_resnet_model_v1.dat",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

RGB = npt.NDArray[np.uint8]
Encoding = npt.NDArray[np.float64]


def model_path(name: str) -> Path:
    """The path of one of dlib's model files shipped in ``face_recognition_models``.

    The package is located without importing it (its ``__init__`` imports the deprecated
    ``pkg_resources``). Raises :class:`FileNotFoundError` saying what to install."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "models" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"dlib model {name!r} not found: the face_recognition_models "
                            "package is missing (pip install face_recognition_models)")


@dataclass(frozen=True)
class KnownFace:
    """A named face to recognise: its name (the file's stem) and 128-d encoding."""

    name: str
    encoding: Encoding
    source: str


@dataclass
class _Detection:
    box: tuple[int, int, int, int]
    """left, top, right, bottom in the original image's pixels."""
    score: float
    encoding: Encoding


class _Models:
    """One set of dlib models. dlib's detector and network keep state while they run, so a
    set is used by one thread at a time (they wait in a pool)."""

    def __init__(self, landmarks: int) -> None:
        predictor = MODEL_FILES["landmarks5" if landmarks == 5 else "landmarks68"]
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(model_path(predictor)))
        self.encoder = dlib.face_recognition_model_v1(str(model_path(MODEL_FILES["encoder"])))

    def analyse(self, rgb: RGB, *, scale: int, upsample: int) -> list[_Detection]:
        """Detect the faces in ``rgb`` (already upscaled by ``scale``) and encode them."""
        rects, scores, _ = self.detector.run(rgb, upsample, 0.0)
        found: list[_Detection] = []
        height, width = rgb.shape[:2]
        for rect, score in zip(rects, scores, strict=True):
            shape = self.predictor(rgb, rect)
            encoding = np.asarray(self.encoder.compute_face_descriptor(rgb, shape),
                                  dtype=np.float64)
            box = (round(max(0, rect.left()) / scale), round(max(0, rect.top()) / scale),
                   round(min(width, rect.right()) / scale),
                   round(min(height, rect.bottom()) / scale))
            found.append(_Detection(box, float(score), encoding))
        return found


def _prepare(bgr: npt.NDArray[np.uint8], upscale_below: int) -> tuple[RGB, int]:
    """RGB image for dlib, upscaled x2 when narrower than ``upscale_below``; and the scale."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    scale = 2 if upscale_below and rgb.shape[1] < upscale_below else 1
    if scale != 1:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(rgb, dtype=np.uint8), scale


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

    def __init__(self, processor_id: str = DEFAULT_ID, *, capacity: int = 10,
                 result_stream: str = RESULT_STREAM, redis_url: str = DEFAULT_REDIS_URL,
                 namespace: str = DEFAULT_NAMESPACE, health_interval: float = 5.0,
                 known_dir: str | os.PathLike[str] | None = None, tolerance: float = 0.6,
                 upscale_below: int = 300, landmarks: int = 5, threads: int = 1,
                 upsample: int = 0, include_encodings: bool = False,
                 **client_options: Any) -> None:
        super().__init__(processor_id, list(CAPABILITIES), capacity=capacity,
                         result_stream=result_stream, redis_url=redis_url,
                         health_interval=health_interval, namespace=namespace,
                         **client_options)
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
        self._known_matrix: Encoding = np.zeros((0, 128))
        self._models: queue.SimpleQueue[_Models] = queue.SimpleQueue()
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
            sets = await asyncio.gather(*(loop.run_in_executor(executor, _Models, self.landmarks)
                                          for _ in range(self.threads)))
            for models in sets:
                self._models.put(models)
            if self.known_dir is not None:
                self.known = await loop.run_in_executor(executor, self._load_known,
                                                        self.known_dir)
                if self.known:
                    self._known_matrix = np.stack([k.encoding for k in self.known])
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        self._executor = executor
        self.log.info("Models loaded in %.2fs (%d thread(s), %d-point landmarks); %d known "
                      "face(s)%s", time.perf_counter() - started, self.threads, self.landmarks,
                      len(self.known), f": {', '.join(k.name for k in self.known)}"
                      if self.known else "")

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
        when there are several); an image without a face is skipped with a warning."""
        if not directory.is_dir():
            raise FileNotFoundError(f"known faces directory {directory} does not exist")
        models = self._models.get()
        try:
            known: list[KnownFace] = []
            for path in sorted(directory.iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
                if bgr is None:
                    self.log.warning("Known face %s: not a readable image; skipped", path)
                    continue
                rgb, scale = _prepare(np.asarray(bgr, dtype=np.uint8), self.upscale_below)
                faces = models.analyse(rgb, scale=scale, upsample=self.upsample)
                if not faces:  # try harder once: a known face is worth the time
                    faces = models.analyse(rgb, scale=scale, upsample=self.upsample + 1)
                if not faces:
                    self.log.warning("Known face %s: no face found; skipped", path)
                    continue
                largest = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
                known.append(KnownFace(path.stem, largest.encoding, str(path)))
            return known
        finally:
            self._models.put(models)

    def match(self, encoding: Encoding) -> tuple[str | None, float | None]:
        """The closest known face within ``tolerance`` (or None) and its distance (None when
        no faces are known)."""
        if not self.known:
            return None, None
        distances = np.linalg.norm(self._known_matrix - encoding, axis=1)
        best = int(np.argmin(distances))
        distance = float(distances[best])
        return (self.known[best].name if distance <= self.tolerance else None), distance

    # -- frames -------------------------------------------------------------------------------

    def _analyse_frame(self, frame_data: dict[bytes, bytes]) -> tuple[list[_Detection],
                                                                     tuple[int, int]]:
        """Decode, upscale, detect and encode (in a worker thread)."""
        bgr = self.decode_image(frame_data)
        rgb, scale = _prepare(bgr, self.upscale_below)
        models = self._models.get()
        try:
            return (models.analyse(rgb, scale=scale, upsample=self.upsample),
                    (int(bgr.shape[1]), int(bgr.shape[0])))
        finally:
            self._models.put(models)

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        """Detect, encode and name the faces of one frame (see the class docstring)."""
        if self._executor is None:
            raise RuntimeError("FaceRecognitionProcessor.setup() has not run")
        loop = asyncio.get_running_loop()
        detections, size = await loop.run_in_executor(self._executor, self._analyse_frame,
                                                      frame_data)
        faces: list[dict[str, Any]] = []
        for detection in detections:
            name, distance = self.match(detection.encoding)
            face: dict[str, Any] = {"box": list(detection.box),
                                    "score": round(detection.score, 4), "name": name,
                                    "distance": None if distance is None else round(distance, 4)}
            if self.include_encodings:
                face["encoding"] = [round(float(v), 6) for v in detection.encoding]
            faces.append(face)
        if faces:
            self.frames_with_faces += 1
        seq: Any = None
        with contextlib.suppress(ValueError, TypeError):
            seq = self.metadata(frame_data).get("seq")
        return {"frame_id": frame_data[b"frame_id"].decode(),
                "camera_id": frame_data.get(b"camera_id", b"").decode(),
                "seq": seq, "faces_detected": len(faces), "faces": faces,
                "image_size": list(size), "processor_id": self.processor_id,
                "timestamp": time.time()}


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (defaults from the environment where noted)."""
    parser = argparse.ArgumentParser(
        description="Face detection and recognition processor (dlib) for framepipe.")
    parser.add_argument("--id", default=os.environ.get("PROCESSOR_ID", DEFAULT_ID),
                        help="processor id, unique in the namespace (env PROCESSOR_ID; "
                             f"default {DEFAULT_ID})")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
                        help="Redis URL (env REDIS_URL)")
    parser.add_argument("--namespace",
                        default=os.environ.get("FRAMEPIPE_NAMESPACE", DEFAULT_NAMESPACE),
                        help="registry key prefix (env FRAMEPIPE_NAMESPACE)")
    parser.add_argument("--result-stream", default=RESULT_STREAM,
                        help=f"stream receiving the results (default {RESULT_STREAM})")
    parser.add_argument("--capacity", type=int, default=10, help="frames in flight (10)")
    parser.add_argument("--health-interval", type=float, default=5.0,
                        help="heartbeat period in seconds (5)")
    parser.add_argument("--known", type=Path, default=None,
                        help="directory of <name>.jpg images of known faces")
    parser.add_argument("--tolerance", type=float, default=0.6,
                        help="largest encoding distance of a match (0.6)")
    parser.add_argument("--upscale-below", type=int, default=300,
                        help="upscale images narrower than this x2 (0: never; 300)")
    parser.add_argument("--landmarks", type=int, choices=(5, 68), default=5,
                        help="shape predictor (5 or 68 points)")
    parser.add_argument("--threads", type=int, default=1, help="model sets / threads (1)")
    parser.add_argument("--upsample", type=int, default=0,
                        help="extra HOG upsampling passes (slower, finds smaller faces)")
    parser.add_argument("--include-encodings", action="store_true",
                        help="put each face's 128-d encoding in the result")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    return parser


async def serve(args: argparse.Namespace) -> None:
    """Build the processor from parsed options and run it until SIGTERM/SIGINT."""
    processor = FaceRecognitionProcessor(
        args.id, capacity=args.capacity, result_stream=args.result_stream,
        redis_url=args.redis_url, namespace=args.namespace,
        health_interval=args.health_interval, known_dir=args.known,
        tolerance=args.tolerance, upscale_below=args.upscale_below, landmarks=args.landmarks,
        threads=args.threads, upsample=args.upsample,
        include_encodings=args.include_encodings)
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
