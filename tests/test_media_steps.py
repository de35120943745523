"""framepipe.media.steps: the media toolkit as ready job steps, run by the real job engine on
real clips, with the object store, progress, temp folders and failures checked."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import BaseModel

from framepipe import (
    ExecutionStatus,
    JobEngine,
    Pipeline,
    Settings,
    StateStore,
    StepContext,
    StepStatus,
)
from framepipe.backends.objects import ObjectStore
from framepipe.errors import PathNotAllowedError, StepCancelledError, StepParamsError
from framepipe.jobs.context import Progressed, StepMessage
from framepipe.jobs.inputs import LocalPathOrKey
from framepipe.jobs.scratch import MARKER
from framepipe.media import probe
from framepipe.media.steps import OPERATIONS, Input, ObjectKey, media_step, run_media
from media import audio_of, dominant_hz, make_clip, make_qr_clip

FAST = "ultrafast"


def run(settings: Settings, pipeline: Pipeline, inputs: dict[str, Any]) -> Any:
    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(pipeline, inputs, raise_on_failure=False)

    return asyncio.run(asyncio.wait_for(main(), 120))


def fetch(objects: ObjectStore, key: str, folder: Path) -> Path:
    return objects.get_file(key, folder / key.replace("/", "_"))


@pytest.mark.slow
def test_a_pipeline_of_every_media_step_runs_end_to_end(
    settings: Settings, tmp_path: Path, objects: ObjectStore, scratch: Path
) -> None:
    video = make_clip(tmp_path / "video.mp4", frames=50, size=(320, 240), tone_hz=440)
    intro = make_clip(tmp_path / "intro.mp4", frames=25, size=(320, 240))
    objects.put_file("uploads/intro.mp4", intro)  # one source from the object store
    booking = make_qr_clip(tmp_path / "qr.mp4", [(None, 10), ("BOOKING-42", 20)])

    p = Pipeline("publish")
    media_step(p, "probe", name="check", source="video")
    media_step(
        p,
        "normalise",
        source="video",
        width=Input("width", 320),
        fps=10,
        preset=FAST,
        depends_on=["check"],
    )
    media_step(p, "watermark", source="normalise", text="ACME", preset=FAST)
    media_step(p, "concat", source=["intro", "watermark"], preset=FAST)
    media_step(p, "thumbnail", source="concat", width=64, at=0.5)
    media_step(
        p,
        "thumbnail_grid",
        name="grid",
        source="concat",
        cols=2,
        rows=2,
        width=128,
        key="media/{execution_id}/sheet.png",
    )
    media_step(p, "extract_frames", name="frames", source="normalise", every=4)
    media_step(p, "stitch", source="frames", fps=5, preset=FAST)
    media_step(p, "decode_qr", name="qr", source="booking", every=2)
    assert p.steps["watermark"].depends_on == ("normalise",)
    assert p.steps["concat"].depends_on == ("watermark",)
    assert p.steps["stitch"].depends_on == ("frames",)

    info = run(
        settings,
        p,
        {"video": str(video), "intro": "uploads/intro.mp4", "booking": str(booking), "width": 160},
    )
    assert info.status is ExecutionStatus.COMPLETED, info.errors
    data = info.data
    here = tmp_path / "fetched"

    assert data["check"]["info"]["width"] == 320 and data["check"]["source"] == "video"
    assert data["check"]["info"]["path"] == str(video)

    norm = data["normalise"]
    assert norm["key"] == f"media/{info.id}/normalise.mp4"
    assert (norm["info"]["width"], norm["info"]["height"], norm["info"]["fps"]) == (160, 120, 10.0)
    assert norm["info"]["path"] == norm["key"]
    assert norm["size"] == objects.stat(norm["key"]).size
    assert probe(fetch(objects, norm["key"], here)).frames == 20

    joined = fetch(objects, data["concat"]["key"], here)
    assert data["concat"]["source"] == ["intro", "watermark"]
    assert probe(joined).frames == 75  # 1 s intro + 2 s of video (10 fps -> 25 fps)
    samples, rate = audio_of(joined)  # the intro was silent, the video had its tone
    assert float(np.abs(samples[: int(0.9 * rate)]).max()) < 0.01
    assert dominant_hz(samples[int(1.1 * rate) : int(2.9 * rate)], rate) == pytest.approx(
        440, abs=5
    )

    thumb = data["thumbnail"]
    assert (thumb["width"], thumb["height"]) == (64, 48)
    assert objects.get(thumb["key"])[:2] == b"\xff\xd8"
    grid = data["grid"]
    assert grid["key"] == f"media/{info.id}/sheet.png"
    assert objects.get(grid["key"])[:4] == b"\x89PNG" and grid["width"] == 128

    frames = data["frames"]
    assert frames["count"] == 5 and frames["prefix"] == f"media/{info.id}/frames"
    assert [k.rsplit("/", 1)[-1] for k in frames["keys"]] == [
        f"frame_{i:06d}.jpg" for i in (0, 4, 8, 12, 16)
    ]
    assert [o.key for o in objects.list(frames["prefix"] + "/")] == frames["keys"]
    assert data["stitch"]["info"]["frames"] == 5 and data["stitch"]["info"]["fps"] == 5.0

    assert data["qr"]["text"] == "BOOKING-42"
    assert data["qr"]["codes"][0]["frame_index"] >= 10

    assert list(scratch.iterdir()) == []  # every step's temp folder is gone


def ctx_for(
    pipeline: Pipeline,
    step: str,
    settings: Settings,
    objects: ObjectStore,
    inputs: dict[str, Any],
    posted: list[StepMessage],
) -> StepContext:
    """A real StepContext whose messages to the scheduler are kept in ``posted``."""
    return StepContext(
        pipeline=pipeline,
        execution_id="0123456789abcdef",
        step_key=step,
        step_name=step,
        attempt=1,
        inputs=inputs,
        data={},
        params={},
        store=StateStore(settings.resolved_database_url),
        objects=lambda: objects,
        post=posted.append,
        has_key=lambda key: False,
    )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "operation", ["normalise", "watermark", "extract_frames", "thumbnail_grid", "concat"]
)
def test_progress_is_real_and_reaches_100_within_the_step(
    settings: Settings, tmp_path: Path, objects: ObjectStore, scratch: Path, operation: str
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=60, size=(160, 120))
    objects.put_file("in/clip.mp4", clip)
    p = Pipeline("progress")
    options: dict[str, Any] = {"text": "x"} if operation == "watermark" else {}
    if operation in ("normalise", "watermark", "concat"):
        options["preset"] = FAST
    source: Any = ["clip", "clip"] if operation == "concat" else "clip"
    media_step(p, operation, name="work", source=source, **options)  # type: ignore[arg-type]
    posted: list[StepMessage] = []
    ctx = ctx_for(p, "work", settings, objects, {"clip": "in/clip.mp4"}, posted)
    try:
        result = p.steps["work"].fn(ctx)["work"]
    finally:
        ctx._cleanup()
    reports = [m for m in posted if isinstance(m, Progressed)]
    values = [m.pct for m in reports]
    assert {m.message for m in reports} == {operation}
    assert values == sorted(values) and values[-1] == 100.0
    assert values[0] <= 10.0  # the download
    working = [v for v in values if 10.0 < v < 90.0]
    assert len(working) >= 5, values  # frames done / total, not a jump to the end
    assert result["source"] == source
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_calls_in_one_step_each_report_in_their_span_and_never_go_back(
    settings: Settings, tmp_path: Path, objects: ObjectStore, scratch: Path
) -> None:
    """Each call kept its own high-water mark: a step calling run_media twice went
    100 -> 10."""
    objects.put_file("in/clip.mp4", make_clip(tmp_path / "clip.mp4", frames=60, size=(160, 120)))
    p = Pipeline("two_calls")

    @p.step()
    def both(ctx: StepContext) -> dict[str, Any]:
        source = ObjectKey("in/clip.mp4")
        run_media(ctx, "normalise", source, preset=FAST, key="out/a{ext}", span=(0, 40))
        run_media(ctx, "thumbnail_grid", source, key="out/b{ext}", span=(40, 100))
        run_media(ctx, "thumbnail", source, key="out/c{ext}")  # all of the step: after 100
        with pytest.raises(StepParamsError, match="span"):
            run_media(ctx, "probe", source, span=(60, 20))
        return {}

    posted: list[StepMessage] = []
    ctx = ctx_for(p, "both", settings, objects, {}, posted)
    try:
        p.steps["both"].fn(ctx)
    finally:
        ctx._cleanup()
    reports = [(m.pct, m.message) for m in posted if isinstance(m, Progressed)]
    values = [pct for pct, _ in reports]
    assert values == sorted(values) and values[-1] == 100.0, reports
    normalised = [pct for pct, message in reports if message == "normalise"]
    grid = [pct for pct, message in reports if message == "thumbnail_grid"]
    assert normalised[-1] == 40.0 and all(0 < v <= 40 for v in normalised)
    assert len([v for v in normalised if 4 < v < 36]) >= 5, normalised  # its work, scaled
    assert grid[-1] == 100.0 and all(40 < v <= 100 for v in grid)
    assert [pct for pct, message in reports if message == "thumbnail"] == [100.0]
    assert list(scratch.iterdir()) == []


def test_an_object_key_source_is_read_from_the_object_store_only(
    settings: Settings, tmp_path: Path, objects: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key a client named, passed on by the pipeline's code: a file of that name in the
    worker's working folder, or an input or step of that name, is never what is read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips").mkdir()
    make_clip(tmp_path / "clips" / "a.mp4", frames=40, size=(320, 240))  # the server's file
    objects.put_file("clips/a.mp4", make_clip(tmp_path / "up.mp4", frames=10, size=(160, 120)))
    objects.put_file("clip", make_clip(tmp_path / "up2.mp4", frames=10, size=(96, 64)))
    p = Pipeline("keys")

    @p.step()
    def work(ctx: StepContext) -> dict[str, Any]:
        return {
            key: run_media(ctx, "probe", ObjectKey(key))
            for key in (ctx.inputs["key"], "clip", "work")
        }

    info = run(settings, p, {"key": "clips/a.mp4", "clip": str(tmp_path / "up.mp4")})
    assert info.status is ExecutionStatus.FAILED  # "work": no such object, not the step
    assert "work: no such object in the object store" in info.errors["work"], info.errors
    objects.put_file("work", make_clip(tmp_path / "up3.mp4", frames=10, size=(64, 48)))
    info = run(settings, p, {"key": "clips/a.mp4", "clip": str(tmp_path / "up.mp4")})
    assert info.status is ExecutionStatus.COMPLETED, info.errors
    sizes = {key: (r["info"]["width"], r["source"]) for key, r in info.data.items()}
    assert sizes == {
        "clips/a.mp4": (160, "clips/a.mp4"),  # the object, not ./clips/a.mp4
        "clip": (96, "clip"),  # the object, not the input named "clip"
        "work": (64, "work"),  # the object, not the step named "work"
    }
    objects.delete("clips/a.mp4")
    gone = run(settings, p, {"key": "clips/a.mp4", "clip": "x"})
    assert "clips/a.mp4: no such object in the object store" in gone.errors["work"]


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "audio_only"])
def test_a_bad_input_fails_the_step_naming_it_cleans_up_and_uploads_nothing(
    settings: Settings, tmp_path: Path, objects: ObjectStore, scratch: Path, corruption: str
) -> None:
    good = make_clip(
        tmp_path / "good.mp4",
        frames=60,
        size=(160, 120),
        tone_hz=330,
        options={"movflags": "faststart"},
    )
    if corruption == "garbage":
        bad = b"this is not a video\n" * 200
    elif corruption == "truncated":
        bad = good.read_bytes()[: good.stat().st_size * 2 // 3]
    else:
        sound = tmp_path / "voice.m4a"
        import av

        with av.open(str(sound), "w", format="mp4") as container:
            stream = container.add_stream("aac", rate=8000)
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 8000), np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate = 8000
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        bad = sound.read_bytes()
    objects.put("uploads/clip.mp4", bad)
    p = Pipeline("bad_input")
    media_step(p, "normalise", source="clip", preset=FAST, retries=1, retry_delay=0.01)
    media_step(p, "thumbnail", source="normalise")

    failed = run(settings, p, {"clip": "uploads/clip.mp4"})
    assert failed.status is ExecutionStatus.FAILED
    message = failed.errors["normalise"].splitlines()[0]
    assert message.startswith("MediaError: uploads/clip.mp4: "), message
    assert str(scratch) not in message  # the user's file, not the step's copy
    assert list(scratch.iterdir()) == []
    assert list(objects.list("media/")) == []

    # the cause fixed (a good upload under the same key), the execution is retried
    objects.put_file("uploads/clip.mp4", good)

    async def retry() -> Any:
        async with JobEngine(settings=settings) as engine:
            await engine.retry(failed.id, p)
            return await engine.wait(failed.id)

    done = asyncio.run(asyncio.wait_for(retry(), 120))
    assert done.status is ExecutionStatus.COMPLETED
    assert done.data["normalise"]["info"]["audio_codec"] == "aac"
    assert objects.exists(done.data["thumbnail"]["key"])
    assert list(scratch.iterdir()) == []


def test_a_bad_local_file_is_named_by_its_own_path(
    settings: Settings, tmp_path: Path, objects: ObjectStore, scratch: Path
) -> None:
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video")
    p = Pipeline("local_bad")
    media_step(p, "watermark", source="input", text="x")
    info = run(settings, p, {"input": str(notes)})
    assert f"{notes}: cannot be opened as a video file" in info.errors["watermark"]
    missing = run(settings, p, {"input": "uploads/nothing-here.mp4"})
    assert "uploads/nothing-here.mp4: no such file, nor object key" in missing.errors["watermark"]
    assert list(scratch.iterdir()) == []
    assert list(objects.list("")) == []


class PublishInputs(BaseModel):
    video: LocalPathOrKey
    width: int = 64


def test_a_declared_input_is_read_as_the_submit_confined_it(
    settings: Settings,
    tmp_path: Path,
    objects: ObjectStore,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 14: with its inputs declared, a media step never reads a file the submitter was
    not allowed (a relative value is an object key, not a file of the server's working
    folder); a local file inside the roots is copied without following links and named by its
    own path."""
    p = Pipeline("declared_media", inputs=PublishInputs)
    media_step(p, "normalise", source="video", width=Input("width"), preset=FAST)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    make_clip(uploads / "clip.mp4", frames=10, size=(160, 120))
    (tmp_path / "notes.mp4").write_text("not a video")

    def submit(inputs: dict[str, Any]) -> Any:
        async def main() -> Any:
            async with JobEngine(settings=settings) as engine:
                execution_id = await engine.submit(p, inputs, input_roots=[uploads])
                return await engine.wait(execution_id, raise_on_failure=False)

        return asyncio.run(asyncio.wait_for(main(), 120))

    monkeypatch.chdir(uploads)  # "clip.mp4" is a file here, but only a key to the submitter
    as_key = submit({"video": "clip.mp4"})
    assert as_key.status is ExecutionStatus.FAILED
    assert "MediaError: clip.mp4: no such object in the object store" in as_key.errors["normalise"]
    with pytest.raises(PathNotAllowedError):
        submit({"video": str(tmp_path / "notes.mp4")})

    done = submit({"video": str(uploads / "clip.mp4")})
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert done.data["normalise"]["info"]["width"] == 64
    assert done.data["normalise"]["source"] == "video"
    (uploads / "bad.mp4").write_text("not a video")
    bad = submit({"video": str(uploads / "bad.mp4")})
    message = bad.errors["normalise"].splitlines()[0]
    assert message.startswith(
        f"MediaError: {uploads / 'bad.mp4'}: cannot be opened as a video file"
    ), message
    assert str(scratch) not in message  # the user's file, not the step's copy
    assert list(scratch.iterdir()) == []


def test_run_media_in_a_step_of_your_own_with_a_key_template(
    settings: Settings, tmp_path: Path, objects: ObjectStore
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=20, size=(160, 120))
    logo = np.zeros((20, 40, 4), np.uint8)
    logo[..., 2], logo[..., 3] = 255, 255  # opaque red
    cv2.imwrite(str(tmp_path / "logo.png"), logo)
    objects.put_file("brand/logo.png", tmp_path / "logo.png")
    p = Pipeline("own")

    @p.step()
    def publish(ctx: StepContext) -> dict[str, Any]:
        marked = run_media(
            ctx,
            "watermark",
            "input",
            image="brand/logo.png",
            position="top-left",
            margin=0,
            opacity=1.0,
            preset=FAST,
            key="out/{inputs[name]}/marked{ext}",
        )
        ctx.progress(100)
        thumb = run_media(
            ctx, "thumbnail", marked["key"], at=0, key="out/{inputs[name]}/poster.png"
        )
        return {"video": marked["key"], "poster": thumb["key"]}

    info = run(settings, p, {"input": str(clip), "name": "spring"})
    assert info.status is ExecutionStatus.COMPLETED, info.errors
    assert info.data == {"video": "out/spring/marked.mp4", "poster": "out/spring/poster.png"}
    poster = cv2.imread(str(fetch(objects, "out/spring/poster.png", tmp_path / "f")))
    assert poster is not None
    assert poster[5:15, 5:35, 2].mean() > 200 and poster[5:15, 5:35, :2].mean() < 60


def test_a_stitch_step_lays_the_sound_of_a_step_or_an_input_under_its_frames(
    settings: Settings, tmp_path: Path, objects: ObjectStore
) -> None:
    """``stitch``'s ``audio`` is a source like ``watermark``'s ``image``: a step's output (and
    a dependency), or an input (a key read from the object store), so frames made from a video
    get its sound back."""
    clip = make_clip(tmp_path / "clip.mp4", frames=40, size=(160, 120), tone_hz=440)
    objects.put_file("uploads/clip.mp4", clip)
    p = Pipeline("restyle")
    media_step(p, "normalise", source="video", fps=10, preset=FAST)
    media_step(p, "extract_frames", name="frames", source="normalise")
    media_step(p, "stitch", source="frames", fps=10, preset=FAST, audio="normalise")
    media_step(
        p, "stitch", name="again", source="frames", fps=10, preset=FAST, audio=Input("sound")
    )
    assert set(p.steps["stitch"].depends_on) == {"frames", "normalise"}
    info = run(settings, p, {"video": "uploads/clip.mp4", "sound": "uploads/clip.mp4"})
    assert info.status is ExecutionStatus.COMPLETED, info.errors
    for step in ("stitch", "again"):
        out = fetch(objects, info.data[step]["key"], tmp_path / step)
        assert probe(out).audio_duration == pytest.approx(1.6, abs=0.05)
        samples, rate = audio_of(out)
        assert dominant_hz(samples[int(0.2 * rate) : int(1.4 * rate)], rate) == pytest.approx(
            440, abs=5
        )


def test_media_steps_are_checked_when_added(tmp_path: Path) -> None:
    p = Pipeline("checked")
    with pytest.raises(StepParamsError, match=r"normalise takes no option\(s\) colour"):
        media_step(p, "normalise", colour="red")
    with pytest.raises(StepParamsError, match="bad key template"):
        media_step(p, "normalise", key="media/{nope}.mp4")
    with pytest.raises(StepParamsError, match="only concat takes a list"):
        media_step(p, "normalise", source=["a", "b"])
    with pytest.raises(ValueError, match="unknown media operation 'blur'"):
        media_step(p, "blur")  # type: ignore[arg-type]
    assert set(OPERATIONS) == {
        "probe",
        "normalise",
        "extract_frames",
        "stitch",
        "thumbnail",
        "thumbnail_grid",
        "watermark",
        "concat",
        "decode_qr",
    }
    assert list(p.steps) == []


def test_a_missing_input_option_names_the_input(settings: Settings, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=10, size=(64, 48))
    p = Pipeline("inputs")
    media_step(p, "normalise", width=Input("width"), preset=FAST)
    info = run(settings, p, {"input": str(clip)})
    assert "option width= reads input 'width'" in info.errors["normalise"]
    done = run(settings, p, {"input": str(clip), "width": 32})
    assert done.data["normalise"]["info"]["width"] == 32


@pytest.mark.parametrize("fix", ["raise_the_limit", "replace_the_input"])
def test_a_video_above_the_pixel_limit_fails_the_step_then_retries_once_fixed(
    settings: Settings,
    tmp_path: Path,
    objects: ObjectStore,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
    fix: str,
) -> None:
    large = make_clip(tmp_path / "large.mp4", frames=20, size=(320, 240))
    objects.put_file("uploads/clip.mp4", large)
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", str(160 * 120))  # read by the step
    p = Pipeline("huge")
    media_step(p, "normalise", source="clip", width=160, preset=FAST)
    media_step(p, "thumbnail", source="normalise")

    failed = run(settings, p, {"clip": "uploads/clip.mp4"})
    assert failed.status is ExecutionStatus.FAILED
    message = failed.errors["normalise"].splitlines()[0]
    assert message.startswith(
        "MediaError: uploads/clip.mp4: its picture is 320x240 (76,800 "
        "pixels), larger than the limit of 19,200 pixels"
    ), message
    assert "FRAMEPIPE_MEDIA_MAX_PIXELS" in message
    assert str(scratch) not in message
    assert failed.step("thumbnail").status is not StepStatus.COMPLETED
    assert list(scratch.iterdir()) == []  # the step's temp folder (and its download) is gone
    assert list(objects.list("media/")) == []  # nothing uploaded

    if fix == "raise_the_limit":
        monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", str(320 * 240))
    else:
        objects.put_file(
            "uploads/clip.mp4", make_clip(tmp_path / "small.mp4", frames=20, size=(160, 120))
        )

    async def retry() -> Any:
        async with JobEngine(settings=settings) as engine:
            await engine.retry(failed.id, p)
            return await engine.wait(failed.id)

    done = asyncio.run(asyncio.wait_for(retry(), 120))
    assert done.status is ExecutionStatus.COMPLETED, done.errors
    info = done.data["normalise"]["info"]
    assert (info["width"], info["height"], info["frames"]) == (160, 120, 20)
    assert objects.exists(done.data["thumbnail"]["key"])
    assert list(scratch.iterdir()) == []


def test_the_step_passes_the_setting_in_and_a_bad_one_fails_it_naming_it(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The media functions read no setting; the step reads ``media_max_pixels`` when it runs
    and passes it in, so a bad value fails the step with ConfigError naming the variable."""
    clip = make_clip(tmp_path / "clip.mp4", frames=5, size=(160, 120))
    p = Pipeline("setting")
    media_step(p, "probe", source="clip")
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", "lots")
    failed = run(settings, p, {"clip": str(clip)})
    assert failed.status is ExecutionStatus.FAILED
    assert failed.errors["probe"].startswith("ConfigError:"), failed.errors["probe"]
    assert "FRAMEPIPE_MEDIA_MAX_PIXELS" in failed.errors["probe"]
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", "10000")
    refused = run(settings, p, {"clip": str(clip)})
    assert "larger than the limit of 10,000 pixels (100x100)" in refused.errors["probe"]
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", "0")  # no limit
    done = run(settings, p, {"clip": str(clip)})
    assert done.data["probe"]["info"]["width"] == 160


def test_the_pixel_limit_is_a_step_option_too(
    settings: Settings, tmp_path: Path, objects: ObjectStore
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=5, size=(320, 240))
    p = Pipeline("option")
    media_step(p, "probe", source="clip", max_pixels=Input("max_pixels", None))
    refused = run(settings, p, {"clip": str(clip), "max_pixels": 1000})
    assert f"{clip}: its picture is 320x240" in refused.errors["probe"]
    allowed = run(settings, p, {"clip": str(clip)})  # no input: the setting (8192x8192)
    assert allowed.data["probe"]["info"]["width"] == 320
    assert allowed.data["probe"]["info"]["variable_frame_rate"] is False


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("operation", ["normalise", "extract_frames", "watermark"])
def test_a_cancel_stops_the_step_at_the_next_frame_of_a_clip_of_unknown_length(
    settings: Settings,
    tmp_path: Path,
    objects: ObjectStore,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
) -> None:
    """A step is stopped by a cancel when it reports progress, and the toolkit reports once per
    whole percent of the length the header announces: a raw .h264 stream announces none, so
    a cancelled step decoded the whole clip and wrote its whole output before it noticed (at
    its report of 100 %). The cancel here comes as the download is reported (10 %), before
    the first frame is decoded: the step's work folder holds the download and nothing else
    when it is removed."""
    clip = make_clip(tmp_path / "clip.h264", frames=50, size=(96, 64))
    objects.put_file("in/clip.h264", clip)
    p = Pipeline("cancelled")
    options: dict[str, Any] = {"extract_frames": {}, "normalise": {"preset": FAST}}.get(
        operation, {"preset": FAST, "text": "x"}
    )
    media_step(p, operation, name="work", source="clip", **options)  # type: ignore[arg-type]
    posted: list[StepMessage] = []
    ctx = ctx_for(p, "work", settings, objects, {"clip": "in/clip.h264"}, posted)

    def post(message: StepMessage) -> None:
        posted.append(message)
        if isinstance(message, Progressed):
            ctx._cancel.set()  # as the scheduler does when the execution is cancelled

    ctx._post = post
    left: list[str] = []  # the files of the step's work folder when it was removed
    remove = shutil.rmtree

    def removing(path: Any, *args: Any, **kwargs: Any) -> None:
        folder = Path(path)
        if folder.is_relative_to(scratch):
            left.extend(
                str(f.relative_to(folder))
                for f in folder.rglob("*")
                if f.is_file() and f.name != MARKER  # the folder's own, not the step's
            )
        remove(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", removing)
    try:
        with pytest.raises(StepCancelledError):
            p.steps["work"].fn(ctx)
    finally:
        ctx._cleanup()
    assert sorted(left) == ["in0/clip.h264"]  # no output, not even one image
    assert [m.pct for m in posted if isinstance(m, Progressed)] == [10.0]  # the download
    assert list(objects.list("media/")) == []
    assert list(scratch.iterdir()) == []
