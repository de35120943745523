"""The test helpers of waiting.py: they return what they waited for and fail naming it."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from waiting import free_port, wait_until, wait_until_async


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_until_returns_the_first_truthy_value() -> None:
    tries = iter([None, 0, [], {"row": 1}, {"row": 2}])
    assert wait_until("the row", lambda: next(tries), timeout=5, interval=0.001) == {"row": 1}


def test_wait_until_fails_naming_what_and_explaining() -> None:
    started = time.monotonic()
    expected = r"(?s)waiting for the gate file \(last check: ''\).*log tail: 'shut'"
    with pytest.raises(AssertionError, match=expected):
        wait_until(
            "the gate file",
            lambda: "",
            timeout=0.2,
            interval=0.01,
            explain=lambda: "log tail: 'shut'",
        )
    assert 0.2 <= time.monotonic() - started < 5


def test_wait_until_async_takes_plain_and_coroutine_checks() -> None:
    async def main() -> None:
        count = 0

        async def later() -> int:
            nonlocal count
            count += 1
            return count if count >= 3 else 0

        assert await wait_until_async("three tries", later, timeout=5, interval=0.001) == 3
        assert await wait_until_async("a plain value", lambda: "yes", timeout=5) == "yes"
        with pytest.raises(AssertionError, match="waiting for nothing at all"):
            await wait_until_async("nothing at all", lambda: False, timeout=0.1)

    asyncio.run(main())
