"""The ML video example (``examples/ml_video``): its model script and HTTP model server run by
the ready pipeline, for real, and bad input through the whole pipeline (issue 5)."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

import framepipe.pipelines.ml_video as ml_module
from framepipe import ExecutionStatus, JobEngine, Settings, StepStatus, open_object_store
from framepipe.backoff import Backoff
from framepipe.jobs.records import list_events
from framepipe.media import probe
from framepipe.pipelines.ml_video import ml_video
from framepipe.processors.adapters import ModelAdapter
from media import make_clip, read_counter
from waiting import free_port

# the ML video example end to end, with model servers and scripts as processes
pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ml_video"
MODEL = EXAMPLE / "model.py"
SERVER = EXAMPLE / "server.py"
MODELS = Path(__file__).resolve().parent / "models"
FRAMES = 20


def run_ml(settings: Settings, clip: Path, **inputs: Any) -> tuple[Any, list[Any]]:
    """Run the pipeline on ``clip`` to the end (failed or not): its record and events."""

    async def main() -> tuple[Any, list[Any]]:
        async with JobEngine(settings=settings) as engine:
            info = await engine.run(
                ml_video,
                {"input": str(clip), "prompt": "anime", "style": "cartoon", "seed": 7, **inputs},
                raise_on_failure=False,
            )
            return info, await asyncio.to_thread(list_events, engine.store, info.id)

    return asyncio.run(main())


def retry_ml(settings: Settings, execution_id: str) -> tuple[Any, list[Any]]:
    """Retry a failed execution to the end: its record and all its events."""

    async def main() -> tuple[Any, list[Any]]:
        async with JobEngine(settings=settings) as engine:
            await engine.retry(execution_id, ml_video)
            info = await engine.wait(execution_id, raise_on_failure=False)
            return info, await asyncio.to_thread(list_events, engine.store, execution_id)

    return asyncio.run(main())


def started(events: list[Any]) -> list[str]:
    return [e.step_key for e in events if e.type == "step.started"]


def first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            return frame.to_ndarray(format="bgr24").astype(np.int16)
    raise AssertionError(f"{path} has no frame")


def result_video(settings: Settings, info: Any) -> Path:
    objects = open_object_store(settings.resolved_objects_url)
    assert objects.get(info.data["thumbnail"])[:2] == b"\xff\xd8"
    return objects.get_file(info.data["video"], settings.home / "result.mp4")


def example_model() -> Any:
    """``examples/ml_video/model.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location("ml_video_example_model", MODEL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4", frames=FRAMES, size=(320, 240))


@contextmanager
def model_server(root: Path, *extra: str) -> Iterator[str]:
    """``server.py`` as a subprocess on a free loopback port; yields its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SERVER),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--output-root",
            str(root),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server.py exited {proc.returncode}: "
                    f"{proc.stderr.read().decode() if proc.stderr else ''}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server.py did not answer within 20 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def fast_model_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapters' own backoff (1 s, 2 s, 4 s for HTTP) shortened so that a failing model
    fails in milliseconds; the adapters still come from the settings (the environment)."""
    real = ml_module.model_from_settings

    def model_from_settings() -> ModelAdapter:
        model = real()
        model.backoff = Backoff(initial=0.01, factor=2.0, maximum=0.05)
        return model

    monkeypatch.setattr(ml_module, "model_from_settings", model_from_settings)


# -- the example with each adapter --------------------------------------------------------------


def test_model_script_through_the_pipeline_stylises_every_frame(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(MODEL))
    info, events = run_ml(settings, clip, width=320)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["model"] == "SubprocessModel"
    assert info.data["frames"] == FRAMES
    video = probe(result_video(settings, info))
    assert (video.frames, video.width, video.height) == (FRAMES, 320, 240)
    # the transform ran: the result is the model's picture of the input, not the input
    result, original = first_frame(settings.home / "result.mp4"), first_frame(clip)
    expected = example_model().stylise(original.astype(np.uint8), "cartoon", 7)
    to_input = np.abs(result - original).mean()
    to_expected = np.abs(result - expected.astype(np.int16)).mean()
    assert to_input > 5 and to_expected < to_input / 2, (to_input, to_expected)
    # the script's "progress: N" lines reached the step
    reported = [
        e.data.get("progress")
        for e in events
        if e.type == "step.progress" and e.step_key == "inference"
    ]
    # (progress events are coalesced per commit round, so how many arrive depends on timing)
    assert reported == sorted(reported), reported
    assert any(0 < p < 90 for p in reported), reported  # the model's span of the step is 0-90


def test_http_model_server_through_the_pipeline(
    settings: Settings, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with model_server(tmp_path / "shared") as url:
        monkeypatch.setenv("MODEL_ADAPTER_TYPE", "http")
        monkeypatch.setenv("MODEL_API_URL", url)
        monkeypatch.setenv("MODEL_API_TIMEOUT", "60000")
        info, _ = run_ml(settings, clip, width=160, style="sketch")
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["model"] == "HttpModel" and info.data["frames"] == FRAMES
    video = probe(result_video(settings, info))
    assert (video.frames, video.width, video.height) == (FRAMES, 160, 120)
    # the frames were written under the server's output root (the shared folder)
    assert len(list((tmp_path / "shared").glob("*/frames/frame_0000.png"))) == 1


def test_the_model_script_refuses_an_unreadable_input(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    done = subprocess.run(
        [
            sys.executable,
            str(MODEL),
            "--input",
            str(text),
            "--prompt",
            "x",
            "--style",
            "cartoon",
            "--seed",
            "1",
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 65  # EX_DATAERR: SubprocessModel does not run it again
    assert "notes.mp4" in done.stderr and "not a readable video" in done.stderr
    assert "frames_path" not in done.stdout


# -- bad input ----------------------------------------------------------------------------------


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.write_text("this is a shopping list, not a video\n")


def _truncated(path: Path) -> None:
    whole = make_clip(path.with_name("whole.mp4"), frames=FRAMES).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def _audio_only(path: Path) -> None:
    """An AAC audio-only .mp4 (a voice memo), 0.5 s of a 440 Hz tone."""
    rate = 44100
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        assert isinstance(stream, av.AudioStream)
        stream.layout = "mono"
        for i in range(rate // 2 // 1024):
            t = (np.arange(1024) + i * 1024) / rate
            samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = i * 1024
            frame.time_base = Fraction(1, rate)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


BAD_INPUTS = {
    "empty": (_empty, "is empty (0 bytes)"),
    "text": (_text, "cannot be opened as a video file"),
    "truncated": (_truncated, "cannot be opened as a video file"),
    "audio-only": (_audio_only, "holds no video stream"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_a_bad_input_file_fails_fetch_clearly_and_retries_once_replaced(
    kind: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    make_bad, cause = BAD_INPUTS[kind]
    path = tmp_path / "upload.mp4"
    make_bad(path)
    failed, events = run_ml(settings, path)
    assert failed.status is ExecutionStatus.FAILED
    assert failed.step("fetch").status is StepStatus.FAILED
    error = failed.errors["fetch"]
    assert "upload.mp4" in error and cause in error, error
    assert started(events).count("preprocess") == 0  # nothing ran on the bad file
    if kind != "truncated":
        return  # one retry shows it (each full run costs a second or two)
    # the cause fixed (the whole file uploaded in its place), the same execution completes
    make_clip(path, frames=10)
    done, events = retry_ml(settings, failed.id)
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert probe(result_video(settings, done)).frames == 10  # the mock's frames


CRASHING_MODEL = """\
import sys
print("progress: 5", flush=True)
raise RuntimeError("weights file /models/anime.ckpt is corrupt")
"""


def test_a_crashing_model_script_fails_inference_then_retry_with_the_good_script(
    settings: Settings, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash = tmp_path / "crash_model.py"
    crash.write_text(CRASHING_MODEL)
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(crash))
    failed, _ = run_ml(settings, clip, width=160)
    assert failed.status is ExecutionStatus.FAILED
    assert failed.step("inference").status is StepStatus.FAILED
    assert failed.step("preprocess").status is StepStatus.COMPLETED
    error = failed.errors["inference"]
    assert str(crash) in error and "exited with code 1" in error, error
    assert "RuntimeError: weights file /models/anime.ckpt is corrupt" in error

    monkeypatch.setenv("PYTHON_SCRIPT", str(MODEL))
    done, events = retry_ml(settings, failed.id)
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert done.data["frames"] == FRAMES
    steps = started(events)
    assert steps.count("fetch") == 1 and steps.count("preprocess") == 1, steps


@pytest.mark.parametrize("script", ["silent_model.py", "mute_model.py"])
def test_a_model_script_that_prints_no_frames_path_fails_inference_then_retry_with_the_good_one(
    settings: Settings, clip: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch, script: str
) -> None:
    """``silent_model.py`` prints progress and chatter but no ``frames_path:`` line;
    ``mute_model.py`` writes its frames but prints nothing at all. Both exit 0."""
    quiet = MODELS / script
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(quiet))
    failed, _ = run_ml(settings, clip, width=160)
    assert failed.status is ExecutionStatus.FAILED
    assert failed.step("inference").status is StepStatus.FAILED
    assert failed.step("preprocess").status is StepStatus.COMPLETED
    error = failed.errors["inference"]
    assert error.startswith("ModelOutputError: "), error
    assert str(quiet) in error
    assert "exited 0 without printing a 'frames_path: PATH' line" in error
    assert list(scratch.iterdir()) == []  # the model's output folder went with the step's
    objects = open_object_store(settings.resolved_objects_url)
    assert list(objects.list(f"ml/{failed.id}/frames/")) == []  # nothing uploaded

    monkeypatch.setenv("PYTHON_SCRIPT", str(MODEL))  # the script fixed
    done, events = retry_ml(settings, failed.id)
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert done.data["frames"] == FRAMES
    steps = started(events)
    assert steps.count("fetch") == 1 and steps.count("preprocess") == 1, steps
    assert list(scratch.iterdir()) == []


def test_a_video_above_the_pixel_limit_fails_fetch_then_retry_after_raising_it(
    settings: Settings, clip: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", str(160 * 120))
    failed, events = run_ml(settings, clip, width=160)
    assert failed.status is ExecutionStatus.FAILED
    error = failed.errors["fetch"]
    assert error.startswith(
        f"InvalidInputError: inputs.input: {clip}: its picture is 320x240 (76,800 pixels), "
        "larger than the limit of 19,200 pixels"
    ), error
    assert "FRAMEPIPE_MEDIA_MAX_PIXELS" in error
    assert started(events).count("preprocess") == 0
    objects = open_object_store(settings.resolved_objects_url)
    assert list(objects.list(f"ml/{failed.id}/")) == []
    assert list(scratch.iterdir()) == []

    # raised to 1080p: the clip and the 960-wide contact sheet the pipeline writes both fit
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", str(1920 * 1080))
    done, _ = retry_ml(settings, failed.id)
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert done.data["preprocessed_info"]["width"] == 160


def test_an_http_model_answering_500_fails_inference_then_retry_with_a_good_server(
    settings: Settings,
    clip: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fast_model_retries: None,
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "http")
    monkeypatch.setenv("MODEL_API_TIMEOUT", "60000")
    with model_server(tmp_path / "shared", "--fail", "model weights not loaded") as bad_url:
        monkeypatch.setenv("MODEL_API_URL", bad_url)
        failed, _ = run_ml(settings, clip, width=160)
    assert failed.status is ExecutionStatus.FAILED
    assert failed.step("inference").status is StepStatus.FAILED
    error = failed.errors["inference"]
    assert f"{bad_url}/infer" in error and "HTTP 500" in error, error
    assert "model weights not loaded" in error and "failed after 4 attempts" in error

    with model_server(tmp_path / "shared") as good_url:
        monkeypatch.setenv("MODEL_API_URL", good_url)
        done, events = retry_ml(settings, failed.id)
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert done.data["model"] == "HttpModel" and done.data["frames"] == FRAMES
    steps = started(events)
    assert steps.count("fetch") == 1 and steps.count("preprocess") == 1, steps


def test_a_truncated_faststart_mp4_fails_instead_of_giving_a_short_video(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    whole = make_clip(
        tmp_path / "whole.mp4", frames=FRAMES, options={"movflags": "faststart"}
    ).read_bytes()
    path = tmp_path / "upload.mp4"
    path.write_bytes(whole[: len(whole) // 2])  # the index (first) says 20 frames, half are gone
    info, _ = run_ml(settings, path, width=160)
    assert info.status is ExecutionStatus.FAILED, info.data.get("preprocessed_info")
    assert "upload.mp4" in (info.error or "")
    assert "truncated" in info.errors["preprocess"]


# -- the model's batch size ---------------------------------------------------------------------


def test_model_batch_size_reaches_the_model_script_and_is_recorded(
    settings: Settings, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``MODEL_BATCH_SIZE`` is passed to the script as ``--batch-size`` (read when the step
    runs, like every model setting) and the execution's data says which one it ran with."""
    argv_file = tmp_path / "argv.txt"
    wrapper = tmp_path / "recording_model.py"
    wrapper.write_text(
        "import pathlib, sys\n"
        f"pathlib.Path({str(argv_file)!r}).write_text(' '.join(sys.argv[1:]))\n"
        f"sys.path.insert(0, {str(EXAMPLE)!r})\n"
        "import model\n"
        "sys.exit(model.main())\n"
    )
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(wrapper))
    monkeypatch.setenv("MODEL_BATCH_SIZE", "3")
    info, _ = run_ml(settings, clip, width=160)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert "--batch-size 3" in argv_file.read_text()
    assert (info.data["frames"], info.data["batch_size"]) == (FRAMES, 3)


def test_the_example_models_pictures_do_not_depend_on_the_batch_size(
    clip: Path, tmp_path: Path
) -> None:
    model = example_model()
    one = model.run(clip, tmp_path / "one", style="cartoon", seed=3, batch_size=1)
    seven = model.run(clip, tmp_path / "seven", style="cartoon", seed=3, batch_size=7)
    names = sorted(p.name for p in one.glob("*.png"))
    assert len(names) == FRAMES and names == sorted(p.name for p in seven.glob("*.png"))
    assert all((one / n).read_bytes() == (seven / n).read_bytes() for n in names)
    with pytest.raises(ValueError, match="batch size 0 is below 1"):
        model.run(clip, tmp_path / "zero", batch_size=0)


def test_model_batch_size_reaches_the_model_server_as_a_form_field(
    clip: Path, tmp_path: Path
) -> None:
    from framepipe.processors.adapters import HttpModel

    async def infer(url: str, **options: Any) -> Any:
        model = HttpModel(url, timeout=60, max_retries=0)
        return await model.infer(clip, output_dir=tmp_path / "out", **options)

    with model_server(tmp_path / "shared") as url:
        assert asyncio.run(infer(url, batch_size=4)).extra["batch_size"] == 4
        assert asyncio.run(infer(url)).extra["batch_size"] == 1  # the model's own default
        answer = httpx.post(
            f"{url}/infer", data={"batch_size": "0"}, files={"input_file": ("c.mp4", b"x")}
        )
        assert answer.status_code == 400
        assert "batch_size '0' is not a whole number >= 1" in answer.json()["error"]


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_model_batch_size_is_refused_naming_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from framepipe.errors import ConfigError
    from framepipe.pipelines.ml_settings import MlVideoSettings

    with pytest.raises(
        ConfigError, match=f"MODEL_BATCH_SIZE='{value}': expected a whole number >= 1"
    ):
        MlVideoSettings.load({"MODEL_BATCH_SIZE": value})
    assert MlVideoSettings.load({}).infer_options() == {}
    assert MlVideoSettings.load({"FRAMEPIPE_MODEL_BATCH_SIZE": "5"}).infer_options() == {
        "batch_size": 5
    }


def test_the_model_server_answers_a_repeated_call_without_running_it_again(
    clip: Path, tmp_path: Path
) -> None:
    """Requests with the same ``Idempotency-Key`` (a client's retries of one call) get the
    first one's answer, also while it still runs: the frames are made once; another key runs
    again, and a malformed key is refused."""
    root = tmp_path / "shared"
    data = clip.read_bytes()

    def post(url: str, key: str) -> httpx.Response:
        return httpx.post(
            f"{url}/infer",
            data={"style": "invert"},
            files={"input_file": ("c.mp4", data)},
            headers={"Idempotency-Key": key},
            timeout=60,
        )

    with model_server(root) as url:

        async def together() -> list[httpx.Response]:
            return list(await asyncio.gather(*(asyncio.to_thread(post, url, "k1") for _ in "abc")))

        answers = asyncio.run(together())
        answers.append(post(url, "k1"))
        assert {a.status_code for a in answers} == {200}
        assert len({a.json()["frames_path"] for a in answers}) == 1
        assert len([p for p in root.iterdir() if p.is_dir()]) == 1  # one run for four requests
        other = post(url, "k2")
        assert other.status_code == 200
        assert other.json()["frames_path"] != answers[0].json()["frames_path"]
        bad = post(url, "x" * 201)
        assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]


def test_the_model_server_keeps_no_folder_of_a_failed_call(tmp_path: Path) -> None:
    """A call that fails (an unreadable video, or one failing half-way through its frames)
    answers 500 and deletes its request folder: nobody reads the frames of a failed call, and
    each one left its folder (and the frames made before the failure) under the output root."""
    root = tmp_path / "shared"
    with model_server(root) as url:
        answer = httpx.post(
            f"{url}/infer",
            data={"style": "cartoon"},
            files={"input_file": ("notes.mp4", b"not a video at all")},
            timeout=60,
        )
        assert answer.status_code == 500
        assert "notes.mp4: not a readable video" in answer.json()["error"]
        assert list(root.iterdir()) == []


def test_the_model_server_refuses_an_unknown_style_as_a_bad_request(
    clip: Path, tmp_path: Path
) -> None:
    """An unknown style is the client's mistake: HTTP 400 naming it and the styles there are
    (``HttpModel`` does not retry a 4xx), before the video is written or decoded; it was a 500,
    which the client retried three times, uploading the video each time."""
    root = tmp_path / "shared"
    with model_server(root) as url:
        answer = httpx.post(
            f"{url}/infer",
            data={"style": "watercolour"},
            files={"input_file": ("c.mp4", clip.read_bytes())},
            timeout=60,
        )
        assert answer.status_code == 400
        assert answer.json() == {
            "success": False,
            "error": "unknown style 'watercolour'; one of cartoon, sketch, invert "
            "(or default, studio, anime)",
        }
        assert list(root.iterdir()) == []
        good = httpx.post(
            f"{url}/infer",
            data={"style": "Anime"},
            files={"input_file": ("c.mp4", clip.read_bytes())},
            timeout=60,
        )
        assert good.status_code == 200 and good.json()["frames"] == FRAMES


UNPADDED_MODEL = """\
import argparse, pathlib, sys
sys.path.insert(0, {tests!r})
import cv2
from media import counter_image
parser = argparse.ArgumentParser()
for name in ("--input", "--prompt", "--style", "--seed", "--output-dir"):
    parser.add_argument(name)
args = parser.parse_args()
frames = pathlib.Path(args.output_dir) / "frames"
frames.mkdir(parents=True)
for i in range(12):  # frame_0.png ... frame_11.png: numbered, not zero-padded
    (frames / f"frame_{{i}}.png").write_bytes(cv2.imencode(".png", counter_image(i))[1].tobytes())
print(f"frames_path: {{frames}}", flush=True)
"""


def test_a_model_numbering_its_frames_without_padding_gets_them_stitched_in_order(
    settings: Settings, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model naming its frames ``frame_0.png ... frame_11.png`` (or a zero-padded one past
    its padding) got a video in text order: 0, 1, 10, 11, 2, 3 ..."""
    script = tmp_path / "unpadded_model.py"
    script.write_text(UNPADDED_MODEL.format(tests=str(Path(__file__).resolve().parent)))
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(script))
    info, _ = run_ml(settings, clip, width=160)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    with av.open(str(result_video(settings, info))) as container:
        shown = [read_counter(f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]
    assert shown == list(range(12))
