"""The embedded demo: an SD-card import job on generated video clips.

``framepipe demo`` makes a folder that plays an SD card with three short H.264 clips, then runs
the ``demo_import`` pipeline twice: the first run copies every clip into the object store, probes
it and renders a thumbnail; the second run, after a fourth clip is "filmed", imports only the new
one (the ledger remembers the rest). Everything lives under the demo's home folder: SQLite state,
objects, the card.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from pydantic import BaseModel, ConfigDict

from framepipe.jobs.context import StepContext
from framepipe.jobs.inputs import LocalPath, local_input
from framepipe.jobs.ledger import file_fingerprint, file_identity
from framepipe.jobs.pipeline import Pipeline

__all__ = ["REF", "make_clip", "pipeline", "prepare_card"]


class DemoInputs(BaseModel):
    """The demo's one input: the card, a local folder (confined like any local path)."""

    model_config = ConfigDict(extra="forbid")
    card: LocalPath


pipeline = Pipeline(
    "demo_import", description="Import new clips from a card, probe, thumbnail.", inputs=DemoInputs
)
REF = "framepipe.demo:demo_import"
"""Where workers load :data:`pipeline` from."""


def make_clip(
    path: Path,
    *,
    seconds: float = 2.0,
    fps: int = 25,
    size: tuple[int, int] = (320, 240),
    hue: int = 0,
) -> Path:
    """Encode a synthetic H.264 clip (moving colour bars) with PyAV; returns ``path``."""
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    x = np.arange(width, dtype=np.int32)
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for n in range(int(seconds * fps)):
            bars = ((x + n * 4 + hue) % width) * 255 // width
            rgb = np.stack([bars, (bars + 85) % 256, (bars + 170) % 256], axis=-1).astype(np.uint8)
            image = np.repeat(rgb[np.newaxis, :, :], height, axis=0)
            image[height // 2 - 8 : height // 2 + 8, (n * 6) % width : (n * 6) % width + 16] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = n
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path


def prepare_card(card: Path, count: int = 3) -> list[Path]:
    """Make ``card`` hold clips ``clip_1.mp4`` .. ``clip_<count>.mp4`` (existing ones are kept)."""
    return [
        p if p.exists() else make_clip(p, hue=i * 40)
        for i, p in ((i, card / f"clip_{i}.mp4") for i in range(1, count + 1))
    ]


@pipeline.step()
def scan(ctx: StepContext) -> dict[str, Any]:
    """List the card; spawn copy + thumbnail steps for files the ledger has not seen."""
    card = local_input(ctx, ctx.inputs["card"], where="inputs.card", declared=True)
    if card is None or not card.is_dir():
        raise FileNotFoundError(f"card folder {ctx.inputs['card']} does not exist")
    files = {
        file_identity(p, card): p
        for p in sorted(card.glob("*.mp4"))
        if p.is_file() and not p.is_symlink()
    }  # a link on a card is not a clip
    new = ctx.ledger.filter_new(files)
    for identity in new:
        path = str(files[identity])
        copied = ctx.spawn_step("copy", {"path": path, "identity": identity})
        ctx.spawn_step("thumbnail", {"path": path}, depends_on=[copied])
    ctx.log.info("%d clips on the card, %d new", len(files), len(new))
    return {"seen": len(files), "new": len(new)}


@pipeline.step(retries=2, weight=2)
def copy(ctx: StepContext, path: str, identity: str) -> dict[str, Any]:
    """Copy one clip into the object store and record it in the ledger."""
    source = Path(path)
    key = f"imports/{source.name}"
    ctx.progress(10, f"copying {source.name}")
    info = ctx.objects.put_file(key, source)
    ctx.ledger.record(
        identity, size=info.size, meta={"key": key, "fingerprint": file_fingerprint(source)}
    )
    return {f"copied:{source.name}": key}


@pipeline.step(depends_on=["scan"], weight=3)
def thumbnail(ctx: StepContext, path: str) -> dict[str, Any]:
    """Probe the stored clip and save its middle frame as a JPEG thumbnail."""
    name = Path(path).name
    local = ctx.tempdir() / name
    ctx.objects.get_file(ctx.data[f"copied:{name}"], local)
    with av.open(str(local)) as container:
        stream = container.streams.video[0]
        frames = stream.frames or 0
        middle = None
        for n, frame in enumerate(container.decode(stream)):
            if frames and n % 10 == 0:
                ctx.progress(80 * n / frames, f"decoding {name}")
            if middle is None and (not frames or n >= frames // 2):
                middle = frame
        if middle is None:
            raise ValueError(f"{name} holds no video frames")
        probe = {
            "frames": frames,
            "fps": float(stream.average_rate or 0),
            "width": stream.width,
            "height": stream.height,
            "codec": stream.codec_context.name,
        }
    jpeg = ctx.tempdir() / f"{name}.jpg"
    with av.open(str(jpeg), "w", format="image2") as out:
        encoder = out.add_stream("mjpeg", rate=1)
        encoder.width, encoder.height, encoder.pix_fmt = middle.width, middle.height, "yuvj420p"
        for packet in encoder.encode(middle.reformat(format="yuvj420p")):
            out.mux(packet)
        for packet in encoder.encode():
            out.mux(packet)
    key = f"thumbnails/{name}.jpg"
    ctx.objects.put_file(key, jpeg)
    return {f"probe:{name}": probe, f"thumbnail:{name}": key}


@pipeline.step(depends_on=["thumbnail"], weight=1)
def report(ctx: StepContext) -> dict[str, Any]:
    """Write a JSON summary of this import to the object store."""
    probes = {k.split(":", 1)[1]: v for k, v in ctx.data.items() if k.startswith("probe:")}
    key = f"reports/{ctx.execution_id}.json"
    ctx.objects.put(key, json.dumps({"imported": probes}, indent=2).encode())
    return {"report": key, "imported": sorted(probes)}
