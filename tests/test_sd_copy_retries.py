"""The SD-card import's copy retries are the operator's: ``SD_IMPORT_COPY_RETRIES`` and
``SD_IMPORT_COPY_RETRY_DELAY`` (``examples/sd_import/copy_retries.py``), read when the pipeline
is loaded.

End to end, a copy fails for real several times before it succeeds: the card's file differs
from its listing while the detector copies it (the real detector, in this process, through a
wrapper of its ``copy_file`` that changes the file's bytes on the card for the first attempts
and puts them back after each), so the detector answers ``changed`` and the backend's ``copy``
step is retried; the service on uvicorn runs the ``sd_import`` pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import need_modules
from framepipe.errors import PipelineDefinitionError
from framepipe.jobs.loading import load_pipeline
from test_example_sd_import import EXAMPLE, CardMaker, ended, running_world, sd_settings, wait_for
from test_sd_card_root import InProcessDetector
from test_server import AUTH, TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")

sys.path.insert(0, str(EXAMPLE))
import backend as sd_backend  # noqa: E402  (examples/sd_import/backend.py)
import detector as sd_detector  # noqa: E402  (examples/sd_import/detector.py)


def test_copy_retries_come_from_the_environment_when_the_pipeline_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unset: 4 retries, the first after 1 s. Set: the values given. Malformed: loading the
    pipeline fails, and the backend command stops (exit 2), naming the variable."""
    for name in ("SD_IMPORT_COPY_RETRIES", "SD_IMPORT_COPY_RETRY_DELAY"):
        monkeypatch.delenv(name, raising=False)
    copy = load_pipeline(sd_backend.PIPELINE_REF).get("copy")
    assert (copy.retries, copy.retry_delay) == (4, 1.0)
    monkeypatch.setenv("SD_IMPORT_COPY_RETRIES", "0")
    monkeypatch.setenv("SD_IMPORT_COPY_RETRY_DELAY", "7.5")
    copy = load_pipeline(sd_backend.PIPELINE_REF).get("copy")
    assert (copy.retries, copy.retry_delay) == (0, 7.5)

    for name, value, says in (
        ("SD_IMPORT_COPY_RETRIES", "-1", "use a whole number of retries >= 0"),
        ("SD_IMPORT_COPY_RETRIES", "2.5", "use a whole number of retries >= 0"),
        ("SD_IMPORT_COPY_RETRY_DELAY", "soon", "use a number of seconds >= 0"),
        ("SD_IMPORT_COPY_RETRY_DELAY", "nan", "use a number of seconds >= 0"),
    ):
        with monkeypatch.context() as bad:
            bad.setenv(name, value)
            with pytest.raises(PipelineDefinitionError, match=f"{name}='{value}': {says}"):
                load_pipeline(sd_backend.PIPELINE_REF)
            with pytest.raises(SystemExit) as stopped:
                sd_backend.main(["--shared", str(tmp_path / "shared")])
            assert stopped.value.code == 2
            assert f"{name}='{value}': {says}" in capsys.readouterr().err


def test_the_backend_command_refuses_a_malformed_retry_count_in_one_line(tmp_path: Path) -> None:
    """As the operator runs it: a fresh process, the variable set before anything is imported
    (the protocol module used to load the pipeline, which read it at import, so a traceback)."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "backend.py"), "--shared", str(tmp_path / "shared")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "SD_IMPORT_COPY_RETRIES": "x"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "backend.py: error: SD_IMPORT_COPY_RETRIES='x': use a whole number of retries >= 0 "
        "(e.g. 6), or leave it unset for 4"
    )


def test_a_copy_is_retried_as_often_as_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SD_IMPORT_COPY_RETRIES=6``: the QR clip's copy fails 6 times (more than the 4
    retries of the default) and succeeds at its 7th attempt; the import completes."""
    failures = 6
    monkeypatch.setenv("SD_IMPORT_COPY_RETRIES", str(failures))
    monkeypatch.setenv("SD_IMPORT_COPY_RETRY_DELAY", "0.05")
    settings = sd_settings(tmp_path, home=tmp_path / "home-fp", retry_max_delay=0.2)
    with running_world(tmp_path, settings) as world:
        server, watch, shared = world["server"], world["watch"], world["shared"]
        maker = CardMaker(watch / "GOPRO1")
        qr = maker.qr("B9101;Nora Nyberg")
        video = maker.video()
        answers: list[dict[str, Any]] = []
        real = sd_detector.copy_file

        def copy_file(card: sd_detector.Card, rel: str, *args: Any, **kwargs: Any) -> Any:
            if rel != qr:
                return real(card, rel, *args, **kwargs)
            file = card.root / rel
            listed = file.read_bytes()
            stamp = file.stat()
            if len(answers) < failures:  # the card's file is not what was listed while copied
                file.write_bytes(bytes(b ^ 0xFF for b in listed))
            try:
                answer: dict[str, Any] = real(card, rel, *args, **kwargs)
            finally:
                file.write_bytes(listed)
                os.utime(file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
            answers.append(answer)
            return answer

        monkeypatch.setattr(sd_detector, "copy_file", copy_file)
        detector = sd_detector.Detector(
            backend=f"{server.url.replace('http', 'ws')}/ws/detector",
            shared=shared,
            token=TOKEN,
            watch=[watch],
            cards=[],
            detector_id="in-process",
            interval=600,  # one poll: the card is listed once, as it was made
            settle=0,
            max_backoff=0.3,
        )
        with InProcessDetector(detector), httpx.Client(base_url=server.url, headers=AUTH) as c:
            done = wait_for("the import", lambda: ended(c, "GOPRO1"), timeout=120)
        assert [a.get("code") for a in answers] == ["changed"] * failures + [None]
        assert done["status"] == "completed", done.get("error")
        copy_of_qr = next(
            s for s in done["steps"] if s["name"] == "copy" and s["params"]["path"] == qr
        )
        assert (copy_of_qr["status"], copy_of_qr["attempt"]) == ("completed", failures + 1)
        assert done["data"]["summary"]["bookings"]["B9101"]["videos"] == [video]
