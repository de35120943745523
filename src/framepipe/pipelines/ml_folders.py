"""The ML video steps' files moved through the object store: one object into a step's folder,
a folder of frames up under a prefix (images only, in playing order) and back down.

Guarantees: a folder's images are its files with an image suffix, in
:func:`~framepipe.media.frames.frame_order` (``frame_10000`` after ``frame_9999``); an upload
or a download checks for a cancel before each file, so a cancelled step stops between files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from framepipe import media
from framepipe.jobs.context import StepContext

__all__ = ["IMAGE_SUFFIXES", "download_folder", "fetch_object", "images", "upload_folder"]


def fetch_object(ctx: StepContext, key: str) -> Path:
    """Download ``key`` into a new folder of this step."""
    return ctx.objects.get_file(key, ctx.tempdir() / key.rsplit("/", 1)[-1])


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def images(folder: Path) -> list[Path]:
    """The image files of ``folder`` in playing order (:func:`media.frame_order
    <framepipe.media.frames.frame_order>`: ``frame_10000`` after ``frame_9999``); a model may
    write other files too."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=media.frame_order,
    )


def upload_folder(
    ctx: StepContext,
    folder: Path,
    prefix: str,
    checkpoint: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Upload the images of ``folder`` under ``prefix``; ``checkpoint`` (default:
    ``ctx.check_cancelled``) is called before each, ``progress(done, total)`` after each."""
    keys = []
    paths = images(folder)
    for n, path in enumerate(paths, 1):
        (checkpoint or ctx.check_cancelled)()
        key = f"{prefix}/{path.name}"
        ctx.objects.put_file(key, path)
        keys.append(key)
        if progress is not None:
            progress(n, len(paths))
    return keys


def download_folder(ctx: StepContext, prefix: str) -> Path:
    """Every object under ``prefix`` into a new folder of this step (checking for a cancel
    before each)."""
    folder = ctx.tempdir()
    for info in ctx.objects.list(prefix + "/"):
        ctx.check_cancelled()
        ctx.objects.get_file(info.key, folder / info.key.rsplit("/", 1)[-1])
    return folder
