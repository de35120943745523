"""examples/ml_video/frames_dag.py: a batch system's per-video DAG (probe -> spawned score
chunks -> aggregate) and its incremental import, on real clips and the real engine."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import av
import numpy as np
import pytest

from framepipe import ExecutionStatus, JobEngine, Settings, StepStatus, open_object_store
from framepipe.jobs.models import ExecutionInfo, StepInfo
from media import make_clip

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ml_video" / "frames_dag.py"


@pytest.fixture(scope="module")
def dag() -> ModuleType:
    spec = importlib.util.spec_from_file_location("frames_dag_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _chunk(info: ExecutionInfo, start: int) -> StepInfo:
    """The ``score`` step of the chunk starting at frame ``start``."""
    return next(s for s in info.steps if s.name == "score" and s.params["start"] == start)


def test_new_uploads_are_submitted_once_and_a_replaced_one_again(
    dag: ModuleType, settings: Settings, tmp_path: Path
) -> None:
    objects = open_object_store(settings.resolved_objects_url)
    clip = make_clip(tmp_path / "a.mp4", frames=30)
    objects.put_file("uploads/a.mp4", clip)
    objects.put_file("uploads/b.mp4", make_clip(tmp_path / "b.mp4", frames=1))
    objects.put("uploads/notes.txt", b"not a video")  # not a video's name: not imported
    objects.put("uploads/c.mp4", b"not a video")  # a video's name: its job fails at probe

    async def main() -> tuple[list[ExecutionInfo], list[str], list[ExecutionInfo]]:
        async with JobEngine(settings=settings) as engine:
            first = await dag.import_new(engine, objects, "uploads/")
            done = [await engine.wait(i, raise_on_failure=False) for i in first]
            again = await dag.import_new(engine, objects, "uploads/")
            objects.put_file("uploads/a.mp4", make_clip(tmp_path / "a2.mp4", frames=12))
            replaced = await dag.import_new(engine, objects, "uploads/")
            return done, again, [await engine.wait(i) for i in replaced]

    done, again, replaced = asyncio.run(main())
    by_input = {info.inputs["input"]: info for info in done}
    assert sorted(by_input) == ["uploads/a.mp4", "uploads/b.mp4", "uploads/c.mp4"]
    assert by_input["uploads/a.mp4"].status == ExecutionStatus.COMPLETED
    assert by_input["uploads/b.mp4"].data["frames_scored"] == 1  # one frame: scored all the same
    bad = by_input["uploads/c.mp4"]
    assert bad.status == ExecutionStatus.FAILED and bad.step("probe").attempt == 1
    assert "InvalidInputError" in bad.errors["probe"] and "uploads/c.mp4" in bad.errors["probe"]
    assert again == []
    assert [info.inputs["input"] for info in replaced] == ["uploads/a.mp4"]
    manifest = json.loads(objects.get(replaced[0].data["manifest"]))
    assert manifest["input"]["info"]["frames"] == 12 and manifest["frames_scored"] == 3
    assert not objects.exists(replaced[0].data["manifest"].replace("manifest.json", "input.mp4"))


def test_a_model_raising_on_a_frame_fails_its_chunk_and_the_retry_runs_only_that_chunk(
    dag: ModuleType, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = make_clip(tmp_path / "in.mp4", frames=40)
    original = dag.score_frame

    def model(image: np.ndarray) -> float:
        if float(image.mean()) == broken[0]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(image)

    with av.open(str(clip)) as container:  # the model fails on frame 25 (third chunk)
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
    broken = [float(frames[25].mean())]
    monkeypatch.setattr(dag, "score_frame", model)

    async def main() -> tuple[ExecutionInfo, ExecutionInfo]:
        async with JobEngine(settings=settings) as engine:
            inputs: dict[str, Any] = {"input": str(clip), "chunk": 10, "every": 5}
            failed = await engine.run(dag.frames_dag, inputs, raise_on_failure=False)
            broken[0] = -1.0  # the model fixed
            await engine.retry(failed.id)
            return failed, await engine.wait(failed.id)

    failed, retried = asyncio.run(main())
    chunk = _chunk(failed, 20)
    assert failed.status == ExecutionStatus.FAILED
    assert chunk.attempt == 3  # retries=2: the error is not one of the input
    assert "CUDA error" in failed.errors[chunk.key]
    others = [s for s in failed.steps if s.name == "score" and s.key != chunk.key]
    assert len(others) == 3 and all(s.status == StepStatus.COMPLETED for s in others)
    assert retried.status == ExecutionStatus.COMPLETED and retried.data["frames_scored"] == 8
    assert all(retried.step(s.key).attempt == 1 for s in others)  # not run again


def test_frames_cut_off_past_the_header_fail_their_chunk_at_once(
    dag: ModuleType, settings: Settings, tmp_path: Path
) -> None:
    whole = make_clip(tmp_path / "whole.mp4", frames=50, options={"movflags": "faststart"})
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            inputs = {"input": str(cut), "chunk": 25}
            return await engine.run(dag.frames_dag, inputs, raise_on_failure=False)

    info = asyncio.run(main())
    chunk = _chunk(info, 25)
    assert info.status == ExecutionStatus.FAILED and chunk.attempt == 1
    assert f"{cut}: frames 25.. cannot be decoded" in info.errors[chunk.key]


def test_a_video_over_the_operators_length_limit_fails_probe_at_once(
    dag: ModuleType, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_DURATION", "1")
    clip = make_clip(tmp_path / "long.mp4", frames=50)  # 2 s

    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(dag.frames_dag, {"input": str(clip)}, raise_on_failure=False)

    info = asyncio.run(main())
    assert info.status == ExecutionStatus.FAILED and info.step("probe").attempt == 1
    assert "longer than the limit of 1 s" in info.errors["probe"]
    assert "FRAMEPIPE_MEDIA_MAX_DURATION" in info.errors["probe"]


def test_one_frame_in_every_is_scored_over_the_whole_video_whatever_the_chunks(
    dag: ModuleType, settings: Settings, tmp_path: Path
) -> None:
    """Chunks of 7 frames, one in 5 scored: frames 0, 5, 10 ... (not 0, 5, 7, 12 ...)."""
    clip = make_clip(tmp_path / "a.mp4", frames=30)

    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(dag.frames_dag, {"input": str(clip), "chunk": 7, "every": 5})

    info = asyncio.run(main())
    objects = open_object_store(settings.resolved_objects_url)
    manifest = json.loads(objects.get(info.data["manifest"]))
    assert [int(n) for n in manifest["scores"]] == [0, 5, 10, 15, 20, 25]


def test_a_chunk_cut_off_partway_fails_instead_of_scoring_what_is_left(
    dag: ModuleType, settings: Settings, tmp_path: Path
) -> None:
    """A Matroska header promises 50 frames and the bytes stop about halfway, between two
    clusters (the decoder meets a clean end, no error): the first chunk of 40 decodes some and
    not all, and fails at once naming how many came (a mean over silently missing frames is
    no result)."""
    whole = make_clip(tmp_path / "whole.mkv", frames=50)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            inputs = {"input": str(cut), "chunk": 40}
            return await engine.run(dag.frames_dag, inputs, raise_on_failure=False)

    info = asyncio.run(main())
    chunk = _chunk(info, 0)
    assert info.status == ExecutionStatus.FAILED and chunk.attempt == 1
    assert f"{cut}: frames 0.. cannot be decoded" in info.errors[chunk.key]
    assert "of its 40 frames decoded" in info.errors[chunk.key]
