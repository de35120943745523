"""The order-accuracy example's stations file watch (``stations_file.watch_stations``) against
real files: whatever becomes of the file (a symlink loop, a parent that is no directory, an
edit moved over it with the same size and time) and whatever applying an edit raises, the
watch goes on until it is told to stop, and the next edit is applied. The runner stops its
service, completing the open orders, even when a task it waits for at the stop failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from waiting import wait_until_async

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "order_accuracy"
sys.path.insert(0, str(EXAMPLE))
from run import _finish  # noqa: E402
from stations_file import watch_stations  # noqa: E402

FIRST = {"s1": "a.mp4"}
EDITED = {"s1": "a.mp4", "s2": "b.mp4"}


class Service:
    """Records the stations applied; raises ``failures`` (one per apply) first."""

    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.applied: list[dict[str, str]] = []
        self.failures = failures or []

    async def apply(self, stations: dict[str, str]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.applied.append(dict(stations))


async def watching(service: Service, path: Path, body: Callable[[], Awaitable[None]]) -> None:
    """Run the watch of ``path`` for ``service`` through ``body``, then stop it: it must end
    without raising."""
    stop = asyncio.Event()
    task = asyncio.create_task(watch_stations(service, path, stop, interval=0.02))  # type: ignore[arg-type]
    try:
        await body()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def symlink_loop(path: Path) -> None:
    path.unlink()
    os.symlink(path.name, path)  # stations.json -> stations.json: ELOOP


def parent_not_a_directory(path: Path) -> None:
    path.unlink()
    path.parent.rmdir()
    path.parent.write_text("")  # ENOTDIR


def restore(path: Path) -> None:
    if path.parent.is_file():
        path.parent.unlink()
        path.parent.mkdir()
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("spoil", [symlink_loop, parent_not_a_directory])
def test_a_stations_file_that_cannot_be_looked_at_is_logged_once_and_the_watch_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: Callable[[Path], None]
) -> None:
    path = tmp_path / "conf" / "stations.json"
    path.parent.mkdir()
    path.write_text(json.dumps(FIRST))
    service = Service()

    async def body() -> None:
        await wait_until_async("the first apply", lambda: service.applied == [FIRST])
        spoil(path)
        await wait_until_async("the problem logged", lambda: "cannot be looked at" in caplog.text)
        await asyncio.sleep(0.2)  # (several looks at it)
        restore(path)
        path.write_text(json.dumps(EDITED))
        await wait_until_async("the edit applied", lambda: len(service.applied) == 2)

    with caplog.at_level(logging.ERROR, logger="order_accuracy"):
        asyncio.run(asyncio.wait_for(watching(service, path, body), 30))
    assert service.applied == [FIRST, EDITED]
    assert caplog.text.count("cannot be looked at") == 1


def test_an_apply_that_raises_is_logged_and_the_next_edit_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "stations.json"
    path.write_text(json.dumps(FIRST))
    service = Service([RuntimeError("the app refused")])

    async def body() -> None:
        await wait_until_async(
            "the failed apply logged", lambda: "applying it failed" in caplog.text
        )
        path.write_text(json.dumps(EDITED))
        await wait_until_async("the edit applied", lambda: service.applied == [EDITED])

    asyncio.run(asyncio.wait_for(watching(service, path, body), 30))
    assert "the app refused" in caplog.text


def test_a_file_moved_over_it_with_the_same_size_and_time_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "stations.json"
    first = {"s1": "a.mp4"}
    moved = {"s1": "b.mp4"}  # the same size
    path.write_text(json.dumps(first))
    service = Service()

    async def body() -> None:
        await wait_until_async("the first apply", lambda: service.applied == [first])
        new = tmp_path / "stations.json.new"
        new.write_text(json.dumps(moved))
        before = path.stat()
        os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert new.stat().st_size == before.st_size
        os.replace(new, path)
        await wait_until_async("the moved file applied", lambda: service.applied == [first, moved])

    asyncio.run(asyncio.wait_for(watching(service, path, body), 30))


def test_the_runner_stop_waits_for_its_tasks_and_logs_a_failed_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        raise OSError(40, "Too many levels of symbolic links")

    async def ends() -> None:
        await asyncio.sleep(0)

    async def main() -> None:
        tasks = [
            asyncio.create_task(fails(), name="the stations file's watch"),
            asyncio.create_task(ends(), name="the other"),
        ]
        await _finish(tasks)
        assert all(task.done() for task in tasks)

    asyncio.run(main())
    assert "the stations file's watch failed" in caplog.text
    assert "Too many levels of symbolic links" in caplog.text
