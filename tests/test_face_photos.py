"""Known-face folders holding what an operator's folder really holds, read by framepipe's one
rule (:mod:`framepipe.processors.face_photos`, applied by ``load_known_faces`` and
``FaceAnalyzer.encode_known``), with real dlib models and real files: names and folders that
are not UTF-8 (OpenCV crashed the process on them: those tests run a subprocess, so a crash is a
failed test), links out of the folder and in a loop, a FIFO, a text file and a BMP named
``.jpg``, a PNG whose header claims 144 megapixels, a file over the byte limit and a photo far
larger than needed.

The same crash hit the video toolkit's image files (``framepipe.media``: ``stitch``,
``extract_frames``, ``thumbnail``, ``watermark``'s image), which now never give OpenCV a path
either: the last test runs each on a folder whose name is not UTF-8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from framepipe.errors import MediaError
from framepipe.processors.face_photos import decode_photo, read_photo, refusal, shown_path
from framepipe.processors.faces import FaceAnalyzer, load_known_faces
from test_doorbell_known_faces import png_header_bomb
from test_processors_faces import clip_frame, face_crop, need_dlib

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # dlib's models: seconds of CPU

NAME_REFUSED = (
    "the file name is not valid UTF-8 or holds a control character: rename it "
    "(the name is the person's)"
)

# run in a subprocess: prints what load_known_faces found in argv[1] (a folder given as bytes
# in hex, since its name need not be UTF-8) and what encode_known makes of argv[2], if given
LOADER = """
import json, os, sys
from framepipe.processors.faces import FaceAnalyzer, load_known_faces
analyzer = FaceAnalyzer()
folder = os.fsdecode(bytes.fromhex(sys.argv[1]))
known = load_known_faces(folder, analyzer)
out = {
    "names": known.names,
    "sources": [face.source for face in known.faces],
    "rejected": {os.path.basename(r.source): r.reason for r in known.rejected},
}
if len(sys.argv) > 2:
    face = analyzer.encode_known(os.fsdecode(bytes.fromhex(sys.argv[2])))
    out["encoded"] = [face.name.encode("utf-8", "backslashreplace").decode(), face.source]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """One face (a crop of carphone's first frame), BGR."""
    need_dlib()
    return face_crop(clip_frame("carphone_pristine.mp4", 0), FaceAnalyzer())


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    need_dlib()
    faces = FaceAnalyzer()
    faces.load()
    return faces


def jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return bytes(data.tobytes())


def load_in_subprocess(folder: bytes, encode: bytes | None = None) -> dict[str, object]:
    args = [sys.executable, "-c", LOADER, folder.hex()] + ([encode.hex()] if encode else [])
    run = subprocess.run(args, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    result: dict[str, object] = json.loads(run.stdout)
    return result


def test_a_file_name_that_is_not_utf8_is_refused_by_name_and_the_process_lives(
    tmp_path: Path, crop: np.ndarray
) -> None:
    """``caf\\xe9.jpg`` (``os.listdir`` gives ``caf\\udce9.jpg``): OpenCV's imread killed the
    process with SIGSEGV on that name; now the file is refused with a reason and shown as
    ``caf\\xe9.jpg``, and its neighbour loads. ``encode_known`` given that path directly reads
    it (as bytes) and names the source the same way."""
    folder = tmp_path / "known"
    folder.mkdir()
    (folder / "alice.jpg").write_bytes(jpeg(crop))
    odd = os.fsencode(folder) + b"/caf\xe9.jpg"
    os.link(folder / "alice.jpg", odd)
    found = load_in_subprocess(os.fsencode(folder), odd)
    assert found["names"] == ["alice"]
    assert found["rejected"] == {"caf\\xe9.jpg": NAME_REFUSED}
    assert found["encoded"] == ["caf\\udce9", f"{folder}/caf\\xe9.jpg"]


def test_a_folder_whose_name_is_not_utf8_loads(tmp_path: Path, crop: np.ndarray) -> None:
    """The operator's folder itself named ``visages_\\xe9t\\xe9`` (Latin-1): its photos load
    (OpenCV was handed the whole path and crashed on it)."""
    folder = os.fsencode(tmp_path) + b"/visages_\xe9t\xe9"
    os.mkdir(folder)
    with open(folder + b"/alice.jpg", "wb") as file:
        file.write(jpeg(crop))
    found = load_in_subprocess(folder)
    assert found["names"] == ["alice"] and found["rejected"] == {}
    assert found["sources"] == [f"{tmp_path}/visages_\\xe9t\\xe9/alice.jpg"]


def test_odd_files_are_refused_with_the_reason_and_the_others_load(
    tmp_path: Path, crop: np.ndarray, analyzer: FaceAnalyzer
) -> None:
    """Each odd file is refused with what is wrong (none is waited on, none is decoded beyond
    its limits); a 6000 px photo is scaled down and recognised; a folder named like a photo
    is passed over."""
    folder = tmp_path / "known"
    folder.mkdir()
    (folder / "alice.jpg").write_bytes(jpeg(crop))
    (folder / "alice_large.jpg").write_bytes(jpeg(cv2.resize(crop, (6000, 6000))))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "mallory.jpg").write_bytes(jpeg(crop))
    (folder / "mallory.jpg").symlink_to(outside / "mallory.jpg")
    (folder / "hop.jpg").symlink_to(Path("..") / "elsewhere" / "mallory.jpg")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "notes.jpg").write_text("not an image\n")
    ok, bmp = cv2.imencode(".bmp", crop)
    assert ok
    (folder / "bitmap.jpg").write_bytes(bmp.tobytes())
    png_header_bomb(folder / "bomb.png", 12_000, 12_000)
    (folder / "album.jpg").mkdir()

    known = load_known_faces(folder, analyzer)

    assert known.names == ["alice", "alice_large"]
    reasons = {Path(r.source).name: r.reason for r in known.rejected}
    assert reasons == {
        "bitmap.jpg": "not a readable image",
        "bomb.png": "12000x12000 pixels: larger than the 120000000 a known face may be",
        "hop.jpg": "it leads out of the known faces folder",
        "loop.jpg": "cannot be read (Too many levels of symbolic links)",
        "mallory.jpg": "it leads out of the known faces folder",
        "notes.jpg": "not a readable image",
        "pipe.jpg": "not a regular file",
    }
    distance = np.linalg.norm(known.faces[0].encoding - known.faces[1].encoding)
    assert distance < 0.3


def test_the_byte_and_pixel_limits_are_the_callers(
    tmp_path: Path, crop: np.ndarray, analyzer: FaceAnalyzer
) -> None:
    """``max_bytes`` and ``max_pixels`` of ``load_known_faces`` and ``encode_known``: a file
    over them is refused naming the limit; ``max_side`` bounds the decoded image."""
    folder = tmp_path / "known"
    folder.mkdir()
    data = jpeg(crop)
    (folder / "alice.jpg").write_bytes(data)
    known = load_known_faces(folder, analyzer, max_bytes=len(data) - 1)
    assert known.names == []
    assert [r.reason for r in known.rejected] == [
        f"{len(data)} bytes: larger than the {len(data) - 1} a known face may be"
    ]
    with pytest.raises(MediaError, match="104x104 pixels: larger than the 100 a known"):
        analyzer.encode_known(folder / "alice.jpg", max_pixels=100, max_side=5000)
    big = jpeg(cv2.resize(crop, (6000, 4000)))
    assert decode_photo(big, "big.jpg").shape == (1333, 2000, 3)
    (folder / "big.jpg").write_bytes(big)
    assert read_photo(folder / "big.jpg", max_side=500).shape == (333, 500, 3)


def test_refusal_and_shown_path() -> None:
    """The name rule alone: printable UTF-8 names pass (accents included); other bytes and
    control characters are refused, and shown escaped."""
    folder = Path("/srv/known")
    assert refusal(folder / "Zoë.jpg", folder) is None
    assert refusal(folder / "caf\udce9.jpg", folder) == NAME_REFUSED
    assert refusal(folder / "bob\n.jpg", folder) == NAME_REFUSED
    assert shown_path(folder / "caf\udce9\n.jpg") == "/srv/known/caf\\xe9\\n.jpg"
    assert shown_path(b"/srv/known/caf\xe9.jpg") == "/srv/known/caf\\xe9.jpg"


# run in a subprocess: one of framepipe.media's image paths under a folder (argv[1], bytes in
# hex) whose name is not UTF-8; prints the output's name
MEDIA = """
import os, sys
from pathlib import Path
import cv2, numpy as np
from framepipe import media
base = Path(os.fsdecode(bytes.fromhex(sys.argv[1])))
images = base / "images"
images.mkdir()
for i in range(3):
    ok, png = cv2.imencode(".png", np.full((64, 96, 3), 40 * i, np.uint8))
    (images / f"frame_{i}.png").write_bytes(png.tobytes())
video = media.stitch(images, base / "video.mp4", fps=5)
operation = sys.argv[2]
if operation == "extract_frames":
    out = media.extract_frames(video, base / "frames")
    print(len(out))
elif operation == "thumbnail":
    out = media.thumbnail(video, base / "thumb.jpg")
    print(cv2.imdecode(np.frombuffer(out.read_bytes(), np.uint8), cv2.IMREAD_COLOR).shape)
elif operation == "watermark":
    out = media.watermark(video, base / "marked.mp4", image=images / "frame_2.png")
    print(media.probe(out).width)
else:
    print(media.probe(video).width)
"""


@pytest.mark.parametrize(
    ("operation", "printed"),
    [("stitch", "96"), ("extract_frames", "3"), ("thumbnail", "(64, 96, 3)"), ("watermark", "96")],
)
def test_the_video_toolkit_takes_paths_that_are_not_utf8(
    tmp_path: Path, operation: str, printed: str
) -> None:
    """``stitch`` reading images, ``extract_frames`` and ``thumbnail`` writing them and
    ``watermark`` reading its image, all under ``\\xe9t\\xe9/`` (Latin-1): each did what it
    does (OpenCV's imread/imwrite killed the process with SIGSEGV on those paths)."""
    base = os.fsencode(tmp_path) + b"/\xe9t\xe9"
    os.mkdir(base)
    run = subprocess.run(
        [sys.executable, "-c", MEDIA, base.hex(), operation],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    assert run.stdout.strip() == printed


def test_a_progressive_jpeg_counts_whole_against_the_limit() -> None:
    """libjpeg keeps every coefficient of a progressive JPEG whatever the scale it decodes
    at: a big one is refused by its whole size, where a baseline one of the same size is
    decoded reduced."""
    from framepipe.processors.face_photos import decode_photo

    picture = np.zeros((3000, 4000, 3), np.uint8)
    baseline = cv2.imencode(".jpg", picture)[1].tobytes()
    progressive = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    limit = 4000 * 3000 // 4  # the baseline one decoded at 1/2 fits; whole, it does not
    assert decode_photo(baseline, "b.jpg", max_pixels=limit, max_side=2000).shape[1] == 2000
    with pytest.raises(MediaError, match="4000x3000 pixels"):
        decode_photo(progressive, "p.jpg", max_pixels=limit, max_side=2000)
