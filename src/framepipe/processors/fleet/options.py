"""A processor client's options: their defaults, their checks, and the log of where its
settings came from.

The defaults are the processor fleet's (capacity 10, base64 image data, a heartbeat every
5 s, at most :data:`~framepipe.processors.fleet.field_values.MAX_PERIOD`). :func:`check_options`
refuses, with :class:`ValueError` or :class:`TypeError` naming
the option, what no processor can run with, before anything is started.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from framepipe.logs import ComponentLogger
from framepipe.processors.fleet.field_values import MAX_PERIOD
from framepipe.redis import safe_url

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_HEALTH_HOST",
    "DEFAULT_HEALTH_INTERVAL",
    "DEFAULT_IMAGE_ENCODING",
    "check_options",
    "check_orchestrator_url",
    "log_settings",
]

DEFAULT_CAPACITY = 10
"""Frames processed at once unless ``capacity`` says otherwise (the processor fleet's default)."""
DEFAULT_HEALTH_INTERVAL = 5.0
"""Seconds between heartbeats unless ``health_interval``/``health_check_interval`` says."""
DEFAULT_IMAGE_ENCODING: Literal["raw", "base64"] = "base64"
"""What ``frame_data[b"image_data"]`` holds unless ``image_encoding`` says: base64 of the image,
as processors written for the processor fleet's frame format decode it."""
DEFAULT_HEALTH_HOST = "127.0.0.1"
"""Where the health endpoint listens unless ``health_host`` says (see
:mod:`~framepipe.processors.fleet.health`)."""


def check_orchestrator_url(orchestrator_url: object) -> None:
    """A :class:`TypeError` when the third positional argument is not an orchestrator URL
    (code that passed ``capacity`` there)."""
    if orchestrator_url is not None and not isinstance(orchestrator_url, str):
        raise TypeError(
            "ProcessorClient's third positional argument is orchestrator_url (the order "
            "processor-fleet code uses: processor_id, capabilities, orchestrator_url, "
            f"capacity, ...), not {orchestrator_url!r}; pass capacity= by keyword"
        )


def check_options(
    processor_id: str,
    capabilities: Sequence[str] | None,
    capacity: int,
    *,
    health_interval: float | None,
    health_check_interval: float | None,
    poll_interval: float,
    image_encoding: str | None,
    health_port: int | None,
    health_host: str = DEFAULT_HEALTH_HOST,
) -> tuple[tuple[str, ...], float]:
    """Check the options of processor ``processor_id``; its capabilities (each once, in their
    order) and its heartbeat period (given under either name, else
    :data:`DEFAULT_HEALTH_INTERVAL`)."""
    if any(c.isspace() for c in processor_id):
        raise ValueError(
            f"processor_id must be a non-empty name without spaces, not {processor_id!r}"
        )
    if (
        capabilities is None
        or isinstance(capabilities, str)
        or not capabilities
        or not all(isinstance(c, str) and c for c in capabilities)
    ):
        raise ValueError(
            f"processor {processor_id!r}: capabilities must be a non-empty "
            f"list of names, not {capabilities!r}"
        )
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"processor {processor_id!r}: capacity must be >= 1, not {capacity!r}")
    if (
        health_interval is not None
        and health_check_interval is not None
        and health_interval != health_check_interval
    ):
        raise ValueError(
            f"processor {processor_id!r}: health_interval={health_interval} and "
            f"health_check_interval={health_check_interval} are one setting; give one"
        )
    interval = next(
        (v for v in (health_interval, health_check_interval) if v is not None),
        DEFAULT_HEALTH_INTERVAL,
    )
    if not (0 < interval <= MAX_PERIOD and 0 < poll_interval < math.inf):  # (refuses nan)
        raise ValueError(
            f"processor {processor_id!r}: health_interval and poll_interval must be positive "
            f"numbers of seconds (health_interval at most {MAX_PERIOD:g}: a longer heartbeat "
            f"period reads as none), not {interval!r} and {poll_interval!r}"
        )
    if image_encoding not in (None, "raw", "base64"):
        raise ValueError(f"image_encoding must be 'raw' or 'base64', not {image_encoding!r}")
    if health_port is not None and (
        isinstance(health_port, bool)
        or not isinstance(health_port, int)
        or not 0 <= health_port < 65536
    ):
        raise ValueError(f"health_port must be a port number, not {health_port!r}")
    if not isinstance(health_host, str) or not health_host.strip():
        raise ValueError(
            f"health_host must name an address ({DEFAULT_HEALTH_HOST}, 0.0.0.0 ...), not "
            f"{health_host!r}: an empty one listens on every interface"
        )
    return tuple(dict.fromkeys(capabilities)), interval


def log_settings(
    log: ComponentLogger,
    *,
    processor_id: str,
    processor_id_source: str,
    code_id: str | None,
    redis_url: str,
    redis_url_source: str,
    orchestrator_url: str | None,
) -> None:
    """Say where the processor's id and Redis came from, and that an orchestrator URL is
    not contacted: a processor pointed at the wrong place should say so at start."""
    if processor_id_source != "argument" and code_id not in (None, processor_id):
        log.info("Processor id %r from PROCESSOR_ID (the code says %r)", processor_id, code_id)
    log.info("Redis at %s (%s)", safe_url(redis_url), redis_url_source)
    if orchestrator_url and redis_url_source != "orchestrator_url":
        log.info(
            "orchestrator_url %s is not contacted: the processor registers on Redis",
            safe_url(orchestrator_url),
        )
        if redis_url_source == "default":
            log.warning(
                "No Redis configured (redis_url, REDIS_URL, REDIS_HOST/REDIS_PORT): using "
                "%s; set REDIS_HOST and REDIS_PORT where the orchestrator's Redis is",
                safe_url(redis_url),
            )
