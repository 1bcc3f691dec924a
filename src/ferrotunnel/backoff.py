"""Reconnect backoff: base * factor**n, +- jitter, then capped (PROTOCOL.md 7.2)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

__all__ = ["BackoffConfig", "Backoff"]


@dataclass(frozen=True)
class BackoffConfig:
    base: float = 1.0
    factor: float = 2.0
    jitter: float = 0.3
    max_delay: float = 60.0
    #: Give up after this many consecutive failed attempts (None: never).
    max_attempts: Optional[int] = None

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or not 0 <= self.jitter <= 1 or self.max_delay < 0:
            raise ValueError("backoff needs base >= 0, factor >= 1, 0 <= jitter <= 1, max_delay >= 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None for no limit)")


class Backoff:
    """Delays for consecutive failed attempts; ``reset()`` after a successful connection."""

    def __init__(self, config: BackoffConfig = BackoffConfig(), rng: Optional[random.Random] = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self.attempts = 0

    def current_delay(self) -> float:
        """The nominal (jitter-free, capped) delay of the next attempt."""
        c = self.config
        return min(c.base * c.factor ** min(self.attempts, 64), c.max_delay)

    def next_delay(self) -> Optional[float]:
        """Delay before the next attempt, or None once max_attempts is used up."""
        c = self.config
        if c.max_attempts is not None and self.attempts >= c.max_attempts:
            return None
        d = c.base * c.factor ** min(self.attempts, 64)
        d += self._rng.uniform(-c.jitter * d, c.jitter * d)  # jitter before the cap, as the original
        self.attempts += 1
        return min(max(d, 0.0), c.max_delay)

    def reset(self) -> None:
        self.attempts = 0
