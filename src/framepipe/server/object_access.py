"""The service's access to its object store, which may be away: :class:`ObjectAccess`.

Guarantees:

* the service starts whatever its object store's state: a store that cannot be opened (an
  endpoint that does not answer, credentials refused, a bucket missing) is opened again in the
  background, with backoff, until it opens; meanwhile the routes that need it answer 503 and
  every other route is served;
* a setting to fix rather than a store away (:class:`ConfigError`, e.g. credentials in the
  endpoint or none at all; :class:`MissingDependencyError`) is raised by
  :meth:`ObjectAccess.open`, naming the setting, so ``framepipe serve`` refuses to start;
* :meth:`ObjectAccess.check` says whether the store answers now (``/health``); a store that
  stops or starts answering is logged once each way;
* no message made here shows a password or a secret query parameter of a URL
  (:func:`framepipe.urls.safe_text`); the store's own messages, which may show endpoints and
  paths, go to the log and the console, never to a client;
* a store given by the caller is used as is and never closed here; one opened here is closed
  by :meth:`ObjectAccess.close`, also one whose opening was under way when it was called.
"""

from __future__ import annotations

import asyncio
import threading
import time

from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backoff import Backoff
from framepipe.errors import ConfigError, ObjectStoreError
from framepipe.logs import get_logger
from framepipe.urls import safe_text, safe_url

__all__ = ["CHECK_EVERY", "OBJECTS_SETTING", "ObjectAccess"]

OBJECTS_SETTING = "FRAMEPIPE_OBJECTS_URL"
"""The setting that names the object store."""

CHECK_EVERY = 2.0
"""Seconds between two questions to the store from :meth:`ObjectAccess.check`."""

_PROBE_KEY = "framepipe-health-probe"
"""The key a check asks the store about: whether it exists does not matter, only whether the
store answers."""

_log = get_logger("server")


class ObjectAccess:
    """The object store at ``url`` (or ``store``, given open, which stays its owner's): open,
    or the reason it is not. ``reopen`` spaces the background attempts to open it."""

    def __init__(
        self, url: str, store: ObjectStore | None = None, *, reopen: Backoff | None = None
    ) -> None:
        self._url = store.url if store is not None else url
        self._store = store
        self._own = store is None
        self._problem: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._checked_at = -CHECK_EVERY
        self.reopen = reopen or Backoff(1.0, 2.0, 30.0)

    @property
    def url(self) -> str:
        """The store's URL: the open store's, else as configured."""
        store = self._store
        return store.url if store is not None else self._url

    @property
    def store(self) -> ObjectStore | None:
        """The open store, or None while it cannot be opened."""
        return self._store

    @property
    def tried(self) -> bool:
        """Whether the store is open or an attempt to open it failed."""
        return self._store is not None or self._problem is not None

    def describe(self) -> str:
        """``the object store <url> (FRAMEPIPE_OBJECTS_URL)``, the URL without its secrets."""
        return f"the object store {safe_url(self._url)} ({OBJECTS_SETTING})"

    def open(self) -> str | None:
        """Open the store unless it is open (blocking: call it in a thread from async code);
        None once it is, else why not (the store's message). A setting to fix:
        :class:`ConfigError` naming it; a package missing: :class:`MissingDependencyError`."""
        if self._store is not None or self._closed:
            return None
        try:
            store = open_object_store(self._url)
        except ObjectStoreError as exc:
            problem = safe_text(str(exc))
            with self._lock:
                self._problem = problem
            return problem
        except ConfigError as exc:
            raise ConfigError(f"{OBJECTS_SETTING}: {safe_text(str(exc))}") from exc
        with self._lock:
            surplus = store if self._closed or self._store is not None else None
            if surplus is None:
                self._store, self._problem = store, None
        if surplus is not None:
            surplus.close()
        return None

    async def keep_opening(self) -> None:
        """Try to open the store, with backoff, until it opens (logged) or an error other
        than the store's own ends the attempts (logged)."""
        attempt = 0
        while self._store is None and not self._closed:
            attempt += 1
            await asyncio.sleep(self.reopen.delay(attempt))
            try:
                problem = await asyncio.to_thread(self.open)
            except Exception as exc:
                _log.error(
                    "%s cannot be opened: %s; not trying again",
                    self.describe(),
                    safe_text(str(exc)),
                )
                return
            if problem is None and self._store is not None:
                _log.info("%s is open", self.describe())

    def check(self) -> str | None:
        """None when the store answers now, else why not (blocking: call it in a thread).
        A store not open is not tried here (:meth:`keep_opening` does): the reason it could
        not be opened is returned. The store is asked at most once per :data:`CHECK_EVERY`
        seconds (``/health`` needs no token: its callers must not turn into requests to the
        store); in between the last answer is returned."""
        store = self._store
        if store is None:
            return self._problem or "not open"
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at < CHECK_EVERY:
                return self._problem
            self._checked_at = now
        try:
            store.exists(_PROBE_KEY)
        except ObjectStoreError as exc:
            problem = safe_text(str(exc))
            with self._lock:
                was, self._problem = self._problem, problem
            if was is None:
                _log.warning("%s does not answer: %s", self.describe(), problem)
            return problem
        with self._lock:
            was, self._problem = self._problem, None
        if was is not None:
            _log.info("%s answers again", self.describe())
        return None

    def close(self) -> None:
        """Close the store if it was opened here; an opening under way closes what it
        opens. Idempotent."""
        with self._lock:
            self._closed = True
            store, self._store = self._store, None
        if store is not None and self._own:
            store.close()
