"""``probe`` on files whose container tells another story than their video stream: a Matroska
file whose sound outlasts its video (also for the thumbnails' middle), one without track
durations (measured, reading the file once), and MP4s trimmed without re-encoding
(``ffmpeg -ss ... -c copy``: an edit list hides the samples before the cut); which packets
play in a Matroska file that starts with an open GOP's leading pictures."""

from __future__ import annotations

import io
import itertools
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import pytest

from framepipe.media import probe, thumbnail, thumbnail_grid
from framepipe.media.timing import estimate_frames
from framepipe.video_length import plays
from media import counter_image, make_clip, make_vfr_clip, need_tool, read_counter


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


def test_thumbnails_of_an_mkv_whose_sound_outlasts_its_video_take_the_videos_middle(
    tmp_path: Path,
) -> None:
    """``thumbnail``'s default is the middle of the video, and ``thumbnail_grid`` spreads its
    tiles over the video: not over the container's 10 s, which a 2 s video with 10 s of sound
    has (the middle was 5.01 s, past the video's end: its last frame, on every tile)."""
    frames = make_vfr_clip(tmp_path / "counter.mp4", [40 * i for i in range(50)])
    clip = tmp_path / "short.mkv"
    sound = ["-f", "lavfi", "-i", "sine=frequency=440:duration=10"]
    ffmpeg("-i", frames, *sound, "-c:v", "copy", "-c:a", "aac", clip)
    with av.open(str(clip)) as container:
        assert container.streams.video[0].duration is None
        assert container.duration is not None and container.duration / av.time_base > 9.9
    assert probe(clip).duration == pytest.approx(2.0, abs=0.002)
    middle = cv2.imread(str(thumbnail(clip, tmp_path / "middle.png")))
    assert middle is not None and read_counter(middle) == 25  # shown from 1.00 s
    sheet = cv2.imread(str(thumbnail_grid(clip, tmp_path / "grid.png", cols=2, rows=1, width=320)))
    assert sheet is not None and sheet.shape[:2] == (120, 320)
    assert [read_counter(sheet[:, :160]), read_counter(sheet[:, 160:])] == [12, 37]  # 0.5, 1.5 s


def test_a_wrong_container_duration_is_not_taken_for_the_sounds(tmp_path: Path) -> None:
    """A Matroska file written to a pipe takes the container's duration from its streams'
    ``DURATION`` metadata, which a copy carries over from its source (here: set to 1 s, while
    both tracks last 4 s), and writes no tags. The sound, which has neither a duration nor a
    tag, is measured as the video is (audio_duration was the container's 1 s)."""
    clip = make_clip(tmp_path / "four.mkv", frames=100, size=(160, 120), tone_hz=440)
    out = tmp_path / "piped.mkv"
    with out.open("wb") as pipe:
        command = [need_tool("ffmpeg"), "-v", "error", "-i", str(clip), "-c", "copy"]
        stale = ["-metadata:s", "DURATION=00:00:01.000"]
        subprocess.run([*command, *stale, "-f", "matroska", "pipe:1"], stdout=pipe, check=True)
    with av.open(str(out)) as container:
        assert container.duration == 1_000_000
        for stream in container.streams:
            assert stream.duration is None and not stream.metadata.get("DURATION")
    info = probe(out)
    assert info.container_duration == pytest.approx(1.0)
    assert info.duration == pytest.approx(4.0, abs=0.002)
    assert info.frames == 100
    assert info.audio_duration == pytest.approx(4.0, abs=0.05)


class CountingReader(io.RawIOBase):
    """A file PyAV reads through, counting the bytes it is given."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.file = open(path, "rb")  # noqa: SIM115 (closed with the reader)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.file.readinto(buffer)
        self.bytes_read += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()
        super().close()


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[CountingReader]:
    """From now on, every file PyAV opens is read through a :class:`CountingReader` (listed
    in the list returned)."""
    opened: list[CountingReader] = []
    real_open = av.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        reader = CountingReader(file)
        opened.append(reader)
        return real_open(reader, *args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    return opened


def test_probing_a_live_mkv_reads_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A live Matroska file tells no length at all (no track durations, tags, container
    duration): probe measures where its video and its sound end in the pass that samples the
    frame rate. After that sample it read all of it twice (once for the video, once for the
    sound): 2.7 times the file's size here."""
    clip = make_clip(tmp_path / "clip.mkv", frames=500, size=(160, 120), tone_hz=440)
    live = tmp_path / "live.mkv"
    ffmpeg("-i", clip, "-c", "copy", "-live", "1", live)
    with av.open(str(live)) as container:
        assert container.duration is None
        assert all(not stream.metadata.get("DURATION") for stream in container.streams)
    readers = count_reads(monkeypatch)
    info = probe(live)
    assert info.duration == pytest.approx(20.0, abs=0.002)
    assert info.frames == 500
    assert info.audio_duration == pytest.approx(20.0, abs=0.05)
    (reader,) = readers
    assert reader.bytes_read <= live.stat().st_size


def test_probing_an_indexed_mkv_without_tags_reads_its_tail_not_all_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Matroska file with cues and a duration but no ``DURATION`` tags (as muxers other than
    FFmpeg's and mkvmerge write it; here FFmpeg's, with the tags renamed): the video and the
    sound are measured from the keyframe before the end, found through the cues, so what is
    read is the frame-rate sample at the head (300 of 1500 frames) and the tail."""
    clip = tmp_path / "clip.mkv"
    sources = ["testsrc2=size=160x120:rate=25:duration=60", "sine=frequency=440:duration=60"]
    inputs = [arg for source in sources for arg in ("-f", "lavfi", "-i", source)]
    ffmpeg(*inputs, "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", clip)
    untagged = tmp_path / "untagged.mkv"
    data = clip.read_bytes()
    assert data.count(b"DURATION") == 2  # one tag a track
    untagged.write_bytes(data.replace(b"DURATION", b"XURATION"))
    with av.open(str(untagged)) as container:
        assert container.duration is not None
        for stream in container.streams:
            assert stream.duration is None and not stream.metadata.get("DURATION")
    readers = count_reads(monkeypatch)
    info = probe(untagged)
    assert info.duration == pytest.approx(60.0, abs=0.002)
    assert info.frames == 1500
    assert info.audio_duration == pytest.approx(60.0, abs=0.05)
    (reader,) = readers
    assert reader.bytes_read < 0.75 * untagged.stat().st_size


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


# -- which packets play ----------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["libx264", "mpeg2video"])
def test_the_leading_pictures_an_mkv_starts_with_do_not_play(tmp_path: Path, codec: str) -> None:
    """A recording that starts at an open GOP's I-frame: the two B-frames that follow it in
    decoding order come before it in time, refer to a picture the file lacks, and the decoder
    drops them; nothing flags them, but they are timed before the stream's start (its first
    packet's time), which is how :func:`plays` tells them (counting them, the packets that
    play were two more than the frames the decoder shows)."""
    gop = "bframes=2:b-adapt=0:open-gop=1:keyint=24:min-keyint=24:scenecut=0"
    options: dict[str, dict[str, str]] = {
        "libx264": {"x264-params": gop},  # an open GOP every 24 frames
        "mpeg2video": {"bf": "2", "g": "12"},  # FFmpeg's MPEG-2 GOPs are open by default
    }
    source = tmp_path / "source.mkv"
    with av.open(str(source), "w") as container:
        stream = container.add_stream(codec, rate=25)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {**options[codec]}
        for i in range(100):
            frame = av.VideoFrame.from_ndarray(counter_image(i), format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    recording = tmp_path / "recording.mkv"
    with av.open(str(source)) as container, av.open(str(recording), "w") as out:
        packets = [packet for packet in container.demux(video=0) if packet.size]
        key = [i for i, packet in enumerate(packets) if packet.is_keyframe][1]
        copy = out.add_stream_from_template(container.streams.video[0])
        for packet in packets[key:]:
            packet.stream = copy
            out.mux(packet)
    with av.open(str(recording)) as container:
        video = container.streams.video[0]
        start = video.start_time
        packets = [packet for packet in container.demux(video) if packet.size]
    assert start is not None and not any(packet.is_discard for packet in packets)
    early = [packet for packet in packets if packet.pts is not None and packet.pts < start]
    assert len(early) == 2
    with av.open(str(recording)) as container:
        shown = [frame.pts for frame in container.decode(video=0)]
    assert len(shown) == len(packets) - 2 and all(t is not None and t >= start for t in shown)
    assert sum(plays(packet, start) for packet in packets) == len(shown)
