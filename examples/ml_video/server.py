#!/usr/bin/env python3
"""An example model server on the HTTP contract of ``HttpModel``, standard library only.

    python server.py --host 127.0.0.1 --port 5000 --output-root /srv/ml-frames

``POST /infer`` with a ``multipart/form-data`` body: ``input_file`` (the video), ``prompt``,
``style``, ``seed``, optionally ``batch_size`` (frames transformed at once, default 1). It runs
:func:`model.run` (the same transform as ``model.py``) and answers
``{"success": true, "frames_path": "<output-root>/<request id>/frames", "frames": N, ...}``; on
failure HTTP 500 with ``{"success": false, "error": "..."}``, and the request's folder deleted
(HTTP 400, before anything is written, for a malformed request or a style the model does not
have: ``HttpModel`` does not retry it).
A request with an ``Idempotency-Key`` header (``HttpModel`` sends one per call, the same on its
retries) that repeats a call still running waits for it, and one that repeats a call that
succeeded gets its answer: a client that timed out and retried does not make the frames twice.
``GET /health`` answers ``{"ok": true}`` (a readiness probe).

``frames_path`` is a path on this machine: the pipeline reads the frames from disk, so the
server and the worker must share ``--output-root`` (same machine or a shared volume). Each
successful request's folder stays there for the client to read; clean it up with a cron job or
tmpfs.

``--fail MESSAGE`` answers every ``/infer`` with HTTP 500 and that message, to try a client's
error handling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import threading
import uuid
from collections import OrderedDict
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model  # model.py next to this file

__all__ = ["ModelServer", "parse_multipart"]

MAX_BODY = 2 * 1024**3
WAIT_FOR_FIRST = 600.0
"""Seconds a repeated request waits for its call's first request before answering 503."""


class BadRequest(Exception):
    """The request is malformed (HTTP 400)."""


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a ``multipart/form-data`` body: ``{name: (filename or None, bytes)}``."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise BadRequest(f"expected multipart/form-data, not {content_type or 'no content type'}")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise BadRequest("the multipart body cannot be parsed (boundary missing?)")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        assert isinstance(part, Message)
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = part.get_payload(decode=True)
        fields[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return fields


def _text(fields: dict[str, tuple[str | None, bytes]], name: str, default: str) -> str:
    """A text field of the form (``default`` when absent); :class:`BadRequest` when it is not
    UTF-8."""
    if name not in fields:
        return default
    try:
        return fields[name][1].decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the form field {name!r} is not UTF-8 text") from exc


class Handler(BaseHTTPRequestHandler):
    server: ModelServer
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_form(self) -> tuple[dict[str, tuple[str | None, bytes]], int, int]:
        """The request's form fields, seed and batch size (default 1); :class:`BadRequest`
        when malformed, or when it names a style the model does not have."""
        raw = self.headers.get("Content-Length") or "-1"
        length = int(raw) if raw.strip().isdigit() else -1
        if not 0 <= length <= MAX_BODY:
            raise BadRequest("a Content-Length up to 2 GiB is required")
        fields = parse_multipart(self.headers.get("Content-Type", ""), self.rfile.read(length))
        if "input_file" not in fields:
            raise BadRequest("the form has no 'input_file'")
        seed_text = fields.get("seed", (None, b"0"))[1].decode(errors="replace") or "0"
        try:
            seed = int(seed_text)
        except ValueError as exc:
            raise BadRequest(f"seed {seed_text!r} is not an integer") from exc
        batch_text = fields.get("batch_size", (None, b"1"))[1].decode(errors="replace") or "1"
        if not batch_text.isdigit() or int(batch_text) < 1:
            raise BadRequest(f"batch_size {batch_text!r} is not a whole number >= 1")
        _text(fields, "prompt", "")
        try:
            model.resolve_style(_text(fields, "style", "cartoon") or "cartoon")
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        return fields, seed, int(batch_text)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/health":
            self._answer(200, {"ok": True})
        else:
            self._answer(404, {"success": False, "error": f"no route {self.path}"})

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/infer":
            self._answer(404, {"success": False, "error": f"no route {self.path}"})
            return
        try:
            fields, seed, batch_size = self._read_form()
        except BadRequest as exc:
            self._answer(400, {"success": False, "error": str(exc)})
            return
        if self.server.fail:
            self._answer(500, {"success": False, "error": self.server.fail})
            return
        key = self.headers.get("Idempotency-Key") or ""
        if not key:
            self._answer(*self._infer(fields, seed, batch_size))
            return
        if not (len(key) <= 200 and key.isascii() and key.isprintable()):
            self._answer(
                400,
                {"success": False, "error": "Idempotency-Key: 1 to 200 printable ASCII characters"},
            )
            return
        call, first = self.server.calls.begin(key)
        if first:
            try:
                call.answer = self._infer(fields, seed, batch_size)
            finally:
                self.server.calls.end(key, call)
        elif not call.done.wait(WAIT_FOR_FIRST):  # the same call, retried while it runs
            self._answer(
                503, {"success": False, "error": "this call is still running; try again later"}
            )
            return
        self._answer(*call.answer)

    def _infer(
        self, fields: dict[str, tuple[str | None, bytes]], seed: int, batch_size: int
    ) -> tuple[int, dict[str, Any]]:
        """Run the model on the request's video: the status and body of the answer."""
        filename, content = fields["input_file"]
        style = _text(fields, "style", "cartoon") or "cartoon"
        prompt = _text(fields, "prompt", "")
        workdir = self.server.output_root / uuid.uuid4().hex
        workdir.mkdir(parents=True)
        source = workdir / ("input" + (Path(filename).suffix if filename else ".mp4"))
        kept = False
        try:
            source.write_bytes(content)
            frames = model.run(source, workdir, style=style, seed=seed, batch_size=batch_size)
            kept = True
        except Exception as exc:
            self.log_message("inference failed: %s", exc)
            # name the client's file, not this server's temporary copy
            error = str(exc).replace(str(source), filename or "input_file")
            return 500, {"success": False, "error": error}
        finally:
            if kept:
                source.unlink(missing_ok=True)
            else:  # nobody reads the frames of a failed call
                shutil.rmtree(workdir, ignore_errors=True)
        count = sum(1 for _ in frames.glob("*.png"))
        return (
            200,
            {
                "success": True,
                "frames_path": str(frames.resolve()),
                "frames": count,
                "prompt": prompt,
                "style": style,
                "batch_size": batch_size,
            },
        )


class Call:
    """One ``Idempotency-Key``'s call: its answer once ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: tuple[int, dict[str, Any]] = (
            500,
            {"success": False, "error": "the first request of this call ended without answer"},
        )


class Calls:
    """The calls by ``Idempotency-Key``: a request whose key is running waits for it, one whose
    key succeeded gets the same answer (frames are not made twice); a failed call is
    forgotten, so its retry runs again. The last :data:`KEPT` finished calls are kept, and
    every running one."""

    KEPT = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: OrderedDict[str, Call] = OrderedDict()

    def begin(self, key: str) -> tuple[Call, bool]:
        """The call of ``key``, and whether this request is its first (it then runs it)."""
        with self._lock:
            call = self._calls.get(key)
            if call is not None:
                return call, False
            call = self._calls[key] = Call()
            done = [k for k, c in self._calls.items() if c.done.is_set()]
            for old in done[: max(0, len(self._calls) - self.KEPT)]:  # never a running one
                del self._calls[old]
            return call, True

    def end(self, key: str, call: Call) -> None:
        """``call`` has its answer: wake its waiters; a failure is not kept."""
        with self._lock:
            if call.answer[0] != 200 and self._calls.get(key) is call:
                del self._calls[key]
        call.done.set()


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], output_root: Path, fail: str = "") -> None:
        super().__init__(address, Handler)
        self.output_root = output_root
        self.fail = fail
        self.calls = Calls()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--output-root",
        required=True,
        type=Path,
        help="where each request's frames are written (shared with the worker)",
    )
    parser.add_argument(
        "--fail",
        default="",
        metavar="MESSAGE",
        help="answer every /infer with HTTP 500 and MESSAGE (for testing)",
    )
    args = parser.parse_args(argv)
    root = args.output_root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    with ModelServer((args.host, args.port), root, args.fail) as server:
        print(
            f"model server on http://{args.host}:{server.server_port} (frames under {root})",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
