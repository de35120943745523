"""A step's temporary folders (``ctx.tempdir()``) when its process is killed: deleted when the
attempt ends however it ends, for a killed one by the next attempt that makes a folder on the
machine. A real ``framepipe run`` killed with SIGKILL, and its retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from framepipe.jobs.scratch import MARKER
from waiting import wait_until

PIPELINE = """
    import time
    from pathlib import Path

    from framepipe import Pipeline, StepContext

    render = Pipeline("tempdir_render")

    @render.step()
    def encode(ctx: StepContext) -> dict:
        folder = ctx.tempdir()
        (folder / "frames.bin").write_bytes(b"x" * 1_000_000)
        if not (Path(ctx.inputs["dir"]) / "ok").exists():
            (Path(ctx.inputs["dir"]) / "started").write_text(str(folder))
            time.sleep(600)  # killed here
        return {"folder": str(folder)}
"""


@pytest.mark.slow
def test_a_killed_steps_folder_is_deleted_by_its_retry(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    file = tmp_path / "render.py"
    file.write_text(textwrap.dedent(PIPELINE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEPIPE_")}
    env |= {"FRAMEPIPE_HOME": str(tmp_path / "home"), "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "framepipe"]
    run = subprocess.Popen(
        [*command, "run", f"{file}:render", "-i", f"dir={tmp_path}", "-q"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until("the step to start", (tmp_path / "started").exists)
        folder = Path((tmp_path / "started").read_text())
        assert (folder / MARKER).is_file() and folder.parent == scratch
        run.kill()
        run.wait()
        assert folder.is_dir()  # nobody could delete it
        (tmp_path / "ok").touch()
        listed = subprocess.run(
            [*command, "jobs", "list", "--json"], env=env, capture_output=True, check=True
        )
        execution_id = json.loads(listed.stdout)[0]["id"]
        retried = subprocess.run(
            [*command, "jobs", "retry", execution_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert not folder.exists()  # the retry's first folder swept the killed one's
        assert list(scratch.iterdir()) == []  # and its own went at its end
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
