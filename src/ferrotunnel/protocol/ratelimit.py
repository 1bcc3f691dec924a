"""Token buckets for the per-session rate limits (``RateLimits``): stream opens and bytes."""

from __future__ import annotations

from typing import Optional

from ..config import RateLimits

__all__ = ["TokenBucket", "RatePolicy"]


class TokenBucket:
    """``rate`` tokens a second, holding at most ``rate * burst`` (at least one)."""

    __slots__ = ("rate", "cap", "level", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.cap = max(rate * burst, 1.0)
        self.level = self.cap
        self.at = now

    def take(self, n: float, now: float) -> float:
        """Take n tokens; returns 0 if they were there, else seconds until the deficit refills."""
        self.level = min(self.cap, self.level + (now - self.at) * self.rate)
        self.at = now
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def try_take(self, n: float, now: float) -> bool:
        """Take n tokens if they are there; a refusal takes nothing (no debt)."""
        self.level = min(self.cap, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < n:
            return False
        self.level -= n
        return True


class RatePolicy:
    """What the peer may do per second: open streams (refused beyond the rate) and send bytes
    (reading pauses until ``throttle_until``). A limit that is None costs nothing."""

    __slots__ = ("opens", "bytes", "throttle_until")

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.opens: Optional[TokenBucket] = (
            TokenBucket(limits.streams_per_second, limits.burst, now) if limits.streams_per_second else None)
        self.bytes: Optional[TokenBucket] = (
            TokenBucket(limits.bytes_per_second, limits.burst, now) if limits.bytes_per_second else None)
        self.throttle_until = 0.0

    def allow_open(self, now: float) -> bool:
        return self.opens is None or self.opens.try_take(1, now)

    def received(self, n: int, now: float) -> None:
        if self.bytes is not None:
            wait = self.bytes.take(n, now)
            if wait:
                self.throttle_until = now + wait
