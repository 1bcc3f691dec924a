"""Listening sockets and who may come in: connection caps, refusals logged once, and file
descriptors that run out.

Two rules keep a listener working when the process runs short of file descriptors:

* **Headroom.** POSIX gives a new descriptor the lowest free number, so an accepted socket
  numbered *n* means descriptors 0 … *n*−1 are all taken. A connection whose number reaches
  ``soft limit − reserve`` is closed at once and counted. Public ingresses keep a large reserve
  (``ingress_fd_reserve``) so tunnel clients can still connect when visitors take everything;
  the tunnel port keeps a small one (``tunnel_fd_reserve``) for the process's own files, name
  lookups and registry connections. This comes first and works on every event loop.
* **Exhaustion.** When ``accept()`` itself fails with EMFILE or ENFILE (descriptors taken by
  something else in the process, or the whole system out of them), accepting pauses for
  ``ACCEPT_PAUSE`` seconds and one line is logged per interval. On the selector event loop the
  listener accepts for itself to do this. Under uvloop, libuv accepts: on EMFILE it closes the
  waiting connections with a reserve descriptor of its own and does not tell the application,
  so there only the headroom rule is seen (the loop does not spin either way).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["RefusalLog", "ConnectionGate", "FdHeadroom", "Listener", "listen", "ACCEPT_PAUSE"]

log = logging.getLogger("ferrotunnel.listen")

#: Seconds accepting stays paused after accept() ran out of descriptors or memory.
ACCEPT_PAUSE = 0.5
#: Connections taken per readiness of a listening socket (the rest wait for the next turn).
ACCEPT_BATCH = 64
#: accept() errors that mean "out of resources": pause, do not spin, do not fail.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class RefusalLog:
    """Refusals by a limit: counted (``counts``), and logged at most once per address and limit
    every ``interval`` seconds, so a flood of refused connections costs one line."""

    #: (address, limit) pairs remembered; beyond it the memory starts over.
    MAX_TRACKED = 10_000

    def __init__(self, what: str, interval: float = 10.0) -> None:
        self.what = what
        self.interval = interval
        self.counts: Dict[str, int] = collections.Counter()
        self._logged: Dict[Tuple[str, str], float] = {}

    def due(self, host: str, limit: str) -> bool:
        """Count one refusal; True when it should be logged (once per address, limit and interval)."""
        self.counts[limit] += 1
        now = time.monotonic()
        key = (host, limit)
        if now - self._logged.get(key, -self.interval) < self.interval:
            return False
        if len(self._logged) >= self.MAX_TRACKED:
            self._logged.clear()
        self._logged[key] = now
        return True

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


class FdHeadroom:
    """Whether an accepted socket's descriptor number leaves fewer than ``reserve`` free."""

    def __init__(self, reserve: int, limit: Optional[int] = None) -> None:
        self.reserve = reserve
        self.limit = soft_fd_limit() if limit is None else limit
        #: Descriptor numbers at or above this are refused (None: no limit known).
        self.ceiling = None if self.limit is None else max(self.limit - reserve, 1)

    def exhausted(self, transport: Any) -> bool:
        ceiling = self.ceiling
        if ceiling is None:
            return False
        sock = transport.get_extra_info("socket")
        return sock is not None and sock.fileno() >= ceiling

    def why(self, transport: Any) -> str:
        sock = transport.get_extra_info("socket")
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


def _uses_libuv(loop: asyncio.AbstractEventLoop) -> bool:
    return type(loop).__module__.startswith("uvloop")


class _Acceptor:
    """Accepts on one listening socket of a selector event loop, pausing when out of descriptors."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Callable[[], Any],
                 owner: "Listener") -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.owner = owner
        self.resume: Optional[asyncio.TimerHandle] = None
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        sock = self.sock
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(exc)
                else:
                    log.warning("%s: accept failed: %s", self.owner.what, exc)
                return
            conn.setblocking(False)
            self.owner.spawn(conn, self.factory)

    def _pause(self, exc: OSError) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.resume = self.loop.call_later(ACCEPT_PAUSE, self._resume)
        self.owner.exhausted(exc)

    def _resume(self) -> None:
        self.resume = None
        if self.sock.fileno() >= 0:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def close(self) -> None:
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None
        elif self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class Listener:
    """The listening sockets of one address: ``asyncio.Server`` under uvloop, an accept loop of
    our own on the selector event loop. ``sockets`` and ``close``/``wait_closed`` as a Server."""

    #: Seconds between the lines that say accepting paused.
    LOG_INTERVAL = 10.0

    def __init__(self, what: str) -> None:
        self.what = what
        self._server: Optional[asyncio.AbstractServer] = None
        self._acceptors: List[_Acceptor] = []
        self._tasks: "set[asyncio.Task[Any]]" = set()
        self._forever: "Optional[asyncio.Future[None]]" = None
        self._log = RefusalLog(what, self.LOG_INTERVAL)
        #: accept() failures for want of resources, by errno name ("EMFILE", "ENFILE", ...).
        self.exhaustion = self._log.counts

    @property
    def sockets(self) -> List[Any]:
        if self._server is not None:
            return list(self._server.sockets)  # type: ignore[attr-defined]
        return [a.sock for a in self._acceptors]

    def exhausted(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if self._log.due("*", name):
            log.warning("%s: cannot accept connections: %s (%s); accepting paused for %.1fs at a time; "
                        "said once per %.0fs", self.what, os.strerror(exc.errno or 0), name, ACCEPT_PAUSE,
                        self.LOG_INTERVAL)

    def spawn(self, conn: socket.socket, factory: Callable[[], Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(conn, factory))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, factory: Callable[[], Any]) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(factory, conn)
        except (OSError, asyncio.CancelledError):
            conn.close()

    async def serve_forever(self) -> None:
        """Wait until closed (then CancelledError, as ``asyncio.Server``); cancelled, it closes."""
        self._forever = fut = asyncio.get_running_loop().create_future()
        try:
            await fut
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    def close(self) -> None:
        if self._forever is not None and not self._forever.done():
            self._forever.cancel()
        if self._server is not None:
            self._server.close()
        for acceptor in self._acceptors:
            acceptor.close()
        self._acceptors = []
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _bind(self, factory: Callable[[], Any], host: str, port: int, backlog: int) -> None:
        loop = asyncio.get_running_loop()
        if _uses_libuv(loop):
            self._server = await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True)
            return
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        socks: List[socket.socket] = []
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                except OSError as exc:
                    raise OSError(exc.errno, f"error while attempting to bind on address {addr!r}: "
                                             f"{(exc.strerror or str(exc)).lower()}") from None
                sock.listen(backlog)
                sock.setblocking(False)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        self._acceptors = [_Acceptor(loop, sock, factory, self) for sock in socks]


async def listen(factory: Callable[[], Any], host: str, port: int, what: str, backlog: int = 1024) -> Listener:
    """Listen on ``host:port`` (every address it resolves to), making a protocol per connection."""
    listener = Listener(what)
    await listener._bind(factory, host, port, backlog)
    return listener
