"""Hop worker threads (ThreadLane) and the loop's inbox: each call runs once in a lane thread,
results and errors come back to the right future, and results that complete while the loop
is busy are delivered in one wake-up. A detached call (run_detached) runs in a daemon thread
of its own and, abandoned while it runs, is named in a warning."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from framepipe.stream.lanes import ThreadLane, inbox_for, run_detached


def test_calls_run_in_the_lanes_threads_and_results_reach_their_futures() -> None:
    async def main() -> tuple[list[int], set[str]]:
        lane = ThreadLane(3, "fp-test")
        names: set[str] = set()

        def square(x: int) -> int:
            names.add(threading.current_thread().name)
            time.sleep(0.001)
            return x * x

        try:
            results = await asyncio.gather(*(lane.submit(square, i) for i in range(60)))
        finally:
            lane.shutdown()
        return list(results), names

    results, names = asyncio.run(main())
    assert results == [i * i for i in range(60)]
    assert names and names <= {"fp-test-0", "fp-test-1", "fp-test-2"}


def test_errors_reach_the_caller_and_the_lane_goes_on() -> None:
    async def main() -> list[Any]:
        lane = ThreadLane(1, "fp-errors")

        def fail(kind: type[BaseException]) -> None:
            raise kind("bad frame")

        try:
            outcomes = await asyncio.gather(
                lane.submit(fail, ValueError),
                lane.submit(fail, SystemExit),
                lane.submit(fail, StopIteration),
                lane.submit(lambda: "still running"),
                return_exceptions=True,
            )
        finally:
            lane.shutdown()
        return list(outcomes)

    value_error, system_exit, stop_iteration, last = asyncio.run(main())
    assert isinstance(value_error, ValueError) and str(value_error) == "bad frame"
    assert isinstance(system_exit, SystemExit)
    assert isinstance(stop_iteration, RuntimeError) and "StopIteration" in str(stop_iteration)
    assert last == "still running"


def test_a_cancelled_call_still_runs_once_and_its_future_stays_cancelled() -> None:
    async def main() -> tuple[int, bool, int]:
        lane = ThreadLane(1, "fp-cancel")
        started, release = threading.Event(), threading.Event()
        runs = []

        def slow() -> str:
            runs.append(1)
            started.set()
            release.wait(5)
            return "done"

        future = lane.submit(slow)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        future.cancel()
        release.set()
        after = await lane.submit(lambda: 7)  # delivered after slow's result was dropped
        lane.shutdown()
        return len(runs), future.cancelled(), after

    assert asyncio.run(main()) == (1, True, 7)


def test_a_shut_down_lane_refuses_calls_and_its_threads_end() -> None:
    async def main() -> ThreadLane:
        lane = ThreadLane(2, "fp-shut")
        assert await lane.submit(lambda: 1) == 1
        lane.shutdown()
        with pytest.raises(RuntimeError, match=r"fp-shut.*shut down"):
            lane.submit(lambda: 2)
        return lane

    lane = asyncio.run(main())
    for thread in lane._threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
    with pytest.raises(ValueError, match="workers must be >= 1"):
        ThreadLane(0, "fp-none")


def test_results_completed_while_the_loop_is_busy_share_one_wake_up() -> None:
    """50 calls finish while the loop is blocked: they come back in one or two wake-ups of
    the loop, not one each (what run_in_executor would cost)."""

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return real(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        lane = ThreadLane(4, "fp-burst")
        try:
            await lane.submit(int)  # threads started
            wakeups = 0
            futures = [lane.submit(lambda i=i: i) for i in range(50)]
            time.sleep(0.3)  # noqa: ASYNC251 - the loop is kept busy on purpose
            results = await asyncio.gather(*futures)
        finally:
            lane.shutdown()
            del loop.call_soon_threadsafe
        return list(results), wakeups

    results, wakeups = asyncio.run(main())
    assert results == list(range(50))
    assert 1 <= wakeups <= 2


def test_each_loop_has_its_own_inbox() -> None:
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert inbox_for(first) is inbox_for(first)
        assert inbox_for(first) is not inbox_for(second)
    finally:
        first.close()
        second.close()


def test_an_inbox_does_not_keep_its_loop_alive() -> None:
    import gc
    import weakref

    loop = asyncio.new_event_loop()
    inbox_for(loop)
    gone = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert gone() is None


def test_a_detached_call_runs_in_a_daemon_thread_of_its_own_and_returns_or_raises() -> None:
    log = logging.getLogger("test.detached")

    def where(x: int) -> tuple[int, str, bool]:
        thread = threading.current_thread()
        return x * 2, thread.name, thread.daemon

    def fail() -> None:
        raise ValueError("bad close")

    async def main() -> tuple[Any, BaseException | Any]:
        result = await run_detached(where, 21, what="where", thread="fp-where", log=log)
        error = await asyncio.gather(
            run_detached(fail, what="fail", thread="fp-fail", log=log), return_exceptions=True
        )
        return result, error[0]

    result, error = asyncio.run(main())
    assert result == (42, "fp-where", True)
    assert isinstance(error, ValueError) and str(error) == "bad close"


def test_a_detached_call_abandoned_while_it_runs_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    log = logging.getLogger("test.detached")

    async def main() -> None:
        call = asyncio.ensure_future(
            run_detached(release.wait, what="sink 'x': segment_closed(S1)", thread="fp-x", log=log)
        )
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(call), 0.2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    try:
        with caplog.at_level(logging.WARNING, "test.detached"):
            asyncio.run(main())
    finally:
        release.set()
    assert "sink 'x': segment_closed(S1) abandoned while it ran" in caplog.text
    assert "'fp-x'" in caplog.text


def test_a_detached_call_that_returned_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.detached")

    async def main() -> None:
        assert await run_detached(lambda: 1, what="quick", thread="fp-quick", log=log) == 1

    with caplog.at_level(logging.WARNING, "test.detached"):
        asyncio.run(main())
    assert "abandoned" not in caplog.text
