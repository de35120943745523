"""The old ``DoorbellSecuritySystem`` API over the orchestrator, for code not yet migrated.

:class:`LegacyAdapter` has the old methods (``start``, ``stop``, ``on_doorbell_pressed``,
``get_recent_captures``, ``get_system_status``) and attributes (``settings``, ``face_manager``,
``camera``, ``gpio``); each is a thin view of the :class:`~doorbell.manager.OrchestratorManager`
so old and new code see the same state. The GPIO handler drives a real button through
``RPi.GPIO`` when that package is importable (a Raspberry Pi) and is a stand-in otherwise:
``gpio.simulate_press()`` then does what the button would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from framepipe.backends.objects import LocalObjectStore
from framepipe.errors import InvalidInputError
from framepipe.logs import get_logger
from framepipe.processors.face_photos import read_photo_bytes, shown_path
from framepipe.urls import safe_url

if TYPE_CHECKING:
    from doorbell.manager import OrchestratorManager

__all__ = ["CameraHandler", "FaceManager", "GPIOHandler", "LegacyAdapter", "LegacySettings"]

Image = npt.NDArray[np.uint8]


class LegacySettings:
    """The old settings object: upper-case attributes over the merged configuration."""

    def __init__(self, manager: OrchestratorManager) -> None:
        cfg = manager.config
        self.DOORBELL_PIN = cfg.gpio_pin
        self.KNOWN_FACES_DIR = str(cfg.known_faces_dir)
        self.CAPTURES_DIR = str(cfg.data_dir / "captures")
        self.DATA_DIR = str(cfg.data_dir)
        self.OBJECTS_URL = cfg.objects_url
        self.CAMERA_SOURCE = cfg.camera_source
        self.FACE_RECOGNITION_TOLERANCE = cfg.tolerance
        self.FACE_DETECTION_MODEL = cfg.detection_model
        self.WORKER_COUNT = cfg.detection_workers
        self.MOTION_DETECTION_ENABLED = cfg.motion_enabled
        self.WEBHOOK_URL = cfg.webhook_url
        self.raw = cfg.raw

    def as_dict(self) -> dict[str, Any]:
        """The upper-case settings as a dict."""
        return {k: v for k, v in vars(self).items() if k.isupper()}


class FaceManager:
    """The old face manager: known faces and one-off recognition of an image."""

    def __init__(self, manager: OrchestratorManager) -> None:
        self._manager = manager

    @property
    def known_face_names(self) -> list[str]:
        """Names of the loaded known faces."""
        return self._manager.orchestrator.known.names

    def load_known_faces(self) -> int:
        """Encode the known-faces folder again; returns how many faces are known."""
        return len(self._manager.reload_known_faces())

    def add_known_face(self, name: str, image_path: str | Path) -> None:
        """Copy ``image_path`` into the known-faces folder as ``<name>.jpg`` (``.png`` for a
        PNG) and reload. Raises :class:`InvalidInputError` when ``name`` is not one plain file
        name (empty, ``/``, ``\\``, a leading ``.``, a control character), and
        :class:`MediaError` when the image does not show exactly one readable face; either
        way nothing is copied."""
        orch = self._manager.orchestrator
        if (
            not name
            or name.startswith(".")
            or any(c in "/\\" or not c.isprintable() for c in name)
            or len(name.encode("utf-8", "surrogatepass")) > 200
        ):
            raise InvalidInputError(
                f"known face name {name!r}: must be one file name (no '/', '\\', leading '.' "
                "or control character, at most 200 bytes)"
            )
        # read once: the bytes checked are the bytes stored
        data = read_photo_bytes(image_path)
        orch.recognizer.encode_known_photo(data, name=name, source=shown_path(image_path))
        folder = orch.config.known_faces_dir
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
        partial = folder / f".{name}.partial"  # never loaded: not a photo's suffix
        try:
            partial.write_bytes(data)
            partial.replace(folder / f"{name}{suffix}")
        finally:
            partial.unlink(missing_ok=True)
        self.load_known_faces()

    def identify_faces(self, image: Image) -> list[dict[str, Any]]:
        """The faces in a BGR image: box, name (None: unknown) and distance."""
        orch = self._manager.orchestrator
        matcher = orch.matcher
        out = []
        for face in orch.recognizer.analyse(image):
            name, distance = matcher.match(face.encoding)
            out.append(
                {
                    "box": face.box.as_list(),
                    "name": name,
                    "known": name is not None,
                    "distance": distance,
                }
            )
        return out


class CameraHandler:
    """The old camera handler: the pipeline's camera, read-only."""

    def __init__(self, manager: OrchestratorManager) -> None:
        self._manager = manager

    @property
    def is_initialized(self) -> bool:
        """True once the camera delivered a frame in this run."""
        pipeline = self._manager.orchestrator.pipeline
        return pipeline is not None and pipeline.latest_frame is not None

    @property
    def source(self) -> str:
        """The camera's URL, path or device."""
        return self._manager.config.camera_source

    def capture_image(self) -> Image | None:
        """A copy of the latest frame (BGR), or None before the first one."""
        pipeline = self._manager.orchestrator.pipeline
        frame = pipeline.latest_frame if pipeline is not None else None
        return None if frame is None else frame.image.copy()

    def get_status(self) -> dict[str, Any]:
        """The camera's supervision status (state, restarts, last error, frames); ``source``
        is its URL with the password and secret query values masked (it is shown: the web
        interface's ``status`` route returns it)."""
        pipeline = self._manager.orchestrator.pipeline
        source = pipeline.health()["source"] if pipeline is not None else None
        return {
            "source": safe_url(self.source),
            "initialized": self.is_initialized,
            "supervisor": source,
        }


class GPIOHandler:
    """The doorbell button on ``pin`` (BCM numbering): ``RPi.GPIO`` when present, a stand-in
    otherwise (``available`` False)."""

    def __init__(self, pin: int = 18, *, bouncetime_ms: int = 300) -> None:
        self.pin = pin
        self.bouncetime_ms = bouncetime_ms
        self.log = get_logger("doorbell.gpio")
        self._callback: Callable[[int], Any] | None = None
        self._gpio: Any = None
        try:
            import RPi.GPIO as gpio  # type: ignore[import-untyped]
        except (ImportError, RuntimeError):
            gpio = None
        self._gpio = gpio
        self.presses = 0

    @property
    def available(self) -> bool:
        """True when a real GPIO board drives the button."""
        return self._gpio is not None

    def setup_doorbell_button(self, callback: Callable[[int], Any]) -> None:
        """Call ``callback(channel)`` when the button is pressed (falling edge, debounced)."""
        self._callback = callback
        if self._gpio is not None:
            gpio = self._gpio
            gpio.setmode(gpio.BCM)
            gpio.setup(self.pin, gpio.IN, pull_up_down=gpio.PUD_UP)
            gpio.add_event_detect(
                self.pin, gpio.FALLING, callback=self._pressed, bouncetime=self.bouncetime_ms
            )
        else:
            self.log.info("no GPIO board: doorbell button on pin %d is simulated", self.pin)

    def _pressed(self, channel: int) -> Any:
        self.presses += 1
        return self._callback(channel) if self._callback is not None else None

    def simulate_press(self, channel: int | None = None) -> Any:
        """Do what a press of the button does; returns the callback's result."""
        return self._pressed(self.pin if channel is None else channel)

    def cleanup(self) -> None:
        """Release the pin."""
        if self._gpio is not None:
            with contextlib.suppress(Exception):
                self._gpio.cleanup(self.pin)
        self._callback = None

    def get_status(self) -> dict[str, Any]:
        """Pin, hardware or simulated, presses so far."""
        return {"pin": self.pin, "hardware": self.available, "presses": self.presses}


class LegacyAdapter:
    """The old ``DoorbellSecuritySystem`` API (see the module docstring)."""

    def __init__(self, manager: OrchestratorManager) -> None:
        self.manager = manager
        self.settings = LegacySettings(manager)
        self.face_manager = FaceManager(manager)
        self.camera = CameraHandler(manager)
        self.gpio = GPIOHandler(manager.config.gpio_pin)
        self.log = get_logger("doorbell.legacy")

    @property
    def running(self) -> bool:
        """True while the system runs."""
        return self.manager.is_running

    def start(self) -> None:
        """Start the system and wire the doorbell button."""
        self.manager.start()
        self.gpio.setup_doorbell_button(self.on_doorbell_pressed)

    def stop(self) -> None:
        """Release the button and stop the system."""
        self.gpio.cleanup()
        self.manager.stop()

    def on_doorbell_pressed(self, channel: int) -> dict[str, Any]:
        """The old button handler: capture, recognise, notify; returns the result."""
        self.log.info("doorbell pressed (channel %s)", channel)
        return self.manager.trigger_doorbell(channel)

    def get_recent_captures(self, limit: int = 10) -> list[dict[str, Any]]:
        """The latest visitor events, newest first: timestamp, name (None: unknown), known,
        distance, snapshot key and, on a local object store, the snapshot's file path."""
        orch = self.manager.orchestrator
        objects = orch.objects
        out = []
        for event in reversed(list(orch.events)):
            if not event["type"].startswith("visitor."):
                continue
            capture = {
                k: event.get(k)
                for k in (
                    "event_id",
                    "timestamp",
                    "type",
                    "name",
                    "known",
                    "distance",
                    "snapshot_key",
                    "trigger",
                )
            }
            capture["image_path"] = None
            if isinstance(objects, LocalObjectStore) and event.get("snapshot_key"):
                capture["image_path"] = str(objects.root / event["snapshot_key"])
            out.append(capture)
            if len(out) >= limit:
                break
        return out

    def get_system_status(self) -> dict[str, Any]:
        """The old status dict: running, state, uptime, faces, captures, camera, GPIO."""
        health = self.manager.get_health_status()
        metrics = self.manager.orchestrator.get_pipeline_metrics()
        return {
            "running": self.running,
            "state": health.state.value,
            "uptime": health.uptime,
            "performance_score": health.performance_score,
            "performance_reason": health.performance_reason,
            "last_error": health.last_error,
            "known_faces": len(health.known_faces),
            "known_face_names": health.known_faces,
            "recent_captures": len(self.get_recent_captures(limit=1000)),
            "events_per_minute": metrics["events_per_minute"],
            "camera": self.camera.get_status(),
            "gpio": self.gpio.get_status(),
            "restart_attempts": health.restart_attempts,
            "issues": health.issues,
        }
