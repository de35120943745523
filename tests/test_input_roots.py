"""Local files named by inputs are confined to the submitter's roots, whatever the pipeline
declares, in both modes (issue 14, hole 3).

The submit records ``input_roots`` with the execution (NULL: unrestricted, the command line and
the Python API; the HTTP service passes ``FRAMEPIPE_INPUT_ROOTS``, none by default); every step
sees it as ``ctx.input_roots``, in the embedded engine and on ``framepipe worker`` processes,
and ``framepipe.jobs.inputs.local_input`` applies it to inputs no model declares. Real
components: the service on uvicorn (``test_server.Server``), real clips, the local object store,
SQLite and PostgreSQL, Redis and worker processes; the SD import's HTTP submission; FIFOs in a
share; the migration of a database at revision 0002.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import cv2
import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from conftest import REDIS_URL, redis_namespace
from framepipe import ExecutionStatus, JobEngine, Pipeline, Settings, StepContext
from framepipe.backends.objects import open_object_store
from framepipe.backends.state import SCHEMA_HEAD, StateStore, executions, steps
from framepipe.confined import LinkRefusedError, open_beneath
from framepipe.errors import PathNotAllowedError
from framepipe.jobs.inputs import copy_local_file, local_input
from framepipe.jobs.models import ExecutionInfo
from framepipe.media.steps import Input, media_step
from media import make_clip
from test_server import AUTH, Server, wait_status

pytestmark = pytest.mark.timeout(240)

FAST = "ultrafast"

# Inputs that no model declares: the media steps read them through local_input.
media_roots = Pipeline("media_roots")
media_step(media_roots, "normalise", source="video", width=64, preset=FAST)

logo_roots = Pipeline("logo_roots")
media_step(logo_roots, "watermark", source="video", image=Input("logo"), preset=FAST)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/clip.mp4`` (the allowed folder) and ``outside/clip.mp4`` (a server file no HTTP
    client may have), both real clips; ``elsewhere/`` holds no ``clip.mp4``."""
    for folder in ("root", "outside", "elsewhere"):
        (tmp_path / folder).mkdir()
    for folder in ("root", "outside"):
        make_clip(tmp_path / folder / "clip.mp4", frames=10, size=(160, 120))
    return tmp_path


def stored_keys(settings: Settings) -> list[str]:
    return [i.key for i in open_object_store(settings.resolved_objects_url).list("")]


def recorded_roots(settings: Settings, execution_id: str) -> Any:
    with StateStore(settings.resolved_database_url) as store, store.read() as conn:
        return conn.execute(
            sa.select(executions.c.input_roots).where(executions.c.id == execution_id)
        ).scalar_one()


def post(client: httpx.Client, pipeline: str, inputs: dict[str, Any]) -> str:
    response = client.post("/api/executions", json={"pipeline": pipeline, "inputs": inputs})
    assert response.status_code == 201, response.text
    execution_id: str = response.json()["id"]
    return execution_id


def submit_api(
    settings: Settings,
    pipeline: Pipeline,
    inputs: dict[str, Any],
    wait: Callable[[str], ExecutionInfo] | None = None,
) -> ExecutionInfo:
    """The Python API, as a user on their own machine calls it (``input_roots=None``)."""

    async def main() -> ExecutionInfo | str:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(pipeline, inputs)
            if wait is not None:
                return execution_id
            return await engine.wait(execution_id, raise_on_failure=False)

    result = asyncio.run(asyncio.wait_for(main(), 120))
    if isinstance(result, str):
        assert wait is not None
        return wait(result)
    return result


def check_confined_over_http(
    settings: Settings, tree: Path, wait: Callable[[str], ExecutionInfo] | None = None
) -> list[str]:
    """The scenario both modes run: the service confined to ``root``. Returns the ids of the
    executions it ran."""
    root = tree / "root"
    served = settings.model_copy(update={"input_roots": [root]})
    with (
        Server(served, pipelines=(media_roots,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        # A server file outside the roots, and a path that does not exist: the same refusal.
        exists = post(client, "media_roots", {"video": str(tree / "outside" / "clip.mp4")})
        missing = post(client, "media_roots", {"video": str(tree / "elsewhere" / "clip.mp4")})
        through_dots = post(client, "media_roots", {"video": f"{root}/../outside/clip.mp4"})
        refusals = [wait_status(client, x, timeout=120) for x in (exists, missing, through_dots)]
        errors = []
        for body in refusals:
            assert body["status"] == "failed", body
            (step,) = body["steps"]
            assert step["status"] == "failed" and step["attempt"] == 1
            first = step["error"].splitlines()[0]
            assert first == (
                "PathNotAllowedError: inputs.video: 'clip.mp4' is not inside an "
                "allowed root (FRAMEPIPE_INPUT_ROOTS)"
            ), first
            assert str(tree) not in first
            errors.append(step["error"])
        assert errors[0] == errors[1] == errors[2]  # nothing tells the missing one apart
        assert stored_keys(settings) == []  # nothing was read, so nothing was stored
        assert recorded_roots(settings, exists) == [os.path.realpath(root)]

        # Inside the roots: read (through a copy that follows no link) and stored.
        inside = wait_status(
            client, post(client, "media_roots", {"video": str(root / "clip.mp4")}), timeout=120
        )
        assert inside["status"] == "completed", inside.get("error")
        assert inside["data"]["normalise"]["info"]["width"] == 64
        assert stored_keys(settings) == [inside["data"]["normalise"]["key"]]

        # A client cannot widen its roots: the body has no such field.
        widened = client.post(
            "/api/executions",
            json={
                "pipeline": "media_roots",
                "inputs": {"video": str(tree / "outside" / "clip.mp4")},
                "input_roots": ["/"],
            },
        )
        assert widened.status_code == 422, widened.text

    # The Python API (and the command line) keep their local-path convenience.
    own = submit_api(settings, media_roots, {"video": str(tree / "outside" / "clip.mp4")}, wait)
    assert own.status is ExecutionStatus.COMPLETED, own.error
    assert recorded_roots(settings, own.id) is None
    return [exists, missing, through_dots, inside["id"], own.id]


def test_media_steps_read_undeclared_inputs_only_inside_the_roots_over_http(
    settings: Settings, tree: Path
) -> None:
    """Embedded engine (SQLite and PostgreSQL)."""
    check_confined_over_http(settings, tree)


@pytest.mark.slow
def test_the_same_holds_on_worker_processes_with_redis_and_postgresql(
    tmp_path: Path, tree: Path, pg_url: str
) -> None:
    """The service submits to the workers (PostgreSQL state, Redis broker); the workers have
    no FRAMEPIPE_INPUT_ROOTS of their own: the roots reach them with the claimed step."""
    from test_jobs_workers import Cluster

    with redis_namespace("fp-roots-") as namespace:
        cluster = Cluster(tmp_path, pg_url, REDIS_URL, namespace)
        try:
            assert cluster.settings.distributed_jobs
            assert "FRAMEPIPE_INPUT_ROOTS" not in cluster.env
            cluster.wait_registered(cluster.worker())
            ran = check_confined_over_http(cluster.settings, tree, cluster.wait)
            with cluster.store.read() as conn:  # every step, refused or not, ran on a worker
                workers = (
                    conn.execute(sa.select(steps.c.worker).where(steps.c.execution_id.in_(ran)))
                    .scalars()
                    .all()
                )
            assert len(workers) == len(ran) and all(workers), workers
        finally:
            cluster.close()


def test_without_roots_configured_the_service_takes_no_local_path(
    settings: Settings, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (``FRAMEPIPE_INPUT_ROOTS`` unset): only object keys. A relative value is
    an object key, never a file of the server's working folder, even one that exists."""
    assert settings.input_roots == []
    objects = open_object_store(settings.resolved_objects_url)
    objects.put_file("uploads/clip.mp4", tree / "root" / "clip.mp4")
    monkeypatch.chdir(tree / "outside")  # "clip.mp4" is a file here
    with (
        Server(settings, pipelines=(media_roots,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        local = wait_status(
            client,
            post(client, "media_roots", {"video": str(tree / "root" / "clip.mp4")}),
            timeout=120,
        )
        relative = wait_status(
            client, post(client, "media_roots", {"video": "clip.mp4"}), timeout=120
        )
        keyed = wait_status(
            client, post(client, "media_roots", {"video": "uploads/clip.mp4"}), timeout=120
        )
    assert local["status"] == "failed"
    assert local["steps"][0]["error"].startswith(
        "PathNotAllowedError: inputs.video: local paths are not accepted here (no roots are "
        "configured: FRAMEPIPE_INPUT_ROOTS)"
    )
    assert relative["status"] == "failed"
    assert relative["steps"][0]["error"].startswith(
        "MediaError: clip.mp4: no such object in the object store"
    )
    assert keyed["status"] == "completed", keyed.get("error")
    assert recorded_roots(settings, local["id"]) == []


def test_a_file_option_read_from_an_input_is_confined_too(settings: Settings, tree: Path) -> None:
    """``watermark(image=Input("logo"))``: the logo is an input like the video."""
    root = tree / "root"
    logo = tree / "outside" / "logo.png"
    image = np.zeros((8, 8, 4), np.uint8)
    image[..., 3] = 255
    cv2.imwrite(str(logo), image)
    cv2.imwrite(str(root / "logo.png"), image)

    async def main(inputs: dict[str, Any]) -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(logo_roots, inputs, input_roots=[root])
            return await engine.wait(execution_id, raise_on_failure=False)

    video = str(root / "clip.mp4")
    refused = asyncio.run(main({"video": video, "logo": str(logo)}))
    assert refused.status is ExecutionStatus.FAILED
    assert refused.errors["watermark"].startswith(
        "PathNotAllowedError: inputs.logo: 'logo.png' is not inside an allowed root"
    )
    done = asyncio.run(main({"video": video, "logo": str(root / "logo.png")}))
    assert done.status is ExecutionStatus.COMPLETED, done.error


def test_a_retry_keeps_the_roots(settings: Settings, tree: Path) -> None:
    """Failed inside the roots (the file was not there yet), retried by the service: still
    confined to the same roots, and the recorded roots are unchanged."""
    root = tree / "root"
    late = root / "late.mp4"
    served = settings.model_copy(update={"input_roots": [root]})
    with (
        Server(served, pipelines=(media_roots,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        inside = post(client, "media_roots", {"video": str(late)})
        outside = post(client, "media_roots", {"video": str(tree / "outside" / "clip.mp4")})
        for execution_id in (inside, outside):
            assert wait_status(client, execution_id, timeout=120)["status"] == "failed"
        make_clip(late, frames=10, size=(160, 120))
        for execution_id in (inside, outside):
            retried = client.post(f"/api/executions/{execution_id}/retry")
            assert retried.status_code == 202, retried.text
        assert wait_status(client, inside, timeout=120)["status"] == "completed"
        again = wait_status(client, outside, timeout=120)
        assert again["status"] == "failed" and again["steps"][0]["attempt"] == 2
        assert again["steps"][0]["error"].startswith("PathNotAllowedError: inputs.video:")
    for execution_id in (inside, outside):
        assert recorded_roots(settings, execution_id) == [os.path.realpath(root)]


# -- local_input, the one rule -------------------------------------------------------------


def ctx_with(roots: list[Path] | None) -> StepContext:
    """What local_input reads of a step's context: its recorded roots."""
    return cast(StepContext, SimpleNamespace(input_roots=None if roots is None else tuple(roots)))


def test_local_input_applies_the_roots_and_keeps_the_convenience_without(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tree / "root"
    monkeypatch.chdir(tree / "outside")
    (root / "link").symlink_to(tree / "outside", target_is_directory=True)
    confined, unrestricted = ctx_with([root]), ctx_with(None)
    assert local_input(confined, str(root / "clip.mp4"), where="inputs.v") == root / "clip.mp4"
    assert local_input(confined, "clip.mp4", where="inputs.v") is None  # a key, not cwd's
    messages = set()
    for outside in (
        tree / "outside" / "clip.mp4",
        tree / "elsewhere" / "clip.mp4",
        root / "link" / "clip.mp4",
    ):
        with pytest.raises(PathNotAllowedError) as refused:
            local_input(confined, str(outside), where="inputs.v")
        messages.add(str(refused.value))
    assert messages == {
        "inputs.v: 'clip.mp4' is not inside an allowed root (FRAMEPIPE_INPUT_ROOTS)"
    }
    with pytest.raises(PathNotAllowedError, match="no roots are configured"):
        local_input(ctx_with([]), str(root / "clip.mp4"), where="inputs.v")
    # No roots (command line, Python API): an existing path, relative or absolute, is local.
    assert local_input(unrestricted, "clip.mp4", where="v") == tree / "outside" / "clip.mp4"
    assert local_input(unrestricted, str(tree / "elsewhere" / "x"), where="v") is None
    assert local_input(unrestricted, "uploads/clip.mp4", where="v") is None
    # A declared value keeps the kind the submit gave it, and is checked against the roots.
    assert local_input(unrestricted, "clip.mp4", where="v", declared=True) is None
    assert (
        local_input(unrestricted, str(tree / "elsewhere" / "x"), where="v", declared=True)
        == tree / "elsewhere" / "x"
    )
    with pytest.raises(PathNotAllowedError):
        local_input(confined, str(tree / "outside" / "clip.mp4"), where="v", declared=True)


# -- the SD import over HTTP ---------------------------------------------------------------


def test_an_sd_import_posted_with_a_foreign_shared_dir_is_refused(tmp_path: Path) -> None:
    """``shared_dir`` is a declared local folder: over HTTP it must lie inside
    FRAMEPIPE_INPUT_ROOTS (none by default), so a client cannot have an import read a folder
    of its choice. The backend's own submissions are unaffected (the example's tests)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "sd_import"
    sys.path.insert(0, str(example))
    import backend as sd_backend

    from framepipe.jobs.loading import load_pipeline

    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    (private / "CARD" / "DCIM").mkdir(parents=True)
    pipeline = load_pipeline(sd_backend.PIPELINE_REF)
    hub = sd_backend.make_hub(pipeline, shared_dir=shared, reconnect_wait=1)
    inputs = {"hub": hub.id, "session_id": "s1", "card_id": "CARD", "files": []}
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'state.db'}")
    with (
        Server(settings, pipelines=(pipeline,), detector_hub=hub) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        for foreign in (private, shared):  # no roots: not even the real share
            refused = client.post(
                "/api/executions",
                json={"pipeline": "sd_import", "inputs": {**inputs, "shared_dir": str(foreign)}},
            )
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"].startswith(
                "inputs.shared_dir: local paths are not accepted here"
            )
        relative = client.post(
            "/api/executions",
            json={"pipeline": "sd_import", "inputs": {**inputs, "shared_dir": "relative/share"}},
        )
        assert relative.status_code == 422 and "inputs.shared_dir" in relative.text
        assert client.get("/api/executions").json() == []  # nothing was created
    confined = settings.model_copy(update={"input_roots": [shared]})
    with (
        Server(confined, pipelines=(pipeline,), detector_hub=hub) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        foreign = client.post(
            "/api/executions",
            json={"pipeline": "sd_import", "inputs": {**inputs, "shared_dir": str(private)}},
        )
        assert foreign.status_code == 422
        assert foreign.json()["detail"] == (
            "inputs.shared_dir: 'private' is not inside an allowed root (FRAMEPIPE_INPUT_ROOTS)"
        )
        asset = client.post(
            "/api/executions",
            json={
                "pipeline": "sd_import",
                "inputs": {
                    **inputs,
                    "shared_dir": str(shared),
                    "intro": str(private / "intro.mp4"),
                },
            },
        )
        assert asset.status_code == 422 and "inputs.intro" in asset.text
        bad_list = client.post(
            "/api/executions",
            json={
                "pipeline": "sd_import",
                "inputs": {
                    **inputs,
                    "shared_dir": str(shared),
                    "files": [
                        {"path": "../x.mp4", "size": 1, "mtime": 0, "fingerprint": "0123456789"}
                    ],
                },
            },
        )
        assert bad_list.status_code == 422
        assert bad_list.json()["detail"].startswith("inputs.files[0].path: ")
        assert client.get("/api/executions").json() == []
        # Inside the configured roots an import may be started (this card lists no file).
        allowed = post(client, "sd_import", {**inputs, "shared_dir": str(shared)})
        body = wait_status(client, allowed, timeout=60)
        assert body["status"] == "completed", body.get("error")
        assert body["data"]["summary"]["status"] == "nothing_new"


def test_an_sd_step_checks_the_shared_dir_against_the_recorded_roots(tmp_path: Path) -> None:
    """Defense in depth: a step of an import whose recorded roots do not hold its shared
    folder (stored before the model was declared, say) refuses to read it."""
    example = Path(__file__).resolve().parents[1] / "examples" / "sd_import"
    sys.path.insert(0, str(example))
    import sd_pipeline

    shared = tmp_path / "shared"
    (shared / "CARD").mkdir(parents=True)
    confined = cast(
        StepContext,
        SimpleNamespace(inputs={"shared_dir": str(shared)}, input_roots=(tmp_path / "other",)),
    )
    with pytest.raises(PathNotAllowedError, match=r"inputs\.shared_dir: 'shared' is not inside"):
        sd_pipeline.shared_dir_of(confined)
    allowed = cast(
        StepContext, SimpleNamespace(inputs={"shared_dir": str(shared)}, input_roots=(shared,))
    )
    assert sd_pipeline.shared_dir_of(allowed) == shared


# -- FIFOs in a share ----------------------------------------------------------------------


def returns_within(seconds: float, fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` in a thread; the exception it raised (None if none). Fails if it is still
    blocked after ``seconds`` (the thread is left behind, blocked on the FIFO; the test opens
    the FIFO's other end to release it)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return TimeoutError(f"still blocked after {seconds} s")
    return outcome[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """``share/CARD/f.mp4`` is a FIFO; afterwards its other end is opened (non-blocking, for
    writing), so a reader still blocked on it, if any, is released."""
    (tmp_path / "share" / "CARD").mkdir(parents=True)
    path = tmp_path / "share" / "CARD" / "f.mp4"
    os.mkfifo(path)
    yield path
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_a_fifo_in_a_share_does_not_hang_the_reader(fifo: Path, tmp_path: Path) -> None:
    share = tmp_path / "share"
    error = returns_within(5, lambda: os.close(open_beneath(share, ("CARD", "f.mp4"))))
    assert isinstance(error, LinkRefusedError), error
    assert "'CARD/f.mp4' is not a regular file" in str(error)
    error = returns_within(5, lambda: copy_local_file(fifo, tmp_path / "copy"))
    assert isinstance(error, LinkRefusedError), error
    assert not (tmp_path / "copy").exists()
    example = Path(__file__).resolve().parents[1] / "examples" / "sd_import"
    sys.path.insert(0, str(example))
    import sd_pipeline

    def read_through_the_backend() -> None:
        with sd_pipeline.shared_file(share, "CARD/f.mp4"):
            pass

    error = returns_within(5, read_through_the_backend)
    assert isinstance(error, LinkRefusedError), error
    # A regular file read the same way is not left non-blocking.
    (share / "CARD" / "g.mp4").write_bytes(b"video")
    fd = open_beneath(share, ("CARD", "g.mp4"))
    try:
        assert os.get_blocking(fd)
        assert os.read(fd, 10) == b"video"
    finally:
        os.close(fd)


def test_open_beneath_refuses_segments_that_leave_their_folder(tmp_path: Path) -> None:
    """One walk for files and folders: ``..`` is refused for both (it used to be followed by
    open_beneath, up out of the root)."""
    from framepipe.confined import open_dir_beneath
    from framepipe.errors import InvalidInputError

    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    for parts in (("..", "secret.txt"), (".", "x"), ("a/b",), ("..",), ("x\x00",)):
        with pytest.raises(InvalidInputError):
            os.close(open_beneath(root, parts))
    with pytest.raises(InvalidInputError):
        os.close(open_dir_beneath(root, ("..",)))


# -- the migration -------------------------------------------------------------------------


def test_a_0002_database_is_upgraded_and_its_executions_stay_unrestricted(
    database_url: str,
) -> None:
    from alembic import command

    from framepipe.backends.state.store import _alembic_config

    assert int(SCHEMA_HEAD) >= 3  # the revision that added input_roots
    with StateStore(database_url, migrate=False) as store:
        with store.write() as conn:
            command.upgrade(_alembic_config(conn), "0002")
        with store.write() as conn:
            conn.exec_driver_sql(
                "INSERT INTO fp_executions (id, pipeline, status, inputs, progress, "
                "cancel_requested, runs, created_at) VALUES "
                "('old2', 'p', 'failed', '{\"video\": \"/x.mp4\"}', 10.0, false, 1, 1.0)"
            )
        assert store.current_revision() == "0002"
    with StateStore(database_url) as store:
        assert store.current_revision() == SCHEMA_HEAD
        with store.read() as conn:
            row = conn.execute(
                sa.select(executions.c.id, executions.c.inputs, executions.c.input_roots)
            ).one()
            assert tuple(row) == ("old2", {"video": "/x.mp4"}, None)
            # NULL in the database itself, not a JSON null
            raw = conn.execute(
                sa.text("SELECT count(*) FROM fp_executions WHERE input_roots IS NULL")
            ).scalar_one()
            assert raw == 1
