"""A detector's sessions on the hub: one ended (its card removed) stays ended, whatever comes
late about it: an answer or a progress report to a request of that session (a copy that was
under way when the card was pulled) reaches its request, or nothing, but does not bring the
session back into ``/api/detectors`` and the dashboard."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from framepipe.config import Settings
from framepipe.server.detector import DetectorHub, DetectorMessage
from test_detector_hostile import connect, detectors, hello, recv
from test_server import Server


class Level(BaseModel):
    percent: int


def test_a_late_answer_or_progress_does_not_bring_an_ended_session_back(tmp_path: Path) -> None:
    hub = DetectorHub("sessions-test", reconnect_wait=1)

    async def on_level(msg: DetectorMessage) -> None:
        await msg.reply({"type": "level:ok", "session_id": msg.message["session_id"]})

    hub.register_message("level", Level, on_level)
    hub.register_message("done", role="end")
    hub.register_message("copied", role="answer")
    hub.register_message("copying", role="progress")
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 's.db'}")
    with Server(settings, detector_hub=hub) as server, connect(server) as ws:
        assert hello(ws, "reader")["type"] == "detector:welcome"
        ws.send(json.dumps({"type": "level", "session_id": "card-1", "percent": 10}))
        assert recv(ws)["type"] == "level:ok"
        assert [s["session_id"] for s in detectors(server)[0]["sessions"]] == ["card-1"]
        ws.send(json.dumps({"type": "done", "session_id": "card-1"}))
        for late in (
            {"type": "copying", "session_id": "card-1", "request_id": "r1"},
            {"type": "copied", "session_id": "card-1", "request_id": "r1"},
        ):
            ws.send(json.dumps(late))
        # In order: what follows is handled after the late messages.
        ws.send(json.dumps({"type": "level", "session_id": "card-2", "percent": 1}))
        assert recv(ws) == {"type": "level:ok", "session_id": "card-2"}
        assert [s["session_id"] for s in detectors(server)[0]["sessions"]] == ["card-2"]
        assert hub.owner("card-1") == "reader"  # still refused to other detectors


def test_a_handler_that_changed_its_message_and_failed_is_answered_with_an_error(
    tmp_path: Path,
) -> None:
    """The error a failed handler's detector gets names the message as it came, even when
    the handler took the type out of it (to forward the rest) before it raised; the detector
    stays connected and its next message is handled."""
    hub = DetectorHub("sessions-test-2", reconnect_wait=1)

    async def on_level(msg: DetectorMessage) -> None:
        msg.message.pop("type")
        if msg.message["percent"] > 50:
            raise ValueError("boom")
        await msg.reply({"type": "level:ok", "session_id": msg.message["session_id"]})

    hub.register_message("level", Level, on_level)
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 's.db'}")
    with Server(settings, detector_hub=hub) as server, connect(server) as ws:
        assert hello(ws, "reader")["type"] == "detector:welcome"
        ws.send(json.dumps({"type": "level", "session_id": "card-1", "percent": 90}))
        error = recv(ws)
        assert error["type"] == "error" and error["detail"] == "level failed: boom"
        ws.send(json.dumps({"type": "level", "session_id": "card-1", "percent": 10}))
        assert recv(ws) == {"type": "level:ok", "session_id": "card-1"}
