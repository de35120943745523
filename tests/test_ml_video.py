"""The ready ML video pipeline, end to end on a real clip, with real adapters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conftest import REDIS_URL, redis_namespace
from framepipe import ExecutionStatus, JobEngine, Settings, StepStatus, open_object_store
from framepipe.backends.state import StateStore
from framepipe.cli import app as cli_app
from framepipe.errors import InvalidInputError, PathNotAllowedError
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.records import get_execution, list_events, list_executions
from framepipe.jobs.scratch import MARKER, remove_abandoned
from framepipe.media import probe
from framepipe.pipelines.ml_video import ml_video
from media import audio_of, dominant_hz, make_clip
from waiting import wait_until, wait_until_async

MODELS = Path(__file__).parent / "models"
RANGES = {
    "fetch": (0, 10),
    "preprocess": (10, 15),
    "inference": (15, 65),
    "postprocess": (65, 75),
    "stitch": (75, 85),
    "thumbnails": (85, 95),
    "finalize": (95, 100),
}


def run_ml(settings: Settings, clip: Path, **inputs: Any) -> tuple[Any, list[Any], JobEngine]:
    async def main() -> tuple[Any, list[Any], JobEngine]:
        async with JobEngine(settings=settings) as engine:
            info = await engine.run(
                ml_video,
                {"input": str(clip), "prompt": "anime", "width": 160, **inputs},
                raise_on_failure=False,
            )
            events = await asyncio.to_thread(list_events, engine.store, info.id)
            return info, events, engine

    return asyncio.run(main())


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "in.mp4", frames=30, size=(320, 240))


def test_mock_model_end_to_end_with_the_original_workers_progress_ranges(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    info, events, _ = run_ml(settings, clip)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    data = info.data
    objects = open_object_store(settings.resolved_objects_url)
    assert data["model"] == "MockModel" and data["frames"] == 10
    out = objects.get_file(data["video"], settings.home / "out.mp4")
    video = probe(out)
    assert (video.frames, video.width, video.video_codec) == (10, 320, "h264")
    assert objects.get(data["thumbnail"])[:2] == b"\xff\xd8"
    assert objects.get(data["grid"])[:2] == b"\xff\xd8"
    manifest = json.loads(objects.get(data["manifest"]))
    assert manifest["video"] == data["video"] and manifest["prompt"] == "anime"
    assert data["preprocessed_info"]["width"] == 160
    # Execution progress follows the hand-written worker's ranges: while a step runs, the
    # execution's progress lies within that step's range.
    for event in events:
        if event.type == "step.progress":
            lo, hi = RANGES[event.step_key]
            assert lo - 0.01 <= event.data["execution_progress"] <= hi + 0.01, event
    done = [e.data["execution_progress"] for e in events if e.type == "step.completed"]
    assert done == sorted(done)
    # and within a step its progress never goes back (thumbnails runs two media operations:
    # each had its own high-water mark, 100 -> 10)
    for step in RANGES:
        values = [
            e.data["progress"] for e in events if e.type == "step.progress" and e.step_key == step
        ]
        assert values == sorted(values), (step, values)
    thumbs = [e.data for e in events if e.type == "step.progress" and e.step_key == "thumbnails"]
    assert {d["message"] for d in thumbs} == {"thumbnail", "thumbnail_grid"}
    assert [e.step_key for e in events if e.type == "step.completed"] == list(RANGES)


def test_subprocess_model_then_a_failing_model_retried_from_the_failed_step(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(MODELS / "crash_model.py"))
    failed, events, _ = run_ml(settings, clip)
    assert failed.status is ExecutionStatus.FAILED
    assert failed.step("inference").status is StepStatus.FAILED
    assert "exited with code 3" in failed.errors["inference"]
    assert "CUDA out of memory" in failed.errors["inference"]
    # the execution's one-line error (jobs list, framepipe run, /api/status) says the cause
    assert failed.error is not None and "\n" not in failed.error
    assert failed.error.endswith("exited with code 3: RuntimeError: CUDA out of memory")
    assert failed.step("preprocess").status is StepStatus.COMPLETED

    monkeypatch.setenv("PYTHON_SCRIPT", str(MODELS / "good_model.py"))

    async def retry() -> tuple[Any, list[Any]]:
        async with JobEngine(settings=settings) as engine:
            await engine.retry(failed.id, ml_video)
            info = await engine.wait(failed.id)
            return info, await asyncio.to_thread(list_events, engine.store, info.id)

    done, events = asyncio.run(retry())
    assert done.status is ExecutionStatus.COMPLETED
    assert done.data["model"] == "SubprocessModel" and done.data["frames"] == 4
    started = [e.step_key for e in events if e.type == "step.started"]
    assert started.count("preprocess") == 1 and started.count("fetch") == 1


def test_a_missing_or_non_video_input_fails_fetch_clearly(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    missing, _, _ = run_ml(settings, tmp_path / "nope.mp4")
    assert f"no such file: '{tmp_path / 'nope.mp4'}'" in missing.errors["fetch"]
    # relative, not on disk: a key, and with no object the submit refuses it (nothing to pin)
    with pytest.raises(InvalidInputError, match="no such object in the object store") as key:
        run_ml(settings, Path("uploads/nope.mp4"))
    assert key.value.where == "inputs.input" and "'uploads/nope.mp4'" in str(key.value)
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    bad, _, _ = run_ml(settings, text)
    assert "notes.mp4" in bad.errors["fetch"] and "InvalidInputError" in bad.errors["fetch"]


def test_an_upload_cut_off_past_its_header_fails_preprocess_once_naming_it(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its index first, so fetch's probe reads a video; its frames stop halfway: a retry
    would decode the same pinned copy, so the step is not run again."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    whole = make_clip(tmp_path / "whole.mp4", frames=50, options={"movflags": "faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    info, _, _ = run_ml(settings, cut)
    assert info.status == ExecutionStatus.FAILED
    error = info.errors["preprocess"]
    assert "InvalidInputError" in error and f"{cut}: truncated" in error
    assert info.step("preprocess").attempt == 1
    assert "submit a new job for a replaced upload" in error


def test_a_video_shorter_than_half_a_frame_at_the_fps_asked_fails_preprocess_once(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    one = make_clip(tmp_path / "one.mp4", frames=1)  # 0.04 s
    info, _, _ = run_ml(settings, one, fps=10)
    assert info.status == ExecutionStatus.FAILED and info.step("preprocess").attempt == 1
    error = info.errors["preprocess"]
    assert "InvalidInputError: inputs.fps" in error and f"{one}: lasts 0.04s" in error
    assert "submit it with an fps of at least 12.5" in error
    done, _, _ = run_ml(settings, one, fps=12.5)  # half a frame: one frame kept
    assert done.status == ExecutionStatus.COMPLETED
    assert done.data["preprocessed_info"]["frames"] == 1


def test_the_fps_suggested_for_a_too_short_video_keeps_a_frame(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One frame at 3 fps lasts 1/3 s: half a frame needs 1.5 fps, which ``:g`` would show as
    exactly that and the same check then refuses (1.5 x 0.33333 < 0.5); the fps suggested is
    rounded up, so a job submitted with it keeps the frame."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    one = make_clip(tmp_path / "third.mp4", frames=1, fps=3)
    info, _, _ = run_ml(settings, one, fps=1)
    assert info.status == ExecutionStatus.FAILED
    found = re.search(r"submit it with an fps of at least ([0-9.]+)", info.errors["preprocess"])
    assert found is not None, info.errors["preprocess"]
    done, _, _ = run_ml(settings, one, fps=float(found[1]))
    assert done.status == ExecutionStatus.COMPLETED, done.errors
    assert done.data["preprocessed_info"]["frames"] == 1


# -- inputs checked at submit (issue 14) ----------------------------------------------------


def submit_ml(
    settings: Settings, inputs: dict[str, Any], input_roots: list[Path] | None = None
) -> ExecutionInfo:
    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(ml_video, inputs, input_roots=input_roots)
            return await engine.wait(execution_id, raise_on_failure=False)

    return asyncio.run(main())


def executions(settings: Settings) -> list[Any]:
    with StateStore(settings.resolved_database_url) as store:
        return list_executions(store)


@pytest.mark.parametrize(
    ("inputs", "where"),
    [
        ({"input": "in.mp4", "width": "abc"}, "inputs.width"),
        ({"input": 5}, "inputs.input"),
        ({"prompt": "anime"}, "inputs.input"),
        ({"input": "in.mp4", "fps": 0}, "inputs.fps"),
        ({"input": "in.mp4", "seed": 1.5}, "inputs.seed"),
        ({"input": "in.mp4", "contrast": "inf"}, "inputs.contrast"),
        ({"input": "in.mp4", "widht": 160}, "inputs.widht"),
    ],
)
def test_inputs_that_can_never_succeed_fail_at_submit_naming_the_field(
    settings: Settings, inputs: dict[str, Any], where: str
) -> None:
    """They were retried 3 times before the execution failed; now nothing is created."""
    with pytest.raises(InvalidInputError) as caught:
        submit_ml(settings, inputs)
    assert caught.value.where == where, caught.value
    assert executions(settings) == []


def test_the_documented_inputs_are_accepted_and_stored_with_their_defaults(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    info = submit_ml(
        settings,
        {
            "input": str(clip),
            "prompt": "anime",
            "style": "studio",
            "seed": "42",
            "width": 160,
            "fps": 12.5,
            "brightness": 10,
            "contrast": 1.2,
        },
    )
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.inputs == {
        "input": str(clip.resolve()),
        "input_version": None,  # a local file: fetch copies it, no object to pin
        "prompt": "anime",
        "style": "studio",
        "seed": 42,
        "width": 160,
        "fps": 12.5,
        "brightness": 10.0,
        "contrast": 1.2,
    }
    assert info.data["preprocessed_info"]["fps"] == 12.5
    defaults = submit_ml(settings, {"input": str(clip), "width": 160}).inputs
    assert defaults == {
        "input": str(clip.resolve()),
        "input_version": None,
        "prompt": "",
        "style": "default",
        "seed": 0,
        "width": 160,
        "fps": 25.0,
        "brightness": 0.0,
        "contrast": 1.0,
    }


def test_the_command_line_refuses_them_with_the_field_and_exit_code_2(
    tmp_path: Path, clip: Path
) -> None:
    result = CliRunner().invoke(
        cli_app,
        [
            "--home",
            str(tmp_path / "home"),
            "run",
            "framepipe.pipelines.ml_video:ml_video",
            "-i",
            f"input={clip}",
            "-i",
            "width=abc",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "inputs.width: Input should be a valid integer" in result.output


def test_a_local_path_outside_the_roots_is_refused_and_says_nothing_about_it(
    settings: Settings, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: submitted over HTTP, ``input: "/some/private/file.mp4"`` was copied into the
    object store (downloadable), and the errors told whether a path existed."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    absent = tmp_path / "absent" / clip.name  # the same name, nothing there
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for roots in ([], [uploads]):
        with pytest.raises(PathNotAllowedError) as there:
            submit_ml(settings, {"input": str(clip)}, roots)
        with pytest.raises(PathNotAllowedError) as not_there:
            submit_ml(settings, {"input": str(absent)}, roots)
        assert there.value.where == "inputs.input"
        assert str(there.value) == str(not_there.value)
        assert str(tmp_path) not in str(there.value)
    assert executions(settings) == []
    objects = open_object_store(settings.resolved_objects_url)
    assert list(objects.list()) == []

    # an object key is what a client without roots gives; a root makes its files usable
    objects.put_file("uploads/in.mp4", clip)
    by_key = submit_ml(settings, {"input": "uploads/in.mp4", "width": 160}, [])
    assert by_key.status is ExecutionStatus.COMPLETED, by_key.error
    assert by_key.data["input_source"]["key"] == "uploads/in.mp4"
    assert by_key.data["input_key"] == f"ml/{by_key.id}/input.mp4"  # the job's own copy
    (uploads / "in.mp4").write_bytes(clip.read_bytes())
    by_path = submit_ml(settings, {"input": str(uploads / "in.mp4"), "width": 160}, [uploads])
    assert by_path.status is ExecutionStatus.COMPLETED, by_path.error
    assert by_path.data["input_key"] == f"ml/{by_path.id}/input.mp4"


def test_an_object_key_input_is_never_read_from_the_workers_folder(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTP (no roots) ``input`` is an object key; preprocess passed it on as a plain
    source, read as a local path when a file of that name existed in the worker's working
    folder: the server's file was normalised, and its copy uploaded for the client."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "private").mkdir()
    make_clip(tmp_path / "private" / "secret.mp4", frames=50, size=(640, 360))  # the server's
    objects = open_object_store(settings.resolved_objects_url)
    objects.put_file("private/secret.mp4", make_clip(tmp_path / "up.mp4", frames=10))
    info = submit_ml(settings, {"input": "private/secret.mp4", "width": 160, "fps": 25}, [])
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["input_source"]["key"] == "private/secret.mp4"
    pre = info.data["preprocessed_info"]
    assert (pre["frames"], pre["height"]) == (10, 120), pre  # the upload's 10 frames of 4:3
    assert pre["duration"] == pytest.approx(0.4, abs=0.05)


# -- on workers: the async inference step keeps its lease ---------------------------------------

EXAMPLE_MODEL = Path(__file__).resolve().parent.parent / "examples" / "ml_video" / "model.py"


@pytest.mark.slow
@pytest.mark.postgres
def test_inference_uploading_many_frames_to_s3_keeps_its_lease_on_two_workers(
    tmp_path: Path, pg_url: str, s3_server: Any, aws_env: None
) -> None:
    """Two ``framepipe worker -c 1`` on PostgreSQL, Redis and a real S3 server, leases of
    1.5 s: the model's 200 frames take seconds to upload (one request each). The upload ran
    on the worker's event loop, which renews the lease, so the other worker took the step
    over, the first one's result was discarded, and this repeated for ever."""
    bucket = s3_server.new_bucket()
    clip = make_clip(tmp_path / "long.mp4", frames=200, size=(160, 120))
    with redis_namespace("fp-ml-lease-") as namespace:
        values = {
            "home": tmp_path / "home",
            "database_url": pg_url,
            "objects_url": f"s3://{bucket}?endpoint={s3_server.endpoint}",
            "broker_url": REDIS_URL,
            "broker_namespace": namespace,
            "lease_seconds": 1.5,
            "sweep_interval": 0.2,
            "shutdown_grace": 2.0,
        }
        settings = Settings(**values)
        env = {
            **os.environ,
            **{f"FRAMEPIPE_{k.upper()}": str(v) for k, v in values.items()},
            "MODEL_ADAPTER_TYPE": "python",
            "PYTHON_SCRIPT": str(EXAMPLE_MODEL),
            "PYTHON_PATH": sys.executable,
        }
        logs = [tmp_path / f"worker{n}.log" for n in (1, 2)]
        procs = []
        for log in logs:
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "framepipe", "worker", "-c", "1"],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=tmp_path,
                    )
                )
        try:

            async def submit() -> str:
                async with JobEngine(settings=settings) as engine:
                    inputs = {"input": str(clip), "prompt": "anime", "width": 160}
                    return await engine.submit(ml_video, inputs)

            execution_id = asyncio.run(submit())
            store = StateStore(pg_url)

            def finished() -> ExecutionInfo | None:
                info = get_execution(store, execution_id)
                return info if info.status.finished else None

            try:
                info = wait_until(
                    "the execution to finish",
                    finished,
                    timeout=120,
                    explain=lambda: "\n".join(log.read_text()[-3000:] for log in logs),
                )
            finally:
                store.close()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
            s3_server.drop_bucket(bucket)
    output = "\n".join(log.read_text(errors="replace") for log in logs)
    assert info.status is ExecutionStatus.COMPLETED, (info.error, output[-3000:])
    assert info.data["frames"] == 200
    inference = info.step("inference")
    assert inference.attempt == 1, output[-3000:]  # never taken over
    assert "no longer held" not in output and "lost the lease" not in output
    assert len(re.findall(r"\[ml_video/inference:\w+\] Stage completed", output)) == 1


# -- a killed process: its model and its folders ----------------------------------------------


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def _ml_env(tmp_path: Path, script: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAMEPIPE_", "MODEL_"))}
    return env | {
        "FRAMEPIPE_HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path / "scratch"),
        "MODEL_ADAPTER_TYPE": "python",
        "PYTHON_PATH": sys.executable,
        "PYTHON_SCRIPT": str(MODELS / script),
    }


@pytest.mark.slow
def test_framepipe_run_killed_during_inference_leaves_no_model_and_its_retry_no_folders(
    tmp_path: Path, clip: Path
) -> None:
    """``framepipe run`` killed by SIGKILL while its model runs: the model script ran on
    beside the retry, and the step's folders (the video, the model's frames) stayed in the
    temporary folder for good. The model now dies with the process; the retry deletes them."""
    (tmp_path / "scratch").mkdir()
    command = [sys.executable, "-m", "framepipe"]
    inputs = ["-i", f"input={clip}", "-i", "prompt=anime", "-i", "width=160"]
    run = subprocess.Popen(
        [*command, "run", "framepipe.pipelines.ml_video:ml_video", *inputs, "-q"],
        env=_ml_env(tmp_path, "hang_model.py"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pids: list[int] = []
    try:
        pid_file = wait_until(
            "the model to start",
            lambda: next((tmp_path / "scratch").glob("framepipe-*-inference-*/pids.txt"), None),
        )
        pids = [int(p) for p in pid_file.read_text().split()]
        run.kill()
        run.wait()
        wait_until("the model to die with framepipe run", lambda: not _alive(pids[0]))
        left = sorted((tmp_path / "scratch").glob("framepipe-*-inference-*"))
        assert len(left) == 2  # the preprocessed video's and the model's
        listed = subprocess.run(
            [*command, "jobs", "list", "--json"],
            env=_ml_env(tmp_path, "good_model.py"),
            capture_output=True,
            text=True,
            check=True,
        )
        execution_id = json.loads(listed.stdout)[0]["id"]
        retried = subprocess.run(
            [*command, "jobs", "retry", execution_id],
            check=False,
            env=_ml_env(tmp_path, "good_model.py"),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert "completed" in retried.stdout
        assert not any(p.exists() for p in left)
        assert list((tmp_path / "scratch").iterdir()) == []
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for pid in pids:  # the script's own child (a sleep) is not killed with it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


_HOLDER = """
import sys, time
from pathlib import Path
from framepipe.jobs.scratch import HeldFolders

root = Path(sys.argv[1])
with HeldFolders(lambda: Path(__import__("tempfile").mkdtemp(prefix="framepipe-", dir=root))) as f:
    print(f.new(), flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_only_marked_folders_whose_holder_died_are_removed(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        held = Path(holder.stdout.readline().strip())
        assert (held / MARKER).is_file()
        unmarked = tmp_path / "framepipe-someone-else"
        unmarked.mkdir()
        (unmarked / "frame.png").write_bytes(b"x")
        elsewhere = tmp_path / "other-marked"  # not a step's folder name
        elsewhere.mkdir()
        (elsewhere / MARKER).write_text("1\n")
        assert remove_abandoned(tmp_path) == 0  # its holder runs
        assert held.is_dir()
        holder.kill()
        holder.wait()
        assert remove_abandoned(tmp_path) == 1
        assert not held.exists()
        assert unmarked.is_dir() and elsewhere.is_dir()
    finally:
        holder.kill()
        holder.wait()


_MANY_FRAMES = """
import argparse
from pathlib import Path
import cv2, numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", required=True)
args, _ = parser.parse_known_args()
frames = Path(args.output_dir) / "frames"
frames.mkdir(parents=True, exist_ok=True)
for i in range(3000):
    cv2.imwrite(str(frames / f"frame_{i:05d}.png"), np.full((8, 8, 3), i % 256, np.uint8))
print(f"frames_path: {frames}", flush=True)
"""


def test_cancelling_while_the_frames_upload_stops_the_upload_and_leaves_no_folder(
    settings: Settings,
    clip: Path,
    scratch: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The upload runs in a thread: cancelled, the step stops it at the next frame and waits
    for it, so its folders are deleted after it, not under it."""
    script = tmp_path / "many_frames.py"
    script.write_text(_MANY_FRAMES)
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(script))

    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(
                ml_video, {"input": str(clip), "prompt": "anime", "width": 160}
            )

            async def uploading() -> bool:
                info = await asyncio.to_thread(get_execution, engine.store, execution_id)
                return any(s.message == "upload" for s in info.steps)

            await wait_until_async("the frames to upload", uploading, timeout=60)
            await engine.cancel(execution_id)
            return await engine.wait(execution_id, raise_on_failure=False)

    info = asyncio.run(main())
    assert info.status is ExecutionStatus.CANCELLED
    step = info.step("inference")
    assert step.status is StepStatus.CANCELLED
    objects = open_object_store(settings.resolved_objects_url)
    uploaded = len(list(objects.list(f"ml/{info.id}/frames/")))
    assert 0 < uploaded < 3000  # stopped part way
    assert list(scratch.iterdir()) == []


# -- what the job used and kept, its sound, and a model server that refuses -----------------------


def test_the_result_keeps_the_uploads_sound_and_the_manifest_says_what_was_used(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result was silent, and the manifest had neither the seed nor the other inputs; its
    ``input_key`` and ``video_info.path`` named files gone once the job completed."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    clip = make_clip(tmp_path / "talk.mp4", frames=25, size=(320, 240), tone_hz=440)
    info, _, _ = run_ml(settings, clip, seed=42, style="studio", fps=25)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    objects = open_object_store(settings.resolved_objects_url)
    out = objects.get_file(info.data["video"], tmp_path / "out.mp4")
    video = probe(out)
    assert video.audio_codec == "aac" and video.audio_duration is not None
    assert video.audio_duration == pytest.approx(video.duration, abs=0.1)
    samples, rate = audio_of(out)
    assert dominant_hz(samples, rate) == pytest.approx(440, abs=10)

    manifest = json.loads(objects.get(info.data["manifest"]))
    assert (manifest["prompt"], manifest["style"], manifest["seed"]) == ("anime", "studio", 42)
    assert (manifest["width"], manifest["fps"]) == (160, 25)
    assert (manifest["brightness"], manifest["contrast"]) == (0, 1)
    assert manifest["input"]["path"] == str(clip)
    assert manifest["input"]["size"] == clip.stat().st_size
    assert manifest["input"]["info"]["frames"] == 25
    assert manifest["video"] == info.data["video"] and objects.exists(manifest["video"])
    assert manifest["video_info"]["path"] == info.data["video"]
    assert "input_key" not in manifest and "intermediates" not in manifest  # deleted: not named
    assert not objects.exists(info.data["input_key"])


def test_a_silent_upload_gives_a_silent_result(
    settings: Settings, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stitch step takes the sound from the preprocessed video only when it has one."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    assert probe(clip).audio_codec is None
    info, _, _ = run_ml(settings, clip)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["preprocessed_info"]["audio_codec"] is None
    objects = open_object_store(settings.resolved_objects_url)
    video = probe(objects.get_file(info.data["video"], tmp_path / "out.mp4"))
    assert video.audio_codec is None and video.frames > 0


def test_the_manifest_names_the_intermediates_when_they_are_kept(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    monkeypatch.setenv("ML_KEEP_INTERMEDIATES", "true")
    info, _, _ = run_ml(settings, clip)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    objects = open_object_store(settings.resolved_objects_url)
    kept = json.loads(objects.get(info.data["manifest"]))["intermediates"]
    assert kept["input"] == f"ml/{info.id}/input.mp4" and objects.exists(kept["input"])
    assert objects.exists(kept["preprocessed"])
    assert len(list(objects.list(kept["frames"] + "/"))) == info.data["frames"]


@pytest.mark.parametrize(
    ("status", "kind", "attempts"),
    [
        (400, "ModelRefusedError: ", 1),  # an InvalidInputError: not run again
        (422, "ModelRefusedError: ", 1),
        (404, "ModelSetupError: ", 1),  # a ConfigError: not run again
        (429, "ModelError: ", 2),  # "not now": the adapter and the step's retry run it again
    ],
)
def test_a_request_the_model_server_refuses_for_good_is_not_run_again(
    settings: Settings,
    clip: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    kind: str,
    attempts: int,
) -> None:
    """The step's retry ran the model again on an HTTP 400 (the adapter had not retried it)."""
    from test_model_adapters import ModelServer, fixed

    with ModelServer([fixed(status, b'{"error": "unknown style \'watercolour\'"}')]) as server:
        monkeypatch.setenv("MODEL_ADAPTER_TYPE", "http")
        monkeypatch.setenv("MODEL_API_URL", server.url)
        monkeypatch.setenv("MODEL_API_RETRIES", "1")
        monkeypatch.setenv("MODEL_API_RETRY_INITIAL", "0.01")
        info, _, _ = run_ml(settings, clip, style="watercolour")
    assert info.status is ExecutionStatus.FAILED
    error = info.errors["inference"]
    assert error.startswith(kind) and f"HTTP {status}" in error, error
    assert "unknown style 'watercolour'" in error
    assert info.step("inference").attempt == attempts
    adapter_attempts = 1 if attempts == 1 else 2  # MODEL_API_RETRIES=1
    assert len(server.requests) == attempts * adapter_attempts


def test_a_model_servers_frames_this_worker_cannot_see_say_they_must_share_the_folder(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server on another machine answered a path of its own: the step failed with a bare
    ``FileNotFoundError`` (and ran the model again)."""
    from test_model_adapters import ModelServer, ok

    elsewhere = Path("/srv/model-host/tmpabc/frames")
    with ModelServer([ok(elsewhere)]) as server:
        monkeypatch.setenv("MODEL_ADAPTER_TYPE", "http")
        monkeypatch.setenv("MODEL_API_URL", server.url)
        info, _, _ = run_ml(settings, clip)
    assert info.status is ExecutionStatus.FAILED
    error = info.errors["inference"]
    assert error.startswith(
        f"ConfigError: HttpModel({server.url}): the server's frames_path {elsewhere} does not "
        "exist on this machine"
    ), error
    assert "both must share that folder" in error
    assert len(server.requests) == 1


def test_a_step_handed_back_logs_that_it_stopped_not_that_it_failed(
    logs: pytest.LogCaptureFixture,
) -> None:
    """A worker stopping (SIGTERM) cancels its running steps' tasks and hands them back; the
    step logged ``Stage failed after 12.73s: CancelledError``."""
    from types import SimpleNamespace

    from framepipe.pipelines.ml_video import _stage

    ctx: Any = SimpleNamespace(pipeline=ml_video, step_name="inference", execution_id="0" * 32)

    async def step() -> None:
        with _stage(ctx):
            await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(step())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    lines = [r.getMessage() for r in logs.records if r.name == "framepipe.steps"]
    assert lines[0] == "Stage started"
    assert re.fullmatch(
        r"Stage stopped after 0\.\d\ds: handed back, not failed; it runs again", lines[1]
    ), lines
    assert not any("failed after" in line for line in lines)


def test_frames_are_taken_in_playing_order_past_their_zero_padding(tmp_path: Path) -> None:
    from framepipe.pipelines.ml_folders import images

    names = ["frame_9998.png", "frame_9999.png", "frame_10000.png", "frame_10001.png"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "log.txt").write_text("a model's other file")
    assert [p.name for p in images(tmp_path)] == names
