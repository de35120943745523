"""``framepipe worker`` as a user runs it: its error lines and last output reach the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _worker(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "framepipe", "--home", str(tmp_path), "worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def test_an_error_after_the_output_tail_started_is_printed_every_time(tmp_path: Path) -> None:
    # The memory broker is refused when the worker is built, after its output tail started:
    # the error line went into the tail's pipe and was lost in most runs.
    for _ in range(5):
        proc = _worker(tmp_path, env={"FRAMEPIPE_BROKER_URL": "memory://"})
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("error: "), proc.stderr
        assert "needs a Redis or RabbitMQ broker" in proc.stderr


def test_a_missing_pipeline_file_is_one_error_line_every_time(tmp_path: Path) -> None:
    # The pipeline is loaded before the broker is reached: nothing needs to listen there.
    missing = tmp_path / "nofile.py"
    env = {"FRAMEPIPE_BROKER_URL": "redis://127.0.0.1:1/0"}
    for _ in range(5):
        proc = _worker(tmp_path, "-p", f"{missing}:x", env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: "), proc.stderr
        assert "nofile.py" in proc.stderr
