"""``MigrationUtils``: back up, check and move a legacy doorbell's data to the orchestrator.

The legacy system kept ``data/known_faces/<name>.jpg`` and its captures as image files in
``data/captures/``. Every method returns the original system's dict and never raises for a problem
it can report: problems go to ``issues`` (blocking) or ``warnings``. Checks are real: dlib and its
models are loaded, known faces are encoded, the camera is opened and read, the object store is
written and read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from doorbell.config import DoorbellConfig, load_config
from doorbell.known_faces import load_known, shown_path
from framepipe.backends.objects import open_object_store
from framepipe.errors import FramepipeError
from framepipe.processors.faces import (
    IMAGE_SUFFIXES,
    MODEL_FILES,
    FaceAnalyzer,
    model_path,
)
from framepipe.sources import VideoSource

if TYPE_CHECKING:
    from doorbell.manager import OrchestratorManager

__all__ = ["MigrationUtils"]


def _config(data_dir: str | Path | None, config: dict[str, Any] | None) -> DoorbellConfig:
    merged = dict(config or {})
    if data_dir is not None:
        merged["data_dir"] = str(data_dir)
    return load_config(merged)


def _analyzer(cfg: DoorbellConfig) -> FaceAnalyzer:
    return FaceAnalyzer(
        model=cfg.detection_model,
        landmarks=cfg.landmarks,
        upscale_below=cfg.upscale_below,
        upsample=cfg.upsample,
    )


def _captures(folder: Path) -> tuple[list[Path], list[str]]:
    """The legacy captures to copy: the ``.jpg``/``.jpeg``/``.png`` regular files of
    ``folder`` (in name order), and why the others named so are left out: a link (or a path)
    that leads out of ``folder`` (it would put a file from elsewhere in the object store, where
    the web interface serves it) and anything but a regular file. A folder that cannot be
    listed is one reason. Never raises."""
    if not folder.is_dir():
        return [], []
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        return [], [f"captures {shown_path(folder)}: cannot be listed ({exc.strerror or exc})"]
    # os.path.realpath, not Path.resolve: it does not raise on a link loop
    root = os.path.realpath(folder)
    kept, refused = [], []
    for path in paths:
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            refused.append(f"capture {shown_path(path)}: it leads out of {shown_path(folder)}")
        elif not path.is_file():
            refused.append(f"capture {shown_path(path)}: not a regular file")
        else:
            kept.append(path)
    return kept, refused


class MigrationUtils:
    """Static helpers; ``data_dir`` defaults to the configuration's (``data``)."""

    @staticmethod
    def validate_migration_compatibility(
        data_dir: str | Path | None = None, config: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``{"compatible", "issues", "warnings", "checks"}``: the
        configuration, dlib and its models, the known faces (each one encoded) and the
        object store."""
        issues: list[str] = []
        warnings: list[str] = []
        checks: dict[str, Any] = {"python": sys.version.split()[0]}
        try:
            cfg = _config(data_dir, config)
            checks["config"] = True
        except FramepipeError as exc:
            issues.append(f"configuration: {exc}")
            checks["config"] = False
            return {"compatible": False, "issues": issues, "warnings": warnings, "checks": checks}
        checks["dlib"] = importlib.util.find_spec("dlib") is not None
        if not checks["dlib"]:
            issues.append("dlib is not installed: pip install dlib-bin")
        missing = []
        for name in MODEL_FILES.values():
            try:
                model_path(name)
            except FramepipeError:
                missing.append(name)
        checks["models"] = not missing
        if missing:
            issues.append(
                f"dlib models missing ({', '.join(missing)}): pip install face_recognition_models"
            )
        folder = cfg.known_faces_dir
        checks["known_faces_dir"] = str(folder)
        if not folder.is_dir():
            warnings.append(
                f"known faces directory {folder} does not exist: every visitor will be unknown"
            )
            checks["known_faces"] = 0
        elif checks["dlib"] and not missing:
            try:
                known = load_known(folder, _analyzer(cfg))
            except FramepipeError as exc:  # cannot be listed: as good as missing
                warnings.append(f"known faces {exc}: every visitor will be unknown")
                checks["known_faces"] = 0
            else:
                checks["known_faces"] = len(known.faces)
                checks["known_face_names"] = known.names
                warnings += [f"known face {r.source} rejected: {r.reason}" for r in known.rejected]
                if not known.faces:
                    warnings.append(f"no usable known face in {folder}")
        checks["object_store"] = _store_check(cfg.objects_url, issues)
        return {"compatible": not issues, "issues": issues, "warnings": warnings, "checks": checks}

    @staticmethod
    def create_backup(
        data_dir: str | Path = "data", backup_root: str | Path | None = None
    ) -> dict[str, Any]:
        """Copy ``known_faces``, ``captures``, ``config`` and ``logs`` of ``data_dir`` (those
        that exist, links as links) to ``<backup_root>/backup_YYYYMMDD_HHMMSS`` (default root
        ``<data_dir>/backups``): ``{"success", "backup_path", "files", "bytes", "copied"}``
        (``files`` and ``bytes``: the regular files copied)."""
        data = Path(data_dir)
        root = Path(backup_root) if backup_root is not None else data / "backups"
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        target = root / f"backup_{stamp}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = root / f"backup_{stamp}_{suffix}"
        copied, files, size = [], 0, 0
        try:
            target.mkdir(parents=True)
            for name in ("known_faces", "captures", "config", "logs"):
                source = data / name
                if not source.is_dir():
                    continue
                # links are copied as links: a link in a loop or out of the folder (which the
                # doorbell refuses) neither fails the backup nor copies a file from elsewhere
                shutil.copytree(source, target / name, symlinks=True)
                copied.append(name)
                for path in (target / name).rglob("*"):
                    if path.is_file() and not path.is_symlink():
                        files += 1
                        size += path.stat().st_size
        except OSError as exc:
            return {
                "success": False,
                "backup_path": str(target),
                "files": files,
                "bytes": size,
                "copied": copied,
                "error": str(exc),
            }
        return {
            "success": True,
            "backup_path": str(target),
            "files": files,
            "bytes": size,
            "copied": copied,
        }

    @staticmethod
    def migrate_legacy_data(
        data_dir: str | Path | None = None, config: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Copy the legacy captures (``<data_dir>/captures/*.jpg``) into the object store
        under ``captures/legacy/`` and check every known face by encoding it; writes
        ``migration/report.json`` there. ``{"success", "migrated": {"captures",
        "known_faces"}, "skipped", "errors", "report_key"}``; ``success`` is False when a
        capture could not be copied."""
        errors: list[str] = []
        skipped: list[str] = []
        try:
            cfg = _config(data_dir, config)
            objects = open_object_store(cfg.objects_url)
        except FramepipeError as exc:
            return {
                "success": False,
                "migrated": {"captures": 0, "known_faces": 0},
                "skipped": [],
                "errors": [str(exc)],
                "report_key": None,
            }
        with objects:
            captures = 0
            paths, refused = _captures(cfg.data_dir / "captures")
            skipped += refused
            for path in paths:
                key = f"captures/legacy/{path.name}"
                try:
                    if objects.exists(key) and objects.stat(key).size == path.stat().st_size:
                        skipped.append(f"{shown_path(path)}: already migrated")
                        continue
                    objects.put_file(key, path)
                    captures += 1
                except (OSError, FramepipeError) as exc:
                    errors.append(f"capture {shown_path(path)}: {exc}")
            known_count = 0
            if cfg.known_faces_dir.is_dir():
                try:
                    known = load_known(cfg.known_faces_dir, _analyzer(cfg))
                except FramepipeError as exc:
                    errors.append(f"known faces: {exc}")
                else:
                    known_count = len(known.faces)
                    skipped += [f"known face {r.source}: {r.reason}" for r in known.rejected]
            report = {
                "migrated_at": time.time(),
                "captures": captures,
                "known_faces": known_count,
                "skipped": skipped,
                "errors": errors,
            }
            objects.put("migration/report.json", json.dumps(report, indent=2).encode())
        return {
            "success": not errors,
            "migrated": {"captures": captures, "known_faces": known_count},
            "skipped": skipped,
            "errors": errors,
            "report_key": "migration/report.json",
        }

    @staticmethod
    def verify_pipeline_health(
        manager: OrchestratorManager | None = None,
        config: dict[str, Any] | None = None,
        camera_timeout: float = 10.0,
    ) -> dict[str, Any]:
        """``{"healthy", "issues", "checks"}``. With a running ``manager``: its health state,
        the camera and the error. Otherwise, from ``config``: dlib's models load, the camera
        opens and gives a frame within ``camera_timeout`` seconds, the object store works."""
        issues: list[str] = []
        checks: dict[str, Any] = {}
        if manager is not None:
            health = manager.get_health_status()
            checks.update(
                state=health.state.value,
                performance_score=health.performance_score,
                restart_attempts=health.restart_attempts,
                known_faces=len(health.known_faces),
            )
            if health.state.value not in ("running",):
                issues.append(
                    f"state is {health.state.value}"
                    + (f": {health.last_error}" if health.last_error else "")
                )
            issues += health.issues
            return {"healthy": not issues, "issues": issues, "checks": checks}
        try:
            cfg = load_config(config)
        except FramepipeError as exc:
            return {"healthy": False, "issues": [f"configuration: {exc}"], "checks": checks}
        started = time.perf_counter()
        try:
            _analyzer(cfg).load()
            checks["models"] = {"loaded": True, "seconds": round(time.perf_counter() - started, 3)}
        except FramepipeError as exc:
            checks["models"] = {"loaded": False}
            issues.append(str(exc))
        checks["camera"] = _camera_check(cfg, camera_timeout, issues)
        checks["object_store"] = _store_check(cfg.objects_url, issues)
        return {"healthy": not issues, "issues": issues, "checks": checks}


def _store_check(url: str, issues: list[str]) -> bool:
    """Write, read back and delete a probe object."""
    try:
        with open_object_store(url) as objects:
            key = f"migration/probe-{time.time_ns()}"
            objects.put(key, b"ok")
            good = objects.get(key) == b"ok"
            objects.delete(key)
    except (OSError, FramepipeError) as exc:
        issues.append(f"object store {url}: {exc}")
        return False
    return good


def _camera_check(cfg: DoorbellConfig, timeout: float, issues: list[str]) -> dict[str, Any]:
    """Open the camera and read one frame."""
    source = VideoSource(
        cfg.camera_source, cfg.camera_name, open_timeout=timeout, read_timeout=timeout
    )

    async def first_frame() -> tuple[int, int]:
        frames = source.frames()
        try:
            frame = await asyncio.wait_for(anext(frames), timeout)
        finally:
            with contextlib.suppress(Exception):
                await frames.aclose()
        return frame.width, frame.height

    try:
        width, height = asyncio.run(first_frame())
    except (FramepipeError, TimeoutError, StopAsyncIteration) as exc:
        issues.append(
            f"camera {cfg.camera_source}: {exc or 'no frame within ' + str(timeout) + 's'}"
        )
        return {"source": cfg.camera_source, "opened": False}
    return {"source": cfg.camera_source, "opened": True, "size": [width, height]}
