"""Model adapters against real things: model scripts run as subprocesses (tests/models/), a real
HTTP server on loopback, in-process models inside a live pipeline, and a real job engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import pytest

from framepipe import JobEngine, Pipeline, Settings, StepContext
from framepipe.errors import (
    ConfigError,
    ExecutionFailedError,
    InvalidInputError,
    ModelError,
    ModelOutputError,
    ModelRefusedError,
    ModelSetupError,
    ModelTimeoutError,
)
from framepipe.frames import Frame
from framepipe.jobs.outcomes import is_permanent
from framepipe.jobs.records import list_events
from framepipe.pipelines.ml_settings import MlVideoSettings
from framepipe.processors import (
    HttpModel,
    MockModel,
    ModelAdapter,
    ModelResult,
    Processor,
    PythonModel,
    SubprocessModel,
    as_step_progress,
)
from framepipe.processors.adapters import ModelProcessor
from framepipe.sources import PatternSource
from framepipe.stream import Sink, Stage, StreamPipeline

MODELS = Path(__file__).parent / "models"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


def adapter_from_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> ModelAdapter:
    """The model the ML video pipeline's settings select (``env`` defaults to the process's
    environment and config file)."""
    return MlVideoSettings.load(env, **overrides).adapter()


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "input.mp4"
    path.write_bytes(b"not really a video, the test models only read bytes" * 10)
    return path


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


def wait_gone(pids: list[int], within: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.02)
    return [p for p in pids if alive(p)]


# -- SubprocessModel ----------------------------------------------------------------------------


def test_subprocess_model_follows_the_seed_protocol(tmp_path: Path, clip: Path) -> None:
    seen: list[float] = []
    model = SubprocessModel(MODELS / "good_model.py")
    result = run(
        model.infer(
            clip,
            prompt="turn into anime",
            style="studio",
            seed=42,
            output_dir=tmp_path / "out",
            progress=seen.append,
            frames=4,
        )
    )
    assert result.frames_path == tmp_path / "out" / "frames"
    files = result.frame_files()
    assert [f.name for f in files] == [f"frame_{i:04d}.png" for i in range(4)]
    image = cv2.imread(str(files[0]))
    assert image is not None and image.shape == (24, 32, 3)
    assert (result.frames_path / "args.txt").read_text() == "turn into anime|studio|42"
    assert seen == [25.0, 50.0, 75.0, 100.0]
    assert result.extra == {"stdout": ["loading model"]}


def test_subprocess_command_is_the_seed_interface(tmp_path: Path) -> None:
    model = SubprocessModel("model.py", python="python3")
    argv = model.command(
        "in.mp4", prompt="p q", style="s", seed=7, output_dir="out", steps=20, fast=True, skip=False
    )
    assert argv == [
        "python3",
        "model.py",
        "--input",
        "in.mp4",
        "--prompt",
        "p q",
        "--style",
        "s",
        "--seed",
        "7",
        "--output-dir",
        "out",
        "--steps",
        "20",
        "--fast",
    ]
    custom = SubprocessModel(argv=["run-model", "{input}", "-o", "{output_dir}"])
    assert custom.command("a", output_dir="b") == ["run-model", "a", "-o", "b"]


def test_subprocess_nonzero_exit_names_code_and_stderr(tmp_path: Path, clip: Path) -> None:
    model = SubprocessModel(MODELS / "crash_model.py")
    with pytest.raises(ModelError) as info:
        run(model.infer(clip, output_dir=tmp_path))
    err = info.value
    assert err.exit_code == 3
    assert "exited with code 3" in str(err) and "crash_model.py" in str(err)
    assert "CUDA out of memory" in err.stderr_tail and "CUDA out of memory" in str(err)
    # the cause ends the first line, which is all an execution's error keeps of it
    first, *rest = str(err).splitlines()
    assert first.endswith("crash_model.py) exited with code 3: RuntimeError: CUDA out of memory")
    assert rest == [
        "stderr (last 2 lines):",
        "loading weights from /models/anime.ckpt",
        "RuntimeError: CUDA out of memory",
    ]
    assert not isinstance(err, ModelOutputError | ModelTimeoutError)


@pytest.mark.parametrize(
    ("code", "error", "step_error"),
    [
        (65, ModelRefusedError, InvalidInputError),  # EX_DATAERR: this input, never
        (66, ModelRefusedError, InvalidInputError),  # EX_NOINPUT
        (64, ModelSetupError, ConfigError),  # EX_USAGE: the command is wrong
        (78, ModelSetupError, ConfigError),  # EX_CONFIG
    ],
)
def test_a_script_refuses_for_good_with_a_sysexits_code(
    tmp_path: Path, clip: Path, code: int, error: type[ModelError], step_error: type[Exception]
) -> None:
    """A script cannot answer HTTP 400, but it can exit with ``sysexits.h``'s codes: its
    refusal is not retried by the adapter nor run again by a step, as a server's 4xx."""
    script = tmp_path / "refusing_model.py"
    script.write_text(
        "import pathlib, sys\n"
        "runs = pathlib.Path(sys.argv[sys.argv.index('--output-dir') + 1]) / 'runs.txt'\n"
        "runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))\n"
        "print('unsupported codec: prores', file=sys.stderr)\n"
        f"sys.exit({code})\n"
    )
    model = SubprocessModel(script, max_retries=3, retry_initial=0.01)
    with pytest.raises(error) as info:
        run(model.infer(clip, output_dir=tmp_path))
    assert (tmp_path / "runs.txt").read_text() == "1"
    refused = info.value
    assert refused.exit_code == code and not refused.retryable
    assert isinstance(refused, step_error) and is_permanent(refused)
    first = str(refused).splitlines()[0]
    assert first.endswith(f"exited with code {code}: unsupported codec: prores")
    assert "not run again" in str(refused)


def test_other_exit_codes_stay_retryable(tmp_path: Path, clip: Path) -> None:
    model = SubprocessModel(MODELS / "crash_model.py", max_retries=0)
    with pytest.raises(ModelError) as info:
        run(model.infer(clip, output_dir=tmp_path))
    assert info.value.retryable and not is_permanent(info.value)


def test_subprocess_without_frames_path_is_an_output_error(tmp_path: Path, clip: Path) -> None:
    seen: list[float] = []
    model = SubprocessModel(MODELS / "silent_model.py", max_retries=2, retry_initial=0.01)
    with pytest.raises(ModelOutputError, match="without printing a 'frames_path: PATH'"):
        run(model.infer(clip, output_dir=tmp_path, progress=seen.append))
    assert seen == [50.0, 100.0]  # not retried: the protocol error would repeat


def test_subprocess_that_prints_nothing_is_an_output_error(tmp_path: Path, clip: Path) -> None:
    seen: list[float] = []
    script = MODELS / "mute_model.py"
    model = SubprocessModel(script, max_retries=2, retry_initial=0.01)
    with pytest.raises(ModelOutputError) as info:
        run(model.infer(clip, output_dir=tmp_path, progress=seen.append))
    message = str(info.value)
    assert str(script) in message
    assert "exited 0 without printing a 'frames_path: PATH' line" in message
    assert info.value.exit_code == 0
    assert (tmp_path / "frames").is_dir()  # it did write frames, but never said where
    assert (tmp_path / "runs.txt").read_text() == "1"  # not retried: it would not say so again
    assert seen == []


def test_subprocess_model_survives_long_lines_and_progress_bars(tmp_path: Path) -> None:
    """What models write around the protocol (a 300 KB stdout line, a 200 KB stderr line, a
    ``\r`` progress bar, 200 KB of warnings, invalid UTF-8) neither fails nor stalls a run, and
    the end of stderr is still what an error shows."""
    seen: list[float] = []
    model = SubprocessModel(MODELS / "chatty_model.py", timeout=60)
    good = tmp_path / "in.mp4"
    good.write_bytes(b"ok")
    result = run(model.infer(good, output_dir=tmp_path / "out", progress=seen.append))
    assert result.frames_path == tmp_path / "out" / "frames"
    assert seen == [50.0]
    (long_line,) = result.extra["stdout"]
    assert set(long_line) == {"x"} and 0 < len(long_line) <= 16384  # kept, cut to a bound
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"fail")
    with pytest.raises(ModelError, match="exited with code 1") as info:
        run(model.infer(bad, output_dir=tmp_path / "out2"))
    assert info.value.stderr_tail.endswith("last words")


def test_subprocess_frames_path_that_does_not_exist(tmp_path: Path, clip: Path) -> None:
    model = SubprocessModel(MODELS / "good_model.py")
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelOutputError, match=f"frames_path {missing} does not exist"):
        run(model.infer(clip, output_dir=tmp_path / "out", report_path=str(missing)))


def test_subprocess_retries_a_crash_with_backoff(tmp_path: Path, clip: Path) -> None:
    model = SubprocessModel(MODELS / "flaky_model.py", max_retries=2, retry_initial=0.05)
    started = time.monotonic()
    result = run(model.infer(clip, output_dir=tmp_path, fail_times=2))
    assert (tmp_path / "runs.txt").read_text() == "3"
    assert result.frames_path == tmp_path / "frames"
    assert time.monotonic() - started >= 0.05 + 0.1 * 0.9  # two backoff delays

    (tmp_path / "runs.txt").unlink()
    with pytest.raises(ModelError, match="failed after 2 attempts; last error") as info:
        run(
            SubprocessModel(MODELS / "flaky_model.py", max_retries=1, retry_initial=0.01).infer(
                clip, output_dir=tmp_path, fail_times=5
            )
        )
    assert info.value.exit_code == 1 and "transient failure 2" in str(info.value)


@pytest.mark.slow
def test_subprocess_timeout_kills_the_whole_process_group(tmp_path: Path, clip: Path) -> None:
    model = SubprocessModel(MODELS / "hang_model.py", timeout=1.5)
    seen: list[float] = []
    started = time.monotonic()
    with pytest.raises(ModelTimeoutError, match=r"no result within 1.5s"):
        run(model.infer(clip, output_dir=tmp_path, progress=seen.append))
    assert time.monotonic() - started < 10
    assert seen == [5.0]
    pids = [int(p) for p in (tmp_path / "pids.txt").read_text().split()]
    assert len(pids) == 2  # the script and its child sleep
    assert wait_gone(pids) == []


def test_cancelling_the_task_kills_the_whole_process_group(tmp_path: Path, clip: Path) -> None:
    model = SubprocessModel(MODELS / "hang_model.py")
    pid_file = tmp_path / "pids.txt"

    async def main() -> list[int]:
        running = asyncio.Event()  # the script reports progress once its pids are written
        task = asyncio.create_task(
            model.infer(clip, output_dir=tmp_path, progress=lambda pct: running.set())
        )
        await running.wait()
        pids = [int(p) for p in pid_file.read_text().split()]
        assert all(alive(p) for p in pids)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pids

    pids = run(main())
    assert wait_gone(pids) == []


def test_a_model_that_exits_leaving_a_child_answers_at_once(tmp_path: Path, clip: Path) -> None:
    """A script that exits 0 while a child it started still holds its stdout answers its
    result when it exits, and the child (in its process group) is killed; the call waited
    for the child to end (here: 120 s), so a timeout reported a model that had finished."""
    model = SubprocessModel(MODELS / "helper_model.py", timeout=30)
    result = run(model.infer(clip, output_dir=tmp_path))
    assert result.frames_path == tmp_path
    assert wait_gone([int((tmp_path / "helper.pid").read_text())]) == []


@pytest.mark.slow
def test_a_model_whose_detached_child_holds_its_output_still_answers(
    tmp_path: Path, clip: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that left the process group (its own session) cannot be killed with it: the
    call still answers the script's result, with a warning saying a process was left running."""
    model = SubprocessModel(MODELS / "helper_model.py", timeout=30)
    try:
        result = run(model.infer(clip, output_dir=tmp_path, detach=True))
        assert result.frames_path == tmp_path
        assert "a process it started outside its process group" in caplog.text
    finally:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.kill(int((tmp_path / "helper.pid").read_text()), signal.SIGKILL)


def test_subprocess_missing_interpreter_is_a_clear_error(tmp_path: Path, clip: Path) -> None:
    model = SubprocessModel(MODELS / "good_model.py", python=str(tmp_path / "no-python"))
    with pytest.raises(ModelError, match="cannot start"):
        run(model.infer(clip, output_dir=tmp_path))


# -- HttpModel against a real server on loopback --------------------------------------------------

Reply = Callable[[dict[str, str]], tuple[int, bytes]]


class ModelServer:
    """A real HTTP server on 127.0.0.1 answering ``POST /infer`` with ``replies`` in turn (the
    last one repeats); it keeps the form fields of every request."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
                message = BytesParser(policy=HTTP).parsebytes(head + body)
                fields: dict[str, str] = {
                    "path": self.path,
                    "idempotency-key": self.headers.get("Idempotency-Key", ""),
                }
                for part in message.iter_parts():
                    name = str(part.get_param("name", header="content-disposition"))
                    payload = part.get_payload(decode=True)
                    assert isinstance(payload, bytes)
                    fields[name] = payload.decode(errors="replace")
                    if part.get_filename():
                        fields[f"{name}.filename"] = str(part.get_filename())
                index = len(server.requests)
                server.requests.append(fields)
                status, reply = server.replies[min(index, len(server.replies) - 1)](fields)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ModelServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(frames_path: Path) -> Reply:
    def reply(fields: dict[str, str]) -> tuple[int, bytes]:
        return 200, json.dumps(
            {"success": True, "frames_path": str(frames_path), "model": "anime-v2"}
        ).encode()

    return reply


def fixed(status: int, body: bytes) -> Reply:
    return lambda fields: (status, body)


@pytest.fixture
def frames_dir(tmp_path: Path) -> Path:
    path = tmp_path / "server-frames"
    path.mkdir()
    return path


def test_http_model_posts_the_seed_form(tmp_path: Path, clip: Path, frames_dir: Path) -> None:
    seen: list[float] = []
    with ModelServer([ok(frames_dir)]) as server:
        model = HttpModel(server.url + "/", timeout=5, check_frames_path=True)
        result = run(
            model.infer(
                clip,
                prompt="turn into anime",
                style="studio",
                seed=42,
                output_dir=tmp_path / "out",
                progress=seen.append,
            )
        )
    assert result == ModelResult(frames_dir, {"model": "anime-v2"})
    [request] = server.requests
    assert request["path"] == "/infer"
    assert request["input_file"] == clip.read_text()
    assert request["input_file.filename"] == "input.mp4"
    assert (request["prompt"], request["style"], request["seed"]) == (
        "turn into anime",
        "studio",
        "42",
    )
    assert seen == [0.0, 100.0]


@pytest.mark.slow
def test_http_500_then_success_is_retried(tmp_path: Path, clip: Path, frames_dir: Path) -> None:
    with ModelServer([fixed(500, b"warming up"), fixed(503, b"busy"), ok(frames_dir)]) as server:
        model = HttpModel(server.url, timeout=5, max_retries=3, retry_initial=0.01)
        result = run(model.infer(clip, output_dir=tmp_path))
    assert result.frames_path == frames_dir
    assert len(server.requests) == 3


@pytest.mark.slow
def test_http_always_500_fails_clearly_after_retries(tmp_path: Path, clip: Path) -> None:
    with ModelServer([fixed(500, b'{"error": "model crashed"}')]) as server:
        model = HttpModel(server.url, timeout=5, max_retries=2, retry_initial=0.01)
        with pytest.raises(ModelError) as info:
            run(model.infer(clip, output_dir=tmp_path))
    assert len(server.requests) == 3
    message = str(info.value)
    assert "failed after 3 attempts" in message and server.url in message
    assert "HTTP 500" in message and "model crashed" in message
    assert info.value.status_code == 500


@pytest.mark.parametrize(
    ("status", "error", "step_error"),
    [
        (400, ModelRefusedError, InvalidInputError),
        (422, ModelRefusedError, InvalidInputError),
        (401, ModelSetupError, ConfigError),
        (404, ModelSetupError, ConfigError),
    ],
)
def test_http_4xx_is_not_retried_nor_run_again_by_a_step(
    tmp_path: Path,
    clip: Path,
    status: int,
    error: type[ModelError],
    step_error: type[Exception],
) -> None:
    with ModelServer([fixed(status, b'{"error": "missing prompt"}')]) as server:
        model = HttpModel(server.url, timeout=5, max_retries=3, retry_initial=0.01)
        with pytest.raises(error, match=rf"HTTP {status}.*missing prompt") as info:
            run(model.infer(clip, output_dir=tmp_path))
    assert len(server.requests) == 1
    assert info.value.status_code == status and not info.value.retryable
    assert isinstance(info.value, step_error) and is_permanent(info.value)


def test_http_429_is_retried(tmp_path: Path, clip: Path, frames_dir: Path) -> None:
    with ModelServer([fixed(429, b"slow down"), ok(frames_dir)]) as server:
        model = HttpModel(server.url, timeout=5, max_retries=3, retry_initial=0.01)
        result = run(model.infer(clip, output_dir=tmp_path))
    assert result.frames_path == frames_dir
    assert len(server.requests) == 2


def test_http_success_false_carries_the_server_error(tmp_path: Path, clip: Path) -> None:
    body = json.dumps({"success": False, "error": "unsupported style 'noir'"}).encode()
    with ModelServer([fixed(200, body)]) as server:
        model = HttpModel(server.url, timeout=5, max_retries=3, retry_initial=0.01)
        with pytest.raises(ModelError, match="the model failed: unsupported style 'noir'"):
            run(model.infer(clip, style="noir", output_dir=tmp_path))
    assert len(server.requests) == 1


def test_http_non_json_body_is_an_output_error(tmp_path: Path, clip: Path) -> None:
    with ModelServer([fixed(200, b"<html>proxy error</html>")]) as server:
        model = HttpModel(server.url, timeout=5, max_retries=3, retry_initial=0.01)
        with pytest.raises(ModelOutputError, match=r"not JSON.*proxy error"):
            run(model.infer(clip, output_dir=tmp_path))
    assert len(server.requests) == 1


def test_http_endless_answer_is_refused_past_the_limit(tmp_path: Path, clip: Path) -> None:
    """An answer that never ends (no Content-Length, bytes until the client goes) is read up to
    ``max_answer_bytes`` and refused, not buffered until memory or the timeout runs out; one
    whose Content-Length is over the limit is refused without reading it."""
    sent: list[int] = []

    class Endless(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if self.path.startswith("/declared"):
                self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            chunk = b'{"success": true, "frames_path": "/x", "pad": "' + b"a" * 65536
            total = 0
            try:
                while total < 1 << 30:
                    self.wfile.write(chunk)
                    total += len(chunk)
            except OSError:
                pass  # the client stopped reading
            sent.append(total)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for path in ("/endless", "/declared"):
            url = f"http://127.0.0.1:{httpd.server_address[1]}{path}"
            model = HttpModel(url, timeout=30, max_retries=2, max_answer_bytes=100_000)
            with pytest.raises(ModelOutputError, match="more than 100000 bytes") as info:
                run(model.infer(clip, output_dir=tmp_path))
            assert info.value.status_code == 200 and not info.value.retryable
            assert len(str(info.value)) < 500
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("body", "error", "quoted"),
    [
        (b"[" * 100_000, ModelOutputError, "not JSON: '[[[["),
        (json.dumps([1] * 100_000).encode(), ModelOutputError, "answered [1, 1, 1"),
        (json.dumps({"success": False, "error": "e" * 200_000}).encode(), ModelError, "eeee"),
        (json.dumps({"success": True, "logs": "l" * 200_000}).encode(), ModelOutputError, "lll"),
    ],
    ids=["nested-too-deep", "long-array", "long-error", "long-without-frames-path"],
)
def test_http_malformed_or_long_answer_is_a_short_model_error(
    tmp_path: Path, clip: Path, body: bytes, error: type[ModelError], quoted: str
) -> None:
    """Whatever the server answers, the call fails with a ModelError naming the model, quoting
    the start of the answer, never the whole of it."""
    with ModelServer([fixed(200, body)]) as server:
        model = HttpModel(server.url, timeout=5, max_retries=0)
        with pytest.raises(error) as info:
            run(model.infer(clip, output_dir=tmp_path))
    message = str(info.value)
    assert message.startswith(f"HttpModel({server.url})") and quoted in message
    assert len(message) < 1000 and "more characters" in message


@pytest.mark.slow
def test_http_slow_response_times_out_and_is_retried(
    tmp_path: Path, clip: Path, frames_dir: Path
) -> None:
    def slow(fields: dict[str, str]) -> tuple[int, bytes]:
        time.sleep(1.5)
        return ok(frames_dir)(fields)

    with ModelServer([slow]) as server:
        model = HttpModel(server.url, timeout=0.3, max_retries=1, retry_initial=0.01)
        started = time.monotonic()
        with pytest.raises(
            ModelTimeoutError,
            match=r"failed after 2 attempts.*127\.0\.0\.1.*"
            r"(no result within 0\.3s|timed out)",
        ):
            run(model.infer(clip, output_dir=tmp_path))
        assert time.monotonic() - started < 1.4
    assert len(server.requests) == 2


@pytest.mark.slow
def test_http_retries_of_one_call_carry_its_idempotency_key(
    tmp_path: Path, clip: Path, frames_dir: Path
) -> None:
    """A retry after a timeout repeats the call's ``Idempotency-Key`` (a server can answer it
    with the first attempt's result); the next call has a key of its own."""

    def slow(fields: dict[str, str]) -> tuple[int, bytes]:
        time.sleep(1.0)
        return ok(frames_dir)(fields)

    with ModelServer([slow, ok(frames_dir)]) as server:
        model = HttpModel(server.url, timeout=0.3, max_retries=1, retry_initial=0.01)
        run(model.infer(clip, output_dir=tmp_path))
        run(model.infer(clip, output_dir=tmp_path))
    keys = [r["idempotency-key"] for r in server.requests]
    assert len(keys) == 3 and all(len(k) == 32 for k in keys), keys
    assert keys[0] == keys[1] != keys[2]


@pytest.mark.slow
def test_http_unreachable_server_names_the_url(tmp_path: Path, clip: Path) -> None:
    with ModelServer([fixed(200, b"{}")]) as server:
        url = server.url
    model = HttpModel(url, timeout=2, max_retries=1, retry_initial=0.01)
    with pytest.raises(ModelError, match=rf"failed after 2 attempts.*{url}.*ConnectError"):
        run(model.infer(clip, output_dir=tmp_path))


def test_http_model_keeps_the_query_and_never_shows_its_secrets(
    tmp_path: Path, clip: Path, frames_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A URL with a path and a query posts to ``<path>/infer?<query>``; a password or a key in
    the URL is masked in every error and in framepipe's log lines."""
    caplog.set_level("DEBUG", logger="framepipe")
    with ModelServer([fixed(503, b"busy"), ok(frames_dir)]) as server:
        url = server.url.replace("//", "//ann:hunter2@") + "/v1/?api_key=SECRET123&mode=fast"
        model = HttpModel(url, timeout=5, max_retries=1, retry_initial=0.01)
        result = run(model.infer(clip, output_dir=tmp_path))
        assert result.frames_path == frames_dir
        assert [r["path"] for r in server.requests] == ["/v1/infer?api_key=SECRET123&mode=fast"] * 2
        assert "api_key=***" in model.describe() and "ann:***@" in model.describe()
        model = HttpModel(url, timeout=5, max_retries=0)
        server.replies = [fixed(500, b"broken")]
        with pytest.raises(ModelError) as info:
            run(model.infer(clip, output_dir=tmp_path))
    shown = str(info.value) + caplog.text
    assert "/v1/infer?api_key=***&mode=fast" in str(info.value)
    assert "SECRET123" not in shown and "hunter2" not in shown


def test_http_model_secrets_stay_out_of_httpx_log_lines(
    tmp_path: Path, clip: Path, frames_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An application logging at INFO (``logging.basicConfig(level=INFO)``) sees httpx's own
    ``HTTP Request: POST <url>`` line for each call: its URL is masked like framepipe's."""
    caplog.set_level("INFO")
    with ModelServer([ok(frames_dir)]) as server:
        url = server.url.replace("//", "//ann:hunter2@") + "/v1?api_key=SECRET123&mode=fast"
        run(HttpModel(url, timeout=5, max_retries=0).infer(clip, output_dir=tmp_path))
    [line] = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert "POST http://ann:***@127.0.0.1:" in line and "/v1/infer?api_key=***&mode=fast" in line
    assert "SECRET123" not in caplog.text and "hunter2" not in caplog.text


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://ann:hunter2@127.0.0.1:99999/?api_key=SECRET123", "malformed host or port"),
        ("http://ann:hun/ter2@models:8000/?token=SECRET123", "must be percent-encoded"),
        ("http://[::1/v1?token=SECRET123", "malformed host or port"),
        ("http:///v1?token=SECRET123", "has no host"),
        ("http://127.0.0.1:5000/\x00?token=SECRET123", "control character"),
        ("http://models :5000/?token=SECRET123", "a space"),
    ],
)
def test_http_model_refuses_a_malformed_url_when_made(url: str, problem: str) -> None:
    """A URL httpx cannot use is a ConfigError naming the setting when the adapter is made,
    never the secrets in it; it was a bare OverflowError (in an ExceptionGroup), ValueError or
    httpx.InvalidURL from the first call, once the pipeline ran."""
    with pytest.raises(ConfigError, match=problem) as info:
        HttpModel(url)
    with pytest.raises(ConfigError, match=rf"^MODEL_API_URL: model URL .*{problem}") as named:
        adapter_from_settings({"MODEL_ADAPTER_TYPE": "http", "MODEL_API_URL": url})
    for message in (str(info.value), str(named.value)):
        assert "SECRET123" not in message and "hunter2" not in message and "ter2" not in message


# -- MockModel ----------------------------------------------------------------------------------


def test_mock_model_writes_frames_with_progress(tmp_path: Path, clip: Path) -> None:
    seen: list[float] = []
    model = MockModel(frames=5, size=(64, 48), fmt="jpg")
    result = run(model.infer(clip, seed=3, output_dir=tmp_path, progress=seen.append))
    files = result.frame_files()
    assert [f.name for f in files] == [f"frame_{i:04d}.jpg" for i in range(5)]
    image = cv2.imread(str(files[2]))
    assert image is not None and image.shape == (48, 64, 3)
    assert seen == [0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
    again = run(MockModel(frames=1, size=(64, 48)).infer(clip, seed=3, output_dir=tmp_path / "b"))
    png = cv2.imread(str(again.frame_files()[0]))
    assert png is not None
    assert np.array_equal(png, MockModel(size=(64, 48)).render(0, seed=3))


def test_mock_model_timeout_and_file_only_process(tmp_path: Path, clip: Path) -> None:
    model = MockModel(frames=50, delay=0.05, timeout=0.2)
    with pytest.raises(ModelTimeoutError, match="MockModel"):
        run(model.infer(clip, output_dir=tmp_path))
    assert len(list((tmp_path / "frames").iterdir())) < 50
    # a file-based model is no processor: a live stage refuses it when it is built
    assert not isinstance(model, Processor)
    with pytest.raises(TypeError, match=r"MockModel\(.*\) works on files"):
        ModelProcessor(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="neither a Processor nor a callable"):
        Stage(model)  # type: ignore[arg-type]


# -- PythonModel --------------------------------------------------------------------------------


class Collect(Sink):
    def __init__(self) -> None:
        self.name = "collect"
        self.frames: list[Frame] = []
        self.lock = threading.Lock()

    def write(self, frame: Frame) -> None:
        with self.lock:
            self.frames.append(frame)


class Negative:
    """A model class: loaded once, then called on each frame in the stage's threads."""

    loads = 0

    def load(self) -> None:
        type(self).loads += 1
        self.table = np.arange(255, -1, -1, dtype=np.uint8)

    def process_frame(self, image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        out: np.ndarray[Any, Any] = self.table[image]
        return out


def test_python_model_runs_on_a_live_stage_through_its_processor() -> None:
    Negative.loads = 0
    sink = Collect()
    source = PatternSource("cam", width=64, height=48, count=30, realtime=False)

    def keep_original(frame: Frame) -> Frame:
        frame.meta["original"] = frame.image.copy()
        return frame

    async def main() -> None:
        pipeline = StreamPipeline(
            "negate",
            source,
            stages=[
                Stage(keep_original),
                Stage(ModelProcessor(PythonModel(Negative)), workers=3, ordered=True),
            ],
            sinks=[sink],
        )
        await pipeline.run()

    run(main())
    assert Negative.loads == 1
    assert [f.seq for f in sink.frames] == list(range(1, 31))
    for frame in sink.frames:
        assert np.array_equal(frame.image, 255 - frame.meta["original"])


def test_python_model_function_results_and_drops() -> None:
    sink = Collect()

    def brightness(image: np.ndarray[Any, Any]) -> float | None:
        mean = float(image.mean())
        return None if mean < 0 else mean

    model = PythonModel(brightness, name="brightness")
    pipeline = StreamPipeline(
        "measure",
        PatternSource("cam", count=5, realtime=False),
        stages=[Stage(ModelProcessor(model))],
        sinks=[sink],
    )
    run(pipeline.run())
    assert len(sink.frames) == 5
    assert all(f.meta["brightness"] > 0 for f in sink.frames)


class MissingWeights:
    """A model class whose weights are not there."""

    def load(self) -> None:
        raise FileNotFoundError("weights/detector.pt")

    def infer(self, input_path: Path, **kwargs: Any) -> str:
        raise AssertionError("never loaded, never called")

    def process_frame(self, image: np.ndarray[Any, Any]) -> None:
        raise AssertionError("never loaded, never called")


def test_a_python_model_that_cannot_load_is_a_model_error_naming_it(
    tmp_path: Path, clip: Path
) -> None:
    """A model class that raises while it is made or loaded fails the call, or the live
    pipeline, with a ModelError naming the model and the cause (its ``__cause__``), where the
    bare FileNotFoundError said nothing of which model."""
    model = PythonModel(MissingWeights, max_retries=2, retry_initial=0.01)
    with pytest.raises(ModelError) as info:
        run(model.infer(clip, output_dir=tmp_path))
    assert str(info.value) == (
        "PythonModel(MissingWeights): loading the model failed: "
        "FileNotFoundError: weights/detector.pt"
    )
    assert isinstance(info.value.__cause__, FileNotFoundError) and not info.value.retryable

    pipeline = StreamPipeline(
        "detect",
        PatternSource("cam", count=3, realtime=False),
        stages=[Stage(ModelProcessor(PythonModel(MissingWeights, name="detector")))],
        sinks=[Collect()],
    )
    with pytest.raises(ModelError, match=r"^detector\(MissingWeights\): loading the model"):
        run(pipeline.run())


def test_an_async_python_models_errors_are_wrapped_and_retried(tmp_path: Path, clip: Path) -> None:
    """An ``async def`` model's exception is a retryable ModelError like a plain function's,
    and a TimeoutError it raises itself (with no adapter timeout) says so."""
    calls: list[int] = []

    async def flaky(input_path: Path, **kwargs: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("GPU out of memory")
        return {"frames_path": str(tmp_path)}

    model = PythonModel(flaky, max_retries=1, retry_initial=0.01)
    assert run(model.infer(clip, output_dir=tmp_path / "o")).frames_path == tmp_path
    assert len(calls) == 2

    async def slow(input_path: Path, **kwargs: Any) -> dict[str, Any]:
        raise TimeoutError("upstream GPU queue")

    timing_out = PythonModel(slow, timeout=None, max_retries=0)
    with pytest.raises(ModelError, match="raised TimeoutError: upstream GPU queue"):
        run(timing_out.infer(clip, output_dir=tmp_path / "o"))

    class Remote(ModelAdapter):  # an adapter of the user's own, no timeout of its own
        async def _infer_once(self, input_path: Path, **kwargs: Any) -> ModelResult:
            raise TimeoutError("the queue did not answer")

    with pytest.raises(ModelTimeoutError, match=r"timed out inside the model.*did not answer"):
        run(Remote(timeout=None, max_retries=0).infer(clip, output_dir=tmp_path / "o"))


def test_python_model_infer_in_a_thread(tmp_path: Path, clip: Path) -> None:
    threads: list[int] = []

    class Stylise:
        instances = 0

        def __init__(self) -> None:
            type(self).instances += 1

        def infer(
            self,
            input_path: Path,
            *,
            prompt: str,
            style: str,
            seed: int,
            output_dir: Path,
            progress: Callable[[float], None],
        ) -> dict[str, Any]:
            threads.append(threading.get_ident())
            out = output_dir / "frames"
            out.mkdir()
            for i in range(4):
                cv2.imwrite(str(out / f"f{i}.png"), np.full((8, 8, 3), seed, np.uint8))
                progress((i + 1) * 25)
            return {"frames_path": out, "prompt": prompt}

    model = PythonModel(Stylise)
    seen: list[float] = []

    async def main() -> list[ModelResult]:
        async with model:
            return [
                await model.infer(
                    clip, prompt="p", seed=9, output_dir=tmp_path / str(i), progress=seen.append
                )
                for i in range(2)
            ]

    results = run(main())
    assert Stylise.instances == 1
    assert threads and threading.get_ident() not in threads
    assert [len(r.frame_files()) for r in results] == [4, 4]
    assert results[0].extra == {"prompt": "p"}
    assert seen == [25.0, 50.0, 75.0, 100.0] * 2

    def broken(input_path: Path, **kwargs: Any) -> str:
        raise ValueError("bad weights")

    with pytest.raises(ModelError, match="raised ValueError: bad weights"):
        run(PythonModel(broken).infer(clip, output_dir=tmp_path / "x"))
    with pytest.raises(ModelOutputError, match="returned int"):
        run(PythonModel(lambda path, **kw: 3).infer(clip, output_dir=tmp_path / "y"))


def test_python_model_cancel_stops_at_the_next_progress(tmp_path: Path, clip: Path) -> None:
    steps: list[int] = []
    stopped = threading.Event()

    def slow(input_path: Path, *, progress: Callable[[float], None], **kw: Any) -> str:
        try:
            for i in range(200):
                steps.append(i)
                progress(i / 2)
                time.sleep(0.01)
        except BaseException:
            stopped.set()
            raise
        return str(tmp_path)

    with pytest.raises(ModelTimeoutError):
        run(PythonModel(slow, timeout=0.2).infer(clip, output_dir=tmp_path))
    assert stopped.wait(5)
    assert len(steps) < 200


def test_progress_callback_errors_pass_through_unretried(tmp_path: Path, clip: Path) -> None:
    class Stop(Exception):
        pass

    calls: list[int] = []

    def model(input_path: Path, *, progress: Callable[[float], None], **kw: Any) -> str:
        calls.append(1)
        progress(10)
        return str(tmp_path)

    def stop(pct: float) -> None:
        raise Stop("the step is cancelled")

    for adapter in (
        PythonModel(model, max_retries=2, retry_initial=0.01),
        SubprocessModel(MODELS / "good_model.py", max_retries=2, retry_initial=0.01),
    ):
        with pytest.raises(Stop):
            run(adapter.infer(clip, output_dir=tmp_path / "out", progress=stop))
    assert calls == [1]


# -- settings -----------------------------------------------------------------------------------


def test_adapter_from_settings_each_type(tmp_path: Path) -> None:
    assert isinstance(adapter_from_settings({}), MockModel)
    assert isinstance(adapter_from_settings({"MODEL_ADAPTER_TYPE": "MOCK"}), MockModel)

    script = MODELS / "good_model.py"
    python = adapter_from_settings(
        {"MODEL_ADAPTER_TYPE": "python", "PYTHON_SCRIPT": str(script), "PYTHON_PATH": "python3"}
    )
    assert isinstance(python, SubprocessModel)
    assert python.command("i", output_dir="o")[:2] == ["python3", str(script)]
    default_python = adapter_from_settings(
        {"MODEL_ADAPTER_TYPE": "python", "PYTHON_SCRIPT": str(script)}
    )
    assert isinstance(default_python, SubprocessModel) and default_python.python == sys.executable
    assert default_python.timeout == 3600.0  # a script that hangs does not hang its step forever
    for variable, value, timeout in (
        ("MODEL_SCRIPT_TIMEOUT", "0", None),
        ("FRAMEPIPE_MODEL_SCRIPT_TIMEOUT", "2.5", 2.5),
    ):
        limited = adapter_from_settings(
            {"MODEL_ADAPTER_TYPE": "python", "PYTHON_SCRIPT": str(script), variable: value}
        )
        assert isinstance(limited, SubprocessModel) and limited.timeout == timeout

    http = adapter_from_settings(
        {
            "MODEL_ADAPTER_TYPE": "http",
            "MODEL_API_URL": "http://127.0.0.1:5000",
            "MODEL_API_TIMEOUT": "2500",
        }
    )
    assert isinstance(http, HttpModel)
    assert http.endpoint == "http://127.0.0.1:5000/infer" and http.timeout == 2.5
    seed_default = adapter_from_settings({"MODEL_ADAPTER_TYPE": "http"})
    assert isinstance(seed_default, HttpModel) and seed_default.timeout == 300.0


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (
            {"MODEL_ADAPTER_TYPE": "onnx"},
            "MODEL_ADAPTER_TYPE='onnx' is not one of: mock, python, http",
        ),
        ({"MODEL_ADAPTER_TYPE": "python"}, "needs PYTHON_SCRIPT"),
        (
            {"MODEL_ADAPTER_TYPE": "python", "PYTHON_SCRIPT": "/nope/model.py"},
            "PYTHON_SCRIPT=/nope/model.py: no such file",
        ),
        ({"MODEL_ADAPTER_TYPE": "http", "MODEL_API_TIMEOUT": "soon"}, "MODEL_API_TIMEOUT='soon'"),
        ({"MODEL_ADAPTER_TYPE": "http", "MODEL_API_URL": "localhost:5000"}, "MODEL_API_URL"),
        (
            {"MODEL_ADAPTER_TYPE": "python", "MODEL_SCRIPT_TIMEOUT": "-1"},
            r"MODEL_SCRIPT_TIMEOUT='-1': expected a number of seconds >= 0 \(0: no limit\)",
        ),
        (
            {"MODEL_ADAPTER_TYPE": "python", "MODEL_SCRIPT_TIMEOUT": "inf"},
            "MODEL_SCRIPT_TIMEOUT='inf'",
        ),
    ],
)
def test_adapter_from_settings_bad_values(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        adapter_from_settings(env)


def test_a_hanging_model_script_from_settings_times_out_and_its_processes_are_killed(
    tmp_path: Path, clip: Path
) -> None:
    model = adapter_from_settings(
        {
            "MODEL_ADAPTER_TYPE": "python",
            "PYTHON_SCRIPT": str(MODELS / "hang_model.py"),
            "MODEL_SCRIPT_TIMEOUT": "1.5",
        }
    )
    with pytest.raises(ModelTimeoutError, match=r"hang_model.py\): no result within 1.5s"):
        run(model.infer(clip, output_dir=tmp_path))
    pids = [int(p) for p in (tmp_path / "pids.txt").read_text().split()]
    assert len(pids) == 2 and wait_gone(pids) == []


def test_a_command_templates_secrets_never_name_the_model() -> None:
    model = SubprocessModel(
        argv=["run-model", "--api", "http://ann:hunter2@h/x?api_key=SECRET1", "{input}"]
    )
    assert "hunter2" not in model.describe() and "SECRET1" not in model.describe()
    assert "http://ann:***@h/x?api_key=***" in model.describe()


def test_adapter_from_settings_runs_the_seed_script(tmp_path: Path, clip: Path) -> None:
    model = adapter_from_settings(
        {"MODEL_ADAPTER_TYPE": "python", "PYTHON_SCRIPT": str(MODELS / "good_model.py")}
    )
    result = run(model.infer(clip, prompt="x", output_dir=tmp_path))
    assert len(result.frame_files()) == 4


@pytest.mark.slow
@pytest.mark.parametrize("names", ["framepipe", "seed"])
def test_http_retries_from_settings_against_a_server_that_fails_then_succeeds(
    tmp_path: Path, clip: Path, frames_dir: Path, names: str
) -> None:
    prefix = "FRAMEPIPE_" if names == "framepipe" else ""
    failures = [fixed(500, b"warming up")] * 3
    with ModelServer([*failures, ok(frames_dir)]) as server:
        env = {
            "MODEL_ADAPTER_TYPE": "http",
            "MODEL_API_URL": server.url,
            "MODEL_API_TIMEOUT": "5000",
            f"{prefix}MODEL_API_RETRIES": "3",
            f"{prefix}MODEL_API_RETRY_INITIAL": "0.01",
            f"{prefix}MODEL_API_RETRY_MAX": "0.02",
        }
        model = adapter_from_settings(env)
        assert isinstance(model, HttpModel)
        assert model.max_retries == 3
        assert (model.backoff.initial, model.backoff.maximum) == (0.01, 0.02)
        result = run(model.infer(clip, output_dir=tmp_path))
        assert result.frames_path == frames_dir
        assert len(server.requests) == 4  # three 500s, then the answer

    with ModelServer([*failures, ok(frames_dir)]) as server:
        env = {**env, "MODEL_API_URL": server.url, f"{prefix}MODEL_API_RETRIES": "2"}
        with pytest.raises(ModelError, match=r"failed after 3 attempts.*HTTP 500"):
            run(adapter_from_settings(env).infer(clip, output_dir=tmp_path))
        assert len(server.requests) == 3


def test_retry_settings_precedence_and_defaults(tmp_path: Path) -> None:
    http = {"MODEL_ADAPTER_TYPE": "http", "MODEL_API_URL": "http://127.0.0.1:9"}
    default = adapter_from_settings(http)
    assert default.max_retries == 3
    assert (default.backoff.initial, default.backoff.maximum) == (1.0, 30.0)
    both = adapter_from_settings(
        {**http, "FRAMEPIPE_MODEL_API_RETRIES": "5", "MODEL_API_RETRIES": "1"}
    )
    assert both.max_retries == 5  # framepipe's own name wins over the short one
    model = adapter_from_settings(
        {**http, "FRAMEPIPE_MODEL_API_RETRIES": "5"},
        model_api_retries=0,
        model_api_retry_initial=0.5,
        model_api_retry_max=4,
    )
    assert model.max_retries == 0  # keyword arguments first
    assert (model.backoff.initial, model.backoff.maximum) == (0.5, 4.0)

    script = {"MODEL_ADAPTER_TYPE": "python", "PYTHON_SCRIPT": str(MODELS / "good_model.py")}
    assert adapter_from_settings(script).max_retries == 0  # a script is not retried by default
    assert adapter_from_settings({**script, "MODEL_API_RETRIES": "2"}).max_retries == 2


@pytest.mark.parametrize(
    ("var", "value", "match"),
    [
        ("FRAMEPIPE_MODEL_API_RETRIES", "-1", "FRAMEPIPE_MODEL_API_RETRIES='-1': expected a whole"),
        ("MODEL_API_RETRIES", "two", "MODEL_API_RETRIES='two': expected a whole number"),
        ("MODEL_API_RETRIES", "2.5", "MODEL_API_RETRIES='2.5'"),
        (
            "FRAMEPIPE_MODEL_API_RETRY_INITIAL",
            "soon",
            "FRAMEPIPE_MODEL_API_RETRY_INITIAL='soon': expected a number of seconds",
        ),
        ("MODEL_API_RETRY_MAX", "-3", "MODEL_API_RETRY_MAX='-3'"),
    ],
)
def test_bad_retry_settings_name_the_variable(var: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        adapter_from_settings({"MODEL_ADAPTER_TYPE": "http", var: value})


def test_model_settings_read_the_config_file_below_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for variable in (
        "MODEL_ADAPTER_TYPE",
        "MODEL_API_URL",
        "FRAMEPIPE_CONFIG",
        "MODEL_API_RETRIES",
        "FRAMEPIPE_MODEL_API_RETRIES",
        "MODEL_API_RETRY_MAX",
        "FRAMEPIPE_MODEL_API_RETRY_MAX",
    ):
        monkeypatch.delenv(variable, raising=False)
    (tmp_path / "framepipe.toml").write_text(
        "model_api_retries = 1\nmodel_api_retry_max = 2.5\nconcurrency = 3\n"
    )
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "http")
    model = adapter_from_settings()  # this process's environment and ./framepipe.toml
    assert isinstance(model, HttpModel)
    assert (model.max_retries, model.backoff.maximum) == (1, 2.5)
    monkeypatch.setenv("MODEL_API_RETRIES", "4")
    assert adapter_from_settings().max_retries == 4  # the environment over the file
    assert MlVideoSettings().model_api_retries == 4  # the constructor reads the same sources
    assert adapter_from_settings(model_api_retries=6).max_retries == 6  # keywords over both

    (tmp_path / "framepipe.toml").write_text("model_api_retries = -2\n")
    monkeypatch.delenv("MODEL_API_RETRIES")
    with pytest.raises(
        ConfigError,
        match=r"model_api_retries in \S*framepipe\.toml=-2: "
        "expected a whole number",
    ):
        adapter_from_settings()
    # a mapping given is the whole environment; its FRAMEPIPE_CONFIG names the file
    other = tmp_path / "ml.toml"
    other.write_text("model_api_retries = 7\n")
    assert (
        adapter_from_settings(
            {"MODEL_ADAPTER_TYPE": "http", "FRAMEPIPE_CONFIG": str(other)}
        ).max_retries
        == 7
    )
    with pytest.raises(ConfigError, match="no_such: Extra inputs are not permitted"):
        MlVideoSettings.load({}, no_such=1)


def test_subprocess_retries_from_the_environment_in_a_job_step(
    settings: Settings, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process environment sets the retries of the model a step builds from the ML video
    pipeline's settings: a script failing twice then succeeds on attempt 3."""
    monkeypatch.setenv("MODEL_ADAPTER_TYPE", "python")
    monkeypatch.setenv("PYTHON_SCRIPT", str(MODELS / "flaky_model.py"))
    monkeypatch.setenv("FRAMEPIPE_MODEL_API_RETRIES", "2")
    monkeypatch.setenv("FRAMEPIPE_MODEL_API_RETRY_INITIAL", "0.01")
    work = tmp_path / "work"
    pipeline = Pipeline("flaky")

    @pipeline.step()
    async def inference(ctx: StepContext) -> dict[str, Any]:
        model = adapter_from_settings()
        result = await model.infer(ctx.inputs["video"], output_dir=work, fail_times=2)
        return {"frames": len(result.frame_files()), "retries": model.max_retries}

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(pipeline, {"video": str(clip)})

    info = run(main())
    assert info.data == {"frames": 1, "retries": 2}
    assert (work / "runs.txt").read_text() == "3"

    monkeypatch.setenv("FRAMEPIPE_MODEL_API_RETRIES", "-1")
    with pytest.raises(ConfigError, match="FRAMEPIPE_MODEL_API_RETRIES"):
        adapter_from_settings()


# -- inside a job step --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mock", "subprocess"])
def test_progress_is_mapped_into_the_step_range(settings: Settings, clip: Path, kind: str) -> None:
    # the engine keeps the latest progress of a round, so the mock takes a little time per frame
    model: ModelAdapter = (
        MockModel(frames=8, size=(32, 24), delay=0.05)
        if kind == "mock"
        else SubprocessModel(MODELS / "good_model.py")
    )
    pipeline = Pipeline("ml_video")

    @pipeline.step()
    async def inference(ctx: StepContext) -> dict[str, Any]:
        result = await model.infer(
            ctx.inputs["video"],
            prompt="anime",
            output_dir=ctx.tempdir(),
            progress=as_step_progress(ctx, 15, 65, "inference"),
        )
        return {"frames": len(result.frame_files())}

    async def main() -> tuple[Any, list[Any]]:
        async with JobEngine(settings=settings) as engine:
            info = await engine.run(pipeline, {"video": str(clip)})
            stored = await asyncio.to_thread(list_events, engine.store, info.id)
            return info, stored

    info, stored = run(main())
    assert info.data == {"frames": 8 if kind == "mock" else 4}
    values = [e.data["progress"] for e in stored if e.type == "step.progress"]
    assert values, "no progress was stored"
    assert all(15 <= v <= 65 for v in values)
    assert values == sorted(values) and max(values) > 15
    if kind == "subprocess":
        assert values[-1] == 65
    assert {e.data["message"] for e in stored if e.type == "step.progress"} == {"inference"}


def test_cancelling_the_execution_kills_the_model_processes(
    settings: Settings, clip: Path, tmp_path: Path
) -> None:
    model = SubprocessModel(MODELS / "hang_model.py")
    pipeline = Pipeline("hanging")
    pid_file = tmp_path / "work" / "pids.txt"

    running = asyncio.Event()  # the script reports progress once its pids are written

    @pipeline.step()
    async def inference(ctx: StepContext) -> dict[str, Any]:
        step_progress = as_step_progress(ctx, 15, 65)

        def progress(pct: float) -> None:
            step_progress(pct)
            running.set()

        await model.infer(ctx.inputs["video"], output_dir=pid_file.parent, progress=progress)
        return {}

    async def main() -> tuple[Any, list[int]]:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(pipeline, {"video": str(clip)})
            await running.wait()
            pids = [int(p) for p in pid_file.read_text().split()]
            await engine.cancel(execution_id)
            info = await engine.wait(execution_id, raise_on_failure=False)
            return info, pids

    info, pids = run(main())
    assert info.status.value == "cancelled"
    assert wait_gone(pids) == []


def test_a_failing_model_fails_the_step_with_its_message(settings: Settings, clip: Path) -> None:
    model = SubprocessModel(MODELS / "crash_model.py")
    pipeline = Pipeline("crashing")

    @pipeline.step()
    async def inference(ctx: StepContext) -> dict[str, Any]:
        await model.infer(ctx.inputs["video"], output_dir=ctx.tempdir())
        return {}

    async def main() -> None:
        async with JobEngine(settings=settings) as engine:
            await engine.run(pipeline, {"video": str(clip)})

    with pytest.raises(ExecutionFailedError) as info:
        run(main())
    [error] = info.value.errors.values()
    assert "exited with code 3" in error and "CUDA out of memory" in error


_PARENT = """
import asyncio, sys
from framepipe.processors import SubprocessModel

asyncio.run(SubprocessModel(sys.argv[1]).infer(sys.argv[2], output_dir=sys.argv[3]))
"""


@pytest.mark.slow
def test_the_model_process_dies_with_the_process_that_started_it(
    tmp_path: Path, clip: Path
) -> None:
    """A worker (or ``framepipe run``) killed by SIGKILL cannot kill its model: the script
    ran on beside the retried attempt (a second model on the GPU) until it ended by itself."""
    out = tmp_path / "out"
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(MODELS / "hang_model.py"), str(clip), str(out)]
    )
    pids: list[int] = []
    try:
        pid_file = out / "pids.txt"
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.02)
        pids = [int(p) for p in pid_file.read_text().split()]
        script, _child = pids
        assert alive(script)
        parent.kill()
        parent.wait()
        assert wait_gone([script]) == [], "the model script outlived the process running it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in pids:  # its own child (a sleep) is not killed with it: documented
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_results_frame_files_are_in_playing_order_past_their_zero_padding(
    tmp_path: Path,
) -> None:
    names = ["frame_9999.png", "frame_10000.png", "frame_10001.jpg"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "frames.json").write_text("{}")
    assert [p.name for p in ModelResult(tmp_path).frame_files()] == names


def test_http_frames_path_this_machine_cannot_see_says_to_share_the_folder(
    tmp_path: Path, clip: Path
) -> None:
    elsewhere = Path("/srv/model-host/tmpabc/frames")
    with ModelServer([ok(elsewhere)]) as server:
        model = HttpModel(server.url, timeout=5, max_retries=2, check_frames_path=True)
        with pytest.raises(ModelOutputError) as info:
            run(model.infer(clip, output_dir=tmp_path))
    assert str(info.value) == (
        f"HttpModel({server.url}): the server's frames_path {elsewhere} does not exist on this "
        "machine: the model server writes the frames there and this process reads them, so "
        "both must share that folder (run them on one machine, or mount a shared volume at the "
        "same path on both)"
    )
    assert len(server.requests) == 1  # not retried: the same answer would come back
