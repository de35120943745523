"""The order-accuracy stations' migration guide ("Per-Order -> Persistent Pipeline"), followed
in its order with its names, settings, commands and checks, on the order-accuracy example
(``examples/order_accuracy/run.py``).

The guide's sections, in order: the quick start (clear the old frames from MinIO, start, read
the start-up log lines), the verification steps (1. one gst-launch process per station,
2. ``Order ... completed: latency=`` lines, 3. ``mc ls minio/frames/`` shows ``station_1/``
and ``station_1/`` shows the orders, 4. ``pkill -9 gst-launch`` is followed by
``Pipeline subprocess died (exit code: -9)``, ``Restarting pipeline in 2s (attempt 1)`` and a
new ``Persistent pipeline started``), the MinIO buckets (``frames`` and ``selected``), the
restart backoff (``min(2 ** n, 60)``; its cap made small here through ``--retry-cap``), and
what happens to a recording that ends or is re-processed.

Everything is real: run.py as a subprocess with the guide's settings, gst-launch-1.0 and
ffmpeg captures, the S3 server fixture (its ``frames`` and ``selected`` buckets), PostgreSQL
and Redis, station videos with QR order tickets. ``pgrep``/``pkill`` are narrowed to this
test's video so that parallel tests' captures are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REDIS_URL, need_modules, redis_namespace
from media import free_port, need_tool
from s3server import S3Server, aws_test_env
from test_example_order_accuracy import EXAMPLE, Runner, completed
from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

need_modules("zxingcpp", "segno", "boto3", install="pip install 'framepipe[qr,s3]' segno")

sys.path.insert(0, str(EXAMPLE))
from make_video import default_schedule, make_station_video  # noqa: E402

FPS = 10
TIMEOUT = 1.0  # the guide's "Adjust Order Timeout", tuned to the test video's short gaps
WAIT = 90.0


def station_video(path: Path, orders: list[str]) -> Path:
    make_station_video(
        path,
        default_schedule(orders, order_seconds=1.5, gap_seconds=1.4, lead_seconds=0.5),
        fps=FPS,
    )
    return path


def empty_bucket(s3: S3Server, bucket: str) -> None:
    """``mc rm -r --force /data/<bucket>/``: the bucket exists and holds nothing."""
    with contextlib.suppress(s3.client.exceptions.BucketAlreadyOwnedByYou):
        s3.client.create_bucket(Bucket=bucket)
    paginator = s3.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        if objects:
            s3.client.delete_objects(Bucket=bucket, Delete={"Objects": objects})


def ls(s3: S3Server, bucket: str, prefix: str = "") -> list[str]:
    """``mc ls minio/<bucket>/<prefix>``: the folders and objects right under ``prefix``."""
    page = s3.client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/")
    folders = [p["Prefix"].removeprefix(prefix) for p in page.get("CommonPrefixes", ())]
    return folders + [o["Key"].removeprefix(prefix) for o in page.get("Contents", ())]


def gst_pids(video: Path) -> list[int]:
    """``ps aux | grep gst-launch``, narrowed to this test's video."""
    done = subprocess.run(
        ["pgrep", "-f", f"gst-launch-1.0.*{video}"], capture_output=True, text=True, check=False
    )
    return [int(pid) for pid in done.stdout.split()]


@pytest.fixture
def guide_env(s3_server: S3Server, pg_url: str) -> Iterator[dict[str, str]]:
    """The guide's deployment: frames in MinIO's ``frames`` bucket (cleared first, as the
    quick start's step 1 does) and ``selected`` bucket, events in PostgreSQL and Redis."""
    need_tool("gst-launch-1.0")
    need_tool("ffmpeg")
    for bucket in ("frames", "selected"):
        empty_bucket(s3_server, bucket)
    with aws_test_env(), redis_namespace("fp-guide-oa-") as namespace:
        yield {
            "FRAMEPIPE_OBJECTS_URL": f"s3://frames?endpoint={s3_server.endpoint}",
            "FRAMEPIPE_DATABASE_URL": pg_url,
            "FRAMEPIPE_BROKER_URL": REDIS_URL,
            "FRAMEPIPE_BROKER_NAMESPACE": namespace.rstrip(":"),
            **{
                k: os.environ[k]
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            },
        }


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def launch(*args: str, env: dict[str, str] | None = None) -> Runner:
        home = {"FRAMEPIPE_HOME": str(tmp_path / "home")}
        runner = Runner([*args], {**home, **(env or {})}, tmp_path)
        runners.append(runner)
        return runner

    yield launch
    for runner in runners:
        if runner.proc.poll() is None:
            runner.proc.kill()
            runner.proc.wait()


def test_quick_start_and_the_verification_steps(
    tmp_path: Path,
    s3_server: S3Server,
    guide_env: dict[str, str],
    start: Callable[..., Runner],
) -> None:
    video = station_video(tmp_path / "station_1.mp4", ["ORDER_123", "ORDER_124"])
    # Quick start: step 3, one persistent pipeline per station (the camera is the looped video)
    runner = start(
        "--station", f"station_1={video}", "--loop", "--order-timeout", str(TIMEOUT), env=guide_env
    )
    first = runner.wait_for(
        lambda e: e["type"] == "source.started" and e["source_id"] == "station_1",
        timeout=WAIT,
        what="station_1's pipeline",
    )
    # step 4: the expected start-up log lines, in their order
    expected = [
        "Starting persistent GStreamer pipeline...",
        f"Persistent pipeline started (PID: {first['pid']})",
        "Frame monitor thread started",
        "Health monitor thread started",
        "All components started, entering main loop",
    ]
    wait_until(
        "the start-up lines",
        lambda: set(expected) <= set(runner.log_lines("station_1")),
        WAIT,
        explain=lambda: "\n".join(runner.logs[-20:]),
    )
    lines = runner.log_lines("station_1")
    assert [lines.index(line) for line in expected] == sorted(lines.index(x) for x in expected)

    # Verification 1: ONE gst-launch process per worker, the station's capture
    assert gst_pids(video) == [first["pid"]]
    environ = Path(f"/proc/{first['pid']}/environ").read_bytes().split(b"\0")
    assert b"STATION_ID=station_1" in environ

    # Verification 2: orders complete, logged with their latency
    runner.wait_for(completed("station_1", "ORDER_124"), timeout=WAIT)
    assert any(
        line.startswith("Order ORDER_123 completed: latency=")
        for line in runner.log_lines("station_1")
    )

    # Verification 3: `mc ls minio/frames/` shows station_1/, and station_1/ its orders
    assert ls(s3_server, "frames") == ["station_1/"]
    assert ls(s3_server, "frames", "station_1/")[:2] == ["ORDER_123/", "ORDER_124/"]
    order = next(o for o in runner.of("order.completed") if o["order_id"] == "ORDER_123")
    stored = ls(s3_server, "frames", "station_1/ORDER_123/")
    assert sorted(f"station_1/ORDER_123/{name}" for name in stored) == sorted(order["stored"])
    assert all(name.startswith("frame_") and name.endswith(".jpg") for name in stored)
    # MinIO buckets: the selected frames are in `selected`
    assert order["selected"] and ls(s3_server, "selected") == ["station_1/"]
    for key in order["selected"]:
        body = s3_server.client.get_object(Bucket="selected", Key=key)["Body"].read()
        assert body[:2] == b"\xff\xd8" and key in order["stored"]

    # Verification 4: kill the pipeline subprocess; it is restarted
    subprocess.run(["pkill", "-9", "-f", f"gst-launch-1.0.*{video}"], check=True)
    again = runner.wait_for(
        lambda e: e["type"] == "source.started" and e["attempt"] == 1,
        timeout=WAIT,
        what="the restarted pipeline",
    )
    restarted = f"Persistent pipeline started (PID: {again['pid']})"
    wait_until("the restart's log line", lambda: restarted in runner.log_lines("station_1"), WAIT)
    lines = runner.log_lines("station_1")
    died = lines.index("Pipeline subprocess died (exit code: -9)")
    assert lines[died + 1] == "Restarting pipeline in 2s (attempt 1)"
    assert restarted in lines[died + 2 :]
    assert gst_pids(video) == [again["pid"]]
    # ... and it works again: its next order completes
    seen = len(runner.of("order.completed"))
    runner.wait_for(
        lambda e: e["type"] == "order.completed" and runner.events.index(e) >= seen,
        timeout=WAIT,
        what="an order after the restart",
    )
    assert runner.stop() == 0
    assert gst_pids(video) == []


def test_a_recording_that_ends_ends_the_run_once(
    tmp_path: Path,
    s3_server: S3Server,
    guide_env: dict[str, str],
    start: Callable[..., Runner],
) -> None:
    """A short clip played once: its orders once each (no ``ORDER_101.2``), the station ends
    with its file, the runner exits 0 on its own (as its README says)."""
    video = station_video(tmp_path / "short.mp4", ["ORDER_101", "ORDER_102"])
    runner = start(
        "--station", f"station_1={video}", "--order-timeout", str(TIMEOUT), env=guide_env
    )
    code = runner.proc.wait(WAIT)
    for thread in runner._threads:
        thread.join(5)
    assert code == 0, "\n".join(runner.logs[-30:])
    orders = [o["segment_id"] for o in runner.of("order.completed")]
    assert orders == ["ORDER_101", "ORDER_102"]
    kinds = {e["type"] for e in runner.events}
    assert not kinds & {"source.died", "source.restarting", "station.failed"}
    assert any("capture started" in line and "gst-launch-1.0" in line for line in runner.logs)
    assert "every station ended: stopping" in "\n".join(runner.logs)
    assert ls(s3_server, "frames", "station_1/") == ["ORDER_101/", "ORDER_102/"]


def test_stored_footage_is_replayed_at_machine_speed(
    tmp_path: Path, guide_env: dict[str, str], start: Callable[..., Runner]
) -> None:
    """``--fast``: every frame of the recording is read for order tags and the run ends."""
    video = station_video(tmp_path / "recorded.mp4", ["ORDER_301", "ORDER_302", "ORDER_303"])
    total = int(
        subprocess.run(
            [
                *("ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0"),
                *("-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(video)),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    runner = start(
        "--station", f"station_1={video}", "--fast", "--order-timeout", str(TIMEOUT), env=guide_env
    )
    assert runner.proc.wait(WAIT) == 0, "\n".join(runner.logs[-30:])
    for thread in runner._threads:
        thread.join(5)
    assert f"{total} frame(s) captured, {total} read for order tags" in runner.log_lines(
        "station_1"
    )
    assert any("capture started" in line and "gst-launch-1.0" in line for line in runner.logs)
    found = {o["order_id"] for o in runner.of("order.completed")}
    assert found == {"ORDER_301", "ORDER_302", "ORDER_303"}
    # orders time out by the recording's own clock, as they would have live: each holds its
    # ticket's frames and the 1 s timeout's, not the idle gap up to the next ticket
    tagged = json.loads(Path(f"{video}.json").read_text())["tagged_frames"]
    for order in runner.of("order.completed"):
        assert order["reason"] == "timeout", order
        assert abs(order["frames"] - tagged[order["order_id"]] - round(TIMEOUT * FPS)) <= 1, order


def test_a_camera_down_is_retried_at_the_cap_until_it_is_back(
    tmp_path: Path, guide_env: dict[str, str], start: Callable[..., Runner]
) -> None:
    """The guide's backoff ``min(2 ** n, 60)``, then a camera that stays down is tried every
    60 s (here ``--retry-cap 1``) with ``station.failed`` once and its health saying so; when
    it is back, ``station.recovered`` and orders again. The camera is an MPEG-TS stream over
    TCP (GStreamer has no tcp:// source, so this station's capture is ffmpeg)."""
    video = station_video(tmp_path / "camera.mp4", ["ORDER_501", "ORDER_502"])
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    runner = start(
        "--station",
        f"station_1={url}",
        "--order-timeout",
        str(TIMEOUT),
        "--restart-delay",
        "0.2",
        "--max-restarts",
        "2",
        "--retry-cap",
        "1",
        env=guide_env,
    )
    failed = runner.wait_for(lambda e: e["type"] == "station.failed", timeout=WAIT)
    assert failed["station_id"] == "station_1" and failed["retrying"] is True
    assert failed["attempts"] == 3 and "exit code" in failed["error"]
    # the station's health says so: retrying, why, and when it tries next
    home = tmp_path / "home"

    def station_health() -> dict[str, Any] | None:
        done = subprocess.run(
            [sys.executable, "-m", "framepipe", "health", "--json"],
            capture_output=True,
            text=True,
            env={**os.environ, **guide_env, "FRAMEPIPE_HOME": str(home)},
            check=False,
        )
        try:
            snapshots = json.loads(done.stdout)
        except ValueError:
            return None
        for snapshot in snapshots:
            status = snapshot.get("pipeline_status", {}).get("station_1")
            if status and status["source"]["state"] == "retrying":
                return dict(status)
        return None

    health = wait_until("station_1's health to say retrying", station_health, WAIT, interval=0.5)
    assert health["state"] == "retrying"
    assert "exit code" in health["last_error"]
    assert health["source"]["retrying_since"] is not None
    assert health["source"]["next_attempt_at"] is not None
    # the camera comes back
    camera = subprocess.Popen(
        [
            *("ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re"),
            *("-stream_loop", "-1", "-i", str(video), "-c", "copy", "-f", "mpegts"),
            f"{url}?listen=1",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        back = runner.wait_for(lambda e: e["type"] == "station.recovered", timeout=WAIT)
        assert back["station_id"] == "station_1" and back["attempts"] >= 3
        runner.wait_for(completed("station_1", "ORDER_501"), timeout=WAIT)
        assert runner.stop() == 0
    finally:
        camera.kill()
        camera.wait()
    assert len(runner.of("station.failed")) == 1
    retries = [e for e in runner.of("source.restarting") if e.get("retrying")]
    assert retries and all(e["delay"] == 1.0 for e in retries)
    assert any(line.startswith("Station recovered") for line in runner.log_lines("station_1"))


def test_known_issue_minio_and_database_errors_stop_the_start_with_the_reason(
    tmp_path: Path, s3_server: S3Server, guide_env: dict[str, str]
) -> None:
    """The guide's known issue "MinIO errors" ("Bucket not found", MinIO not running), and a
    database that cannot be reached: run.py starts no station, says why in one line on
    stderr, no traceback, and exits 2 (bad settings), not 1 (a station that failed)."""
    video = station_video(tmp_path / "station_1.mp4", ["ORDER_123"])
    missing = f"fp-missing-{os.getpid()}"
    down = f"http://127.0.0.1:{free_port()}"
    cases = [
        (  # the frames bucket does not exist
            {"FRAMEPIPE_OBJECTS_URL": f"s3://{missing}?endpoint={s3_server.endpoint}"},
            [],
            f"bucket '{missing}' does not exist",
        ),
        (  # the selected bucket does not exist
            {},
            ["--selected", f"s3://{missing}?endpoint={s3_server.endpoint}"],
            f"bucket '{missing}' does not exist",
        ),
        (  # MinIO is not running
            {"FRAMEPIPE_OBJECTS_URL": f"s3://frames?endpoint={down}"},
            [],
            f"cannot reach S3 endpoint {down}",
        ),
        (  # PostgreSQL is not running
            {"FRAMEPIPE_DATABASE_URL": f"postgresql+psycopg://127.0.0.1:{free_port()}/test"},
            [],
            "cannot open database",
        ),
        (  # a --spool folder that cannot be made (a file is there)
            {},
            ["--spool", str(video)],
            f"cannot open object store directory {video}",
        ),
    ]
    for env, args, reason in cases:
        done = subprocess.run(
            [sys.executable, str(EXAMPLE / "run.py"), "--station", f"station_1={video}", *args],
            cwd=tmp_path,
            env={**os.environ, **guide_env, "FRAMEPIPE_HOME": str(tmp_path / "home"), **env},
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        stderr = "\n" + done.stderr
        said = stderr[stderr.rindex("\nerror: ") + 1 :]  # the reason may span lines
        assert said.startswith("error: ") and reason in said, done.stderr[-3000:]
        assert "Persistent pipeline started" not in done.stderr
    assert ls(s3_server, "frames") == []
