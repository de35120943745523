"""The order-accuracy example (``examples/order_accuracy/``) end to end.

The example's runner is a real process; each station's capture is a real ffmpeg (or
gst-launch-1.0) subprocess playing a generated station video (QR order tickets made with
segno, idle gaps, a damaged ticket, two tickets at once) at its own rate. The tests read the
runner's events (JSON lines on stdout) and logs (stderr), the object store and the state
store; they kill a capture with SIGKILL and stop the runner with SIGTERM. Without ffmpeg,
gst-launch-1.0, zxing-cpp, segno, Redis, PostgreSQL or moto the tests skip with the reason,
except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from conftest import REDIS_URL, need_modules, redis_namespace
from media import need_tool
from s3server import aws_test_env, s3_server_at
from waiting import wait_until

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "order_accuracy"
FPS = 10
TIMEOUT = 1.0  # the order timeout the tests run with
KEY = re.compile(r"^frames/(?P<station>[^/]+)/(?P<order>[^/]+)/frame_(?P<ts>\d+)_(?P<n>\d+)\.jpg$")

# slow: the order-accuracy example end to end
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

need_modules("zxingcpp", "segno", install="pip install 'framepipe[qr]' segno")

sys.path.insert(0, str(EXAMPLE))
from make_video import Shot, default_schedule, make_station_video  # noqa: E402


class Runner:
    """``run.py`` as a subprocess: its events (stdout JSON lines) and log lines (stderr) are
    collected by threads; :meth:`wait_for` waits for an event matching a predicate."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE / "run.py"), "--json", *args],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self.logs: list[str] = []
        self._new: queue.Queue[dict[str, Any]] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_logs, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            self.events.append(event)
            self._new.put(event)

    def _read_logs(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.logs.append(line.rstrip("\n"))

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 60.0, what: str = "event"
    ) -> dict[str, Any]:
        for event in list(self.events):
            if match(event):
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._new.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self._new.empty():
                    break
                continue
            if match(event):
                return event
        raise AssertionError(
            f"no {what} within {timeout}s; runner exit code "
            f"{self.proc.poll()}; log tail:\n" + "\n".join(self.logs[-30:])
        )

    def of(self, kind: str, station: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["type"] == kind
            and (station is None or e.get("station_id", e.get("source_id")) == station)
        ]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        for thread in self._threads:
            thread.join(5)
        return code

    def log_lines(self, station: str) -> list[str]:
        """The messages logged for ``station`` (the part after ``[station]``)."""
        mark = f"[{station}] "
        return [line.split(mark, 1)[1] for line in self.logs if mark in line]


def completed(station: str, segment: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e["type"] == "order.completed" and e["station_id"] == station and e["segment_id"] == segment
    )


@pytest.fixture(scope="module")
def station_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """ORDER_101, a damaged ticket, ORDER_102, ORDER_103 and ORDER_104 with both tickets in
    view for half a second between them, idle gaps longer than the order timeout."""
    need_tool("ffmpeg")
    path = tmp_path_factory.mktemp("video") / "station.mp4"
    shots = default_schedule(
        ["ORDER_101", "ORDER_102", "ORDER_103", "ORDER_104"],
        order_seconds=2.0,
        gap_seconds=1.6,
        lead_seconds=1.0,
        damaged=True,
        conflict=True,
    )
    schedule = make_station_video(path, shots, fps=FPS)
    return path, schedule


@pytest.fixture
def runner_factory(tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    runners: list[Runner] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Runner:
        home = tmp_path / "home"
        runner = Runner([*args], {"FRAMEPIPE_HOME": str(home), **(env or {})}, tmp_path)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        if runner.proc.poll() is None:
            runner.proc.kill()
            runner.proc.wait()


def trailing_frames() -> int:
    """Frames of an order after its tag left: those of the order timeout."""
    return round(TIMEOUT * FPS)


def test_stations_orders_storage_and_a_killed_capture(
    station_video: tuple[Path, dict[str, Any]],
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    video, schedule = station_video
    tagged = schedule["tagged_frames"]
    stations_file = tmp_path / "stations.json"
    stations_file.write_text(json.dumps({"station_1": str(video)}))
    from waiting import free_port

    metrics_port = free_port()
    runner = runner_factory(
        "--stations-file",
        str(stations_file),
        "--order-timeout",
        str(TIMEOUT),
        "--best-frames",
        "3",
        "--metrics-port",
        str(metrics_port),
    )

    # station_1 runs; station_2 is added to the running app through the stations file
    runner.wait_for(
        lambda e: e["type"] == "station.first_frame" and e["station_id"] == "station_1",
        what="station_1's first frame",
    )
    stations_file.write_text(json.dumps({"station_1": str(video), "station_2": str(video)}))
    runner.wait_for(
        lambda e: e["type"] == "station.added" and e["station_id"] == "station_2",
        what="station_2 added",
    )
    first = runner.wait_for(
        lambda e: e["type"] == "station.first_frame" and e["station_id"] == "station_2",
        what="station_2's first frame",
    )
    assert first["seconds"] >= 0

    # kill station_2's capture in the middle of ORDER_102
    started = runner.wait_for(
        lambda e: e["type"] == "source.started" and e["source_id"] == "station_2"
    )
    runner.wait_for(
        lambda e: (
            e["type"] == "order.started"
            and e["station_id"] == "station_2"
            and e["order_id"] == "ORDER_102"
        ),
        what="station_2's ORDER_102",
    )
    time.sleep(0.5)
    os.kill(started["pid"], signal.SIGKILL)
    restarted = runner.wait_for(
        lambda e: (
            e["type"] == "source.started" and e["source_id"] == "station_2" and e["attempt"] == 1
        ),
        what="station_2's capture restarted",
    )
    assert restarted["pid"] != started["pid"]
    # the replayed video shows ORDER_101 again: a new order, never mixed with the first
    again = runner.wait_for(completed("station_2", "ORDER_101.2"), timeout=60)
    assert again["order_id"] == "ORDER_101" and again["repeat"] == 2
    runner.wait_for(completed("station_1", "ORDER_104"), timeout=60)
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert runner.stop() == 0
    # Prometheus: orders (segments) completed and their latency, restarts per station
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['framepipe_segments_completed_total{pipeline="station_1"}'] >= 4
    assert samples['framepipe_segment_latency_seconds{pipeline="station_1",quantile="0.5"}'] >= 0
    assert samples['framepipe_source_restarts_total{pipeline="station_2",source="station_2"}'] == 1
    assert samples['framepipe_stage_frames_total{pipeline="station_1",stage="order_tags"}'] > 100
    # the event sink (the state database): what it wrote, nothing dropped
    written = [v for k, v in samples.items() if k.startswith("framepipe_event_sink_written")]
    dropped = [v for k, v in samples.items() if k.startswith("framepipe_event_sink_dropped")]
    assert written and written[0] > 10 and dropped == [0.0]

    # station_1: every order, in order, with its frames
    orders = runner.of("order.completed", "station_1")
    assert [o["segment_id"] for o in orders] == ["ORDER_101", "ORDER_102", "ORDER_103", "ORDER_104"]
    expected = {
        "ORDER_101": tagged["ORDER_101"] + trailing_frames(),
        "ORDER_102": tagged["ORDER_102"] + trailing_frames(),
        "ORDER_103": tagged["ORDER_103"] + FPS // 2,  # + both tickets in view: ORDER_103 stays
        "ORDER_104": tagged["ORDER_104"] + trailing_frames(),
    }
    reasons = {"ORDER_103": "key_changed"}
    objects = tmp_path / "home" / "objects"
    for order in orders:
        oid = order["order_id"]
        assert abs(order["frames"] - expected[oid]) <= 3, (oid, order["frames"], expected[oid])
        assert order["reason"] == reasons.get(oid, "timeout")
        assert order["station_id"] == "station_1"
        assert order["first_ts_ms"] < order["last_ts_ms"]
        assert order["latency_s"] is not None and 0 <= order["latency_s"] < TIMEOUT + 5
        # every frame stored under the hand-written station's layout, nothing else in the
        # order's folder
        assert len(order["stored"]) == order["frames"]
        numbers = []
        for key in order["stored"]:
            match = KEY.match(key)
            assert match, key
            assert (match["station"], match["order"]) == ("station_1", oid)
            assert order["first_ts_ms"] <= int(match["ts"]) <= order["last_ts_ms"]
            assert (objects / key).stat().st_size > 1000
            numbers.append(int(match["n"]))
        assert numbers == sorted(numbers)
        on_disk = sorted(
            p.relative_to(objects).as_posix()
            for p in (objects / "frames" / "station_1" / oid).iterdir()
        )
        assert on_disk == sorted(order["stored"])
        # the three frames with the sharpest tag, copied under selected/
        assert len(order["selected"]) == 3
        for key in order["selected"]:
            assert key.startswith("selected/frames/station_1/")
            assert key.removeprefix("selected/") in order["stored"]
            assert (objects / key).read_bytes() == (
                objects / key.removeprefix("selected/")
            ).read_bytes()
    logged = runner.log_lines("station_1")
    for order in orders:
        assert (
            f"Order {order['segment_id']} completed: latency={order['latency_s']:.1f}s "
            f"frames={order['frames']}"
        ) in logged

    # bad tags were reported, not turned into orders
    unreadable = runner.of("tag.unreadable", "station_1")
    assert unreadable and "ChecksumError" in unreadable[0]["error"]
    conflict = runner.of("tag.conflict", "station_1")
    assert conflict and conflict[0]["tags"] == ["ORDER_103", "ORDER_104"]

    # station_2: the kill was noticed at once, logged as the hand-written station logged it,
    # and restarted in 2 s
    lines = runner.log_lines("station_2")
    died = lines.index("Pipeline subprocess died (exit code: -9)")
    assert lines[died + 1] == "Restarting pipeline in 2s (attempt 1)"
    assert f"Persistent pipeline started (PID: {restarted['pid']})" in lines[died + 2 :]
    # the order open at the kill closed on its timeout with every frame it had
    cut = next(
        o for o in runner.of("order.completed", "station_2") if o["segment_id"] == "ORDER_102"
    )
    assert cut["reason"] == "timeout" and 0 < cut["frames"] < expected["ORDER_102"]
    assert len(cut["stored"]) == cut["frames"]
    assert all((objects / key).is_file() for key in cut["stored"])
    # one capture process per station at a time: station_1 was never restarted by the kill
    assert [e["attempt"] for e in runner.of("source.started", "station_1")] == [0]

    # the events were committed to the embedded state store, for `framepipe serve`
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'state.db'}")
    with engine.connect() as conn:
        rows = (
            conn.execute(sa.text("SELECT data FROM fp_events WHERE type = 'order.completed'"))
            .scalars()
            .all()
        )
    engine.dispose()
    stored = [json.loads(r) if isinstance(r, str) else r for r in rows]
    assert {(d["station_id"], d["segment_id"]) for d in stored} >= {
        ("station_1", o) for o in expected
    }
    assert all(d["app"] == "order_accuracy" for d in stored)


def test_an_order_whose_frames_were_not_stored_says_so(
    station_video: tuple[Path, dict[str, Any]],
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    """The checking service reads an order's frames from the store: an order whose frames the
    store refused is not reported as a plain success. Here the real local store refuses every
    frame of ORDER_102 (an object already sits where its folder goes); its ``order.completed``
    says how many frames are missing, a warning says so, and the other orders are whole."""
    video, _ = station_video
    blocker = tmp_path / "home" / "objects" / "frames" / "station_1" / "ORDER_102"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")
    runner = runner_factory(
        "--station", f"station_1={video}", "--fast", "--order-timeout", str(TIMEOUT)
    )
    assert runner.proc.wait(60) == 0
    assert runner.stop() == 0
    orders = {o["segment_id"]: o for o in runner.of("order.completed", "station_1")}
    assert set(orders) == {"ORDER_101", "ORDER_102", "ORDER_103", "ORDER_104"}
    cut = orders.pop("ORDER_102")
    assert cut["frames"] > 0 and cut["stored"] == [] and cut["selected"] == []
    assert cut["not_stored"] == cut["frames"]
    failures = [e for e in runner.of("processor.error") if e["stage"] == "frame_store"]
    assert len(failures) == cut["frames"]
    assert all("ORDER_102" in e["error"] for e in failures)
    warning = (
        f"Order ORDER_102: {cut['frames']} of its {cut['frames']} frame(s) not stored "
        "(refused by the object store: see the frame_store warnings; or cut off by a stop)"
    )
    assert any(line.endswith(f"WARNING [station_1] {warning}") for line in runner.logs)
    for order in orders.values():
        assert order["not_stored"] == 0 and len(order["stored"]) == order["frames"]


def test_a_code_that_is_not_an_order_id_and_an_order_held_too_long(
    tmp_path: Path, runner_factory: Callable[..., Runner]
) -> None:
    """A QR code that is not an order id (a shop's URL) is ``tag.invalid`` and opens no order
    nor storage folder; an order longer than ``--max-order-seconds`` closes then
    (``max_duration``), and its tag still in view opens ``ORDER_201.2``."""
    need_tool("ffmpeg")
    video = tmp_path / "odd.mp4"
    url = "https://shop.example/promo?id=7"
    shots = [
        Shot(0.5),
        Shot(4.0, ["ORDER_201"]),
        Shot(1.5),
        Shot(1.0, [url]),
        Shot(1.5),
        Shot(1.0, ["ORDER_202"]),
        Shot(1.5),
    ]
    make_station_video(video, shots, fps=FPS)
    runner = runner_factory(
        *("--station", f"station_1={video}", "--fast"),
        *("--order-timeout", str(TIMEOUT), "--max-order-seconds", "2"),
    )
    assert runner.proc.wait(60) == 0
    assert runner.stop() == 0
    invalid = runner.of("tag.invalid", "station_1")
    assert invalid and all(e["texts"] == [url] for e in invalid)
    orders = runner.of("order.completed", "station_1")
    assert [(o["segment_id"], o["repeat"], o["reason"]) for o in orders] == [
        ("ORDER_201", 1, "max_duration"),
        ("ORDER_201.2", 2, "max_duration"),
        ("ORDER_202", 1, "timeout"),
    ]
    for order in orders[:2]:  # --max-order-seconds 2 of a 10 fps recording
        assert abs(order["frames"] - 2 * FPS) <= 1, order
    folders = tmp_path / "home" / "objects" / "frames" / "station_1"
    assert sorted(p.name for p in folders.iterdir()) == ["ORDER_201", "ORDER_201.2", "ORDER_202"]


def test_a_capture_that_stops_sending_frames_is_restarted(
    station_video: tuple[Path, dict[str, Any]],
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    """The hand-written station's health monitor, for a capture that hangs: its process
    lives but no frame comes. After ``--stall-timeout`` s the station logs the stall, ends
    the hung process and starts its capture again."""
    need_tool("ffmpeg")
    video, _ = station_video
    capture = tmp_path / "hangs.sh"
    capture.write_text(
        "#!/bin/sh\n"
        f"ffmpeg -hide_banner -loglevel error -nostdin -i {video} -frames:v 15 -f mjpeg pipe:1\n"
        "exec sleep 600\n"
    )
    capture.chmod(0o755)
    runner = runner_factory(
        *("--station", f"station_1=cmd:{capture}", "--stall-timeout", "2"),
        *("--restart-delay", "0.2", "--order-timeout", str(TIMEOUT)),
    )
    first = runner.wait_for(lambda e: e["type"] == "source.started", what="the capture")
    stalled = runner.wait_for(lambda e: e["type"] == "source.stalled", what="the stall")
    assert stalled["source_id"] == "station_1"
    again = runner.wait_for(
        lambda e: e["type"] == "source.started" and e["attempt"] == 1, what="the restart"
    )
    assert again["pid"] != first["pid"]
    wait_until(
        "the hung capture to be gone", lambda: not Path(f"/proc/{first['pid']}").exists(), 30
    )
    assert runner.stop() == 0
    lines = runner.log_lines("station_1")
    assert "Pipeline stalled: no frame for 2.0s" in lines
    assert any(line.startswith("Restarting pipeline in 0.2s (attempt 1)") for line in lines)
    assert f"Persistent pipeline started (PID: {again['pid']})" in lines


def test_a_station_whose_camera_stays_down_is_retried_at_the_cap_alone(
    station_video: tuple[Path, dict[str, Any]],
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    """A camera that fails its restarts is reported once (``station.failed`` with
    ``retrying``) and tried again every ``--retry-cap`` seconds; the other stations go on and
    the runner stays up for it (exit 0 on SIGTERM). A station whose file is missing, or is
    no video, is reported invalid once and never restarted."""
    video, _schedule = station_video
    bad = "cmd:sh -c 'echo camera unreachable >&2; exit 1'"
    junk = tmp_path / "junk.mp4"  # a file, but no video: it can never be played
    junk.write_bytes(os.urandom(4096))
    runner = runner_factory(
        "--station",
        f"station_ok={video}",
        "--station",
        f"station_bad={bad}",
        "--station",
        "station_missing=/no/such/video.mp4",
        "--station",
        f"station_junk={junk}",
        "--order-timeout",
        str(TIMEOUT),
        "--max-restarts",
        "1",
        "--restart-delay",
        "0.3",
        "--retry-cap",
        "1",
    )
    failed = runner.wait_for(
        lambda e: e["type"] == "station.failed", timeout=60, what="station_bad failed"
    )
    assert failed["station_id"] == "station_bad" and failed["retrying"] is True
    assert "exit code: 1" in failed["error"] and failed["attempts"] == 2
    assert failed["next_attempt_at"] > time.time() - 5
    # still tried, every second
    runner.wait_for(
        lambda e: (
            e["type"] == "source.restarting"
            and e["source_id"] == "station_bad"
            and e["attempt"] == 4
        ),
        timeout=30,
        what="station_bad's fourth attempt",
    )
    runner.wait_for(completed("station_ok", "ORDER_102"), timeout=60)
    assert runner.proc.poll() is None  # a station retrying keeps the runner up
    assert runner.stop() == 0
    retries = [e for e in runner.of("source.restarting") if e["source_id"] == "station_bad"]
    assert [e["delay"] for e in retries[:4]] == [0.3, 1.0, 1.0, 1.0]
    assert [e["retrying"] for e in retries[:4]] == [False, True, True, True]
    assert len(runner.of("station.failed")) == 1
    lines = runner.log_lines("station_bad")
    assert "Pipeline subprocess died (exit code: 1)" in lines
    assert any(
        line.startswith("Station failed: CaptureExitedError")
        and line.endswith("retrying every 1s until it is back")
        for line in lines
    )
    assert not any("failed for good" in line for line in lines)
    # station_ok went on
    ok = [o["segment_id"] for o in runner.of("order.completed", "station_ok")]
    assert ok[:2] == ["ORDER_101", "ORDER_102"]
    # the station whose video does not exist was refused with the reason; the others ran
    invalid = {e["station_id"]: e["error"] for e in runner.of("station.invalid")}
    assert sorted(invalid) == ["station_junk", "station_missing"]
    assert "does not exist" in invalid["station_missing"]
    assert str(junk) in invalid["station_junk"]  # refused once, not restarted
    assert not [e for e in runner.of("source.restarting") if e["source_id"] == "station_junk"]
    assert any("[station_missing]" in line and "does not exist" in line for line in runner.logs)


def test_distributed_redis_postgresql_s3_with_gstreamer(
    tmp_path: Path, runner_factory: Callable[..., Runner], pg_url: str
) -> None:
    need_tool("gst-launch-1.0")
    need_tool("ffmpeg")
    import redis

    with redis_namespace("fp-oa-") as namespace:
        run_distributed(
            tmp_path, runner_factory, pg_url, namespace.rstrip(":"), redis.Redis.from_url(REDIS_URL)
        )


def run_distributed(
    tmp_path: Path, runner_factory: Callable[..., Runner], pg_url: str, namespace: str, client: Any
) -> None:
    video = tmp_path / "short.mp4"
    make_station_video(
        video,
        default_schedule(
            ["ORDER_201", "ORDER_202"], order_seconds=1.5, gap_seconds=1.4, lead_seconds=0.5
        ),
        fps=FPS,
    )
    with aws_test_env(), s3_server_at(tmp_path) as s3:
        s3.client.create_bucket(Bucket="orders")
        s3.client.create_bucket(Bucket="selected")
        env = {
            "FRAMEPIPE_OBJECTS_URL": f"s3://orders?endpoint={s3.endpoint}",
            "FRAMEPIPE_DATABASE_URL": pg_url,
            "FRAMEPIPE_BROKER_URL": REDIS_URL,
            "FRAMEPIPE_BROKER_NAMESPACE": namespace,
            **{
                k: os.environ[k]
                for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
            },
        }
        runner = runner_factory(
            "--station",
            f"station_1={video}",
            "--capture",
            "gst",
            "--order-timeout",
            str(TIMEOUT),
            "--best-frames",
            "2",
            "--selected",
            f"s3://selected?endpoint={s3.endpoint}",
            env=env,
        )
        runner.wait_for(completed("station_1", "ORDER_202"), timeout=60)
        assert runner.stop() == 0
        orders = runner.of("order.completed", "station_1")
        assert [o["order_id"] for o in orders][:2] == ["ORDER_201", "ORDER_202"]
        listed = s3.client.list_objects_v2(Bucket="orders", Prefix="frames/station_1/")
        keys = {item["Key"] for item in listed.get("Contents", ())}
        for order in orders[:2]:
            assert set(order["stored"]) <= keys
            assert len(order["stored"]) == order["frames"] > 10
            assert all(KEY.match(k) for k in order["stored"])
            assert len(order["selected"]) == 2
            for key in order["selected"]:
                body = s3.client.get_object(Bucket="selected", Key=key)["Body"].read()
                assert body[:2] == b"\xff\xd8"
        # the capture was gst-launch-1.0, one process
        assert any("capture started" in line and "gst-launch-1.0" in line for line in runner.logs)

    # events committed to PostgreSQL and appended to the Redis Stream
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        rows = (
            conn.execute(
                sa.text("SELECT data FROM fp_events WHERE type = 'order.completed' ORDER BY id")
            )
            .scalars()
            .all()
        )
    engine.dispose()
    assert [r["segment_id"] for r in rows][:2] == ["ORDER_201", "ORDER_202"]
    stream = f"{namespace}:events:order_accuracy"
    entries = client.xrange(stream)
    client.close()
    completed_entries = [
        json.loads(fields[b"data"])
        for _id, fields in entries
        if fields[b"type"] == b"order.completed"
    ]
    assert [e["segment_id"] for e in completed_entries][:2] == ["ORDER_201", "ORDER_202"]
    assert completed_entries[0]["stored"] == orders[0]["stored"]


def test_no_event_stored_streamed_or_printed_shows_a_cameras_secrets(
    tmp_path: Path, runner_factory: Callable[..., Runner], pg_url: str
) -> None:
    """Cameras whose URL holds a password or a token (down, so they keep being retried): the
    events printed by ``--json``, committed to PostgreSQL and appended to the Redis Stream,
    and the log, show neither; ``station.added`` shows each source masked."""
    import redis

    secrets = ("CamSecret42", "TokSecret99", "CmdSecret7")
    stations = {
        "station_pw": "rtsp://cam:CamSecret42@127.0.0.1:1/live",
        "station_tok": "http://127.0.0.1:1/live?token=TokSecret99",
        "station_cmd": "cmd:sh -c 'exit 1' rtsp://cam:CmdSecret7@127.0.0.1:1/live",
    }
    with redis_namespace("fp-oa-") as namespace:
        stream = f"{namespace.rstrip(':')}:events:order_accuracy"
        runner = runner_factory(
            *(
                arg
                for station, spec in stations.items()
                for arg in ("--station", f"{station}={spec}")
            ),
            "--restart-delay",
            "0.2",
            env={
                "FRAMEPIPE_DATABASE_URL": pg_url,
                "FRAMEPIPE_BROKER_URL": REDIS_URL,
                "FRAMEPIPE_BROKER_NAMESPACE": namespace.rstrip(":"),
            },
        )
        for station in stations:
            runner.wait_for(
                lambda e, s=station: e["type"] == "source.restarting" and e["source_id"] == s,
                what=f"{station} retried",
            )
        assert runner.stop() == 0
        client = redis.Redis.from_url(REDIS_URL)
        streamed = [
            (fields[b"type"].decode(), fields[b"data"].decode())
            for _id, fields in client.xrange(stream)
        ]
        client.close()
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT type, data FROM fp_events ORDER BY id")).all()
    engine.dispose()

    added = {e["station_id"]: e["source"] for e in runner.of("station.added")}
    assert added == {
        "station_pw": "rtsp://cam:***@127.0.0.1:1/live",
        "station_tok": "http://127.0.0.1:1/live?token=***",
        "station_cmd": "cmd:sh -c 'exit 1' rtsp://cam:***@127.0.0.1:1/live",
    }
    assert {t for t, _data in stored} >= {"station.added", "source.restarting"}
    assert [t for t, _data in streamed].count("station.added") == 3
    printed = "\n".join(json.dumps(e) for e in runner.events)
    for where, text in (
        ("--json", printed),
        ("PostgreSQL", json.dumps([data for _type, data in stored])),
        ("the Redis Stream", "\n".join(data for _type, data in streamed)),
        ("the log", "\n".join(runner.logs)),
    ):
        assert not [s for s in secrets if s in text], f"a secret in {where}"


def test_network_cameras_through_an_ffmpeg_capture_and_pyav(
    station_video: tuple[Path, dict[str, Any]],
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    """Two "cameras" stream the station video over TCP (MPEG-TS, as an encoder box would);
    station_1 captures its camera with an ffmpeg subprocess, station_2 with PyAV in-process
    and reads its tags at half size (``--tag-reduce 2``): both see every frame of the order."""
    from waiting import free_port

    need_tool("ffmpeg")
    video, schedule = station_video
    cameras = []
    urls = []
    for _ in range(2):
        port = free_port()
        urls.append(f"tcp://127.0.0.1:{port}")
        cameras.append(
            subprocess.Popen(
                [
                    "ffmpeg",
                    "-hide_banner",
                    "-loglevel",
                    "error",
                    "-nostdin",
                    "-re",
                    "-i",
                    str(video),
                    "-c",
                    "copy",
                    "-f",
                    "mpegts",
                    f"tcp://127.0.0.1:{port}?listen=1",
                ],
                stdin=subprocess.DEVNULL,
            )
        )
    try:
        # a capture that connects before its camera listens is refused and retried quickly
        ffmpeg_run = runner_factory(
            "--station",
            f"station_1={urls[0]}",
            "--order-timeout",
            str(TIMEOUT),
            "--restart-delay",
            "0.3",
        )
        av_run = runner_factory(
            "--station",
            f"station_2={urls[1]}",
            "--capture",
            "av",
            "--tag-reduce",
            "2",
            "--order-timeout",
            str(TIMEOUT),
            "--restart-delay",
            "0.3",
            env={"FRAMEPIPE_HOME": str(tmp_path / "home_av")},
        )
        for run, station in ((ffmpeg_run, "station_1"), (av_run, "station_2")):
            order = run.wait_for(completed(station, "ORDER_102"), timeout=60)
            assert (
                abs(order["frames"] - schedule["tagged_frames"]["ORDER_102"] - trailing_frames())
                <= 3
            )
            assert run.stop() == 0
            ids = [o["segment_id"] for o in run.of("order.completed", station)]
            assert ids[:2] == ["ORDER_101", "ORDER_102"]
        assert any(
            "capture started" in line and "ffmpeg" in line and urls[0] in line
            for line in ffmpeg_run.logs
        )
    finally:
        for camera in cameras:
            camera.kill()
            camera.wait()


@pytest.mark.parametrize("capture", ["ffmpeg", "av"])
def test_input_options_open_a_raw_mjpeg_recording_at_its_rate(
    capture: str,
    station_video: tuple[Path, dict[str, Any]],
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    """A camera's raw MJPEG dump has no container and so no rate (FFmpeg assumes 25 fps).
    Replayed with ``--fast``, orders time out by the recording's clock, so the rate matters:
    ``--input-option framerate=10`` opens it at its real rate, and each order holds its
    ticket's frames plus one order timeout's (10 frames), whichever capture reads it."""
    video, schedule = station_video
    raw = tmp_path / "camera.mjpeg"
    dump = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(video), "-an"]
    subprocess.run([*dump, "-c:v", "mjpeg", "-q:v", "3", "-f", "mjpeg", str(raw)], check=True)
    run = runner_factory(
        "--station",
        f"station_1={raw}",
        "--capture",
        capture,
        "--fast",
        "--input-option",
        f"framerate={FPS}",
        "--order-timeout",
        str(TIMEOUT),
    )
    order = run.wait_for(completed("station_1", "ORDER_102"), timeout=60)
    expected = schedule["tagged_frames"]["ORDER_102"] + trailing_frames()
    assert abs(order["frames"] - expected) <= 2, order
    assert run.stop() in (0, -signal.SIGTERM, 143)
    bad = runner_factory("--station", f"station_1={raw}", "--input-option", "framerate")
    assert bad.proc.wait(30) != 0
    assert any("--input-option 'framerate': use NAME=VALUE" in line for line in bad.logs)


def test_a_stations_file_deleted_while_it_runs_stops_no_station(
    station_video: tuple[Path, dict[str, Any]],
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    """A deploy or an editor that deletes the stations file before writing it again stopped
    every station (their open orders closed, split from the frames that followed). The
    removal is logged and changes nothing; the file written again is applied as any edit."""
    video, _schedule = station_video
    stations_file = tmp_path / "stations.json"
    stations_file.write_text(json.dumps({"station_1": str(video)}))
    runner = runner_factory("--stations-file", str(stations_file), "--loop")
    runner.wait_for(
        lambda e: e["type"] == "station.first_frame" and e["station_id"] == "station_1",
        what="station_1's first frame",
    )
    stations_file.unlink()
    wait_until(
        "the removal to be logged",
        lambda: any(f"stations file {stations_file} is gone" in line for line in runner.logs),
        30,
    )
    stations_file.write_text(json.dumps({"station_1": str(video), "station_2": str(video)}))
    runner.wait_for(
        lambda e: e["type"] == "station.first_frame" and e["station_id"] == "station_2",
        what="station_2 started from the file written again",
    )
    assert runner.stop() == 0
    assert runner.of("station.removed") == []
    assert [e["attempt"] for e in runner.of("source.started", "station_1")][:1] == [0]
    assert len(runner.of("station.added", "station_1")) == 1
    assert any(
        line.endswith("(write {} in it to stop every station); stations unchanged")
        for line in runner.logs
    )


def test_the_stations_hosted_by_framepipe_serve(
    station_video: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """``framepipe serve --app examples/order_accuracy/service.py:app``: the orders reach the
    service's event API, the stations are listed with their latest frame and can be stopped."""
    from waiting import free_port

    video, _schedule = station_video
    port = free_port()
    env = {
        **os.environ,
        "FRAMEPIPE_HOME": str(tmp_path / "home"),
        "ORDER_STATIONS": f"station_1={video}",
        "ORDER_TIMEOUT": str(TIMEOUT),
        "ORDER_LOOP": "1",
        "FRAMEPIPE_API_TOKEN": "order-accuracy-test-token",
    }
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "framepipe",
            "serve",
            "--port",
            str(port),
            "--app",
            f"{EXAMPLE / 'service.py'}:app",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        orders: list[dict[str, Any]] = []
        with httpx.Client(
            base_url=base, timeout=5, headers={"Authorization": "Bearer order-accuracy-test-token"}
        ) as client:
            while time.monotonic() < deadline and len(orders) < 2:
                time.sleep(0.3)
                if serve.poll() is not None:
                    break
                try:
                    page = client.get("/api/events", params={"limit": 1000}).json()
                except httpx.TransportError:
                    continue
                orders = [e["data"] for e in page["events"] if e["type"] == "order.completed"]
            assert [o["segment_id"] for o in orders][:2] == ["ORDER_101", "ORDER_102"], (
                serve.stderr.read() if serve.poll() is not None else orders
            )
            assert orders[0]["app"] == "order_accuracy"
            assert orders[0]["station_id"] == "station_1" and orders[0]["frames"] > 10
            sources = client.get("/api/sources").json()
            (station,) = [s for s in sources if s["pipeline"] == "station_1"]
            assert station["app"] == "order_accuracy" and station["state"] == "running"
            assert station["frame_url"] is not None
            frame = client.get(station["frame_url"])
            assert frame.status_code == 200 and frame.content[:2] == b"\xff\xd8"
            assert client.post("/api/sources/order_accuracy/station_1/stop").status_code == 202
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
            raise
    assert code == 0  # a graceful shutdown
    log = serve.stderr.read() if serve.stderr is not None else ""
    assert "app stopped" in log and "Application shutdown complete" in log, log[-3000:]


def test_the_hosted_stations_take_input_options_from_the_environment(tmp_path: Path) -> None:
    """``ORDER_INPUT_OPTIONS`` gives ``framepipe serve``'s stations the FFmpeg input options
    that ``run.py --input-option`` gives the runner's; a malformed pair is refused naming the
    setting, before anything starts."""
    video = tmp_path / "counter.mp4"
    video.write_bytes(b"")  # the stations are built, not started
    probe = (
        "import json, service; print(json.dumps(service.service.capture_options['input_options']))"
    )

    def load(options: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "FRAMEPIPE_HOME": str(tmp_path / "home"),
            "ORDER_STATIONS": f"station_1={video}",
            "ORDER_INPUT_OPTIONS": options,
        }
        return subprocess.run(
            [sys.executable, "-c", probe],
            check=False,
            env=env,
            cwd=EXAMPLE,
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = load("input_format=mjpeg, video_size=1280x720,headers=X-Site: a, b")
    assert good.returncode == 0, good.stderr[-2000:]
    assert json.loads(good.stdout.strip().splitlines()[-1]) == {
        "input_format": "mjpeg",
        "video_size": "1280x720",
        "headers": "X-Site: a, b",  # a comma not followed by NAME= is the value's
    }
    bad = load("framerate")
    assert bad.returncode != 0
    assert "ORDER_INPUT_OPTIONS 'framerate': use NAME=VALUE" in bad.stderr


def test_a_stations_file_turned_into_a_symlink_loop_leaves_the_stop_completing_orders(
    station_video: tuple[Path, dict[str, Any]],
    runner_factory: Callable[..., Runner],
    tmp_path: Path,
) -> None:
    """A stations file that can no longer be looked at (here a symlink loop) is logged and
    changes nothing: the stop still completes the open order and the run ends cleanly."""
    video, _schedule = station_video
    stations_file = tmp_path / "stations.json"
    stations_file.write_text(json.dumps({"station_1": str(video)}))
    runner = runner_factory("--stations-file", str(stations_file), "--loop")
    runner.wait_for(
        lambda e: e["type"] == "order.started" and e["station_id"] == "station_1",
        what="an order of station_1",
    )
    stations_file.unlink()
    os.symlink(stations_file.name, stations_file)
    wait_until(
        "the symlink loop to be logged",
        lambda: any(
            f"stations file {stations_file} cannot be looked at" in line for line in runner.logs
        ),
        30,
    )
    assert runner.stop() == 0
    started = {e["segment_id"] for e in runner.of("order.started", "station_1")}
    done = {e["segment_id"] for e in runner.of("order.completed", "station_1")}
    assert started and started <= done  # the one open at the stop included
    assert runner.of("station.removed") == []
