"""The bounds on the thumbnails the service makes of stored frames, over real HTTP: at most
``thumbnail_concurrency`` made at once (a request that gets no turn is a 503 with
``Retry-After``, a kept thumbnail needs no turn, a failed one gives its turn back, a request
that went away keeps its turn until its thread ends), and a pixel budget that is a setting
(``thumbnail_max_pixels``), refused when it is not a positive number.

A thumbnail is held busy by an object store whose reads of ``gated/`` keys wait for the test to
let them go: the test knows the turn is taken (the read has begun) and keeps it taken as long
as it likes, so no assertion depends on how fast anything runs. The wait for a turn is
shortened on the service's cache so the refusal comes quickly; the refusal does not depend on
its length, as the turn is never given back before the test says so.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from framepipe.app import App
from framepipe.backends.objects.local import LocalObjectStore
from framepipe.config import Settings, load_settings
from framepipe.errors import ConfigError
from framepipe.server.thumbnails import (
    DEFAULT_CONCURRENCY,
    MAX_PIXELS,
    ThumbnailCache,
    ThumbnailsBusyError,
    ThumbnailSlots,
)
from test_server import AUTH, Server
from waiting import wait_until, wait_until_async

BASE = "/api/segments/station/cam/frames"


class GatedStore(LocalObjectStore):
    """A local store whose reads of ``gated/`` keys begin (``entered``), then wait until the
    test sets ``gate`` (at most a minute, so a failing test never hangs the server)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def get(self, key: str) -> bytes:
        if key.startswith("gated/"):
            self.entered.set()
            self.gate.wait(60)
        return super().get(key)


def _png(width: int, height: int) -> bytes:
    ok, encoded = cv2.imencode(".png", np.full((height, width, 3), 90, np.uint8))
    assert ok
    return bytes(encoded)


def _settings(tmp_path: Path, **thumbnails: Any) -> Settings:
    return Settings(
        home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'state.db'}", **thumbnails
    )


def _said(answer: httpx.Response) -> str:
    """What an answer said, for a failed assertion: its JSON, or its status and type."""
    if answer.headers.get("content-type", "").startswith("application/json"):
        return answer.text
    return f"{answer.status_code} {answer.headers.get('content-type')}"


def _cache(server: Server) -> ThumbnailCache:
    cache = server.server.config.app.state.service.thumbnails
    assert isinstance(cache, ThumbnailCache)
    return cache


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[GatedStore]:
    store = GatedStore(tmp_path / "objects")
    try:
        yield store
    finally:
        store.gate.set()


@pytest.fixture
def one_at_a_time(tmp_path: Path, gated: GatedStore) -> Iterator[Server]:
    """A service making one thumbnail at a time, on the gated store, waiting 0.3 s for a turn."""
    settings = _settings(tmp_path, thumbnail_concurrency=1)
    app = App("station", settings=settings)
    with Server(settings, pipelines=(), apps=[app], objects=gated) as server:
        _cache(server).slot_wait = 0.3
        yield server


def test_a_request_that_gets_no_turn_is_a_503_with_retry_after(
    one_at_a_time: Server, gated: GatedStore
) -> None:
    gated.put("gated/big.png", _png(800, 600))
    gated.put("snaps/fine.png", _png(800, 600))
    with (
        httpx.Client(base_url=one_at_a_time.url, headers=AUTH, timeout=60) as client,
        httpx.Client(base_url=one_at_a_time.url, headers=AUTH, timeout=60) as other,
        ThreadPoolExecutor(1) as pool,
    ):
        kept = client.get(f"{BASE}/snaps/fine.png?width=160")
        assert kept.status_code == 200, _said(kept)
        slow = pool.submit(other.get, f"{BASE}/gated/big.png?width=160")
        wait_until("the gated thumbnail's read to begin", gated.entered.is_set, 30)

        busy = client.get(f"{BASE}/snaps/fine.png?width=120")
        assert busy.status_code == 503, _said(busy)
        assert int(busy.headers["Retry-After"]) >= 1
        detail = busy.json()["detail"]
        assert "'snaps/fine.png'" in detail and "busy making thumbnails" in detail, detail
        assert "thumbnail_concurrency" in detail, detail
        # A thumbnail already kept needs no turn.
        again = client.get(f"{BASE}/snaps/fine.png?width=160")
        assert again.status_code == 200 and again.content == kept.content

        gated.gate.set()
        assert slow.result(timeout=60).status_code == 200
        served = client.get(f"{BASE}/snaps/fine.png?width=120")
        assert served.status_code == 200, _said(served)
        assert _cache(one_at_a_time).busy == 0


def test_a_failed_thumbnail_gives_its_turn_back(tmp_path: Path) -> None:
    """A refusal of every kind (no such object, not an image, over the budget) ends the
    thumbnail's turn: with one turn, the next request is still served."""
    settings = _settings(tmp_path, thumbnail_concurrency=1, thumbnail_max_pixels=100_000)
    with (
        Server(settings, pipelines=(), apps=[App("station", settings=settings)]) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client,
    ):
        _cache(server).slot_wait = 0.3
        assert client.put("/api/objects/snaps/big.png", content=_png(800, 600)).status_code == 201
        assert (
            client.put("/api/objects/snaps/text.png", content=b"not a picture").status_code == 201
        )
        assert client.put("/api/objects/snaps/fine.png", content=_png(300, 200)).status_code == 201
        for name, status in (("missing.png", 404), ("text.png", 415), ("big.png", 422)) * 2:
            refused = client.get(f"{BASE}/snaps/{name}")
            assert refused.status_code == status, (name, _said(refused))
        served = client.get(f"{BASE}/snaps/fine.png")
        assert served.status_code == 200, _said(served)
        assert _cache(server).busy == 0


def test_an_object_larger_than_any_image_in_the_budget_is_refused_unread(tmp_path: Path) -> None:
    """An object asked for as a frame that is larger than any image within the pixel budget
    can be (its pixels as raw RGB, plus 1 MiB) is refused from its size, before it is read
    into memory; a frame within the budget is still served."""
    settings = _settings(tmp_path, thumbnail_max_pixels=100_000)
    with (
        Server(settings, pipelines=(), apps=[App("station", settings=settings)]) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client,
    ):
        huge = _png(300, 200) + os.urandom(2 << 20)  # an image's header, 2 MiB behind it
        assert client.put("/api/objects/snaps/huge.png", content=huge).status_code == 201
        assert client.put("/api/objects/snaps/fine.png", content=_png(300, 200)).status_code == 201
        refused = client.get(f"{BASE}/snaps/huge.png?width=120")
        assert refused.status_code == 422, _said(refused)
        detail = refused.json()["detail"]
        assert f"is {len(huge)} bytes, larger than an image" in detail, detail
        assert f"({100_000 * 3 + (1 << 20)}); not read" in detail, detail
        assert client.get(f"{BASE}/snaps/fine.png?width=120").status_code == 200


def test_the_pixel_budget_is_a_setting(tmp_path: Path) -> None:
    assert Settings().thumbnail_max_pixels == MAX_PIXELS
    settings = _settings(tmp_path, thumbnail_max_pixels=640 * 480)
    with (
        Server(settings, pipelines=(), apps=[App("station", settings=settings)]) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client,
    ):
        assert client.put("/api/objects/snaps/over.png", content=_png(800, 600)).status_code == 201
        assert client.put("/api/objects/snaps/under.png", content=_png(640, 480)).status_code == 201
        refused = client.get(f"{BASE}/snaps/over.png?width=160")
        assert refused.status_code == 422, _said(refused)
        detail = refused.json()["detail"]
        assert "'snaps/over.png'" in detail and "800x600" in detail, detail
        assert f"over the {640 * 480} a thumbnail is made from" in detail, detail
        served = client.get(f"{BASE}/snaps/under.png?width=160")
        assert served.status_code == 200, _said(served)
        image = cv2.imdecode(np.frombuffer(served.content, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape[:2] == (120, 160)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("thumbnail_concurrency", 0),
        ("thumbnail_concurrency", -2),
        ("thumbnail_concurrency", "several"),
        ("thumbnail_concurrency", 1.5),
        ("thumbnail_max_pixels", 0),
        ("thumbnail_max_pixels", -1),
        ("thumbnail_max_pixels", "huge"),
    ],
)
def test_invalid_thumbnail_settings_are_refused_naming_the_variable(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"FRAMEPIPE_{name.upper()}: Input should be"):
        load_settings(**{name: value})


def test_thumbnail_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().thumbnail_concurrency == DEFAULT_CONCURRENCY
    monkeypatch.setenv("FRAMEPIPE_THUMBNAIL_CONCURRENCY", "3")
    monkeypatch.setenv("FRAMEPIPE_THUMBNAIL_MAX_PIXELS", "1000000")
    settings = load_settings()
    assert (settings.thumbnail_concurrency, settings.thumbnail_max_pixels) == (3, 1_000_000)
    monkeypatch.setenv("FRAMEPIPE_THUMBNAIL_MAX_PIXELS", "0")
    with pytest.raises(ConfigError, match="FRAMEPIPE_THUMBNAIL_MAX_PIXELS"):
        load_settings()


def test_a_request_that_went_away_keeps_its_turn_until_its_thread_ends() -> None:
    """The request's task is cancelled (its client went away) while its thread makes the
    thumbnail: the turn stays taken until the thread ends, then is given back."""
    entered = threading.Event()
    gate = threading.Event()

    def slow() -> bytes:
        entered.set()
        gate.wait(60)
        return b"made"

    async def scenario() -> None:
        slots = ThumbnailSlots(1, wait=0.2)
        request = asyncio.create_task(slots.run(slow))
        await wait_until_async("the thread to begin", entered.is_set)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert slots.busy == 1
        with pytest.raises(ThumbnailsBusyError) as busy:
            await slots.run(lambda: b"other")
        assert busy.value.retry_after >= 1
        gate.set()
        await wait_until_async("the thread to end", lambda: slots.busy == 0)
        assert await slots.run(lambda: b"next") == b"next"

    try:
        asyncio.run(scenario())
    finally:
        gate.set()


def test_slots_refuse_a_size_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ThumbnailSlots(0)
    cache = ThumbnailCache()

    async def in_a_loop() -> None:
        assert cache.slots(2) is cache.slots(2)
        with pytest.raises(ValueError, match="fixed while it runs"):
            cache.slots(3)

    asyncio.run(in_a_loop())


def test_an_app_served_again_in_a_new_event_loop_gets_new_slots() -> None:
    """The slots wait on an asyncio primitive bound to the loop that first waited on it: a
    service (its cache) served again in another loop (a test client, a restart in the same
    process) must not fail its thumbnails with "bound to a different event loop"."""
    cache = ThumbnailCache()

    async def two_at_once() -> ThumbnailSlots:
        slots = cache.slots(1)
        results = await asyncio.gather(*(slots.run(lambda: time.sleep(0.05)) for _ in range(2)))
        assert results == [None, None]  # the second waited for the first's slot
        return slots

    first = asyncio.run(two_at_once())
    second = asyncio.run(two_at_once())
    assert first is not second


def test_a_thumbnail_kept_for_any_of_the_stores_needs_no_turn(tmp_path: Path) -> None:
    """A frame read from an app's second store (its selected frames, the service's own) is
    kept like one of the first: asked again, it is found without a read or a turn."""
    first = LocalObjectStore(tmp_path / "frames")
    second = GatedStore(tmp_path / "selected")
    second.put("gated/best.png", _png(320, 240))
    second.gate.set()
    cache = ThumbnailCache()
    made = cache.get(second, "gated/best.png", 160)
    second.gate.clear()
    second.entered.clear()
    assert cache.kept_in([first, second], "gated/best.png", 160) == made
    assert not second.entered.is_set()  # nothing was read
    assert cache.kept_in([first, second], "gated/best.png", 120) is None
