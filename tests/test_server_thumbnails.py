"""The thumbnail route on a damaged frame, over real HTTP: a frame cut off while it was written
(or uploaded) is a truncated image, not "not an image"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from framepipe.app import App
from framepipe.config import Settings
from test_server import AUTH, Server

BASE = "/api/segments/station/cam/frames"


def _encoded(kind: str) -> bytes:
    noisy = np.random.default_rng(7).integers(0, 255, (240, 320, 3), np.uint8)
    ok, encoded = cv2.imencode(kind, noisy)
    assert ok
    return bytes(encoded)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'state.db'}")
    with Server(settings, pipelines=(), apps=[App("station", settings=settings)]) as running:
        yield running


def test_a_truncated_or_corrupt_image_is_a_422_saying_so(server: Server) -> None:
    """A JPEG or PNG cut off in its header or in its data is answered 422 "truncated or
    corrupt" naming the key and the format; data of no image format is still a 415 "not an
    image"; the whole image is served."""
    jpeg, png = _encoded(".jpg"), _encoded(".png")
    objects = {
        "cut-in-header.jpg": ("JPEG", jpeg[:100]),
        "cut-in-data.jpg": ("JPEG", jpeg[: len(jpeg) // 2]),
        "cut-near-end.jpg": ("JPEG", jpeg[:-10]),
        "cut-in-header.png": ("PNG", png[:20]),
        "cut-in-data.png": ("PNG", png[: len(png) // 2]),
    }
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        for name, (_, data) in objects.items():
            assert client.put(f"/api/objects/frames/{name}", content=data).status_code == 201
        assert client.put("/api/objects/frames/whole.jpg", content=jpeg).status_code == 201
        assert client.put("/api/objects/frames/notes.jpg", content=b"a note").status_code == 201
        for name, (kind, _) in objects.items():
            answer = client.get(f"{BASE}/frames/{name}")
            assert answer.status_code == 422, (name, answer.text)
            detail = answer.json()["detail"]
            assert "truncated or corrupt" in detail and kind in detail, detail
            assert f"frames/{name}" in detail and str(server.url) not in detail
            assert "home" not in detail, detail
        not_image = client.get(f"{BASE}/frames/notes.jpg")
        assert not_image.status_code == 415
        assert "not an image" in not_image.json()["detail"]
        whole = client.get(f"{BASE}/frames/whole.jpg")
        assert whole.status_code == 200 and whole.content.startswith(b"\xff\xd8")
