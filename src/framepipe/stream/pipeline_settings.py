"""The checks of a live pipeline's settings, made when the pipeline is made.

Guarantees: a :class:`~framepipe.stream.pipeline.StreamPipeline` with a setting it cannot run
with is refused before it takes anything over (its source's events included), and
before any of its stages is set up, with a :class:`ValueError` naming the setting and the
value given: ``max_restarts`` below 0, ``after_restarts`` other than ``"fail"`` or
``"keep_trying"``, ``stall_timeout``, ``start_timeout`` or ``retry_delay`` not above 0 (None
is allowed: no limit, the default delay), ``healthy_after`` below 0, ``teardown_timeout`` not
above 0, ``performance_window`` not above 0, or two stages or sinks of the same name (the
pipeline's name and every name are said). A pipeline made is one whose capture can be
supervised: ``start()`` never fails on its settings.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_settings"]


def check_settings(
    pipeline: str,
    *,
    max_restarts: int | None,
    after_restarts: str,
    stall_timeout: float | None,
    start_timeout: float | None,
    healthy_after: float,
    retry_delay: float | None,
    teardown_timeout: float,
    performance_window: float,
    names: Sequence[str],
) -> None:
    """Raise a :class:`ValueError` for the first setting ``pipeline`` cannot run with;
    ``names``: its stages' then its sinks' names."""
    if max_restarts is not None and max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0 or None, got {max_restarts}")
    if after_restarts not in ("fail", "keep_trying"):
        raise ValueError(f"after_restarts must be 'fail' or 'keep_trying', not {after_restarts!r}")
    for setting, value in (
        ("stall_timeout", stall_timeout),
        ("start_timeout", start_timeout),
        ("retry_delay", retry_delay),
    ):
        if value is not None and value <= 0:
            raise ValueError(f"{setting} must be > 0 or None, got {value}")
    if healthy_after < 0:
        raise ValueError(f"healthy_after must be >= 0, got {healthy_after}")
    if not teardown_timeout > 0:
        raise ValueError(f"teardown_timeout must be > 0, got {teardown_timeout}")
    if len(set(names)) != len(names):
        raise ValueError(f"pipeline {pipeline!r}: stage names must be unique, got {list(names)}")
    if performance_window <= 0:
        raise ValueError(f"performance_window must be > 0, got {performance_window}")
