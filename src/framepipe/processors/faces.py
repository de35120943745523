"""Faces with dlib: detection (HOG or CNN), 128-d encodings, known faces and matching.

dlib comes from the ``dlib-bin`` wheel and its models from the ``face_recognition_models``
package (``pip install 'framepipe[fleet]'``); both are imported on first use, so importing this
module costs nothing and a missing one raises :class:`~framepipe.errors.MissingDependencyError`
with the pip command. Nothing is ever downloaded.

Guarantees:

* :class:`FaceAnalyzer` is thread-safe: it holds ``sets`` independent sets of dlib models (dlib's
  detector and network keep state while they run) and lends one set to one thread at a time, so
  ``sets`` threads work in parallel and more wait. Models are loaded once, by :meth:`load` or by
  the first call that needs them.
* Boxes are ``(left, top, right, bottom)`` in the pixels of the image given, clipped to it,
  whatever upscaling was used to find small faces (images narrower than ``upscale_below`` are
  upscaled x2 first).
* :func:`load_known_faces` never raises (nor crashes) for one bad file: what the rules of
  :mod:`framepipe.processors.face_photos` refuse (a name that is not UTF-8 or holds a control
  character, a link out of the folder, a file too large, not a regular file or not a PNG or
  JPEG), an unreadable file, an image without a face and (with ``multiple="reject"``) one with
  several faces are returned as :class:`RejectedFace` entries that say why;
  :meth:`FaceAnalyzer.encode_known` raises :class:`~framepipe.errors.MediaError` naming the
  file for the same cases. No file is handed to OpenCV by name: each is read as bytes.
* :class:`FaceMatcher` answers the closest known face within ``tolerance`` (Euclidean distance
  of the encodings, 0.6 by default as in dlib's documentation) and that distance.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from framepipe.errors import MediaError, MissingDependencyError
from framepipe.processors.face_photos import (
    MAX_BYTES,
    MAX_PIXELS,
    MAX_SIDE,
    decode_photo,
    read_photo_bytes,
    refusal,
    shown_path,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MODEL_FILES",
    "DetectorModel",
    "Encoding",
    "Face",
    "FaceAnalyzer",
    "FaceBox",
    "FaceMatcher",
    "KnownFace",
    "KnownFaces",
    "RejectedFace",
    "import_dlib",
    "load_known_faces",
    "model_path",
]

MODEL_FILES = {
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "encoder": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn": "mmod_human_face_detector.dat",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

DetectorModel = Literal["hog", "cnn"]
Encoding = npt.NDArray[np.float64]
Image = npt.NDArray[np.uint8]


def import_dlib() -> Any:
    """The ``dlib`` module; :class:`MissingDependencyError` when the wheel is not installed."""
    try:
        import dlib  # type: ignore[import-untyped]
    except ImportError as exc:
        raise MissingDependencyError("dlib-bin", "fleet", "Face detection with dlib") from exc
    return dlib


def model_path(name: str) -> Path:
    """The path of one of dlib's model files shipped in ``face_recognition_models``.

    The package is located without importing it (its ``__init__`` imports the deprecated
    ``pkg_resources``). Raises :class:`MissingDependencyError` when it is not installed."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "models" / name
        if path.is_file():
            return path
    raise MissingDependencyError(
        "face_recognition_models", "fleet", f"Face recognition (dlib model {name})"
    )


@dataclass(frozen=True)
class FaceBox:
    """A detected face: its box in the image's pixels and the detector's score (HOG: the SVM
    margin, about 0-3; CNN: the MMOD confidence)."""

    left: int
    top: int
    right: int
    bottom: int
    score: float

    @property
    def area(self) -> int:
        """Pixels in the box."""
        return max(0, self.right - self.left) * max(0, self.bottom - self.top)

    def as_list(self) -> list[int]:
        """``[left, top, right, bottom]``."""
        return [self.left, self.top, self.right, self.bottom]


@dataclass(frozen=True)
class Face:
    """A detected face and its 128-d encoding."""

    box: FaceBox
    encoding: Encoding


@dataclass(frozen=True)
class KnownFace:
    """A named face to recognise: its name (the file's stem), 128-d encoding and source file."""

    name: str
    encoding: Encoding
    source: str


@dataclass(frozen=True)
class RejectedFace:
    """A known-face image that could not be used, and why."""

    source: str
    reason: str


@dataclass
class KnownFaces:
    """What :func:`load_known_faces` found: the usable faces and the rejected files."""

    faces: list[KnownFace]
    rejected: list[RejectedFace]

    @property
    def names(self) -> list[str]:
        """The known names, in file order."""
        return [face.name for face in self.faces]


def _prepare(bgr: Image, upscale_below: int) -> tuple[Image, int]:
    """RGB image for dlib, upscaled x2 when narrower than ``upscale_below``; and the scale."""
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ValueError(f"need an HxWx3 uint8 BGR image, got {bgr.dtype} {bgr.shape}")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    scale = 2 if upscale_below and rgb.shape[1] < upscale_below else 1
    if scale != 1:
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(rgb, dtype=np.uint8), scale


class _ModelSet:
    """One set of dlib models, used by one thread at a time. The detector and the
    predictor+encoder load on first use, so a detection-only or encoding-only user pays for
    its half only."""

    def __init__(self, dlib: Any, detector: DetectorModel, landmarks: int) -> None:
        self.dlib = dlib
        self.cnn = detector == "cnn"
        self.landmarks = landmarks
        self._detector: Any = None
        self._predictor: Any = None
        self._encoder: Any = None

    def load(self, *, detect: bool, encode: bool) -> None:
        """Load the parts asked for (no-op for parts already loaded)."""
        dlib = self.dlib
        if detect and self._detector is None:
            self._detector = (
                dlib.cnn_face_detection_model_v1(str(model_path(MODEL_FILES["cnn"])))
                if self.cnn
                else dlib.get_frontal_face_detector()
            )
        if encode and self._encoder is None:
            name = MODEL_FILES["landmarks5" if self.landmarks == 5 else "landmarks68"]
            self._predictor = dlib.shape_predictor(str(model_path(name)))
            self._encoder = dlib.face_recognition_model_v1(str(model_path(MODEL_FILES["encoder"])))

    def detect(self, rgb: Image, upsample: int) -> list[tuple[Any, float]]:
        """dlib rectangles (in ``rgb``'s pixels) with their scores."""
        self.load(detect=True, encode=False)
        if self.cnn:
            return [(d.rect, float(d.confidence)) for d in self._detector(rgb, upsample)]
        rects, scores, _ = self._detector.run(rgb, upsample, 0.0)
        return [(r, float(s)) for r, s in zip(rects, scores, strict=True)]

    def encode(self, rgb: Image, rect: Any) -> Encoding:
        """The 128-d encoding of the face in ``rect``."""
        self.load(detect=False, encode=True)
        shape = self._predictor(rgb, rect)
        return np.asarray(self._encoder.compute_face_descriptor(rgb, shape), dtype=np.float64)


class FaceAnalyzer:
    """Detects faces (``model="hog"`` or ``"cnn"``), encodes them (``landmarks`` 5 or 68 points
    for the alignment) and reads known faces; see the module docstring for its guarantees.

    ``upscale_below``: images narrower than this are upscaled x2 before detection (0: never).
    ``upsample``: dlib's own extra upsampling passes (finds smaller faces, slower). ``sets``:
    model sets, i.e. threads that can work at once."""

    def __init__(
        self,
        *,
        model: DetectorModel = "hog",
        landmarks: int = 5,
        upscale_below: int = 300,
        upsample: int = 0,
        sets: int = 1,
    ) -> None:
        if model not in ("hog", "cnn"):
            raise ValueError(f"face detection model must be 'hog' or 'cnn', not {model!r}")
        if landmarks not in (5, 68):
            raise ValueError(f"landmarks must be 5 or 68, not {landmarks}")
        if sets < 1 or upsample < 0 or upscale_below < 0:
            raise ValueError("sets must be >= 1, upsample and upscale_below >= 0")
        self.model: DetectorModel = model
        self.landmarks = landmarks
        self.upscale_below = upscale_below
        self.upsample = upsample
        self.sets = sets
        self._pool: queue.SimpleQueue[_ModelSet] = queue.SimpleQueue()
        self._sets: list[_ModelSet] = []
        self._lock = threading.Lock()

    def load(self, *, detect: bool = True, encode: bool = True) -> None:
        """Load every model set (blocking; call it in a worker thread): the detector, the
        predictor and encoder, or the parts asked for (the others load on first use).
        Raises :class:`MissingDependencyError` when dlib or the models are missing."""
        with self._lock:
            dlib = import_dlib()
            while len(self._sets) < self.sets:
                self._sets.append(_ModelSet(dlib, self.model, self.landmarks))
                self._pool.put(self._sets[-1])
            for models in self._sets:
                models.load(detect=detect, encode=encode)

    def unload(self) -> None:
        """Drop every model set (the next use loads fresh ones); calls in flight finish with
        the sets they hold."""
        with self._lock:
            self._sets = []
            self._pool = queue.SimpleQueue()

    @contextlib.contextmanager
    def _models(self) -> Iterator[_ModelSet]:
        if len(self._sets) < self.sets:
            self.load(detect=False, encode=False)
        pool = self._pool
        models = pool.get()
        try:
            yield models
        finally:
            pool.put(models)

    def _box(self, rect: Any, score: float, scale: int, size: tuple[int, int]) -> FaceBox:
        width, height = size
        return FaceBox(
            max(0, round(rect.left() / scale)),
            max(0, round(rect.top() / scale)),
            min(width, round(rect.right() / scale)),
            min(height, round(rect.bottom() / scale)),
            score,
        )

    def detect(self, bgr: Image, *, upsample: int | None = None) -> list[FaceBox]:
        """The faces in a BGR image, largest first."""
        rgb, scale = _prepare(bgr, self.upscale_below)
        size = (int(bgr.shape[1]), int(bgr.shape[0]))
        with self._models() as models:
            found = models.detect(rgb, self.upsample if upsample is None else upsample)
        boxes = [self._box(rect, score, scale, size) for rect, score in found]
        return sorted(boxes, key=lambda b: -b.area)

    def encode(self, bgr: Image, boxes: Sequence[FaceBox]) -> list[Encoding]:
        """The 128-d encoding of each box of a BGR image (boxes as :meth:`detect` gives)."""
        if not boxes:
            return []
        rgb, scale = _prepare(bgr, self.upscale_below)
        with self._models() as models:
            rect = models.dlib.rectangle
            return [
                models.encode(
                    rgb, rect(b.left * scale, b.top * scale, b.right * scale, b.bottom * scale)
                )
                for b in boxes
            ]

    def analyse(self, bgr: Image, *, upsample: int | None = None) -> list[Face]:
        """Detect and encode in one pass (one model set, no re-scaling), largest face first."""
        rgb, scale = _prepare(bgr, self.upscale_below)
        size = (int(bgr.shape[1]), int(bgr.shape[0]))
        with self._models() as models:
            found = models.detect(rgb, self.upsample if upsample is None else upsample)
            faces = [
                Face(self._box(rect, score, scale, size), models.encode(rgb, rect))
                for rect, score in found
            ]
        return sorted(faces, key=lambda f: -f.box.area)

    def encode_known(
        self,
        path: str | os.PathLike[str],
        *,
        multiple: Literal["largest", "reject"] = "reject",
        max_bytes: int = MAX_BYTES,
        max_pixels: int = MAX_PIXELS,
        max_side: int = MAX_SIDE,
    ) -> KnownFace:
        """The known face in an image file named ``<name>.jpg`` (or ``.png``), read as bytes
        (:func:`~framepipe.processors.face_photos.read_photo_bytes`; never opened by OpenCV by
        name) and decoded within the limits of
        :func:`~framepipe.processors.face_photos.decode_photo`.

        Raises :class:`MediaError` naming the file (as ``shown_path`` shows it) when it cannot
        be read or is too large, is not a readable PNG or JPEG, has no face (after a second,
        more thorough detection pass) or, with ``multiple="reject"``, more than one face
        (``"largest"`` takes the largest)."""
        data = read_photo_bytes(path, max_bytes=max_bytes)
        return self.encode_known_photo(
            data,
            name=Path(path).stem,
            source=shown_path(path),
            multiple=multiple,
            max_pixels=max_pixels,
            max_side=max_side,
        )

    def encode_known_photo(
        self,
        data: bytes,
        *,
        name: str,
        source: str,
        multiple: Literal["largest", "reject"] = "reject",
        max_pixels: int = MAX_PIXELS,
        max_side: int = MAX_SIDE,
    ) -> KnownFace:
        """The known face ``name`` in the PNG or JPEG ``data`` (a photo already read, e.g. to
        be stored once checked); as :meth:`encode_known`, errors naming ``source``."""
        image = decode_photo(data, source, max_pixels=max_pixels, max_side=max_side)
        faces = self.analyse(image)
        if not faces:  # try harder once: a known face is worth the time
            faces = self.analyse(image, upsample=self.upsample + 1)
        if not faces:
            raise MediaError(source, "no face found in the image")
        if len(faces) > 1 and multiple == "reject":
            raise MediaError(
                source,
                f"{len(faces)} faces in the image; a known-face image must show exactly one person",
            )
        return KnownFace(name, faces[0].encoding, source)


def load_known_faces(
    directory: str | os.PathLike[str],
    analyzer: FaceAnalyzer,
    *,
    multiple: Literal["largest", "reject"] = "reject",
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> KnownFaces:
    """Encode every ``<name>.jpg``/``.jpeg``/``.png`` of ``directory`` (in name order); files
    that cannot be used are returned in ``rejected`` with the reason, named as
    :func:`~framepipe.processors.face_photos.shown_path` shows them (see the module
    docstring). Raises :class:`MediaError` only when ``directory`` is not a directory or
    cannot be listed."""
    folder = Path(directory)
    if not folder.is_dir():
        raise MediaError(shown_path(folder), "known faces directory does not exist")
    try:
        paths = sorted(folder.iterdir())
    except OSError as exc:
        reason = f"known faces directory cannot be listed ({exc.strerror or type(exc).__name__})"
        raise MediaError(shown_path(folder), reason) from exc
    known = KnownFaces([], [])
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        refused = refusal(path, folder)
        try:
            if refused is None and path.is_dir():
                continue  # a folder named like a photo
            if refused is None:
                known.faces.append(
                    analyzer.encode_known(
                        path,
                        multiple=multiple,
                        max_bytes=max_bytes,
                        max_pixels=max_pixels,
                        max_side=max_side,
                    )
                )
        except MediaError as exc:
            refused = exc.reason
        except OSError as exc:
            refused = f"cannot be read ({exc.strerror or type(exc).__name__})"
        if refused is not None:
            known.rejected.append(RejectedFace(shown_path(path), refused))
    return known


class FaceMatcher:
    """Names encodings after the closest known face within ``tolerance``."""

    def __init__(self, known: Sequence[KnownFace] = (), tolerance: float = 0.6) -> None:
        if tolerance <= 0:
            raise ValueError(f"tolerance must be > 0, not {tolerance}")
        self.tolerance = tolerance
        self.known = list(known)
        self._matrix: Encoding = (
            np.stack([k.encoding for k in self.known]) if self.known else np.zeros((0, 128))
        )

    @property
    def names(self) -> list[str]:
        """The known names."""
        return [k.name for k in self.known]

    def match(self, encoding: Encoding) -> tuple[str | None, float | None]:
        """The closest known name within ``tolerance`` (None otherwise) and its distance (None
        when no face is known)."""
        if not self.known:
            return None, None
        distances = np.linalg.norm(self._matrix - encoding, axis=1)
        best = int(np.argmin(distances))
        distance = float(distances[best])
        return (self.known[best].name if distance <= self.tolerance else None), distance
