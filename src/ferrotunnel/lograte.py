"""``LogRate``: a warning that a peer can cause on demand is logged at most once per key and
interval; the lines held back are counted and the next line says how many."""

from __future__ import annotations

import logging
from typing import Any, Dict, Hashable, Tuple

__all__ = ["LogRate", "LOG_RATE_INTERVAL"]

#: Seconds between two lines of the same kind (per ``LogRate`` and key).
LOG_RATE_INTERVAL = 10.0


class LogRate:
    """At most one line per key every ``interval`` seconds; time comes from the caller (``now``),
    so the sans-IO core can use it. At most ``max_keys`` keys are remembered (then it starts over)."""

    __slots__ = ("interval", "max_keys", "_last")

    def __init__(self, interval: float = LOG_RATE_INTERVAL, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: Dict[Hashable, Tuple[float, int]] = {}  # key -> (when logged, held back since)

    def due(self, key: Hashable, now: float) -> int:
        """-1 if a line for ``key`` is held back (and counted), else how many were held back since
        the last line (the caller logs now)."""
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return -1
        if last is None and len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        return last[1] if last is not None else 0

    def log(self, logger: logging.Logger, level: int, key: Hashable, now: float, msg: str, *args: Any) -> bool:
        """``logger.log(level, msg, *args)`` unless held back; True if logged."""
        if not logger.isEnabledFor(level):
            return False
        held = self.due(key, now)
        if held < 0:
            return False
        if held:
            logger.log(level, msg + " (%d more like it since the last such line; one per %.0fs)", *args, held,
                       self.interval)
        else:
            logger.log(level, msg, *args)
        return True

    def warning(self, logger: logging.Logger, key: Hashable, now: float, msg: str, *args: Any) -> bool:
        """``log`` at WARNING."""
        return self.log(logger, logging.WARNING, key, now, msg, *args)
