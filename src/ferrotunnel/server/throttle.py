"""Failed handshakes per source address: past the threshold within the window, an address waits."""

from __future__ import annotations

import collections
from typing import Deque

__all__ = ["AuthThrottle"]


class AuthThrottle:
    #: Addresses remembered at once (the oldest is forgotten first).
    MAX_TRACKED = 10_000

    def __init__(self, threshold: int, window: float) -> None:
        self.threshold = threshold
        self.window = window
        self._fails: "collections.OrderedDict[str, Deque[float]]" = collections.OrderedDict()

    def _recent(self, host: str, now: float) -> Deque[float]:
        q = self._fails.get(host)
        if q is None:
            return collections.deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._fails[host]
        return q

    def throttled(self, host: str, now: float) -> bool:
        return self.threshold > 0 and len(self._recent(host, now)) >= self.threshold

    def failure(self, host: str, now: float) -> None:
        q = self._fails.get(host)
        if q is None:
            if len(self._fails) >= self.MAX_TRACKED:
                self._fails.popitem(last=False)
            q = self._fails[host] = collections.deque(maxlen=max(self.threshold, 1))
        q.append(now)
        self._fails.move_to_end(host)
