"""The doorbell's configuration: the original system's dict and environment variables,
validated.

Precedence: built-in defaults, then the environment (the original system's
``HEALTH_CHECK_INTERVAL``, ``AUTO_RECOVERY_ENABLED``, ``MAX_RESTART_ATTEMPTS``, ``CPU_THRESHOLD``,
``MEMORY_THRESHOLD``, ``WORKER_COUNT``, ``FACE_RECOGNITION_TOLERANCE``, and
``RESTART_COOLDOWN_SECONDS``, ``METRICS_COLLECTION_INTERVAL``, ``DOORBELL_CAMERA``,
``DOORBELL_DATA_DIR``, ``DOORBELL_WEBHOOK_URL``),
then the dict given to :class:`~doorbell.manager.OrchestratorManager`, merged key by key (nested
dicts too). A value of the wrong type or out of range raises :class:`~framepipe.errors.ConfigError`
naming the key (or the variable) before anything starts.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from doorbell.notify import check_webhook_url
from framepipe.errors import ConfigError
from framepipe.processors.faces import DetectorModel

__all__ = ["DEFAULTS", "ENV_VARS", "DoorbellConfig", "load_config"]

DEFAULTS: dict[str, Any] = {
    "health_check_interval": 30.0,
    "metrics_collection_interval": 60.0,
    "auto_recovery_enabled": True,
    "max_restart_attempts": 3,
    "restart_cooldown_seconds": 60.0,
    "cpu_threshold": 80.0,
    "memory_threshold": 85.0,
    "performance_threshold": 0.7,
    "queue_backlog_threshold": 0.8,
    "component_failure_threshold": 5,
    "framepipe_home": None,
    "data_dir": "data",
    "log_file": None,
    "known_faces_dir": None,
    "objects_url": None,
    "camera": {
        "source": "/dev/video0",
        "name": "front_door",
        "realtime": False,
        "loop": False,
        "stall_timeout": 10.0,
        "open_timeout": 10.0,
        "max_retries": 5,
        "retry_initial_delay": 2.0,
    },
    "pipeline_config": {
        "face_detection": {
            "worker_count": 2,
            "detector_type": "cpu",
            "model": "hog",
            "upscale_below": 300,
            "upsample": 0,
            "queue_size": 8,
        },
        "face_recognition": {"worker_count": 2, "tolerance": 0.6, "encoding_model": "small"},
        "motion_detection": {"enabled": False, "threshold": 0.01},
        "event_processing": {
            "visit_timeout": 5.0,
            "max_visit_duration": 120.0,
            "min_known_ratio": 0.3,
            "store_frames": False,
            "recent_events": 100,
        },
    },
    "notifications": {
        "webhook_url": None,
        "webhook_timeout": 5.0,
        "webhook_retries": 2,
        "webhook_queue": 100,
    },
    "doorbell": {"gpio_pin": 18},
}

ENV_VARS: dict[str, tuple[tuple[str, ...], type]] = {
    "HEALTH_CHECK_INTERVAL": (("health_check_interval",), float),
    "METRICS_COLLECTION_INTERVAL": (("metrics_collection_interval",), float),
    "AUTO_RECOVERY_ENABLED": (("auto_recovery_enabled",), bool),
    "MAX_RESTART_ATTEMPTS": (("max_restart_attempts",), int),
    "RESTART_COOLDOWN_SECONDS": (("restart_cooldown_seconds",), float),
    "CPU_THRESHOLD": (("cpu_threshold",), float),
    "MEMORY_THRESHOLD": (("memory_threshold",), float),
    "WORKER_COUNT": (("pipeline_config", "*", "worker_count"), int),
    "FACE_RECOGNITION_TOLERANCE": (("pipeline_config", "face_recognition", "tolerance"), float),
    "DOORBELL_CAMERA": (("camera", "source"), str),
    "DOORBELL_DATA_DIR": (("data_dir",), str),
    "DOORBELL_WEBHOOK_URL": (("notifications", "webhook_url"), str),
}
"""Environment variable -> (path in the config, type); ``*`` is both face stages."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, text: str, kind: type) -> Any:
    problem = ConfigError(f"environment variable {name}={text!r} is not a valid {kind.__name__}")
    if kind is bool:
        value = text.strip().lower()
        if value not in _TRUE | _FALSE:
            raise problem
        return value in _TRUE
    try:
        return kind(text)
    except ValueError:
        raise problem from None


def _merge(base: dict[str, Any], override: Mapping[str, Any], where: str = "") -> None:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = copy.deepcopy(value)


@dataclass(frozen=True)
class DoorbellConfig:
    """The merged, validated configuration; ``raw`` is the merged dict (the legacy
    ``settings`` show it)."""

    raw: dict[str, Any] = field(repr=False)
    health_check_interval: float
    metrics_collection_interval: float
    auto_recovery_enabled: bool
    max_restart_attempts: int
    restart_cooldown_seconds: float
    cpu_threshold: float
    memory_threshold: float
    performance_threshold: float
    queue_backlog_threshold: float
    component_failure_threshold: int
    data_dir: Path
    log_file: Path | None
    known_faces_dir: Path
    objects_url: str
    camera_source: str
    camera_name: str
    camera_realtime: bool
    camera_loop: bool
    stall_timeout: float
    open_timeout: float
    camera_max_retries: int
    camera_retry_delay: float
    detection_workers: int
    detector_type: str
    detection_model: DetectorModel
    upscale_below: int
    upsample: int
    queue_size: int
    recognition_workers: int
    tolerance: float
    landmarks: int
    motion_enabled: bool
    motion_threshold: float
    visit_timeout: float
    max_visit_duration: float
    min_known_ratio: float
    store_frames: bool
    recent_events: int
    webhook_url: str | None
    webhook_timeout: float
    webhook_retries: int
    webhook_queue: int
    gpio_pin: int


def _get(raw: Mapping[str, Any], path: str, kind: type | tuple[type, ...]) -> Any:
    value: Any = raw
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ConfigError(f"doorbell config: {path} is missing")
        value = value[part]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"doorbell config: {path} is too large a number") from None
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"doorbell config: {path} must be a {want}, not {value!r}")
    return value


MAX_RECENT_EVENTS = 100_000
"""The most events read back at start (each is one object read from the store)."""


def _positive(path: str, value: float, *, zero: bool = False, most: float | None = None) -> float:
    """``value``, unless it is not a finite number ``> 0`` (``>= 0`` with ``zero``) up to
    ``most``: a NaN compares false with every bound, so it is refused by name."""
    finite = not isinstance(value, float) or math.isfinite(value)  # an int of any size is
    if not finite or value < 0 or (value == 0 and not zero):
        raise ConfigError(
            f"doorbell config: {path} must be a finite number {'>= 0' if zero else '> 0'}, "
            f"not {value}"
        )
    if most is not None and value > most:
        raise ConfigError(f"doorbell config: {path} must be at most {most:g}, not {value}")
    return value


def load_config(
    config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> DoorbellConfig:
    """Defaults <- environment <- ``config``, validated (see the module docstring)."""
    raw = copy.deepcopy(DEFAULTS)
    env = os.environ if environ is None else environ
    for name, (path, kind) in ENV_VARS.items():
        if env.get(name) in (None, ""):
            continue
        value = _parse(name, env[name], kind)
        if path[1:2] == ("*",):
            for stage in ("face_detection", "face_recognition"):
                raw["pipeline_config"][stage][path[2]] = value
            continue
        target = raw
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    if config:
        _merge(raw, config)

    pc = "pipeline_config."
    named = _get(raw, pc + "face_detection.model", str)
    model: DetectorModel | None = "hog" if named == "hog" else "cnn" if named == "cnn" else None
    if model is None:
        raise ConfigError(
            f"doorbell config: {pc}face_detection.model must be 'hog' or 'cnn', not {named!r}"
        )
    encoding_model = _get(raw, pc + "face_recognition.encoding_model", str)
    if encoding_model not in ("small", "large"):
        raise ConfigError(
            f"doorbell config: {pc}face_recognition.encoding_model must be "
            f"'small' (5-point landmarks) or 'large' (68-point), not "
            f"{encoding_model!r}"
        )
    detector_type = _get(raw, pc + "face_detection.detector_type", str)
    if detector_type not in ("cpu", "gpu"):
        raise ConfigError(
            f"doorbell config: {pc}face_detection.detector_type must be 'cpu' "
            f"or 'gpu', not {detector_type!r}"
        )
    workers = {}
    for stage in ("face_detection", "face_recognition"):
        count = _get(raw, f"{pc}{stage}.worker_count", int)
        if count < 1:
            raise ConfigError(
                f"doorbell config: {pc}{stage}.worker_count must be >= 1, not {count}"
            )
        workers[stage] = count
    data_dir = Path(_get(raw, "data_dir", (str, Path)))
    known = raw.get("known_faces_dir")
    objects = raw.get("objects_url")
    source = _get(raw, "camera.source", (str, int, Path))
    log_file = raw.get("log_file")
    if log_file is not None and not isinstance(log_file, (str, Path)):
        raise ConfigError(f"doorbell config: log_file must be a path, not {log_file!r}")
    webhook = raw["notifications"].get("webhook_url")
    if webhook is not None and not isinstance(webhook, str):
        raise ConfigError(
            "doorbell config: notifications.webhook_url must be a URL string, "
            f"not a {type(webhook).__name__}"
        )
    if webhook:
        check_webhook_url(webhook, "notifications.webhook_url")
    return DoorbellConfig(
        raw=raw,
        health_check_interval=_positive(
            "health_check_interval", _get(raw, "health_check_interval", float)
        ),
        metrics_collection_interval=_positive(
            "metrics_collection_interval", _get(raw, "metrics_collection_interval", float)
        ),
        auto_recovery_enabled=_get(raw, "auto_recovery_enabled", bool),
        max_restart_attempts=int(
            _positive("max_restart_attempts", _get(raw, "max_restart_attempts", int), zero=True)
        ),
        restart_cooldown_seconds=_positive(
            "restart_cooldown_seconds", _get(raw, "restart_cooldown_seconds", float), zero=True
        ),
        cpu_threshold=_get(raw, "cpu_threshold", float),
        memory_threshold=_get(raw, "memory_threshold", float),
        performance_threshold=_get(raw, "performance_threshold", float),
        queue_backlog_threshold=_positive(
            "queue_backlog_threshold", _get(raw, "queue_backlog_threshold", float)
        ),
        component_failure_threshold=int(
            _positive("component_failure_threshold", _get(raw, "component_failure_threshold", int))
        ),
        data_dir=data_dir,
        # the original system's log file; "" turns it off
        log_file=(
            data_dir / "logs" / "doorbell.log"
            if log_file is None
            else (Path(log_file) if str(log_file) else None)
        ),
        known_faces_dir=Path(known) if known else data_dir / "known_faces",
        objects_url=str(objects) if objects else str(data_dir / "objects"),
        camera_source=f"/dev/video{source}" if isinstance(source, int) else str(source),
        camera_name=_get(raw, "camera.name", str),
        camera_realtime=_get(raw, "camera.realtime", bool),
        camera_loop=_get(raw, "camera.loop", bool),
        stall_timeout=_positive("camera.stall_timeout", _get(raw, "camera.stall_timeout", float)),
        open_timeout=_positive("camera.open_timeout", _get(raw, "camera.open_timeout", float)),
        camera_max_retries=_get(raw, "camera.max_retries", int),
        camera_retry_delay=_positive(
            "camera.retry_initial_delay", _get(raw, "camera.retry_initial_delay", float), zero=True
        ),
        detection_workers=workers["face_detection"],
        detector_type=detector_type,
        detection_model=model,
        upscale_below=_get(raw, pc + "face_detection.upscale_below", int),
        upsample=_get(raw, pc + "face_detection.upsample", int),
        queue_size=_get(raw, pc + "face_detection.queue_size", int),
        recognition_workers=workers["face_recognition"],
        tolerance=_positive(
            pc + "face_recognition.tolerance", _get(raw, pc + "face_recognition.tolerance", float)
        ),
        landmarks=5 if encoding_model == "small" else 68,
        motion_enabled=_get(raw, pc + "motion_detection.enabled", bool),
        motion_threshold=_get(raw, pc + "motion_detection.threshold", float),
        visit_timeout=_positive(
            pc + "event_processing.visit_timeout",
            _get(raw, pc + "event_processing.visit_timeout", float),
        ),
        max_visit_duration=_positive(
            pc + "event_processing.max_visit_duration",
            _get(raw, pc + "event_processing.max_visit_duration", float),
        ),
        min_known_ratio=_get(raw, pc + "event_processing.min_known_ratio", float),
        store_frames=_get(raw, pc + "event_processing.store_frames", bool),
        recent_events=int(
            _positive(
                pc + "event_processing.recent_events",
                _get(raw, pc + "event_processing.recent_events", int),
                most=MAX_RECENT_EVENTS,
            )
        ),
        webhook_url=webhook or None,
        webhook_timeout=_positive(
            "notifications.webhook_timeout", _get(raw, "notifications.webhook_timeout", float)
        ),
        webhook_retries=int(
            _positive(
                "notifications.webhook_retries",
                _get(raw, "notifications.webhook_retries", int),
                zero=True,
            )
        ),
        webhook_queue=int(
            _positive("notifications.webhook_queue", _get(raw, "notifications.webhook_queue", int))
        ),
        gpio_pin=_get(raw, "doorbell.gpio_pin", int),
    )
