"""Connection caps of a listener: ``ConnectionGate`` (connections per host and in all, and the
descriptor reserve of ``FdHeadroom``), ``Admitted`` (a connection counted at its accept, before
TLS, standing in for the gate), and ``RefusalLog`` (refusals counted, logged once per interval).
``aio/listen.py`` uses them and re-exports them.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from typing import Any, Dict, Optional

from ..lograte import LogRate

__all__ = ["RefusalLog", "ConnectionGate", "FdHeadroom", "Admitted", "soft_fd_limit"]

log = logging.getLogger("ferrotunnel.listen")


class RefusalLog:
    """Refusals by a limit: counted (``counts``), and logged at most once per address and limit
    every ``interval`` seconds, so a flood of refused connections costs one line."""

    #: (address, limit) pairs remembered; beyond it the memory starts over.
    MAX_TRACKED = 10_000

    def __init__(self, what: str, interval: float = 10.0) -> None:
        self.what = what
        self.interval = interval
        self.counts: Dict[str, int] = collections.Counter()
        self._rate = LogRate(interval, self.MAX_TRACKED)

    def due(self, host: str, limit: str) -> bool:
        """Count one refusal; True when it should be logged (once per address, limit and interval)."""
        self.counts[limit] += 1
        return self._rate.due((host, limit), time.monotonic()) >= 0

    def refuse(self, host: str, limit: str, why: str) -> bool:
        """Count and maybe log one refusal; returns False (the answer to "admit?")."""
        if self.due(host, limit):
            log.warning("%s: refusing connections from %s: %s (%s); said once per %.0fs", self.what, host, why,
                        limit, self.interval)
        return False


def soft_fd_limit() -> Optional[int]:
    """The process's soft RLIMIT_NOFILE, or None where there is none to read."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def _socket_of(conn: Any) -> Any:
    """The socket of a transport, or ``conn`` itself when it is one (accepted, before TLS)."""
    return conn if isinstance(conn, socket.socket) else conn.get_extra_info("socket")


class FdHeadroom:
    """Whether an accepted socket's descriptor number leaves fewer than ``reserve`` free (asked
    of its transport, or of the socket itself)."""

    def __init__(self, reserve: int, limit: Optional[int] = None) -> None:
        self.reserve = reserve
        self.limit = soft_fd_limit() if limit is None else limit
        #: Descriptor numbers at or above this are refused (None: no limit known).
        self.ceiling = None if self.limit is None else max(self.limit - reserve, 1)

    def exhausted(self, transport: Any) -> bool:
        ceiling = self.ceiling
        if ceiling is None:
            return False
        sock = _socket_of(transport)
        return sock is not None and sock.fileno() >= ceiling

    def why(self, transport: Any) -> str:
        sock = _socket_of(transport)
        fd = sock.fileno() if sock is not None else -1
        return f"file descriptor {fd} of {self.limit}: fewer than {self.reserve} left"


class ConnectionGate:
    """Caps connections at once, per source address and in total, and keeps a reserve of file
    descriptors; refusals go to a ``RefusalLog``."""

    def __init__(self, per_address: int, total: int, what: str, fd_reserve: int = 0) -> None:
        self.per_address = per_address
        self.total = total
        self.open = 0
        self._by_host: Dict[str, int] = {}
        self.refusals = RefusalLog(what)
        self.headroom = FdHeadroom(fd_reserve)
        #: Refusals by limit ("per_address", "total", "fd_reserve").
        self.refused = self.refusals.counts

    def enter(self, host: str, transport: Any = None) -> bool:
        if self.open >= self.total:
            return self.refusals.refuse(host, "total", f"{self.open} connections open")
        n = self._by_host.get(host, 0)
        if n >= self.per_address:
            return self.refusals.refuse(host, "per_address", f"{n} connections open from this address")
        if transport is not None and self.headroom.exhausted(transport):
            return self.refusals.refuse(host, "fd_reserve", self.headroom.why(transport))
        self._by_host[host] = n + 1
        self.open += 1
        return True

    def leave(self, host: str) -> None:
        self.open -= 1
        n = self._by_host.get(host, 0) - 1
        if n > 0:
            self._by_host[host] = n
        else:
            self._by_host.pop(host, None)

    def admit(self, host: str, sock: socket.socket) -> "Optional[Admitted]":
        """``enter`` for a connection just accepted, before its protocol hears of it (TLS first):
        its pass, to stand in for this gate in the protocol, or None when refused."""
        return Admitted(self, host) if self.enter(host, sock) else None


class Admitted:
    """One connection a ``ConnectionGate`` counted at the accept, before TLS: it stands in for the
    gate as the protocol's ``gate``, so the protocol's own ``enter`` (once the handshake is done)
    takes over the count instead of adding to it, and its ``leave`` gives the slot back. A
    handshake that never reaches the protocol (failed, timed out, the visitor gone) is
    ``release``d by the listener instead. Either way the slot is given back exactly once."""

    __slots__ = ("_gate", "host", "_handed")

    def __init__(self, gate: ConnectionGate, host: str) -> None:
        self._gate: Optional[ConnectionGate] = gate  # None once the slot is given back
        self.host = host  # the slot's; what the protocol computes is the same, and not needed
        self._handed = False

    def enter(self, host: str, transport: Any = None) -> bool:
        """The protocol's connection is made: the count is its now (False: given back already)."""
        if self._gate is None:
            return False
        self._handed = True
        return True

    def leave(self, host: str = "") -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.leave(self.host)

    def release(self) -> None:
        """The listener is done with the connection: the slot goes back unless the protocol took it."""
        if not self._handed:
            self.leave()
