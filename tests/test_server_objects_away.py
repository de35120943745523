"""The service and an object store that is away: ``framepipe serve`` starts without it, says so
in one line naming the setting and the cause (never a secret), ``/health`` reports it, the
routes that need it answer 503 and the others are served, and it is opened once it can be. A
setting to fix (credentials in the endpoint) is one line and exit 2. All of it was a
traceback at start-up and exit 3 (found in review)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from framepipe.config import Settings
from s3server import S3Server
from test_server import AUTH, TOKEN, Server
from waiting import free_port, wait_until

SECRET = "s3-secret-never-shown"
ACCESS = "AKIANEVERSHOWN"


def _env(objects_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "FRAMEPIPE_API_TOKEN": TOKEN,
        "FRAMEPIPE_OBJECTS_URL": objects_url,
        "FRAMEPIPE_S3_ACCESS_KEY": ACCESS,
        "FRAMEPIPE_S3_SECRET_KEY": SECRET,
    }


def _serve_args(home: Path) -> list[str]:
    return [sys.executable, "-m", "framepipe", "--home", str(home), "serve", "--port", "0"]


@pytest.mark.slow
def test_serve_starts_without_an_unreachable_object_store_and_says_so(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    url = f"s3://frames/cam?endpoint=http://127.0.0.1:{closed}"
    proc = subprocess.Popen(
        _serve_args(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(url),
    )
    try:
        assert proc.stdout is not None
        link = ""
        while "Dashboard:" not in link:
            link = proc.stdout.readline()
            if not link and proc.poll() is not None:
                pytest.fail(f"framepipe serve exited {proc.returncode}: {proc.communicate()}")
        base = link.split("Dashboard: ", 1)[1].strip().rstrip("/")
        with httpx.Client(base_url=base, headers=AUTH, timeout=30) as client:
            health = client.get("/health")
            assert health.status_code == 200, health.text
            assert health.json()["status"] == "degraded"
            assert health.json()["database"] == "ok"
            assert health.json()["objects"] == "unavailable (the server's log has the cause)"
            assert str(closed) not in health.text  # no endpoint to a client without a token
            assert client.get("/api/executions").status_code == 200
            put = client.put("/api/objects/frames/1.jpg", content=b"jpeg")
            assert put.status_code == 503
            assert "object store is unavailable" in put.json()["detail"]
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "FRAMEPIPE_OBJECTS_URL" in warnings[0]
    assert f"cannot reach S3 endpoint http://127.0.0.1:{closed}" in warnings[0]
    assert SECRET not in err and ACCESS not in err


@pytest.mark.slow
def test_serve_refuses_credentials_in_the_object_store_endpoint_in_one_line(
    tmp_path: Path,
) -> None:
    url = f"s3://frames/cam?endpoint=http://alice:{SECRET}@127.0.0.1:{free_port()}"
    result = subprocess.run(
        _serve_args(tmp_path),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(url),
    )
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "FRAMEPIPE_OBJECTS_URL: S3 endpoint" in lines[0] and "carries credentials" in lines[0]
    assert SECRET not in result.stderr + result.stdout
    assert "Dashboard" not in result.stdout  # refused before anything is served


@pytest.mark.slow
@pytest.mark.usefixtures("aws_env")
def test_the_service_opens_its_object_store_once_it_can(
    settings: Settings, s3_server: S3Server
) -> None:
    """A bucket that does not exist yet: the service serves without it, then opens it in the
    background once it exists; uploads work from then on and ``/health`` is ok."""
    bucket = f"later-{os.urandom(6).hex()}"
    url = f"s3://{bucket}/frames?endpoint={s3_server.endpoint}&region=us-east-1"
    with (
        Server(settings.model_copy(update={"objects_url": url})) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["objects"] == "unavailable (the server's log has the cause)"
        assert client.put("/api/objects/a.bin", content=b"abc").status_code == 503
        assert client.get("/api/executions").status_code == 200

        s3_server.client.create_bucket(Bucket=bucket)
        try:
            wait_until(
                "the service to open the object store",
                lambda: client.get("/health").json()["objects"] == "ok",
                60,
                interval=0.2,
            )
            assert client.get("/health").json()["status"] == "ok"
            assert client.put("/api/objects/a.bin", content=b"abc").status_code == 201
            assert client.get("/api/objects/a.bin").content == b"abc"
            stored = s3_server.client.get_object(Bucket=bucket, Key="frames/a.bin")
            assert stored["Body"].read() == b"abc"
        finally:
            s3_server.drop_bucket(bucket)


def test_health_asks_the_object_store_at_most_once_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/health needs no token: however often it is called, the store is asked at most once
    per CHECK_EVERY seconds, and the answer in between is the last one."""
    from framepipe.backends.objects import LocalObjectStore
    from framepipe.server import object_access

    class Counted(LocalObjectStore):
        asked = 0

        def exists(self, key: str) -> bool:
            Counted.asked += 1
            return super().exists(key)

    store = Counted(tmp_path / "objects")
    access = object_access.ObjectAccess(store.url, store)
    assert [access.check() for _ in range(50)] == [None] * 50
    assert Counted.asked == 1
    monkeypatch.setattr(object_access, "CHECK_EVERY", 0.0)
    assert [access.check() for _ in range(3)] == [None] * 3
    assert Counted.asked == 4
