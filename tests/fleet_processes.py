"""A processor in a process of its own, for the fleet's tests on the real Redis: the script
(:data:`PROCESSOR`, written by :func:`processor_script`) and one life of it
(:class:`Processor`), whose stdout says which frames it started and finished; the frames it
is sent (:func:`entry`).

The processor ``solo`` offers ``cap``, beats every 0.2 s, takes raw images and publishes to
``<ns>results``; a frame whose id starts with ``poison`` kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from conftest import REDIS_URL
from framepipe.frames import encode_jpeg

__all__ = ["JPEG", "PROCESSOR", "Processor", "entry", "processor_script"]

JPEG = encode_jpeg(np.zeros((8, 8, 3), np.uint8))


def entry(frame_id: str) -> dict[str, bytes | str]:
    """A frame entry of camera ``cam``: an 8x8 black JPEG."""
    return {"frame_id": frame_id, "camera_id": "cam", "image_data": JPEG}


PROCESSOR = """
import asyncio, json, os, sys
from framepipe.processors import ProcessorClient

cfg = json.loads(sys.argv[1])

class Worker(ProcessorClient):
    async def process_frame(self, frame_data):
        frame_id = frame_data[b"frame_id"].decode()
        print("start", frame_id, os.getpid(), flush=True)
        if frame_id.startswith("poison"):
            os._exit(3)  # the frame kills the process (a segfault, the OOM killer)
        await asyncio.sleep(cfg["delay"])
        print("done", frame_id, flush=True)
        return {"pid": os.getpid()}

async def main():
    worker = Worker(cfg["id"], ["cap"], capacity=cfg["capacity"], redis_url=cfg["url"],
                    health_interval=0.2, namespace=cfg["ns"], image_encoding="raw",
                    result_stream=cfg["ns"] + "results", environ={},
                    health_port=cfg.get("health_port"))
    worker.install_signal_handlers()
    await worker.start()

asyncio.run(main())
"""


def processor_script(folder: Path) -> Path:
    """:data:`PROCESSOR` written to a file in ``folder``."""
    path = folder / "processor_main.py"
    path.write_text(PROCESSOR)
    return path


class Processor:
    """One life of a processor process: its stdout lines, read as they come."""

    def __init__(
        self,
        script: Path,
        ns: str,
        *,
        capacity: int = 1,
        delay: float = 0.0,
        health_port: int | None = None,
    ) -> None:
        self.script = script
        self.cfg: dict[str, Any] = {
            "id": "solo",
            "capacity": capacity,
            "delay": delay,
            "url": REDIS_URL,
            "ns": ns,
            "health_port": health_port,
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Processor:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(self.script),
            json.dumps(self.cfg),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())

    def said(self, word: str, frame_id: str) -> bool:
        return any(line.split()[:2] == [word, frame_id] for line in self.lines)

    async def exited(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def finish(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
        await self.exited()
