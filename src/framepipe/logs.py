"""Logging with the component in every line: ``... INFO [station_1] Pipeline started``.

Use :func:`get_logger` with a component name; records from other loggers show the logger's
name as their component.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from framepipe.urls import safe_text

__all__ = [
    "LOGGED_CHARS",
    "ComponentLogger",
    "Repeats",
    "configure_logging",
    "get_logger",
    "loggable",
]

FORMAT = "%(asctime)s %(levelname)-7s [%(component)s] %(message)s"


class _ComponentFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "component"):
            record.component = record.name.removeprefix("framepipe.")
        return True


def _utf8(value: Any) -> Any:
    """``value`` as a log line may show it: a text holding a lone surrogate (a file name's
    undecodable byte, a hostile string) with it written as an escape (``name\\udcff``), and
    a text or an exception naming a URL with the URL's secrets masked (:func:`safe_text`:
    a driver's "cannot reach rtsp://admin:pw@cam")."""
    if isinstance(value, BaseException):
        try:
            text = str(value)
        except Exception:  # its own __str__ is broken: logging says so when it formats it
            return value
        if "://" not in text:
            return value
        value = text
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return safe_text(value)
    return value


class _MaskedFormatter(logging.Formatter):
    """The component format, with the secrets of URLs masked in the whole line, a traceback
    included (what the adapter cannot reach: a record of another library, ``exc_info``)."""

    def format(self, record: logging.LogRecord) -> str:
        return safe_text(super().format(record))


class ComponentLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that stamps every record with its component name. Text in its message and
    arguments is made encodable as UTF-8 first (a lone surrogate escaped), so a handler that
    writes UTF-8 (a file, a journal, a JSON log) never fails on a line of framepipe's, and
    no URL in them shows its password, whatever handler the application installed."""

    def __init__(self, component: str, logger: str | None = None) -> None:
        super().__init__(
            logging.getLogger(logger or f"framepipe.{component}"), {"component": component}
        )
        self.component = component

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.isEnabledFor(level):  # a disabled debug line per frame costs no encoding
            return
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1  # the caller, not this frame
        if args:  # formatted first: masking the format would eat its placeholders
            values: Any = args[0] if len(args) == 1 and isinstance(args[0], Mapping) else args
            try:
                msg = str(msg) % values
            except (TypeError, ValueError, KeyError):  # logging reports the bad call itself
                super().log(level, msg, *args, **kwargs)
                return
        super().log(level, _utf8(msg), **kwargs)

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("component", self.component)
        kwargs["extra"] = extra
        return msg, kwargs


class Repeats:
    """Which of a message that repeats to log: the first of each key at once, then at most one
    per ``every`` seconds, each saying how many were held back since the one before (a store
    outage fails every frame; its log gets a line every few seconds, not ten a second).
    Thread-safe."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None: hold this one back; otherwise log it, with the number held back since the
        last one logged (0: none)."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)

    def held(self) -> dict[str, int]:
        """The keys with messages held back since their last one logged, and how many; they
        count as reported from here on."""
        with self._lock:
            held, self._held = self._held, {}
            return held


def get_logger(component: str, logger: str | None = None) -> ComponentLogger:
    """The logger of one component (``jobs.engine``, ``station_1``, ``sd_import/copy:3fa2``).

    ``logger`` names the underlying :mod:`logging` logger (default ``framepipe.<component>``);
    give a shared one for short-lived components such as steps, since loggers live forever."""
    return ComponentLogger(component, logger)


def configure_logging(level: str | int = "INFO", *, stream: Any = None) -> None:
    """Install one handler on the ``framepipe`` logger with the component format.

    Calling it again replaces the handler; records still propagate to the root logger's
    handlers only when the application configured none here.
    """
    logger = logging.getLogger("framepipe")
    for handler in list(logger.handlers):
        if getattr(handler, "_framepipe", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_MaskedFormatter(FORMAT))
    handler.addFilter(_ComponentFilter())
    handler._framepipe = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


LOGGED_CHARS = 120
"""At most this many characters of a value are shown (its head and its tail)."""


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def loggable(value: bytes | str | None, limit: int = LOGGED_CHARS) -> str:
    """``value`` for a log line: bytes decoded as UTF-8 (a bad byte replaced); longer than
    ``limit`` characters, its head and tail around a marker with its length
    (``ab…[200000 chars]…yz``); then every character that is not printable (NUL, newline,
    carriage return, tab, other controls, line separators, lone surrogates) written as its
    escape (``\\x00``, ``\\n`` as ``\\x0a``, ``\\u2028``). The result is one line of at most
    about ``10 x limit`` characters whatever ``value`` holds; printable text is unchanged."""
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if len(text) > limit:
        head = max(1, limit * 2 // 3)
        tail = max(1, limit - head)
        text = f"{text[:head]}…[{len(text)} chars]…{text[-tail:]}"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)
