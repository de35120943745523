"""The ready ML video pipeline (seed 003), end to end on a real clip, with real adapters."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from framepipe import ExecutionStatus, JobEngine, Settings, StepStatus, open_object_store
from framepipe.jobs.records import list_events
from framepipe.media import probe
from framepipe.pipelines.ml_video import ml_video
from media import make_clip

MODELS = Path(__file__).parent / "models"
RANGES = {"fetch": (0, 10), "preprocess": (10, 15), "inference": (15, 65),
          "postprocess": (65, 75), "stitch": (75, 85), "thumbnails": (85, 95),
          "finalize": (95, 100)}


def run_ml(settings: Settings, clip: Path, **inputs: Any) -> tuple[Any, list[Any], JobEngine]:
    async def main() -> tuple[Any, list[Any], JobEngine]:
        async with JobEngine(settings=settings) as engine:
            info = await engine.run(ml_video, {"input": str(clip), "prompt": "anime",
                                               "width": 160, **inputs},
                                    raise_on_failure=False)
            events = await asyncio.to_thread(list_events, engine.store, info.id)
            return info, events, engine

    return asyncio.run(main())


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "in.mp4", frames=30, size=(320, 240))


def test_mock_model_end_to_end_with_the_seed_progress_ranges(
        settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    # Execution progress follows the seed's ranges: while a step runs, the execution's
    # progress lies within that step's range.
    for event in events:
        if event.type == "step.progress":
            lo, hi = RANGES[event.step_key]
            assert lo - 0.01 <= event.data["execution_progress"] <= hi + 0.01, event
    done = [e.data["execution_progress"] for e in events if e.type == "step.completed"]
    assert done == sorted(done)
    assert [e.step_key for e in events if e.type == "step.completed"] == list(RANGES)


def test_subprocess_model_then_a_failing_model_retried_from_the_failed_step(
        settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(MODELS / "crash_model.py"))
    failed, events, _ = run_ml(settings, clip)
    assert failed.status is ExecutionStatus.FAILED
    assert failed.step("inference").status is StepStatus.FAILED
    assert "exited with code 3" in failed.errors["inference"]
    assert "CUDA out of memory" in failed.errors["inference"]
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
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    missing, _, _ = run_ml(settings, tmp_path / "nope.mp4")
    assert "neither a file nor an object key" in missing.errors["fetch"]
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    bad, _, _ = run_ml(settings, text)
    assert "notes.mp4" in bad.errors["fetch"] and "MediaError" in bad.errors["fetch"]
