"""Logging with the component in every line: ``... INFO [station_1] Pipeline started``.

Use :func:`get_logger` with a component name; records from other loggers show the logger's
name as their component.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["ComponentLogger", "configure_logging", "get_logger"]

FORMAT = "%(asctime)s %(levelname)-7s [%(component)s] %(message)s"


class _ComponentFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "component"):
            record.component = record.name.removeprefix("framepipe.")
        return True


class ComponentLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that stamps every record with its component name."""

    def __init__(self, component: str, logger: str | None = None) -> None:
        super().__init__(
            logging.getLogger(logger or f"framepipe.{component}"), {"component": component}
        )
        self.component = component

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("component", self.component)
        kwargs["extra"] = extra
        return msg, kwargs


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
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_ComponentFilter())
    handler._framepipe = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
