"""Store and forward of a FrameStore (``spool=``): frames the object store refuses while it is
down are kept locally, listed as ``spooled`` in their segments, and uploaded under their keys
by the next run once the store is back (``frames.uploaded``); on a real S3 server that is
stopped and started again."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from framepipe import LocalObjectStore
from framepipe.backends.objects import S3ObjectStore
from framepipe.errors import ObjectStoreError
from framepipe.frames import Frame
from framepipe.logs import get_logger
from framepipe.sources import PatternSource
from framepipe.stream import FrameStore, Segmenter, Stage, StreamPipeline
from framepipe.stream.spool import Spool
from s3server import REGION, _wait_listening, aws_test_env, start_moto
from test_stream import Events, of, run_pipeline, tagger
from waiting import free_port, wait_until_async

pytestmark = pytest.mark.slow  # an S3 server started twice

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")


def _moto(port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = start_moto(port, log)
    assert _wait_listening(proc, port, time.monotonic() + 60), log.read_text()[-2000:]
    return proc


def _s3_with_bucket(
    tmp_path: Path, bucket: str = "frames"
) -> tuple[int, str, subprocess.Popen[bytes], Any]:
    """A moto S3 server on a free port (log in ``tmp_path``) holding ``bucket``: its port,
    endpoint, process and a boto3 client of it. Call inside ``aws_test_env()``."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = _moto(port, tmp_path / "s3.log")
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    client.create_bucket(Bucket=bucket)
    return port, endpoint, proc, client


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _run_until_uploaded(pipeline: StreamPipeline, count: int) -> Events:
    """Run ``pipeline`` (a long paced source) until its spool reports ``count`` frames
    uploaded, then stop it: however long the uploads take on a busy machine (60 s at most)."""
    events: Events = []
    pipeline.on_event(lambda kind, data: events.append((kind, data)))

    async def main() -> None:
        await pipeline.start()
        try:
            while sum(d["count"] for d in of(events, "frames.uploaded")) < count:
                if pipeline.state in ("stopped", "failed"):
                    break
                await asyncio.sleep(0.05)
        finally:
            await pipeline.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
    return events


def test_frames_refused_while_the_store_is_down_are_kept_and_uploaded_once_it_is_back(
    tmp_path: Path,
) -> None:
    with aws_test_env():
        port, endpoint, proc, client = _s3_with_bucket(tmp_path)
        store = S3ObjectStore("frames", endpoint_url=endpoint, max_attempts=1, connect_timeout=1)
        spool = tmp_path / "spool"
        _stop(proc)  # the store goes down

        events = run_pipeline(
            StreamPipeline(
                "s",
                PatternSource("s", count=40, realtime=False),
                stages=[Stage(tagger({range(1, 21): "A", range(21, 41): "B"}))],
                segmenter=Segmenter("order", timeout=5),
                sinks=[FrameStore(store, spool=spool, spool_retry=0.2)],
            )
        )
        completed = {d["segment_id"]: d for d in of(events, "segment.completed")}
        assert set(completed) == {"A", "B"}
        for seg in completed.values():
            assert (seg["stored"], seg["not_stored"], len(seg["spooled"])) == ([], 0, 20)
        assert not [d for d in of(events, "processor.error") if d["stage"] == "frame_store"]
        kept = sorted(completed["A"]["spooled"] + completed["B"]["spooled"])
        assert sorted(i.key for i in LocalObjectStore(spool).list()) == kept

        proc = _moto(port, tmp_path / "s3.log")  # back (moto starts empty)
        try:
            client.create_bucket(Bucket="frames")
            later = _run_until_uploaded(  # the next run uploads what the last one kept
                StreamPipeline(
                    "s",
                    PatternSource("s", count=600, fps=10, realtime=True),
                    sinks=[FrameStore(store, spool=spool, spool_retry=0.2)],
                ),
                40,
            )
            uploads = of(later, "frames.uploaded")
            assert sum(u["count"] for u in uploads) == 40, uploads
            assert sorted(k for u in uploads for k in u["keys"]) == kept
            in_store = sorted(o["Key"] for o in client.list_objects_v2(Bucket="frames")["Contents"])
            assert in_store == kept
            assert list(LocalObjectStore(spool).list()) == []
            first = store.get(kept[0])
            assert first[:2] == b"\xff\xd8"  # a JPEG, as it would have been stored
        finally:
            client.close()
            store.close()
            _stop(proc)


def test_a_frame_whose_key_the_store_cannot_hold_is_not_kept(tmp_path: Path) -> None:
    """Kept, it would be refused again: a key conflict fails the frame (``not_stored``) as
    without a spool, and nothing is kept."""
    store = LocalObjectStore(tmp_path / "objects")
    blocker = tmp_path / "objects" / "frames" / "s" / "B"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")
    events = run_pipeline(
        StreamPipeline(
            "s",
            PatternSource("s", count=20, realtime=False),
            stages=[Stage(tagger({range(1, 11): "A", range(11, 21): "B"}))],
            segmenter=Segmenter("order", timeout=5),
            sinks=[FrameStore(store, spool=tmp_path / "spool")],
        )
    )
    completed = {d["segment_id"]: d for d in of(events, "segment.completed")}
    assert (completed["B"]["not_stored"], completed["B"]["spooled"]) == (10, [])
    assert (completed["A"]["not_stored"], len(completed["A"]["stored"])) == (0, 10)
    assert list(LocalObjectStore(tmp_path / "spool").list()) == []


def test_a_full_spool_keeps_no_more_and_says_so(tmp_path: Path) -> None:
    """A long outage must not fill the disk: past ``spool_max_bytes`` a refused frame is not
    kept; it is ``not_stored`` and its ``processor.error`` says the spool is full."""
    with aws_test_env():
        _, endpoint, proc, client = _s3_with_bucket(tmp_path)
        store = S3ObjectStore("frames", endpoint_url=endpoint, max_attempts=1, connect_timeout=1)
        _stop(proc)
        source = PatternSource("s", count=10, realtime=False, moving_box=False)
        one = len(Frame(source.render(0), "s", 1).to_jpeg(85))  # every frame is this picture
        events = run_pipeline(
            StreamPipeline(
                "s",
                source,
                stages=[Stage(tagger({range(1, 11): "A"}))],
                segmenter=Segmenter("order", timeout=5),
                sinks=[FrameStore(store, spool=tmp_path / "spool", spool_max_bytes=4 * one)],
            )
        )
        client.close()
        store.close()
    (seg,) = of(events, "segment.completed")
    assert (len(seg["spooled"]), seg["not_stored"]) == (4, 6)
    errors = [d["error"] for d in of(events, "processor.error") if d["stage"] == "frame_store"]
    assert len(errors) == 6 and all("spool" in e and "is full" in e for e in errors), errors
    assert len(list(LocalObjectStore(tmp_path / "spool").list())) == 4


def test_best_frames_the_store_cannot_copy_leave_their_segment_short_not_the_pipeline_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket of the best frames is down when the segments close: each segment completes
    with its frames stored, no best frame in ``selected``, the shortfall in
    ``not_selected`` and one warning naming it; the pipeline goes on to the end."""
    with aws_test_env():
        _, endpoint, proc, client = _s3_with_bucket(tmp_path, "selected")
        client.close()
        down = S3ObjectStore("selected", endpoint_url=endpoint, max_attempts=1, connect_timeout=1)
        _stop(proc)  # the store goes down
        pipeline = StreamPipeline(
            "s",
            PatternSource("s", count=40, realtime=False),
            stages=[Stage(tagger({range(1, 21): "A", range(21, 41): "B"}))],
            segmenter=Segmenter("order", timeout=5),
            sinks=[
                FrameStore(
                    LocalObjectStore(tmp_path / "frames"), select_best=2, selected_store=down
                )
            ],
        )
        try:
            events = run_pipeline(pipeline)
        finally:
            down.close()
    assert not of(events, "pipeline.failed")
    completed = {d["segment_id"]: d for d in of(events, "segment.completed")}
    assert set(completed) == {"A", "B"}
    for seg in completed.values():
        assert (len(seg["stored"]), seg["selected"], seg["not_selected"]) == (20, [], 2)
    warned = [
        r.getMessage() for r in caplog.records if "best frames were not copied" in r.getMessage()
    ]
    assert len(warned) == 2 and "segment A: 2 of its 2 best frames" in warned[0]


def test_a_pipeline_started_again_goes_on_uploading_what_its_spool_kept(tmp_path: Path) -> None:
    """The same pipeline (and frame store) stopped during an outage and started again, as an
    app's pause and resume or a recovery do: what its spool kept is uploaded once the store is
    back, and so is what it keeps after the restart."""
    with aws_test_env():
        port, endpoint, proc, client = _s3_with_bucket(tmp_path)
        store = S3ObjectStore("frames", endpoint_url=endpoint, max_attempts=1, connect_timeout=1)
        _stop(proc)  # the store goes down
        frame_store = FrameStore(store, spool=tmp_path / "spool", spool_retry=0.2)
        pipeline = StreamPipeline(
            "s",
            PatternSource("s", fps=20, realtime=True),
            sinks=[frame_store],
            stages=[Stage(tagger({range(1, 10_000): "A"}))],
            segmenter=Segmenter("order", timeout=5),
        )
        events: Events = []
        pipeline.on_event(lambda kind, data: events.append((kind, data)))
        spool = LocalObjectStore(tmp_path / "spool")

        async def main() -> None:
            await pipeline.start()
            await wait_until_async("frames kept", lambda: len(list(spool.list())) >= 5)
            await pipeline.stop()
            kept = len(list(spool.list()))
            await pipeline.start()
            await wait_until_async("more frames kept", lambda: len(list(spool.list())) > kept)
            await asyncio.to_thread(_moto_back)
            await wait_until_async(
                "every kept frame uploaded",
                lambda: not list(spool.list()) and of(events, "frames.uploaded"),
                timeout=60,
            )
            await pipeline.stop()

        def _moto_back() -> None:
            nonlocal proc
            proc = _moto(port, tmp_path / "s3.log")  # back (moto starts empty)
            client.create_bucket(Bucket="frames")

        try:
            asyncio.run(asyncio.wait_for(main(), 120))
            uploaded = sorted(k for u in of(events, "frames.uploaded") for k in u["keys"])
            listed = client.list_objects_v2(Bucket="frames")["Contents"]
            assert set(uploaded) <= {o["Key"] for o in listed} and len(uploaded) >= 6
        finally:
            client.close()
            store.close()
            _stop(proc)


def test_the_spool_log_names_its_folder_and_the_store(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """Stations keep frames in folders of their own: each line says which folder and which
    object store, so three stations in one outage give three lines one can tell apart."""
    kept = LocalObjectStore(tmp_path / "spool" / "T7")
    target = LocalObjectStore(tmp_path / "objects")
    (tmp_path / "objects").rmdir()  # its disk is gone: every put is refused
    spool = Spool(
        kept,
        target,
        retry_every=60,
        uploaded=lambda n, keys: None,
        log=get_logger("x"),
        max_bytes=1 << 20,
    )
    spool.keep("frames/T7/A/1.jpg", b"\xff\xd8jpeg")
    assert spool.drain() == 0
    (tmp_path / "objects").mkdir()  # back
    assert spool.drain() == 1
    lines = [r.getMessage() for r in logs.records if r.name == "framepipe.x"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"frames kept in {kept.url} while the object store {target.url} ")
    assert lines[1] == f"1 frame(s) kept in {kept.url} uploaded to {target.url}"


def test_a_store_that_hangs_sends_the_frames_to_the_spool_not_the_camera_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An S3 server that hangs (SIGSTOP: it accepts connections and never answers) holds the
    first frames for its read timeout; the frames after them go to the spool at once, until
    the store takes a kept frame again, so the station keeps up with its camera instead of
    storing one frame per timeout. Said once; once the server answers again, the kept frames
    are uploaded and new ones stored as before."""
    with aws_test_env():
        _, endpoint, proc, client = _s3_with_bucket(tmp_path)
        store = S3ObjectStore(
            "frames", endpoint_url=endpoint, max_attempts=1, connect_timeout=1, read_timeout=1
        )
        spool = tmp_path / "spool"
        proc.send_signal(signal.SIGSTOP)  # the store hangs
        try:
            events: Events = []
            pipeline = StreamPipeline(
                "s",
                PatternSource("s", fps=20, realtime=True),
                stages=[Stage(tagger({range(1, 10_000): "A"}))],
                segmenter=Segmenter("order", timeout=5),
                sinks=[FrameStore(store, spool=spool, spool_retry=0.5, workers=2)],
            )
            pipeline.on_event(lambda kind, data: events.append((kind, data)))

            async def hang() -> None:
                await pipeline.start()
                await asyncio.sleep(4)
                await pipeline.stop()

            with caplog.at_level(logging.WARNING):
                asyncio.run(asyncio.wait_for(hang(), 60))
            (order,) = of(events, "segment.completed")
            assert order["frames"] >= 50, order["frames"]  # 80 made in 4 s; 8 at one a timeout
            assert len(order["spooled"]) + order["not_stored"] >= order["frames"] - 4
            away = [r for r in caplog.records if "until it takes them again" in r.getMessage()]
            assert len(away) == 1, [r.getMessage() for r in caplog.records]
        finally:
            proc.send_signal(signal.SIGCONT)
        try:
            kept = len(order["spooled"])
            later = _run_until_uploaded(
                StreamPipeline(
                    "s",
                    PatternSource("s", fps=10, realtime=True),
                    stages=[Stage(tagger({range(1, 10_000): "B"}))],
                    segmenter=Segmenter("order", timeout=5),
                    sinks=[FrameStore(store, spool=spool, spool_retry=0.2)],
                ),
                kept,
            )
            assert sum(u["count"] for u in of(later, "frames.uploaded")) == kept
            (back,) = of(later, "segment.completed")
            assert back["stored"], back  # stored directly again once the store answers
        finally:
            client.close()
            store.close()
            _stop(proc)


def test_a_kept_frame_refused_for_its_key_is_set_aside_and_the_spool_goes_on(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """The store is back, but the first kept frame's key conflicts with an object there (a
    file where its folder should be): that frame is set aside with one error naming its key
    and why, the frames after it are uploaded, and the store is no longer away."""
    kept = LocalObjectStore(tmp_path / "spool")
    target = LocalObjectStore(tmp_path / "objects")
    (tmp_path / "objects" / "frames" / "T7").mkdir(parents=True)
    (tmp_path / "objects" / "frames" / "T7" / "A").write_bytes(b"")  # not a folder
    refused: list[tuple[str, str]] = []
    uploaded: list[str] = []
    spool = Spool(
        kept,
        target,
        retry_every=60,
        uploaded=lambda n, keys: uploaded.extend(keys),
        refused=lambda key, reason: refused.append((key, reason)),
        log=get_logger("x"),
        max_bytes=1 << 20,
    )
    spool.keep("frames/T7/A/1.jpg", b"\xff\xd8one")
    spool.keep("frames/T7/B/2.jpg", b"\xff\xd8two")
    spool.refused("frames/T7/A/1.jpg", ObjectStoreError("the store is down"))
    assert spool.away
    assert spool.drain() == 1
    assert not spool.away
    assert uploaded == ["frames/T7/B/2.jpg"] and target.get("frames/T7/B/2.jpg") == b"\xff\xd8two"
    assert [key for key, _ in refused] == ["frames/T7/A/1.jpg"]
    assert [i.key for i in kept.list()] == ["frames/T7/A/1.jpg"]  # still there, not lost
    assert spool.drain() == 0  # not tried again by this run: no second error
    errors = [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "frames/T7/A/1.jpg" in errors[0] and "frames/T7/A" in refused[0][1], errors
    assert "set aside" in errors[0]
    spool.close()


def test_a_pipeline_whose_store_comes_back_with_a_conflicting_key_stores_again(
    tmp_path: Path,
) -> None:
    """A live station: the store goes away, order A's frames are kept; the store comes back
    with a file where A's folder should be. A's kept frames are set aside
    (``frames.refused``), order B's are uploaded, and B's later frames are stored directly:
    the spool does not stay away for good."""
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    root.rmdir()  # its disk is gone: every put is refused
    spool = LocalObjectStore(tmp_path / "spool")
    frame_store = FrameStore(store, spool=tmp_path / "spool", spool_retry=0.2)
    kept = frame_store.spool
    assert kept is not None
    pipeline = StreamPipeline(
        "s",
        PatternSource("s", fps=20, realtime=True),
        stages=[Stage(tagger({range(1, 11): "A", range(11, 100_000): "B"}))],
        segmenter=Segmenter("order", timeout=60),
        sinks=[frame_store],
    )
    events: Events = []
    pipeline.on_event(lambda kind, data: events.append((kind, data)))

    async def main() -> None:
        await pipeline.start()
        await wait_until_async("A's frames kept", lambda: len(list(spool.list())) >= 3)
        back = tmp_path / "back"
        (back / "frames" / "s").mkdir(parents=True)
        (back / "frames" / "s" / "A").write_bytes(b"")  # where A's folder should be
        back.rename(root)  # back, with the conflict
        await wait_until_async(
            "the store taking frames again",
            lambda: of(events, "frames.uploaded") and not kept.away,
            timeout=60,
        )
        await wait_until_async(
            "B's frames stored directly", lambda: len(list(store.list("frames/s/B/"))) >= 15
        )
        await pipeline.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
    completed = {d["segment_id"]: d for d in of(events, "segment.completed")}
    assert completed["B"]["stored"], completed["B"]  # not all kept: the store took them
    refused = [d["key"] for d in of(events, "frames.refused")]
    assert refused and all(k.startswith("frames/s/A/") for k in refused), refused
    assert set(refused) <= {i.key for i in spool.list()}  # set aside, not lost
    uploaded = [k for d in of(events, "frames.uploaded") for k in d["keys"]]
    assert all(k.startswith("frames/s/B/") for k in uploaded), uploaded
