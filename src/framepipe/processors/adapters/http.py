"""Models behind HTTP: :class:`HttpModel`, ``POST {url}/infer`` with the input as a multipart
upload and a JSON answer naming the frames.

Guarantees: 5xx answers, connection errors and timeouts are retried (with the adapter's
backoff); a 4xx or ``success: false`` is not; an answer that is not a JSON object with a
``frames_path`` is a :class:`~framepipe.errors.ModelOutputError`. ``httpx`` is imported on the
first call only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from framepipe.errors import ConfigError, ModelError, ModelOutputError, ModelTimeoutError
from framepipe.processors.adapters.base import ModelAdapter, ModelResult
from framepipe.urls import safe_url

__all__ = ["HttpModel"]


class HttpModel(ModelAdapter):
    """A model behind HTTP: ``POST {url}/infer`` with a multipart form (``input_file``,
    ``prompt``, ``style``, ``seed``, plus extra options as fields); the answer is JSON
    ``{"success": true, "frames_path": "..."}`` (other keys go to ``extra``).

    HTTP 5xx, connection errors and timeouts are retried with backoff (``max_retries``), then
    fail with a :class:`ModelError` naming the URL and the last error. A 4xx is not retried,
    nor is ``success: false`` (a :class:`ModelError` with the server's ``error`` text). A body
    that is not JSON, or no ``frames_path``, is a :class:`ModelOutputError`.

    The server's ``frames_path`` is a path on *its* filesystem, so it is not checked here unless
    ``check_frames_path=True`` (a shared volume). ``transport`` is passed to ``httpx``.
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
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"model URL must start with http:// or https://, not {url!r}")
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

    @property
    def target(self) -> str:
        return safe_url(self.url)

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
            async with httpx.AsyncClient(
                timeout=self.timeout, headers=self.headers, transport=self.transport
            ) as client:
                response = await client.post(
                    self.endpoint,
                    data=data,
                    files={"input_file": (input_path.name, content, "application/octet-stream")},
                )
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
        body = response.text
        if response.status_code >= 400:
            raise ModelError(
                f"{who}: POST {shown} answered HTTP {response.status_code}: "
                f"{body[-500:].strip() or response.reason_phrase}",
                model=who,
                retryable=response.status_code >= 500,
                status_code=response.status_code,
            )
        try:
            answer = response.json()
        except ValueError as exc:
            raise ModelOutputError(
                f"{who}: POST {shown} answered a body that is not JSON: {body[:200]!r}",
                model=who,
                status_code=response.status_code,
            ) from exc
        if not isinstance(answer, dict):
            raise ModelOutputError(
                f"{who}: POST {shown} answered {answer!r}, not a JSON object",
                model=who,
                status_code=response.status_code,
            )
        if answer.get("success") is not True:
            error = answer.get("error") or answer.get("message") or "no error text"
            raise ModelError(
                f"{who}: the model failed: {error}", model=who, status_code=response.status_code
            )
        frames_path = answer.get("frames_path")
        if not isinstance(frames_path, str) or not frames_path:
            raise ModelOutputError(
                f"{who}: the answer has no 'frames_path': {answer!r}",
                model=who,
                status_code=response.status_code,
            )
        progress(100)
        extra = {k: v for k, v in answer.items() if k not in {"success", "frames_path"}}
        return ModelResult(Path(frames_path), extra)
