"""Reconnect backoff: base * factor**n, +- jitter, then capped (PROTOCOL.md 7.2); which failures
count toward giving up (``suspect``); OSErrors reworded (``os_error``)."""

from __future__ import annotations

import random
from typing import Optional

from ..config import BackoffConfig
from ..errors import RetryableHandshakeError, SuspectedMisconfiguration
from ..frames import HandshakeStatus

__all__ = ["BackoffConfig", "Backoff", "os_error", "suspect"]


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
        """A connection succeeded: the next failure starts from the base delay again."""
        self.attempts = 0


def os_error(exc: OSError, message: str) -> OSError:
    """``exc``'s class with ``message`` (and its errno), so ``except ConnectionRefusedError`` and
    the retry policy see the same error."""
    try:
        new = type(exc)(message)
    except TypeError:  # pragma: no cover - an OSError subclass with another signature
        new = OSError(message)
    new.errno = exc.errno
    return new


def suspect(exc: BaseException) -> bool:
    """Whether a failed attempt counts toward giving up (``client.MAX_SUSPECT_ATTEMPTS``): one
    that suggests a setting not matching the server, or a tunnel id another client holds."""
    if isinstance(exc, SuspectedMisconfiguration):
        return True
    return isinstance(exc, RetryableHandshakeError) and exc.retry_after is None and \
        exc.status == HandshakeStatus.TUNNEL_ID_TAKEN
