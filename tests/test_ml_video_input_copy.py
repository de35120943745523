"""The ML video job runs on the video its submitter sent: a job queued while no worker runs,
its upload's key then given another video, is refused naming the key instead of completing
on the other video; a job takes its own copy of the upload, which its later steps read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REDIS_URL, redis_namespace
from framepipe import ExecutionStatus, JobEngine, Settings, StepStatus, open_object_store
from framepipe.errors import InvalidInputError
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.records import get_execution
from framepipe.jobs.worker import Worker
from framepipe.pipelines.ml_video import ml_video
from media import make_clip

KEY = "uploads/shared.mp4"


@pytest.fixture(params=["local", "s3"])
def objects_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The local store, then the real S3 test server."""
    if request.param == "local":
        yield f"file://{tmp_path / 'objects'}"
        return
    request.getfixturevalue("aws_env")
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    try:
        yield f"s3://{bucket}?endpoint={server.endpoint}"
    finally:
        server.drop_bucket(bucket)


@pytest.fixture
def worker_settings(tmp_path: Path, objects_url: str) -> Iterator[Settings]:
    """Settings of a submitter and a worker sharing a SQLite database, a Redis broker and
    the object store."""
    with redis_namespace("fp-ml-copy-") as namespace:
        yield Settings(
            home=tmp_path / "home",
            database_url=f"sqlite:///{tmp_path / 'state.db'}",
            objects_url=objects_url,
            broker_url=REDIS_URL,
            broker_namespace=namespace,
            jobs_mode="workers",
            retry_initial_delay=0.01,
            retry_max_delay=0.05,
            shutdown_grace=2.0,
        )


def queue_then_work(settings: Settings, inputs: dict[str, Any], meanwhile: Any) -> ExecutionInfo:
    """Submit ``inputs`` with no worker running, call ``meanwhile()``, then start a worker
    and wait for the execution to finish."""

    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(ml_video, inputs, input_roots=[])
            await asyncio.to_thread(meanwhile)
            worker = Worker(settings)
            running = asyncio.create_task(worker.run())
            try:
                return await asyncio.wait_for(
                    engine.wait(execution_id, raise_on_failure=False), 120
                )
            finally:
                worker.request_stop()
                await asyncio.wait_for(running, 30)

    return asyncio.run(main())


def test_a_queued_job_whose_upload_was_replaced_is_refused_naming_the_key(
    worker_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It completed on the second video: fetch kept the client's key, which preprocess read
    when the worker came."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    objects = open_object_store(worker_settings.resolved_objects_url)
    objects.put_file(KEY, make_clip(tmp_path / "a.mp4", frames=10, size=(320, 240)))
    other = make_clip(tmp_path / "b.mp4", frames=20, size=(160, 120))

    def replace() -> None:
        time.sleep(3.2)  # past the clock slack, and a new second for S3's whole seconds
        objects.put_file(KEY, other)

    info = queue_then_work(worker_settings, {"input": KEY, "width": 160}, replace)
    assert info.status is ExecutionStatus.FAILED, info.data
    fetch = info.step("fetch")
    assert fetch.status is StepStatus.FAILED and fetch.attempt == 1  # refused, not retried
    error = info.errors["fetch"]
    assert error.startswith(
        f"InvalidInputError: inputs.input: '{KEY}' was replaced after this job was submitted"
    ), error
    assert info.step("preprocess").status is not StepStatus.COMPLETED
    assert "preprocessed_info" not in info.data
    assert objects.get(KEY) == other.read_bytes()  # the client's object is left alone


def test_an_upload_replaced_right_after_the_submit_is_refused_naming_the_key(
    worker_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit pins the object's version, so a replacement within the same second (which
    a modification time, whole seconds on S3, cannot tell) is refused; before, the job
    completed on the second video."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    objects = open_object_store(worker_settings.resolved_objects_url)
    objects.put_file(KEY, make_clip(tmp_path / "a.mp4", frames=10, size=(320, 240)))
    other = make_clip(tmp_path / "b.mp4", frames=20, size=(160, 120))

    info = queue_then_work(
        worker_settings, {"input": KEY, "width": 160}, lambda: objects.put_file(KEY, other)
    )
    assert info.status is ExecutionStatus.FAILED, info.data
    assert info.inputs["input_version"] not in (None, objects.stat(KEY).version)
    fetch = info.step("fetch")
    assert fetch.status is StepStatus.FAILED and fetch.attempt == 1  # refused, not retried
    error = info.errors["fetch"]
    assert error.startswith(
        f"InvalidInputError: inputs.input: '{KEY}' was replaced after this job was submitted"
    ), error
    assert "preprocessed_info" not in info.data
    assert not objects.exists(f"ml/{info.id}/input.mp4")  # no copy left
    assert objects.get(KEY) == other.read_bytes()


def test_the_submit_refuses_a_missing_key_or_a_version_the_object_no_longer_is(
    worker_settings: Settings, tmp_path: Path
) -> None:
    """A submitter may pin its own upload (the version its PUT got): one replaced since is
    refused at the submit, naming the field, and no execution is made."""
    objects = open_object_store(worker_settings.resolved_objects_url)
    mine = objects.put_file(KEY, make_clip(tmp_path / "a.mp4", frames=10, size=(320, 240)))
    objects.put_file(KEY, make_clip(tmp_path / "b.mp4", frames=20, size=(160, 120)))

    async def submit(inputs: dict[str, Any]) -> str:
        async with JobEngine(settings=worker_settings) as engine:
            return await engine.submit(ml_video, inputs, input_roots=[])

    with pytest.raises(InvalidInputError) as stale:
        asyncio.run(submit({"input": KEY, "input_version": mine.version}))
    assert stale.value.where == "inputs.input_version"
    assert f"'{KEY}' is no longer version {mine.version}" in str(stale.value)
    with pytest.raises(InvalidInputError) as missing:
        asyncio.run(submit({"input": "uploads/nope.mp4"}))
    assert missing.value.where == "inputs.input"
    assert "'uploads/nope.mp4': no such object in the object store" in str(missing.value)
    current = objects.stat(KEY).version
    execution_id = asyncio.run(submit({"input": KEY, "input_version": current}))
    assert execution_id


def test_an_upload_s_etag_given_without_its_quotes_pins_it(
    worker_settings: Settings, tmp_path: Path
) -> None:
    """S3 gives an ETag in quotes; MinIO's clients (minio-js, mc) and others give it without.
    Either pins the upload (it was refused as a version the object no longer is), and the job
    stores the version as the store gives it, which fetch copies."""
    objects = open_object_store(worker_settings.resolved_objects_url)
    mine = objects.put_file(KEY, make_clip(tmp_path / "a.mp4", frames=10, size=(320, 240)))
    assert mine.version is not None

    async def submit(inputs: dict[str, Any]) -> ExecutionInfo:
        async with JobEngine(settings=worker_settings) as engine:
            execution_id = await engine.submit(ml_video, inputs, input_roots=[])
            return get_execution(engine.store, execution_id, with_steps=False)

    info = asyncio.run(submit({"input": KEY, "input_version": mine.version.strip('"')}))
    assert info.inputs["input_version"] == mine.version
    objects.put_file(KEY, make_clip(tmp_path / "b.mp4", frames=20, size=(160, 120)))
    with pytest.raises(InvalidInputError) as stale:
        asyncio.run(submit({"input": KEY, "input_version": mine.version.strip('"')}))
    assert stale.value.where == "inputs.input_version"


def test_a_job_reads_its_own_copy_of_the_upload_and_deletes_only_that(
    worker_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    objects = open_object_store(worker_settings.resolved_objects_url)
    upload = make_clip(tmp_path / "a.mp4", frames=10, size=(320, 240))
    objects.put_file(KEY, upload)
    info = queue_then_work(worker_settings, {"input": KEY, "width": 160}, lambda: None)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["input_key"] == f"ml/{info.id}/input.mp4"
    assert info.data["input_source"]["key"] == KEY
    assert info.data["input_source"]["size"] == upload.stat().st_size
    assert info.data["input_source"]["version"] == objects.stat(KEY).version
    pre = info.data["preprocessed_info"]
    assert (pre["frames"], pre["width"], pre["height"]) == (10, 160, 120)
    assert objects.get(KEY) == upload.read_bytes()  # finalize deleted the copy, not this
    assert not objects.exists(info.data["input_key"])


def test_an_empty_or_non_video_upload_fails_fetch_once_naming_the_key(
    worker_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both failed fetch three times (its two retries read the same bytes)."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    objects = open_object_store(worker_settings.resolved_objects_url)
    objects.put("uploads/empty.mp4", b"")
    objects.put("uploads/notes.mp4", b"a shopping list, not a video\n")

    for key, cause in (
        ("uploads/empty.mp4", "is empty (0 bytes), not a video"),
        ("uploads/notes.mp4", "cannot be opened as a video file"),
    ):
        info = queue_then_work(worker_settings, {"input": key}, lambda: None)
        assert info.status is ExecutionStatus.FAILED
        fetch = info.step("fetch")
        assert fetch.status is StepStatus.FAILED and fetch.attempt == 1, fetch
        error = info.errors["fetch"]
        assert error.startswith(f"InvalidInputError: inputs.input: {key}: {cause}"), error


def test_an_upload_replaced_to_fix_it_is_taken_by_the_retry(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``framepipe jobs retry`` after replacing a bad upload means the new one: the replacement
    counts from the retry, not from the submit."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "mock")
    objects = open_object_store(settings.resolved_objects_url)
    objects.put(KEY, b"half an upload")

    async def run() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(ml_video, {"input": KEY, "width": 160}, raise_on_failure=False)

    failed = asyncio.run(run())
    assert failed.step("fetch").status is StepStatus.FAILED, failed.error
    time.sleep(3.2)
    objects.put_file(KEY, make_clip(tmp_path / "whole.mp4", frames=10, size=(320, 240)))

    async def retry() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            await engine.retry(failed.id, ml_video)
            return await engine.wait(failed.id, raise_on_failure=False)

    done = asyncio.run(retry())
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert done.data["preprocessed_info"]["frames"] == 10
