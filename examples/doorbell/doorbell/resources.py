"""The machine's CPU and memory use, read from ``/proc``.

Guarantees: every reading is a percentage rounded to 0.1, or None where ``/proc`` is missing or
unreadable (never raised); the CPU use is over all cores since the previous reading.
"""

from __future__ import annotations

__all__ = ["ResourceSampler", "over_thresholds"]


class ResourceSampler:
    """The machine's CPU use (percent of all cores, since the previous sample) and memory use
    (percent of RAM not available), from ``/proc``; None where ``/proc`` is missing."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def cpu_percent(self) -> float | None:
        """CPU busy share since the previous call, 0-100."""
        now = self._cpu_times()
        last, self._last = self._last, now
        if now is None or last is None or now[0] == last[0]:
            return None
        total, idle = now[0] - last[0], now[1] - last[1]
        return round(100.0 * (total - idle) / total, 1)

    @staticmethod
    def memory_percent() -> float | None:
        """Memory in use (total less available), 0-100."""
        try:
            info: dict[str, int] = {}
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    name, value = line.split(":", 1)
                    info[name] = int(value.split()[0])
            total, available = info["MemTotal"], info["MemAvailable"]
        except (OSError, ValueError, KeyError):
            return None
        return round(100.0 * (total - available) / total, 1)


def over_thresholds(
    cpu: float | None, memory: float | None, cpu_threshold: float, memory_threshold: float
) -> list[str]:
    """Each use over its threshold, said as ``CPU 93.0% > 90.0%`` (empty when none is)."""
    over = []
    if cpu is not None and cpu > cpu_threshold:
        over.append(f"CPU {cpu}% > {cpu_threshold}%")
    if memory is not None and memory > memory_threshold:
        over.append(f"memory {memory}% > {memory_threshold}%")
    return over
