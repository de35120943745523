"""The doorbell's webhook: each visitor event and doorbell press POSTed as JSON
(:class:`Webhook`), never at the cost of the doorbell itself.

Guarantees:

* :meth:`Webhook.submit` never blocks and never raises: the event waits in a bounded queue
  (``max_pending``); when it is full the oldest waiting event is dropped, counted in
  ``dropped`` and logged once until an event is delivered again.
* One task on the orchestrator's event loop POSTs the events in the order they came, with no
  thread of its own: a slow, hanging or failing webhook never takes the threads that doorbell
  presses and event storage use.
* Each attempt is bounded as a whole by ``timeout`` seconds (a server that answers one byte at a
  time is cut off too). A connection error, a timeout, an HTTP 5xx or 429 is retried
  ``retries`` times (backoff from 1 s, doubling); another HTTP error is not.
* An event that could not be delivered is counted in ``failed``, logged once and handed to
  ``on_failure(event, error)`` once (the orchestrator emits ``notification.failed``). So is
  one that cannot be POSTed at all (a value that is not JSON, any other error): it is not
  retried, and the events after it are POSTed as usual.
* The URL is shown (in logs, errors, events) as ``scheme://host:port/...`` only: a webhook's
  path and query are often its secret (Slack, Discord, Home Assistant), and so is a password.
* :meth:`Webhook.close` delivers what is queued within its ``timeout``; what is left is counted
  in ``dropped`` and logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from framepipe.backoff import Backoff
from framepipe.errors import ConfigError
from framepipe.logs import get_logger

__all__ = ["Webhook", "check_webhook_url", "shown_webhook"]

_RETRIED_STATUS = 429


def shown_webhook(url: str) -> str:
    """``scheme://host:port/...``: what may be shown of a webhook URL (no user, password,
    path or query)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "the webhook URL (not shown)"
    if not parts.scheme or not host:
        return "the webhook URL (not shown)"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}/..."


def check_webhook_url(url: str, key: str) -> str:
    """``url`` when it is an ``http://`` or ``https://`` URL with a host; otherwise raises
    :class:`ConfigError` naming ``key`` (never the URL's path, query or password)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"doorbell config: {key} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(
            f"doorbell config: {key} must be an http:// or https:// URL with a host, "
            f"not {shown_webhook(url)!r}"
        )
    return url


class Webhook:
    """POSTs events to ``url`` from a bounded queue (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 2,
        max_pending: int = 100,
        backoff: Backoff | None = None,
        on_failure: Callable[[dict[str, Any], str], None] | None = None,
    ) -> None:
        if timeout <= 0 or retries < 0 or max_pending < 1:
            raise ValueError("timeout must be > 0, retries >= 0, max_pending >= 1")
        self.url = url
        self.shown = shown_webhook(url)
        """The URL as it may be shown."""
        self.timeout = timeout
        self.retries = retries
        self.max_pending = max_pending
        self.backoff = backoff or Backoff(1.0, 2.0, 30.0, 0.1)
        self.on_failure = on_failure
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.log = get_logger("doorbell.webhook")
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned_full = False
        self._secrets = tuple(s for s in _secret_parts(url) if s)

    @property
    def pending(self) -> int:
        """Events waiting to be POSTed (not counting the one being POSTed)."""
        return len(self._queue)

    def stats(self) -> dict[str, int]:
        """``sent``, ``failed``, ``dropped``, ``pending``."""
        return {
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "pending": self.pending,
        }

    def submit(self, event: dict[str, Any]) -> None:
        """Queue ``event`` (call it on the event loop); never blocks, never raises."""
        try:
            if len(self._queue) >= self.max_pending:
                lost = self._queue.popleft()
                self.dropped += 1
                if not self._warned_full:
                    self._warned_full = True
                    self.log.warning(
                        "webhook %s: %d event(s) waiting, dropping the oldest (%s) and those "
                        "after it until an event is delivered",
                        self.shown,
                        self.max_pending,
                        lost.get("event_id"),
                    )
            self._queue.append(event)
            self._ensure_task()
        except Exception:  # never the caller's problem
            self.log.exception("webhook %s: event not queued", self.shown)

    def _ensure_task(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._wake, self._idle = asyncio.Event(), asyncio.Event()
            self._task = loop.create_task(self._run(), name="doorbell-webhook")
        assert self._wake is not None
        assert self._idle is not None
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        assert self._idle is not None
        wake, idle = self._wake, self._idle
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            while True:
                if not self._queue:
                    wake.clear()
                    idle.set()
                    await wake.wait()
                    continue
                event = self._queue.popleft()
                try:
                    await self._deliver(client, event)
                except asyncio.CancelledError:
                    self._queue.appendleft(event)  # close() counts it
                    raise
                except Exception as exc:  # (a value json cannot encode): this event only
                    self._failed(event, self._scrubbed(f"{type(exc).__name__}: {exc}"))

    async def _deliver(self, client: httpx.AsyncClient, event: dict[str, Any]) -> None:
        error = ""
        for attempt in range(1, self.retries + 2):
            error, retry = await self._attempt(client, event)
            if not error:
                self.sent += 1
                self._warned_full = False
                return
            if not retry or attempt > self.retries:
                break
            await asyncio.sleep(self.backoff.delay(attempt))
        self._failed(event, error)

    def _failed(self, event: dict[str, Any], error: str) -> None:
        """Count, log and report ``event`` as not delivered (``error``)."""
        self.failed += 1
        self.log.warning("webhook %s failed for %s: %s", self.shown, event.get("event_id"), error)
        if self.on_failure is not None:
            try:
                self.on_failure(event, error)
            except Exception:
                self.log.exception("webhook failure callback failed")

    async def _attempt(self, client: httpx.AsyncClient, event: dict[str, Any]) -> tuple[str, bool]:
        """One POST: ("", False) when delivered, else (the error, whether to retry)."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await client.post(self.url, json=event)
        except TimeoutError:
            return f"no answer within {self.timeout:g}s", True
        except httpx.TimeoutException:
            return f"no answer within {self.timeout:g}s", True
        except httpx.HTTPError as exc:
            return self._scrubbed(f"{type(exc).__name__}: {exc}"), True
        status = response.status_code
        if status < 400:
            return "", False
        text = f"HTTP {status} {response.reason_phrase}".rstrip()
        return text, status >= 500 or status == _RETRIED_STATUS

    def _scrubbed(self, text: str) -> str:
        """``text`` with the URL and its secret parts replaced by what may be shown."""
        text = text.replace(self.url, self.shown)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109
        """Deliver what is queued within ``timeout`` seconds, then stop; what is left is
        counted in ``dropped`` and logged. A later :meth:`submit` starts again."""
        task, self._task = self._task, None
        if task is None:
            return
        if task.get_loop() is asyncio.get_running_loop() and not task.done():
            assert self._idle is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        left = len(self._queue)
        if left:
            self.dropped += left
            self._queue.clear()
            self.log.warning("webhook %s: %d event(s) not delivered before stop", self.shown, left)


def _secret_parts(url: str) -> list[str]:
    """The parts of ``url`` that are not shown: its user info, path and query (those longer
    than a few characters, so that a short one does not mask unrelated text)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    candidates = [parts.password or "", parts.path, parts.query]
    candidates += [p for p in parts.path.split("/") if len(p) >= 8]
    return sorted((c for c in candidates if len(c) >= 4), key=len, reverse=True)
