"""The SD import's shared folder (``--shared``) is never made up where a share should be.

What the user expects: a share that is not mounted (its mount point missing, or there but
empty because nothing is mounted) is refused when the detector or the backend starts, in one
line naming the folder, instead of copies landing on the local disk and the imports failing
a quarter of a minute later; ``--create-shared`` creates a local folder on purpose;
``--shared-is-mount`` refuses a mount point with nothing mounted, at start and before each copy.

Real components: the detector and the backend as the commands the README runs, the real
``copy_file`` on real folders, ``/`` as a real mount point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framepipe.jobs.ledger import file_fingerprint
from test_example_sd_import import EXAMPLE

sys.path.insert(0, str(EXAMPLE))
import detector as sd_detector
from shared_root import SharedFolderError, check_shared

pytestmark = [pytest.mark.timeout(120)]


def run(script: str, shared: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``script`` (``detector.py`` or ``backend.py``) as the operator starts it, with
    ``--shared shared``; both stop before they connect or serve when the folder is refused."""
    args = [sys.executable, str(EXAMPLE / script), "--shared", str(shared), *extra]
    if script == "detector.py":
        args += ["--watch", str(cwd), "--backend", "ws://127.0.0.1:9/ws/detector"]
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={**os.environ, "FRAMEPIPE_HOME": str(cwd / "home")},
    )


@pytest.mark.parametrize("script", ["detector.py", "backend.py"])
def test_a_missing_shared_folder_is_refused_at_start_and_not_created(
    tmp_path: Path, script: str
) -> None:
    missing = tmp_path / "mnt" / "shared-videos"  # the share's mount point, not there
    proc = run(script, missing, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"the shared folder {missing} does not exist" in last, last
    assert "--create-shared" in last
    assert not missing.exists() and not (tmp_path / "mnt").exists()


@pytest.mark.parametrize("script", ["detector.py", "backend.py"])
def test_an_empty_mount_point_is_refused_when_the_share_is_said_to_be_mounted(
    tmp_path: Path, script: str
) -> None:
    mount_point = tmp_path / "shared-videos"
    mount_point.mkdir()  # what is left when nothing is mounted there
    proc = run(script, mount_point, "--shared-is-mount", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"the shared folder {mount_point} is not a mount point" in last, last
    assert list(mount_point.iterdir()) == []
    both = run(script, mount_point, "--shared-is-mount", "--create-shared", cwd=tmp_path)
    assert both.returncode == 2 and "a mount point is not created here" in both.stderr


def test_the_rule_creates_only_when_told_and_takes_a_real_mount_point(tmp_path: Path) -> None:
    folder = tmp_path / "local" / "shared"
    with pytest.raises(SharedFolderError, match="does not exist"):
        check_shared(folder, create=False, mount=False)
    assert not folder.exists()
    assert check_shared(folder, create=True, mount=False, writable=True) == folder
    assert folder.is_dir()
    assert check_shared(Path("/"), create=False, mount=True) == Path("/")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SharedFolderError, match="is not a folder"):
        check_shared(tmp_path / "file", create=True, mount=False)


@pytest.fixture
def card(tmp_path: Path) -> sd_detector.Card:
    root = tmp_path / "CARD"
    (root / "DCIM").mkdir(parents=True)
    (root / "DCIM" / "a.MP4").write_bytes(b"a" * 300_000)
    files = sd_detector.list_card(root)
    return sd_detector.Card(root, "CARD", sd_detector.card_id_of("CARD", files), files)


def copy(card: sd_detector.Card, shared: Path, **options: bool) -> dict[str, object]:
    source = card.root / "DCIM" / "a.MP4"
    result: dict[str, object] = sd_detector.copy_file(
        card,
        "DCIM/a.MP4",
        shared,
        "C/DCIM/a.MP4",
        size=source.stat().st_size,
        fingerprint=file_fingerprint(source),
        **options,
    )
    return result


def test_a_share_gone_while_the_detector_runs_fails_the_copy_at_once_naming_it(
    tmp_path: Path, card: sd_detector.Card
) -> None:
    """Unmounted after the start: the copy is answered ``io_error`` naming the folder, and
    nothing is written where the share was (the folder is not made up again)."""
    shared = tmp_path / "shared"
    result = copy(card, shared)
    assert result["ok"] is False and result["code"] == "io_error", result
    assert f"the shared folder {shared} does not exist" in str(result["error"])
    assert not shared.exists()
    shared.mkdir()  # the empty mount point, nothing mounted
    result = copy(card, shared, shared_mount=True)
    assert result["code"] == "io_error", result
    assert f"the shared folder {shared} is not a mount point" in str(result["error"])
    assert list(shared.iterdir()) == []
    assert copy(card, shared)["ok"] is True  # a local folder, as told: copied
