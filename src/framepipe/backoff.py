"""Exponential backoff with jitter, shared by step retries and supervised restarts."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Delays ``initial * factor**(attempt-1)``, capped at ``maximum``, each spread by
    ``±jitter`` (a fraction) so that many clients retrying together do not stay in step.

    ``Backoff(2, 2, 60).delay(1..6)`` is about 2, 4, 8, 16, 32, 60 seconds.
    """

    initial: float = 2.0
    factor: float = 2.0
    maximum: float = 60.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < 0 or self.factor < 1 or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid backoff {self!r}")

    def base(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (1-based), without jitter."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        exponent = min(attempt - 1, 64)
        return float(min(self.maximum, self.initial * self.factor**exponent))

    def delay(self, attempt: int) -> float:
        """The jittered delay before retry number ``attempt``; never above ``maximum``."""
        base = self.base(attempt)
        spread = base * self.jitter
        return min(self.maximum, max(0.0, base + random.uniform(-spread, spread)))
