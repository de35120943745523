"""What a client sends that the service must refuse or answer without harm, over real HTTP and
WebSockets: ids and filters that cannot reach a database (both backends), request bodies
capped by route and not by content type, images that would decode to more than the pixel
budget, an object store that fails without telling the server's paths, and tokens kept out of
the log whatever spelling of ``token`` the service accepted."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from framepipe import Pipeline, StepContext
from framepipe.app import App
from framepipe.backends.state.schema import steps
from framepipe.config import Settings
from framepipe.server.guard import redact
from framepipe.server.thumbnails import MAX_PIXELS, NotAnImageError, image_size
from test_server import AUTH, TOKEN, Server

quick = Pipeline("quick")


@quick.step()
def only(ctx: StepContext) -> dict[str, Any]:
    return {"seen": sorted(ctx.inputs)}


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _ws_refusal(server: Server, query: str) -> tuple[dict[str, Any], int | None]:
    """The message and the close code of a ``/ws`` that gets no snapshot."""
    with ws_connect(
        f"ws://127.0.0.1:{server.port}/ws{query}", additional_headers=AUTH, open_timeout=10
    ) as ws:
        message = json.loads(ws.recv(timeout=10))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None, "the socket dropped without a close frame"
    return message, closed.value.rcvd.code


# -- ids and filters -----------------------------------------------------------------------------


def test_ids_and_filters_that_cannot_be_stored_are_refused_naming_the_parameter(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A NUL or an over-long value in an id or a filter is the client's fault on every
    backend: a 422 naming the parameter, before any database is asked (PostgreSQL refuses a
    NUL in text, which was a 503 and an ERROR in the log)."""
    long_id = "a" * 65
    cases = [
        ("GET", "/api/executions/%00abc", ["path", "execution_id"]),
        ("GET", f"/api/executions/{long_id}", ["path", "execution_id"]),
        ("GET", "/api/status/ab%00cd", ["path", "job_id"]),
        ("GET", "/api/events?execution_id=%00", ["query", "execution_id"]),
        ("GET", "/api/executions?pipeline=qu%00ick", ["query", "pipeline"]),
        ("GET", "/api/executions?status=running&status=%00", ["query", "status", 1]),
        ("POST", "/api/executions/%00abcd/cancel", ["path", "execution_id"]),
        ("POST", "/api/executions/%00abcd/retry", ["path", "execution_id"]),
    ]
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        for method, path, loc in cases:
            answer = client.request(method, path)
            assert answer.status_code == 422, (path, answer.text)
            assert [e["loc"] for e in answer.json()["detail"]] == [loc], path
        for body in ('{"pipeline": "quick\\u0000"}', '{"pipeline": "\\ud800"}'):
            refused = client.post(
                "/api/executions", content=body, headers={"Content-Type": "application/json"}
            )
            assert refused.status_code == 422, (body, refused.text)
            assert refused.json()["detail"][0]["loc"] == ["body", "pipeline"]
        # What can be an id still reaches the store, and is answered as before.
        assert client.get("/api/executions/abcd").status_code == 404
        assert client.get("/api/executions", params={"status": "nosuch"}).json() == []
        message, code = _ws_refusal(server, "?execution_id=ab%00cd")
        assert (message["type"], code) == ("error", 1008)
        assert message["detail"].startswith("execution_id: ")
        message, code = _ws_refusal(server, "?execution_id=abcd")
        assert (message["type"], code) == ("error", 1008)  # no such execution
    assert not _errors(caplog)


def test_ws_closes_with_1011_when_the_state_database_fails(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault of the server while making the snapshot is an ``error`` message and close
    code 1011, logged, never a socket dropped with a traceback."""
    with Server(settings, pipelines=(quick,)) as server:
        engine = sa.create_engine(settings.resolved_database_url)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {steps.name} RENAME TO {steps.name}_gone")
        finally:
            engine.dispose()
        message, code = _ws_refusal(server, "")
        assert (message["type"], code) == ("error", 1011)
        assert steps.name not in message["detail"]  # the cause is logged, not sent
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            assert client.get("/api/executions").status_code == 503
    assert any(m.startswith("/ws: no snapshot") for m in _errors(caplog))


# -- request bodies ------------------------------------------------------------------------------


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    chunk = b'{"pipeline":"quick","inputs":{"a":"' + b"x" * size
    sent = 0
    while sent < total:
        yield chunk
        sent += len(chunk)


def test_bodies_are_capped_by_route_whatever_their_content_type(tmp_path: Path) -> None:
    """A JSON route's body is counted and refused (413, FRAMEPIPE_MAX_INPUTS_BYTES) without
    being read whole, with any content type or none; an upload is held to its own limit
    (FRAMEPIPE_MAX_UPLOAD_BYTES) even when it says it is JSON."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        max_inputs_bytes=20_000,
        max_upload_bytes=4_000_000,
    )
    big = 8_000_000
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        for ctype in (None, "application/merge-patch+json", "text/plain", "application/json"):
            headers = {"Content-Type": ctype} if ctype else {}
            tracemalloc.start()
            try:
                answer = client.post("/api/executions", content=_chunks(big), headers=headers)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert answer.status_code == 413, (ctype, answer.text)
            assert "FRAMEPIPE_MAX_INPUTS_BYTES" in answer.json()["detail"]
            assert peak < big // 4, f"{ctype}: the body was read whole ({peak} bytes held)"
        declared = client.post("/api/executions", content=b" " * 200_000)
        assert declared.status_code == 413
        # The upload route: its own limit, whatever the body says it is.
        report = b'{"a":"' + b"x" * 2_000_000 + b'"}'
        stored = client.put(
            "/api/objects/data/report.json",
            content=report,
            headers={"Content-Type": "application/json"},
        )
        assert stored.status_code == 201, stored.text
        assert client.get("/api/objects/data/report.json").content == report
        over = client.put(
            "/api/objects/data/big.json",
            content=report * 3,
            headers={"Content-Type": "application/json"},
        )
        assert over.status_code == 413
        assert "FRAMEPIPE_MAX_UPLOAD_BYTES" in over.json()["detail"]
        # A body under the cap is used as before.
        small = client.post(
            "/api/executions",
            content=b'{"pipeline": "quick"}',
            headers={"Content-Type": "application/vnd.example+json"},
        )
        assert small.status_code == 201, small.text


# -- images --------------------------------------------------------------------------------------


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG of ``width`` x ``height`` black pixels: a few kilobytes that
    OpenCV would decode to ``3 * width * height`` bytes of BGR."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_image_sizes_are_read_from_headers_as_opencv_decodes_them() -> None:
    picture = np.zeros((30, 50, 3), np.uint8)
    for ext, kind, params in (
        (".jpg", "JPEG", []),
        (".png", "PNG", []),
        (".webp", "WebP", [cv2.IMWRITE_WEBP_QUALITY, 101]),  # lossless: VP8L
        (".webp", "WebP", [cv2.IMWRITE_WEBP_QUALITY, 80]),  # lossy: VP8
        (".bmp", "BMP", []),
    ):
        ok, encoded = cv2.imencode(ext, picture, params)
        assert ok
        data = bytes(encoded)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image_size(data) == (kind, decoded.shape[1], decoded.shape[0]) == (kind, 50, 30)
    assert image_size(_png_bomb(20_000, 20_000)) == ("PNG", 20_000, 20_000)
    for ext in (".tiff", ".gif", ".ppm"):  # decodable by OpenCV, but not sized: not decoded
        ok, encoded = cv2.imencode(ext, picture)
        assert ok
        with pytest.raises(NotAnImageError):
            image_size(bytes(encoded))
    for junk in (b"", b"\xff\xd8\xff\x00", b"\x89PNG\r\n\x1a\n\x00", b"RIFF\x00\x00\x00\x00WEBP"):
        with pytest.raises(NotAnImageError):
            image_size(junk)


def test_a_thumbnail_of_an_image_over_the_pixel_budget_is_refused_undecoded(
    tmp_path: Path,
) -> None:
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'state.db'}")
    width, height = 10_000, MAX_PIXELS // 10_000 + 1000
    bomb = _png_bomb(width, height)
    assert len(bomb) < 100_000
    ok, fine = cv2.imencode(".png", np.full((600, 800, 3), 90, np.uint8))
    assert ok
    base = "/api/segments/station/cam/frames"
    with (
        Server(settings, pipelines=(), apps=[App("station", settings=settings)]) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        assert client.put("/api/objects/snaps/bomb.png", content=bomb).status_code == 201
        assert client.put("/api/objects/snaps/fine.png", content=bytes(fine)).status_code == 201
        tracemalloc.start()
        try:
            refused = client.get(f"{base}/snaps/bomb.png")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert refused.status_code == 422, refused.headers.get("content-type")
        detail = refused.json()["detail"]
        assert "'snaps/bomb.png'" in detail and f"{width}x{height}" in detail
        assert peak < 20_000_000, f"the image was decoded ({peak} bytes held)"
        thumb = client.get(f"{base}/snaps/fine.png?width=160")
        assert thumb.status_code == 200
        shape = cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_COLOR).shape
        assert shape[:2] == (120, 160)


def _marker(data: bytes, marker: bytes) -> int:
    """The offset of the first ``marker`` segment of a JPEG (walked by segment lengths)."""
    pos = 2
    while data[pos : pos + 2] != marker:
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos


def _declaring(data: bytes, width: int, height: int) -> bytes:
    """The JPEG ``data`` with its frame header (SOF0 or SOF2) declaring ``width`` x
    ``height``."""
    sof = _marker(data, b"\xff\xc2" if b"\xff\xc2" in data else b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def _first_scan_one_component(data: bytes) -> bytes:
    """The baseline JPEG ``data`` with its first scan holding only its first component: a
    sequential JPEG of several scans, which libjpeg decodes through a buffer of the whole
    picture's coefficients."""
    sos = _marker(data, b"\xff\xda")
    segment = data[sos + 4 : sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")]
    count = segment[0]
    scan = bytes([1]) + segment[1:3] + segment[1 + 2 * count :]
    rest = data[sos + 4 + len(segment) :]
    return data[:sos] + b"\xff\xda" + struct.pack(">H", 2 + len(scan)) + scan + rest


def test_a_camera_jpeg_over_the_budget_is_thumbnailed_from_its_reduced_decode(
    tmp_path: Path,
) -> None:
    """A 10000x5000 JPEG (a 50-megapixel camera still) is over the pixel budget in full but
    decoded at 1/8 or 1/4 for a thumbnail, which is what counts for a sequential JPEG; the
    same picture progressive, or sequential in several scans, makes libjpeg hold every
    coefficient of the full picture whatever the reduction, so its full size counts (422);
    a JPEG whose reduced picture is still over the budget is refused too."""
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'state.db'}")
    picture = np.zeros((5000, 10_000, 3), np.uint8)
    picture[:, :, 1] = 120
    picture[:, 5000:, 2] = 200
    ok, encoded = cv2.imencode(".jpg", picture)
    assert ok
    still = bytes(encoded)
    ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    progressive = bytes(encoded)
    del picture, encoded
    assert MAX_PIXELS < 10_000 * 5000 and image_size(progressive) == ("JPEG", 10_000, 5000)
    refused = {
        "progressive.jpg": (progressive, "10000x5000"),
        "scans.jpg": (_first_scan_one_component(still), "10000x5000"),
        "huge.jpg": (_declaring(still, 60_000, 60_000), "60000x60000"),  # 7500x7500 at 1/8
    }
    base = "/api/segments/station/cam/frames"
    with (
        Server(settings, pipelines=(), apps=[App("station", settings=settings)]) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client,
    ):
        assert client.put("/api/objects/snaps/still.jpg", content=still).status_code == 201
        for name, (data, _) in refused.items():
            assert client.put(f"/api/objects/snaps/{name}", content=data).status_code == 201
        for width, shape in ((320, (160, 320)), (1920, (960, 1920))):  # at 1/8, at 1/4
            thumb = client.get(f"{base}/snaps/still.jpg?width={width}")
            assert thumb.status_code == 200, thumb.text
            image = cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_COLOR)
            assert image.shape[:2] == shape
            assert image[:, : width // 4, 2].mean() < 30 < 170 < image[:, -width // 4 :, 2].mean()
        for name, (_, size) in refused.items():
            answer = client.get(f"{base}/snaps/{name}?width=320")
            assert answer.status_code == 422, (name, answer.status_code)
            detail = answer.json()["detail"]
            assert f"'snaps/{name}'" in detail and size in detail, detail


# -- a failing object store ----------------------------------------------------------------------


def test_a_failing_object_store_is_a_500_naming_the_key_never_the_servers_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A read the store fails (here a symlink loop in a store outside the home) is the
    server's fault: a 500 whose detail names the key, with the cause in the log only."""
    root = tmp_path / "srv-objects"
    (root / "snaps").mkdir(parents=True)
    os.symlink("loop.jpg", root / "snaps" / "loop.jpg")  # a link to itself
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        objects_url=root.as_uri(),
    )
    with (
        Server(settings, pipelines=(), apps=[App("station", settings=settings)]) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        for path in (
            "/api/objects/snaps/loop.jpg",
            "/api/segments/station/cam/frames/snaps/loop.jpg",
        ):
            answer = client.get(path)
            assert answer.status_code == 500, (path, answer.text)
            assert "'snaps/loop.jpg'" in answer.json()["detail"]
            assert str(tmp_path) not in answer.text and "file:" not in answer.text
        # The safety net under the details the service does show: the store's folder too.
        service = server.server.config.app.state.service
        shown = service.public(f"cannot open {root / 'snaps'} ({root.as_uri()})")
        assert str(root) not in shown and "file:" not in shown
    assert any("snaps/loop.jpg" in m for m in _errors(caplog))


def test_an_upload_whose_key_conflicts_with_the_stores_folders_is_a_409(tmp_path: Path) -> None:
    """The local store keeps keys as folders and files: ``f/g`` while ``f`` is an object, or
    ``d`` while ``d/x`` exists, is the client's conflict (409 naming the key), not a failure
    of the server (500), and nothing stored before changes."""
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'state.db'}")
    with (
        Server(settings, pipelines=()) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        assert client.put("/api/objects/f", content=b"1").status_code == 201
        assert client.put("/api/objects/d/x", content=b"2").status_code == 201
        for key in ("f/g", "d"):
            answer = client.put(f"/api/objects/{key}", content=b"3")
            assert answer.status_code == 409, (key, answer.text)
            detail = answer.json()["detail"]
            assert f"'{key}'" in detail and str(tmp_path) not in detail, detail
        assert client.get("/api/objects/f").content == b"1"
        assert client.get("/api/objects/d/x").content == b"2"


# -- tokens in the log ---------------------------------------------------------------------------


def test_a_token_is_kept_out_of_the_log_however_its_name_is_spelt(tmp_path: Path) -> None:
    """The service decodes query parameter names, so ``?%74oken=`` is a token it accepts;
    the log hides its value as it hides ``?token=``'s."""
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'state.db'}")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn.access")]
    with Server(settings, pipelines=(quick,)) as server:
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        try:
            for name in ("%74oken", "tok%65n", "token"):
                url = f"ws://127.0.0.1:{server.port}/ws?{name}={TOKEN}"
                with ws_connect(url, open_timeout=10) as ws:
                    assert json.loads(ws.recv(timeout=10))["type"] == "snapshot", name
            answer = httpx.get(f"{server.url}/api/pipelines?x=1&%74oken={TOKEN}", headers=AUTH)
            assert answer.status_code == 200
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.removeHandler(handler)
                logger.setLevel(level)
    log = out.getvalue()
    assert "/ws?%74oken=***" in log and "/ws?tok%65n=***" in log, log
    assert "%74oken=***" in log.split("/api/pipelines", 1)[1], log
    assert TOKEN not in log, log
    # A value is hidden up to the next parameter, whatever it holds.
    assert redact('/ws?a=1&token=ab"cd%22ef&b=2') == "/ws?a=1&token=***&b=2"
    assert redact("/ws?execution_id=token&b=token") == "/ws?execution_id=token&b=token"
