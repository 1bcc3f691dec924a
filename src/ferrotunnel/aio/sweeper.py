"""``IdleSweeper``: closes forwarded connections that stay silent, with one timer for all of them."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .bridge import TcpBridge

__all__ = ["IdleSweeper", "IDLE_TICKS"]

#: Sweeps (every half timeout) a bridge may stay silent before the next one closes it.
IDLE_TICKS = 2

#: Idle sweepers that hold bridges: the roots of those bridges, which need no other holder while
#: they pipe (an ingress may be closed and dropped while its connections go on).
_SWEEPING: "set[IdleSweeper]" = set()

log = logging.getLogger("ferrotunnel.forward")


class IdleSweeper:
    """Closes bridges with no traffic for ``timeout`` seconds: one timer for all of them, so an idle
    connection costs no timer of its own. A bridge goes after 1 to 1.5 timeouts of silence."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.bridges: "set[TcpBridge]" = set()
        self._handle: Optional[asyncio.TimerHandle] = None

    def add(self, bridge: "TcpBridge") -> None:
        if bridge.finished:
            return
        self.bridges.add(bridge)
        _SWEEPING.add(self)  # holds its bridges (the bridges need no other holder)
        bridge.sweeper = self
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.timeout / 2, self._sweep)

    def discard(self, bridge: "TcpBridge") -> None:
        """``bridge`` finished: it leaves (and the sweeper stops being a root once it has none)."""
        bridges = self.bridges
        bridges.discard(bridge)
        if not bridges:
            _SWEEPING.discard(self)

    def _sweep(self) -> None:
        self._handle = None
        for bridge in list(self.bridges):
            if bridge.idle_tick() >= IDLE_TICKS:
                log.info("closing idle connection (no traffic for %.0fs)", self.timeout)
                bridge.abort(reset_peer=False)
        if self.bridges:
            self._handle = asyncio.get_running_loop().call_later(self.timeout / 2, self._sweep)

    def close(self) -> None:
        """Its owner (an ingress) closes. The bridges it holds go on (they end with their streams),
        so the sweeps go on while it holds any: the timer stops only once none is left (``_sweep``)."""
        if self._handle is not None and not self.bridges:
            self._handle.cancel()
            self._handle = None
