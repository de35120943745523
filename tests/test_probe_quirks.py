"""``probe`` on files whose container tells another story than their video stream: a Matroska
file whose sound outlasts its video, and MP4s trimmed without re-encoding (``ffmpeg -ss ...
-c copy``: an edit list hides the samples before the cut)."""

from __future__ import annotations

import itertools
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import pytest

from framepipe.media import probe
from framepipe.media.timing import estimate_frames
from media import counter_image, make_clip, need_tool


def ffmpeg(*args: str | Path) -> None:
    command = [need_tool("ffmpeg"), "-v", "error", "-y", *map(str, args)]
    subprocess.run(command, check=True)


# -- a video shorter than its sound --------------------------------------------------------------


def test_an_mkv_whose_sound_outlasts_its_video_gives_the_videos_duration(tmp_path: Path) -> None:
    """Matroska gives no stream a duration, and the file's duration is its longest track's:
    probe gave the 1 s video of a file with 3 s of sound a duration of 3.02 s (and 76 frames)."""
    clip = make_clip(tmp_path / "short.mkv", frames=25, tone_hz=440, audio_seconds=3.0)
    with av.open(str(clip)) as container:
        assert container.streams.video[0].duration is None
        assert container.duration is not None and container.duration / av.time_base > 3.0
    info = probe(clip)
    assert info.duration == pytest.approx(1.0, abs=0.002)
    assert info.frames == 25
    assert info.container_duration == pytest.approx(3.02, abs=0.01)
    assert info.audio_duration == pytest.approx(3.0, abs=0.05)
    # the same in an MP4 (whose streams have their own durations)
    mp4 = probe(make_clip(tmp_path / "short.mp4", frames=25, tone_hz=440, audio_seconds=3.0))
    assert mp4.duration == pytest.approx(1.0, abs=0.002)
    assert mp4.frames == 25
    assert mp4.container_duration == pytest.approx(3.0, abs=0.01)
    assert mp4.audio_duration == pytest.approx(3.0, abs=0.05)
    # a video alone: the container's duration is the video's
    alone = probe(make_clip(tmp_path / "alone.mkv", frames=25))
    assert alone.duration == alone.container_duration == pytest.approx(1.0, abs=0.002)
    # the media steps' progress totals estimate the same video's frames, not the sound's
    with av.open(str(clip)) as container:
        assert estimate_frames(container.streams.video[0], container) == 25


@pytest.mark.parametrize("written", ["to a pipe", "live"])
def test_an_mkv_without_track_durations_gives_where_its_video_ends(
    tmp_path: Path, written: str
) -> None:
    """Written to a pipe (or as a live stream), a Matroska file has no ``DURATION`` tags: the
    video's length is where its last packet ends (pts plus duration), from its start."""
    clip = make_clip(tmp_path / "short.mkv", frames=25, tone_hz=440, audio_seconds=3.0)
    out = tmp_path / "out.mkv"
    if written == "live":
        ffmpeg("-i", clip, "-c", "copy", "-live", "1", out)
    else:
        with out.open("wb") as pipe:
            command = [need_tool("ffmpeg"), "-v", "error", "-i", str(clip), "-c", "copy"]
            subprocess.run([*command, "-f", "matroska", "pipe:1"], stdout=pipe, check=True)
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.duration is None and not video.metadata.get("DURATION")
        assert video.start_time  # the sound's priming moved the video's start
        whole = container.duration
        assert (whole is None) == (written == "live")
    info = probe(out)
    assert info.duration == pytest.approx(1.0, abs=0.002)
    assert info.frames == 25
    if whole is not None:
        assert info.container_duration == pytest.approx(3.02, abs=0.01)
    else:
        assert info.container_duration is None
    assert info.audio_duration == pytest.approx(3.0, abs=0.05)


# -- the frame rate of a trimmed clip ------------------------------------------------------------


def b_frame_clip(path: Path, times_ms: list[int]) -> Path:
    """An H.264 MP4 with B-frames (two between references, a fixed pattern), frame ``i``
    showing :func:`counter_image` ``(i)`` at ``times_ms[i]`` (time base 1/1000)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"preset": "veryfast", "x264-params": "bframes=2:b-adapt=0"}
        for i, at in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(counter_image(i % 256), format="bgr24")
            frame.pts, frame.time_base = at, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def trimmed(src: Path, dst: Path, start: str) -> Path:
    ffmpeg("-ss", start, "-i", src, "-c", "copy", dst)
    return dst


def hidden_among_shown(path: Path) -> bool:
    """Whether, in decoding order, a sample the edit list hides comes after one it shows."""
    with av.open(str(path)) as container:
        flags = [entry.is_discard for entry in container.streams.video[0].index_entries]
    return any(shown_first and hidden for shown_first, hidden in itertools.pairwise(flags))


def decoded_intervals(path: Path) -> set[int]:
    with av.open(str(path)) as container:
        times = sorted(frame.pts for frame in container.decode(video=0) if frame.pts is not None)
    return {b - a for a, b in itertools.pairwise(times)}


def test_a_trimmed_constant_rate_clip_with_b_frames_is_constant(tmp_path: Path) -> None:
    """``ffmpeg -ss 1 -c copy`` on a 25 fps clip with B-frames: in decoding order (the order
    of the index's timestamps) the samples the edit list hides are interleaved with the first
    ones it shows, so the gaps between the shown samples' decoding times were irregular and
    probe called the constant rate variable."""
    clip = b_frame_clip(tmp_path / "clip.mp4", [40 * i for i in range(100)])
    assert probe(clip).variable_frame_rate is False
    for start in ("0.5", "1", "1.5", "2"):
        cut = trimmed(clip, tmp_path / f"cut{start}.mp4", start)
        assert hidden_among_shown(cut), start
        assert len(decoded_intervals(cut)) == 1, start  # what plays is at a constant rate
        info = probe(cut)
        assert info.variable_frame_rate is False, start
        assert info.fps == pytest.approx(25.0, rel=0.01)


def test_a_trimmed_variable_rate_clip_is_judged_on_the_frames_that_play(tmp_path: Path) -> None:
    """A variable rate after the cut is still variable; one that only the hidden samples had
    is not."""
    regular = [40 * i for i in range(50)]
    burst = [0, 10, 20, 30, 300, 340, 700, 740, 780, 820, 860, 900, 1300, 1340, 1380]
    tail = b_frame_clip(tmp_path / "tail.mp4", regular + [2000 + t for t in burst])
    head = b_frame_clip(tmp_path / "head.mp4", burst + [1500 + t for t in regular])
    assert probe(tail).variable_frame_rate is True
    assert probe(head).variable_frame_rate is True
    cut_tail = trimmed(tail, tmp_path / "cut_tail.mp4", "1")
    assert len(decoded_intervals(cut_tail)) > 1
    assert probe(cut_tail).variable_frame_rate is True
    cut_head = trimmed(head, tmp_path / "cut_head.mp4", "1.7")
    assert len(decoded_intervals(cut_head)) == 1
    assert probe(cut_head).variable_frame_rate is False
