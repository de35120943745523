"""Models behind HTTP: :class:`HttpModel`, ``POST {url}/infer`` with the input as a multipart
upload and a JSON answer naming the frames.

Guarantees: 5xx answers, the 4xx that mean "not now" (:data:`NOT_NOW`: 408, 409, 425, 429),
connection errors and timeouts are retried (with the adapter's backoff), and a step may run
them again; the other 4xx are not, nor by a step's retry:
:class:`~framepipe.errors.ModelSetupError` for those about the URL or credentials
(:data:`SETUP_REFUSED`: 401, 403, 404, 405), :class:`~framepipe.errors.ModelRefusedError` for
the rest (what was sent); ``success: false`` is not retried by the adapter; an answer that is
not a JSON object with a ``frames_path`` (a body that is not JSON, nested too deep to decode,
or longer than ``max_answer_bytes``, refused without reading it all) is a
:class:`~framepipe.errors.ModelOutputError`, and no error quotes more than a few hundred
characters of what the server sent. A password or a secret query parameter in the URL is
masked (:func:`~framepipe.urls.safe_url`) in every error and log line: framepipe's, and httpx's
own ``HTTP Request: POST <url>`` line (a filter on the ``httpx`` logger, installed by the first
call, masks the URLs of its records). ``httpx`` is imported on the first call only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from framepipe.errors import (
    ConfigError,
    ModelError,
    ModelOutputError,
    ModelRefusedError,
    ModelSetupError,
    ModelTimeoutError,
)
from framepipe.processors.adapters.base import ModelAdapter, ModelResult, PathLike
from framepipe.urls import safe_text, safe_url

__all__ = ["MAX_ANSWER_BYTES", "NOT_NOW", "SETUP_REFUSED", "HttpModel"]

NOT_NOW = frozenset({408, 409, 425, 429})
"""The 4xx answers that say "not now" (a timeout, a conflict, too early, too many requests):
retried like a 5xx."""

SETUP_REFUSED = frozenset({401, 403, 404, 405})
"""The 4xx answers that say the model's URL or credentials are wrong."""

MAX_ANSWER_BYTES = 1 << 20
"""The longest answer :class:`HttpModel` reads by default (1 MiB): a JSON object naming a
directory of frames, with a few other keys."""
_QUOTED = 300
"""The most characters of the server's answer an error quotes."""


def _quoted(text: str, *, tail: bool = False) -> str:
    """``text`` cut to its first (``tail``: last) :data:`_QUOTED` characters, saying how many
    were left out."""
    cut = len(text) - _QUOTED
    if cut <= 0:
        return text
    if tail:
        return f"({cut} characters before) ...{text[-_QUOTED:]}"
    return f"{text[:_QUOTED]}... ({cut} more characters)"


def _url_problem(url: str) -> str | None:
    """What makes ``url`` unusable, or None; never quotes it (a password could be read as a
    port or a host)."""
    if not url.isprintable() or any(c.isspace() for c in url):
        return "has a space or a control character in it"
    try:
        parts = urlsplit(url)
        hostname, _port = parts.hostname, parts.port  # reading the port checks it
    except ValueError:
        return (
            "has a malformed host or port (a port is a number up to 65535; a '/', '?', '#' or "
            "'@' in a password must be percent-encoded)"
        )
    if not hostname:
        return "has no host"
    return None


class _MaskedUrls(logging.Filter):
    """Shows every URL among a log record's arguments as :func:`safe_url` does: httpx logs
    each request's whole URL (``HTTP Request: POST http://user:pw@host/infer?api_key=...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_masked(arg) for arg in record.args)
        return True


def _masked(arg: object) -> object:
    if isinstance(arg, int | float):
        return arg
    text = str(arg)
    return safe_text(text) if "://" in text else arg


_MASKED_URLS = _MaskedUrls()


_CALL_KEY: ContextVar[str | None] = ContextVar("framepipe_http_model_call", default=None)
"""The ``Idempotency-Key`` of the :meth:`HttpModel.infer` call under way in this task."""


class HttpModel(ModelAdapter):
    """A model behind HTTP: ``POST {url}/infer`` with a multipart form (``input_file``,
    ``prompt``, ``style``, ``seed``, plus extra options as fields); the answer is JSON
    ``{"success": true, "frames_path": "..."}`` (other keys go to ``extra``).

    HTTP 5xx, connection errors and timeouts are retried with backoff (``max_retries``), then
    fail with a :class:`ModelError` naming the URL and the last error. A 4xx is not retried,
    nor is ``success: false`` (a :class:`ModelError` with the server's ``error`` text). A body
    that is not JSON, or no ``frames_path``, is a :class:`ModelOutputError`, and so is an answer
    longer than ``max_answer_bytes`` (read no further than that).

    Every attempt of one :meth:`infer` call carries the same ``Idempotency-Key`` header, a new
    one per call: a server that keeps them answers a retry of a call it is still working on
    (the client timed out) or has done with that call's result instead of running the model
    again (the example model server does).

    A URL that is not ``http(s)://host[:port]/...`` (a port that is not a number up to 65535,
    no host, a space or control character in it) is a :class:`ConfigError` here, not a failure
    of the first call.

    The server's ``frames_path`` is a path on *its* filesystem, so it is not checked here unless
    ``check_frames_path=True`` (a shared volume); then one this machine cannot see is a
    :class:`ModelOutputError` saying the two must share that folder
    (:meth:`frames_path_problem`). ``transport`` is passed to ``httpx``.
    """

    check_frames_path = False

    def __init__(
        self,
        url: str,
        *,
        timeout: float | None = 300.0,
        max_retries: int = 3,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
        headers: Mapping[str, str] | None = None,
        check_frames_path: bool = False,
        name: str | None = None,
        transport: Any = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        if max_answer_bytes < 1:
            raise ValueError(f"max_answer_bytes must be >= 1, not {max_answer_bytes}")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"model URL must start with http:// or https://, not {safe_url(url)!r}"
            )
        if problem := _url_problem(url):
            raise ConfigError(f"model URL {safe_url(url)} {problem}")
        super().__init__(
            name=name,
            timeout=timeout,
            max_retries=max_retries,
            retry_initial=retry_initial,
            retry_max=retry_max,
        )
        self.url = url
        self.headers = dict(headers or {})
        self.check_frames_path = check_frames_path
        self.transport = transport
        self.max_answer_bytes = max_answer_bytes

    @property
    def target(self) -> str:
        return safe_url(self.url)

    async def infer(self, input_path: PathLike, **kwargs: Any) -> ModelResult:
        """:meth:`ModelAdapter.infer`, its attempts under one ``Idempotency-Key``."""
        token = _CALL_KEY.set(uuid.uuid4().hex)
        try:
            return await super().infer(input_path, **kwargs)
        finally:
            _CALL_KEY.reset(token)

    def frames_path_problem(self, frames_path: Path) -> str | None:
        """Why this machine cannot read the frames at the server's ``frames_path``, or None
        when it is a folder here, saying that the server writes the frames there and the
        caller reads them, so both must see that folder."""
        if frames_path.is_dir():
            return None
        what = "is not a folder" if frames_path.exists() else "does not exist"
        return (
            f"{self.describe()}: the server's frames_path {frames_path} {what} on this machine: "
            "the model server writes the frames there and this process reads them, so both "
            "must share that folder (run them on one machine, or mount a shared volume at the "
            "same path on both)"
        )

    @property
    def endpoint(self) -> str:
        """The URL posted to: ``/infer`` appended to the URL's path, its query kept."""
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/infer"))

    async def _infer_once(
        self,
        input_path: Path,
        *,
        prompt: str,
        style: str,
        seed: int,
        output_dir: Path,
        progress: Callable[[float], None],
        options: Mapping[str, Any],
    ) -> ModelResult:
        import httpx

        logging.getLogger("httpx").addFilter(_MASKED_URLS)  # once: a filter is added once
        who = self.describe()
        shown = safe_url(self.endpoint)
        data = {
            "prompt": prompt,
            "style": style,
            "seed": str(seed),
            **{k: str(v) for k, v in options.items() if v is not None},
        }
        try:
            content = await asyncio.to_thread(input_path.read_bytes)
        except OSError as exc:
            raise ModelError(f"{who}: cannot read input {input_path}: {exc}", model=who) from exc
        progress(0)
        try:
            async with (
                httpx.AsyncClient(
                    timeout=self.timeout, headers=self.headers, transport=self.transport
                ) as client,
                client.stream(
                    "POST",
                    self.endpoint,
                    headers={"Idempotency-Key": _CALL_KEY.get() or uuid.uuid4().hex},
                    data=data,
                    files={"input_file": (input_path.name, content, "application/octet-stream")},
                ) as response,
            ):
                raw, whole = await self._read_answer(response)
        except httpx.TimeoutException as exc:
            raise ModelTimeoutError(
                f"{who}: POST {shown} timed out ({type(exc).__name__})",
                model=who,
                retryable=True,
            ) from exc
        except httpx.HTTPError as exc:
            raise ModelError(
                f"{who}: POST {shown} failed: {type(exc).__name__}: {exc or 'connection error'}",
                model=who,
                retryable=True,
            ) from exc
        status = response.status_code
        body = raw.decode(errors="replace")
        if status >= 400:
            refused = f"{who}: POST {shown} answered HTTP {status}: " + (
                _quoted(body.strip(), tail=True) or response.reason_phrase
            )
            if status >= 500 or status in NOT_NOW:
                raise ModelError(refused, model=who, retryable=True, status_code=status)
            if status in SETUP_REFUSED:
                raise ModelSetupError(
                    f"{refused} (check the model's URL and the server's access)",
                    model=who,
                    status_code=status,
                )
            raise ModelRefusedError(refused, model=who, status_code=status)
        if not whole:
            raise ModelOutputError(
                f"{who}: POST {shown} answered more than {self.max_answer_bytes} bytes "
                "(max_answer_bytes); refused",
                model=who,
                status_code=status,
            )
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ModelOutputError(
                f"{who}: POST {shown} answered a body that is not JSON: {_quoted(repr(body))}",
                model=who,
                status_code=status,
            ) from exc
        if not isinstance(answer, dict):
            raise ModelOutputError(
                f"{who}: POST {shown} answered {_quoted(repr(answer))}, not a JSON object",
                model=who,
                status_code=status,
            )
        if answer.get("success") is not True:
            error = answer.get("error") or answer.get("message") or "no error text"
            raise ModelError(
                f"{who}: the model failed: {_quoted(str(error))}", model=who, status_code=status
            )
        frames_path = answer.get("frames_path")
        if not isinstance(frames_path, str) or not frames_path:
            raise ModelOutputError(
                f"{who}: the answer has no 'frames_path': {_quoted(repr(answer))}",
                model=who,
                status_code=status,
            )
        progress(100)
        extra = {k: v for k, v in answer.items() if k not in {"success", "frames_path"}}
        return ModelResult(Path(frames_path), extra)

    async def _read_answer(self, response: Any) -> tuple[bytes, bool]:
        """The answer's body, and whether it is whole: reading stops past
        ``max_answer_bytes`` (at once when its ``Content-Length`` says it is longer)."""
        limit = self.max_answer_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return b"", False
        raw = bytearray()
        async for chunk in response.aiter_bytes():
            raw += chunk[: limit + 1 - len(raw)]
            if len(raw) > limit:
                return bytes(raw[:limit]), False
        return bytes(raw), True
