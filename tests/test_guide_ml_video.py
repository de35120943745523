"""The ML video team's guide to their hand-written worker, followed in its order with its names
and settings, on framepipe: the five stages and their log lines, the model adapters, the worker
started with their environment alone (SQLite ``DATABASE_FILE``, MinIO on the S3 server the
tests start, RabbitMQ on 127.0.0.1:5672), progress polled at ``/api/status/:jobId``, temporary
files cleaned up after completion, and settings framepipe would otherwise ignore refused."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from brokers import AMQP_URL, amqp_namespace
from framepipe import ExecutionStatus, JobEngine, Settings, StepStatus, open_object_store
from framepipe.errors import ConfigError
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.records import list_executions
from framepipe.pipelines.ml_settings import MlVideoSettings
from framepipe.pipelines.ml_video import ml_video
from framepipe.pipelines.ml_worker import cli_arguments, map_settings
from media import make_clip
from test_server import TOKEN, Server
from waiting import wait_until

MODELS = Path(__file__).resolve().parent / "models"
STAGES = ("preprocess", "inference", "postprocess", "stitch", "thumbnails")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
THEIR_STATUSES = {"queued", "processing", "completed", "failed"}


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4", frames=12, size=(320, 240))


@pytest.fixture(autouse=True)
def no_team_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the team's variables it uses; none leaks in from the machine."""
    for name in (
        "DATABASE_FILE",
        "RABBITMQ_URL",
        "ML_KEEP_INTERMEDIATES",
        "FRAMEPIPE_ML_KEEP_INTERMEDIATES",
        "MODEL_ADAPTER_TYPE",
        "PYTHON_SCRIPT",
        "PYTHON_PATH",
        *[n for n in os.environ if n.startswith("MINIO_")],
    ):
        monkeypatch.delenv(name, raising=False)


def run_ml(settings: Settings, clip: Path | str, **inputs: Any) -> ExecutionInfo:
    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(
                ml_video,
                {"input": str(clip), "prompt": "turn into anime", "style": "studio", "seed": 42}
                | {"width": 160, **inputs},
                raise_on_failure=False,
            )

    return asyncio.run(main())


def retry_ml(settings: Settings, execution_id: str) -> ExecutionInfo:
    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            await engine.retry(execution_id, ml_video)
            return await engine.wait(execution_id, raise_on_failure=False)

    return asyncio.run(main())


def keys_of(settings: Settings, execution_id: str) -> set[str]:
    prefix = f"ml/{execution_id}/"
    with open_object_store(settings.resolved_objects_url) as objects:
        return {info.key.removeprefix(prefix) for info in objects.list(prefix)}


# -- Pipeline stages, and Monitoring: "Each stage logs start time, duration" ---------------------


def test_pipeline_stages_run_in_order_and_log_their_durations(
    settings: Settings,
    clip: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    with caplog.at_level(logging.INFO, logger="framepipe.steps"):
        info = run_ml(settings, clip)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    lines = [(str(getattr(r, "component", "")), r.getMessage()) for r in caplog.records]
    for stage in STAGES:
        component = f"ml_video/{stage}:{info.id[:8]}"
        mine = [message for where, message in lines if where == component]
        assert mine[0] == "Stage started", (stage, mine)
        assert re.fullmatch(r"Stage completed in \d+\.\d\ds", mine[-1]), (stage, mine)
    started = [where.split("/")[1].split(":")[0] for where, m in lines if m == "Stage started"]
    assert started == ["fetch", *STAGES, "finalize"]


# -- Model adapters: MODEL_ADAPTER_TYPE=python with PYTHON_PATH and PYTHON_SCRIPT ---------------


def test_the_python_adapter_runs_their_script_protocol(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(MODELS / "good_model.py"))
    info = run_ml(settings, clip)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["model"] == "SubprocessModel"


# -- Configuration: their variables, mapped onto framepipe's settings --------------------------


def test_their_configuration_block_maps_onto_framepipe_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FRAMEPIPE_DATABASE_URL", "FRAMEPIPE_OBJECTS_URL", "FRAMEPIPE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("FRAMEPIPE_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("FRAMEPIPE_S3_SECRET_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no framepipe.toml
    env = {
        "MODEL_ADAPTER_TYPE": "mock",
        "DATABASE_FILE": str(tmp_path / "db.sqlite3"),
        "MINIO_ENDPOINT": "127.0.0.1",
        "MINIO_PORT": "9000",
        "MINIO_ACCESS_KEY": "minioadmin",
        "MINIO_SECRET_KEY": "minio-secret-value",
        "MINIO_BUCKET": "mangamotion",
        "RABBITMQ_URL": "amqp://guest:rabbit-password@127.0.0.1:5672",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    mapped = map_settings()
    assert mapped.environment == {
        "FRAMEPIPE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "FRAMEPIPE_OBJECTS_URL": "s3://mangamotion?endpoint=http://127.0.0.1:9000",
        "FRAMEPIPE_S3_ACCESS_KEY": "minioadmin",
        "FRAMEPIPE_S3_SECRET_KEY": "minio-secret-value",
        "FRAMEPIPE_BROKER_URL": "amqp://guest:rabbit-password@127.0.0.1:5672",
    }
    shown = "\n".join(mapped.notes)
    assert "minio-secret-value" not in shown and "rabbit-password" not in shown
    assert "amqp://guest:***@127.0.0.1:5672" in shown
    assert "minio-secret-value" not in repr(MlVideoSettings.load())

    # framepipe's own name wins, and the team's variable is reported as not used
    monkeypatch.setenv("FRAMEPIPE_OBJECTS_URL", "s3://other?endpoint=http://127.0.0.1:9001")
    again = map_settings()
    assert "FRAMEPIPE_OBJECTS_URL" not in again.environment
    assert "FRAMEPIPE_S3_SECRET_KEY" not in again.environment
    assert any(note.startswith("MINIO_* is not used") for note in again.notes)

    monkeypatch.setenv("MINIO_PORT", "ninety")
    with pytest.raises(ConfigError, match="MINIO_PORT='ninety'"):
        map_settings()
    monkeypatch.setenv("MINIO_PORT", "9000")
    monkeypatch.setenv("MINIO_ENDPOINT", "https://minio.internal:9443")
    monkeypatch.delenv("MINIO_PORT")
    assert MlVideoSettings.load().objects_url() == (
        "s3://mangamotion?endpoint=https://minio.internal:9443"
    )


def test_the_entry_point_runs_a_worker_with_the_ml_pipeline_by_default() -> None:
    ref = "framepipe.pipelines.ml_video:ml_video"
    assert cli_arguments([]) == ["worker", "--pipeline", ref]
    assert cli_arguments(["-c", "2"]) == ["worker", "--pipeline", ref, "-c", "2"]
    assert cli_arguments(["serve", "--port", "8000"]) == [
        "serve",
        "--pipeline",
        ref,
        "--port",
        "8000",
    ]
    assert cli_arguments(["jobs", "list"]) == ["jobs", "list"]


def test_minio_or_database_settings_a_plain_process_would_ignore_are_refused(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Started as ``framepipe run`` / ``framepipe worker`` instead of the ML entry point, a
    process with MINIO_* set wrote to the local store; now the job stops at its first stage,
    naming the framepipe setting, without the secret."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    monkeypatch.delenv("FRAMEPIPE_OBJECTS_URL", raising=False)
    monkeypatch.delenv("FRAMEPIPE_DATABASE_URL", raising=False)
    monkeypatch.setenv("MINIO_ENDPOINT", "127.0.0.1")
    monkeypatch.setenv("MINIO_SECRET_KEY", "minio-secret-value")
    info = run_ml(settings, clip)
    assert info.status is ExecutionStatus.FAILED
    assert info.step("fetch").status is StepStatus.FAILED
    assert info.step("fetch").attempt == 1  # a setting error: no retry can mend it
    error = info.errors["fetch"]
    assert "FRAMEPIPE_OBJECTS_URL=s3://mangamotion?endpoint=http://127.0.0.1:9000" in error
    assert "python -m framepipe.pipelines.ml_worker" in error
    assert "minio-secret-value" not in error
    assert keys_of(settings, info.id) == set()

    monkeypatch.delenv("MINIO_ENDPOINT")
    monkeypatch.delenv("MINIO_SECRET_KEY")
    monkeypatch.setenv("DATABASE_FILE", str(tmp_path / "db.sqlite3"))
    other = run_ml(settings, clip)
    assert other.status is ExecutionStatus.FAILED
    assert "FRAMEPIPE_DATABASE_URL=sqlite:///" in other.errors["fetch"]


def test_an_object_key_submitted_where_minio_settings_are_ignored_names_the_setting(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit pins an object key's version, so it looks in the object store: with MINIO_*
    set but this process on the local store, it was refused as "no such object ... upload it
    first" (the upload is in MinIO). It is refused naming the framepipe setting, as fetch does
    for a local file, and no execution is made."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    monkeypatch.delenv("FRAMEPIPE_OBJECTS_URL", raising=False)
    monkeypatch.setenv("MINIO_ENDPOINT", "127.0.0.1")
    monkeypatch.setenv("MINIO_SECRET_KEY", "minio-secret-value")

    async def submit() -> None:
        async with JobEngine(settings=settings) as engine:
            await engine.submit(ml_video, {"input": "uploads/clip.mp4"})

    with pytest.raises(ConfigError) as refused:
        asyncio.run(submit())
    error = str(refused.value)
    assert "FRAMEPIPE_OBJECTS_URL=s3://mangamotion?endpoint=http://127.0.0.1:9000" in error
    assert "python -m framepipe.pipelines.ml_worker" in error
    assert "minio-secret-value" not in error

    async def listed() -> list[Any]:
        async with JobEngine(settings=settings) as engine:
            return list_executions(engine.store)

    assert asyncio.run(listed()) == []


# -- Progress tracking: the frontend polls /api/status/:jobId ----------------------------------


def poll_status(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every answer of ``/api/status/{job_id}`` until it says completed or failed."""
    seen: list[dict[str, Any]] = []

    def finished() -> bool:
        answer = client.get(f"/api/status/{job_id}", headers=AUTH)
        assert answer.status_code == 200, answer.text
        seen.append(answer.json())
        return seen[-1]["status"] in ("completed", "failed")

    wait_until(f"job {job_id} to finish", finished, 120, interval=0.05)
    return seen


def test_the_frontend_polls_status_in_their_shape(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    with Server(settings, pipelines=(ml_video,)) as server, httpx.Client(base_url=server.url) as c:
        put = c.put("/api/objects/uploads/clip.mp4", content=clip.read_bytes(), headers=AUTH)
        assert put.status_code in (200, 201), put.text
        submitted = c.post(
            "/api/executions",
            json={
                "pipeline": "ml_video",
                "inputs": {"input": "uploads/clip.mp4", "prompt": "turn into anime", "width": 160},
            },
            headers=AUTH,
        )
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        answers = poll_status(c, job_id)
        last = answers[-1]
        assert {a["status"] for a in answers} <= THEIR_STATUSES
        progress = [a["progress"] for a in answers]
        assert progress == sorted(progress) and all(isinstance(p, int) for p in progress)
        assert last["status"] == "completed" and last["progress"] == 100, last
        assert last["jobId"] == job_id and last["error"] is None and last["stage"] is None
        assert last["resultPath"] == f"ml/{job_id}/output.mp4"
        assert last["thumbnailPath"] == f"ml/{job_id}/thumbnail.jpg"
        assert last["createdAt"].endswith("Z") and last["updatedAt"] >= last["createdAt"]
        assert last["executionStatus"] == "completed"
        video = c.get(f"/api/objects/{last['resultPath']}", headers=AUTH)
        assert video.status_code == 200 and len(video.content) > 1000
        # an id prefix works as on /api/executions; an unknown one is a 404
        assert c.get(f"/api/status/{job_id[:8]}", headers=AUTH).json()["jobId"] == job_id
        assert c.get("/api/status/ffffffffffff", headers=AUTH).status_code == 404
        # behind the same token and browser checks as the rest of /api
        assert c.get(f"/api/status/{job_id}").status_code == 401
        assert (
            c.get(f"/api/status/{job_id}", headers={"Authorization": "Bearer no"}).status_code
            == 401
        )
        foreign = c.get(f"/api/status/{job_id}", headers={**AUTH, "Origin": "https://evil.example"})
        assert foreign.status_code == 403
        rebound = c.get(f"/api/status/{job_id}", headers={**AUTH, "Host": "evil.example"})
        assert rebound.status_code in (400, 403)


def test_a_failed_job_reads_failed_with_its_stage_and_error(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_SCRIPT", str(MODELS / "crash_model.py"))
    failed = run_ml(settings, clip)
    with Server(settings, pipelines=(ml_video,)) as server, httpx.Client(base_url=server.url) as c:
        body = c.get(f"/api/status/{failed.id}", headers=AUTH).json()
    assert body["status"] == "failed" and body["stage"] == "inference", body
    assert "exited with code 3" in body["error"]
    assert body["resultPath"] is None and body["executionStatus"] == "failed"


# -- Resource management: "Temp files cleaned up after job completion" --------------------------

FINAL = {"output.mp4", "thumbnail.jpg", "grid.jpg", "manifest.json"}


def test_intermediates_are_deleted_on_completion_and_kept_for_a_retry(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_PATH", sys.executable)
    monkeypatch.setenv("PYTHON_SCRIPT", str(MODELS / "crash_model.py"))
    failed = run_ml(settings, clip)
    assert failed.status is ExecutionStatus.FAILED
    kept = keys_of(settings, failed.id)
    assert {"input.mp4", "preprocessed.mp4"} <= kept  # what the retry resumes from

    monkeypatch.setenv("PYTHON_SCRIPT", str(MODELS / "good_model.py"))
    done = retry_ml(settings, failed.id)
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert keys_of(settings, done.id) == FINAL
    # input, preprocessed, the model's frames; no post-processed copy of them (the default
    # contrast and brightness change nothing)
    assert done.data["intermediates_deleted"] == 2 + done.data["frames"]


def test_keep_intermediates_keeps_them(
    settings: Settings, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    monkeypatch.setenv("ML_KEEP_INTERMEDIATES", "true")
    info = run_ml(settings, clip)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    keys = keys_of(settings, info.id)
    assert FINAL | {"input.mp4", "preprocessed.mp4"} <= keys
    assert any(k.startswith("frames/") for k in keys)
    assert info.data["intermediates_deleted"] == 0
    # the default contrast 1 and brightness 0 change nothing: no frame went through the store
    # again (a post-processed copy of every one), stitch took the model's
    assert not any(k.startswith("post/") for k in keys)
    assert info.data["post_prefix"] == info.data["frames_prefix"]
    brighter = run_ml(settings, clip, brightness=40)
    assert brighter.status is ExecutionStatus.COMPLETED, brighter.error
    post = {k for k in keys_of(settings, brighter.id) if k.startswith("post/")}
    assert len(post) == brighter.data["post_frames"] == brighter.data["frames"]
    # a key the user gave is never an intermediate
    monkeypatch.delenv("ML_KEEP_INTERMEDIATES")
    with open_object_store(settings.resolved_objects_url) as objects:
        objects.put_file("uploads/clip.mp4", clip)
        by_key = run_ml(settings, "uploads/clip.mp4")
        assert by_key.status is ExecutionStatus.COMPLETED, by_key.error
        assert objects.exists("uploads/clip.mp4")
    assert keys_of(settings, by_key.id) == FINAL


# -- Usage: "Start Pipeline Worker" with their environment alone ---------------------------------


@pytest.fixture
def their_database(tmp_path: Path) -> Path:
    """Their DATABASE_FILE, with the jobs table their API and worker wrote."""
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, file_path TEXT, prompt TEXT, status TEXT,"
            " progress INTEGER, result_path TEXT, error TEXT, created_at TEXT, updated_at TEXT)"
        )
        db.execute(
            "INSERT INTO jobs VALUES ('old-1', 'uploads/a.mp4', 'anime', 'completed', 100,"
            " 'outputs/old-1/video.mp4', NULL, '2025-11-24', '2025-11-24')"
        )
    db.close()
    return path


def clean_environment() -> dict[str, str]:
    """This process's environment without any framepipe, AWS, MinIO or model setting."""
    prefixes = ("FRAMEPIPE_", "AWS_", "MINIO_", "MODEL_", "PYTHON_SCRIPT", "PYTHON_PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.pop("DATABASE_FILE", None)
    env.pop("RABBITMQ_URL", None)
    return env


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ml_worker(
    request: pytest.FixtureRequest, tmp_path: Path, their_database: Path, s3_server: Any
) -> Iterator[tuple[dict[str, str], Path, str]]:
    """``python -m framepipe.pipelines.ml_worker`` started with their variables alone (and a
    broker namespace of the test's own): (its environment, its log, the bucket). With
    ``postgresql``, ``FRAMEPIPE_DATABASE_URL`` names the PostgreSQL server too (workers on
    several machines), and wins over ``DATABASE_FILE``."""
    database = {}
    if request.param == "postgresql":
        database["FRAMEPIPE_DATABASE_URL"] = request.getfixturevalue("pg_url")
    bucket = s3_server.new_bucket()
    port = s3_server.endpoint.rsplit(":", 1)[1]
    with amqp_namespace("fp-ml-guide-") as namespace:
        env = clean_environment() | {
            "MODEL_ADAPTER_TYPE": "mock",
            "DATABASE_FILE": str(their_database),
            "MINIO_ENDPOINT": "127.0.0.1",
            "MINIO_PORT": port,
            "MINIO_ACCESS_KEY": "minio-access",
            "MINIO_SECRET_KEY": "minio-secret-value",
            "MINIO_BUCKET": bucket,
            "RABBITMQ_URL": AMQP_URL.rstrip("/"),
            "FRAMEPIPE_BROKER_NAMESPACE": namespace,  # the test's own queue on the shared broker
            "FRAMEPIPE_HOME": str(tmp_path / "worker-home"),
            "AWS_EC2_METADATA_DISABLED": "true",
            **database,
        }
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "framepipe.pipelines.ml_worker", "--concurrency", "2"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        try:
            yield env, log, bucket
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            s3_server.drop_bucket(bucket)


@pytest.mark.slow
def test_the_worker_starts_with_their_settings_and_the_frontend_polls_it(
    ml_worker: tuple[dict[str, str], Path, str],
    s3_server: Any,
    their_database: Path,
    clip: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env, log, bucket = ml_worker
    # their API put the upload into MinIO; the service submits by key
    s3_server.client.upload_file(str(clip), bucket, "uploads/clip.mp4")
    monkeypatch.setenv("FRAMEPIPE_S3_ACCESS_KEY", "minio-access")
    monkeypatch.setenv("FRAMEPIPE_S3_SECRET_KEY", "minio-secret-value")
    service = Settings(
        home=tmp_path / "service-home",
        database_url=env.get("FRAMEPIPE_DATABASE_URL", f"sqlite:///{their_database}"),
        objects_url=f"s3://{bucket}?endpoint={s3_server.endpoint}",
        broker_url=env["RABBITMQ_URL"],
        broker_namespace=env["FRAMEPIPE_BROKER_NAMESPACE"],
    )
    with Server(service, pipelines=(ml_video,)) as server, httpx.Client(base_url=server.url) as c:
        submitted = c.post(
            "/api/executions",
            json={
                "pipeline": "ml_video",
                "inputs": {
                    "input": "uploads/clip.mp4",
                    "prompt": "turn into anime",
                    "style": "studio",
                    "seed": 42,
                    "width": 160,
                },
            },
            headers=AUTH,
        )
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        answers = poll_status(c, job_id)
    output = log.read_text(errors="replace")
    assert answers[-1]["status"] == "completed", (answers[-1], output[-3000:])
    assert answers[-1]["resultPath"] == f"ml/{job_id}/output.mp4"

    # the results went to MinIO, not the local store; the intermediates are gone
    listed = s3_server.client.list_objects_v2(Bucket=bucket, Prefix=f"ml/{job_id}/")
    keys = {item["Key"].removeprefix(f"ml/{job_id}/") for item in listed.get("Contents", ())}
    assert keys == FINAL
    assert not (tmp_path / "worker-home" / "objects").exists()

    # the worker ran every stage (in its own process) and logged it; no secret in its output
    assert f"FRAMEPIPE_OBJECTS_URL=s3://{bucket}?endpoint=http://127.0.0.1:" in output
    for stage in STAGES:
        assert re.search(
            rf"\[ml_video/{stage}:{job_id[:8]}\] Stage completed in \d+\.\d\ds", output
        )
    assert "minio-secret-value" not in output and "guest:guest" not in output

    # their DATABASE_FILE holds framepipe's tables beside their untouched jobs table (or, with
    # FRAMEPIPE_DATABASE_URL, none of them: the worker said DATABASE_FILE was not used)
    with sqlite3.connect(their_database) as db:
        assert db.execute("SELECT status FROM jobs WHERE id = 'old-1'").fetchone() == ("completed",)
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if "FRAMEPIPE_DATABASE_URL" in env:
            assert "DATABASE_FILE is not used: framepipe's database_url is set" in output
            assert "fp_executions" not in tables
        else:
            assert "[ml_worker] DATABASE_FILE -> FRAMEPIPE_DATABASE_URL=sqlite:///" in output
            row = db.execute("SELECT status FROM fp_executions WHERE id = ?", (job_id,))
            assert row.fetchone() == ("completed",)
    db.close()
