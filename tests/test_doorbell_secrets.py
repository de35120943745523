"""What the doorbell shows of its camera's URL (``examples/doorbell``): the legacy
``get_system_status()`` and the web interface's ``GET status`` route, which hands it to any
holder of the service's token, never carry the camera's password or a secret query value.

Real components: the doorbell's manager (not started: what it reports then is what it reports
while the camera is away) and its FastAPI routes served by Starlette's test client.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "doorbell"
sys.path.insert(0, str(EXAMPLE))

from doorbell import OrchestratorManager  # noqa: E402

CAMERA = "rtsp://door:Pw0rdS3cret@127.0.0.1:1/stream1?token=T0kS3cret"


@pytest.fixture
def manager(tmp_path: Path) -> OrchestratorManager:
    return OrchestratorManager(
        {"data_dir": str(tmp_path / "data"), "log_file": "", "camera": {"source": CAMERA}}
    )


def test_the_legacy_status_names_the_camera_without_its_secrets(
    manager: OrchestratorManager,
) -> None:
    status = manager.get_legacy_interface().get_system_status()
    assert status["camera"]["source"] == "rtsp://door:***@127.0.0.1:1/stream1?token=***"
    shown = json.dumps(status, default=str)
    assert "Pw0rdS3cret" not in shown and "T0kS3cret" not in shown


def test_the_web_status_route_names_the_camera_without_its_secrets(
    manager: OrchestratorManager,
) -> None:
    pytest.importorskip("fastapi")
    from doorbell.web import _router
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    api = FastAPI()
    api.include_router(_router(manager, "doorbell"), prefix="/api/apps/doorbell")
    with TestClient(api) as client:
        response = client.get("/api/apps/doorbell/status")
    assert response.status_code == 200
    assert "Pw0rdS3cret" not in response.text and "T0kS3cret" not in response.text
    assert response.json()["camera"]["source"].startswith("rtsp://door:***@127.0.0.1:1/")
