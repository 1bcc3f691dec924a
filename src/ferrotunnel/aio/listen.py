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
  listener accepts for itself to do this, and under uvloop too with TLS or trusted proxies.
  Otherwise under uvloop, libuv accepts: on EMFILE it closes the waiting connections with a
  reserve descriptor of its own and does not tell the application, so there only the headroom
  rule is seen (the loop does not spin either way).

A listener that terminates TLS (the HTTPS ingress) counts a connection in its protocol's
``ConnectionGate`` as soon as it is accepted, before the handshake: the event loop tells the
protocol only once the handshake is done, and until then a stranger's half-open connections
would hold descriptors no cap sees. It accepts for itself on every event loop for this.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
from typing import Any, Callable, Dict, List, Optional

from ..addr import address_key
from ..protocol.proxyproto import (PROXY_V2_PREFIX, ProxyProtocolError, ProxyV2Reader, TrustedProxies,
                                   maybe_header)
from .gate import Admitted, ConnectionGate, FdHeadroom, RefusalLog  # noqa: F401  (also from here)
from .transport import tune_socket

__all__ = ["RefusalLog", "ConnectionGate", "FdHeadroom", "Listener", "listen", "ACCEPT_PAUSE"]

log = logging.getLogger("ferrotunnel.listen")

#: Seconds accepting stays paused after accept() ran out of descriptors or memory.
ACCEPT_PAUSE = 0.5
#: Connections taken per readiness of a listening socket (the rest wait for the next turn).
ACCEPT_BATCH = 64
#: ``stop_listening``: connections already queued by the kernel that are still taken, at most.
MAX_TAKEN_AT_STOP = 4096
#: With trusted proxies: connections at once still waiting for their first bytes (before any
#: protocol, and so any other cap, exists); beyond it new ones are closed at once.
MAX_AWAITING_HEADER = 1024
#: Of those, at most this many from one address that is not a trusted proxy (a trusted balancer
#: carries every visitor, and has only the cap above); beyond it that address's new ones are
#: closed at once, and one address cannot take the whole of MAX_AWAITING_HEADER.
MAX_AWAITING_PER_ADDRESS = 64
#: Longest pause between looks at a signature that came in part, where the kernel cannot be asked
#: to wait for more (SO_RCVLOWAT); the pauses start at 10 ms and double.
MAX_SIGNATURE_PAUSE = 0.5
#: accept() errors that mean "out of resources": pause, do not spin, do not fail.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


#: What ``_proxy_header`` answers for a connection that is closed here and now.
_DROP = object()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> bool:
    """Wait until ``sock`` has bytes (or EOF) to read; False after ``timeout`` seconds. (Not
    ``wait_for``: before Python 3.12 it swallows a cancellation that comes as the socket turns
    readable, and a closing listener then waited for the whole ``header_timeout``.)"""
    if timeout <= 0:
        return False
    fut: "asyncio.Future[bool]" = loop.create_future()
    fd = sock.fileno()

    def done(readable: bool) -> None:
        if not fut.done():
            fut.set_result(readable)

    loop.add_reader(fd, done, True)
    timer = loop.call_later(timeout, done, False)
    try:
        return await fut
    finally:
        timer.cancel()
        loop.remove_reader(fd)


def _set_lowat(conn: socket.socket, size: int) -> bool:
    """Have ``conn`` reported readable only once ``size`` bytes are there (or it ends); False
    where the option cannot be set."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
        return True
    except (OSError, AttributeError):
        return False


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

    def _ready(self, batch: int = ACCEPT_BATCH) -> None:
        sock = self.sock
        for _ in range(batch):
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

    def take_queued(self) -> None:
        """Accept what the kernel already queued (before the socket closes, which would reset it)."""
        if self.resume is None and self.sock.fileno() >= 0:  # (paused for want of descriptors: no)
            self._ready(MAX_TAKEN_AT_STOP)

    def close(self) -> None:
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None
        elif self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


#: A TLS-terminating listener (the HTTPS ingress) gives each handshake this long.
TLS_HANDSHAKE_TIMEOUT = 10.0


class Listener:
    """The listening sockets of one address: ``asyncio.Server`` under uvloop, an accept loop of
    our own on the selector event loop. ``sockets`` and ``close``/``wait_closed`` as a Server."""

    #: Seconds between the lines that say accepting paused.
    LOG_INTERVAL = 10.0

    def __init__(self, what: str, proxies: Optional[TrustedProxies] = None, header_timeout: float = 3.0,
                 ssl: Any = None) -> None:
        #: an ``ssl.SSLContext``: connections are TLS, terminated here (after any PROXY header)
        self.ssl = ssl
        self.what = what
        #: Addresses whose PROXY protocol v2 header is used (None: headers are not looked for).
        self.proxies = proxies
        self.header_timeout = header_timeout
        self._proxy_log = RefusalLog(what)
        #: Connections closed for their PROXY header, by reason ("untrusted", "malformed",
        #: "awaiting": over MAX_AWAITING_HEADER still waiting for their first bytes;
        #: "awaiting_per_address": over MAX_AWAITING_PER_ADDRESS of them from one address).
        self.proxy_refused = self._proxy_log.counts
        self.awaiting_header = 0
        #: Connections waiting for their first bytes by ``addr.address_key`` (not trusted proxies').
        self._awaiting_from: Dict[str, int] = {}
        self._server: Optional[asyncio.AbstractServer] = None
        self._factory: Callable[[], Any] = lambda: None  # (the protocol factory, once bound)
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
        admitted: Optional[Admitted] = None
        try:
            make = factory
            if self.proxies is not None:
                try:
                    host = str(conn.getpeername()[0])
                except OSError:
                    conn.close()  # (closed before it was accepted)
                    return
                trusted = self.proxies.trusts(host)
                key = None if trusted else address_key(host)
                if not self._may_await(host, key):
                    conn.close()
                    return
                self.awaiting_header += 1
                if key is not None:
                    self._awaiting_from[key] = self._awaiting_from.get(key, 0) + 1
                try:
                    peer = await self._proxy_header(conn, host, trusted)
                finally:
                    self.awaiting_header -= 1
                    if key is not None:
                        left = self._awaiting_from.pop(key) - 1
                        if left:
                            self._awaiting_from[key] = left
                if peer is _DROP:
                    conn.close()
                    return
                if peer is not None:
                    make = functools.partial(_with_peer, factory, peer)
            if self.ssl is None:
                await asyncio.get_running_loop().connect_accepted_socket(make, conn)
                return
            # TLS: the protocol is made now and its gate entered before the handshake (the loop
            # calls connection_made only after it); a connection over a cap goes at once
            protocol = make()
            gate = getattr(protocol, "gate", None)
            if isinstance(gate, ConnectionGate):
                admitted = gate.admit(_host_of(protocol, conn), conn)
                if admitted is None:
                    conn.close()
                    return
                protocol.gate = admitted
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: protocol, conn, ssl=self.ssl, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.CancelledError):
            conn.close()
        finally:
            if admitted is not None:
                admitted.release()  # (nothing once the protocol took the slot over)

    def _may_await(self, host: str, key: Optional[str]) -> bool:
        """Whether a new connection from ``host`` may wait for its first bytes: under
        MAX_AWAITING_HEADER, and (``key``: not a trusted proxy) under MAX_AWAITING_PER_ADDRESS."""
        if self.awaiting_header >= MAX_AWAITING_HEADER:
            limit, cap, held = "awaiting", "MAX_AWAITING_HEADER", f"{self.awaiting_header} connections are"
        elif key is not None and self._awaiting_from.get(key, 0) >= MAX_AWAITING_PER_ADDRESS:
            limit, cap = "awaiting_per_address", "MAX_AWAITING_PER_ADDRESS"
            held = f"{MAX_AWAITING_PER_ADDRESS} of its connections are"
        else:
            return True
        if self._proxy_log.due(host, limit):
            log.warning("%s: refusing connections from %s: %s waiting for their first bytes (%s); said once per %.0fs",
                        self.what, host, held, cap, self._proxy_log.interval)
        return False

    async def _signature(self, conn: socket.socket, deadline: float) -> Any:
        """Wait for a PROXY v2 signature's 12 bytes (peeked, left in the socket): True once they are
        there, None when the first bytes are something else or nothing came by ``deadline``, _DROP
        when the connection closed before its first byte. A signature that came in part costs
        nothing while more is awaited: the kernel reports the socket readable only once another
        byte is there (SO_RCVLOWAT); else the looks are spaced out (up to MAX_SIGNATURE_PAUSE)."""
        loop = asyncio.get_running_loop()
        seen = 0  # bytes of the signature seen so far, with the kernel asked to wake us at one more
        pause = 0.01
        try:
            while True:
                if not await _readable(loop, conn, deadline - loop.time()):
                    return None  # nothing yet: no header (a protocol whose server speaks first)
                try:
                    head = conn.recv(PROXY_V2_PREFIX, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                if not head:
                    return _DROP  # closed before its first byte: a health check, nothing to log
                if not maybe_header(head):
                    return None
                if len(head) >= 12:
                    return True
                if len(head) > seen and _set_lowat(conn, len(head) + 1):  # part of it so far
                    seen = len(head)
                    continue
                # readable and nothing new: the peer ended, or the kernel ignores the option
                await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
                pause = min(pause * 2, MAX_SIGNATURE_PAUSE)
        finally:
            if seen:
                _set_lowat(conn, 1)  # (the default again, for the protocol)

    async def _proxy_header(self, conn: socket.socket, host: str, trusted: bool) -> Any:
        """The address a PROXY v2 header names (consumed from the socket), None to go on with the
        socket's own (no header, a LOCAL header, nothing sent in ``header_timeout``), or _DROP
        (closed before its first byte; a header from an untrusted address; a malformed one)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.header_timeout
        found = await self._signature(conn, deadline)
        if found is not True:
            return found
        if not trusted:
            if self._proxy_log.due(host, "untrusted"):
                log.warning("%s: refusing a PROXY protocol header from %s, which is not a trusted proxy "
                            "(--trusted-proxy); said once per %.0fs", self.what, host, self._proxy_log.interval)
            return _DROP
        reader = ProxyV2Reader()
        try:
            header = None
            while header is None:
                if not await _readable(loop, conn, deadline - loop.time()):
                    raise ProxyProtocolError("PROXY v2 header not complete in time")
                chunk = conn.recv(reader.needed)  # never past the header: what follows is the stream's
                if not chunk:
                    raise ProxyProtocolError("closed in the middle of a PROXY v2 header")
                header = reader.feed(chunk)
        except (ProxyProtocolError, BlockingIOError) as exc:
            if self._proxy_log.due(host, "malformed"):
                log.warning("%s: closing a connection from proxy %s: %s; said once per %.0fs", self.what, host, exc,
                            self._proxy_log.interval)
            return _DROP
        if header.command == "local" and not await self._has_traffic(conn, deadline):
            return _DROP  # the balancer's health check: a header, then a close
        return header.source

    async def _has_traffic(self, conn: socket.socket, deadline: float) -> bool:
        """After a LOCAL header (the proxy's own connection): False if the connection ends before
        another byte; True once a byte is there, or nothing came before ``deadline``."""
        loop = asyncio.get_running_loop()
        if not await _readable(loop, conn, deadline - loop.time()):
            return True
        try:
            return conn.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    async def serve_forever(self) -> None:
        """Wait until closed (then CancelledError, as ``asyncio.Server``); cancelled, it closes."""
        self._forever = fut = asyncio.get_running_loop().create_future()
        try:
            await fut
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    def stop_listening(self) -> None:
        """Close the listening sockets (a balancer's health checks now fail) without dropping a
        connection that already reached this host: those the kernel queued for ``accept()`` are
        taken first (closing the socket would reset them, and a balancer that already passed a
        visitor's bytes on may answer it with nothing), and those still reading their PROXY
        header go on. ``close`` ends those too."""
        if self._server is not None:
            self._take_queued(self._server.sockets)  # type: ignore[attr-defined]
            self._server.close()
        for acceptor in self._acceptors:
            acceptor.take_queued()
            acceptor.close()
        self._acceptors = []

    def _take_queued(self, lsocks: Any) -> None:
        """Accept what the kernel queued on an ``asyncio.Server``'s sockets (through a duplicate
        descriptor: the loop owns the socket) and make each a protocol, as the loop would."""
        for lsock in lsocks:
            try:
                fd = os.dup(lsock.fileno())
            except OSError:
                continue
            try:
                dup = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                continue
            with dup:
                dup.setblocking(False)  # (not socket.getdefaulttimeout(): accept() must not wait)
                for _ in range(MAX_TAKEN_AT_STOP):
                    try:
                        conn, _ = dup.accept()
                    except ConnectionAbortedError:
                        continue
                    except OSError:  # (BlockingIOError: none left)
                        break
                    conn.setblocking(False)
                    self.spawn(conn, self._factory)

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
        self._factory = factory
        if _uses_libuv(loop) and self.proxies is None and self.ssl is None:
            # with trusted proxies or TLS: our accept loop, as below (uvloop makes the protocol of a
            # TLS connection at the accept, but tells it nothing until the handshake is done)
            self._server = await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True)
            for lsock in self._server.sockets:  # accepted connections inherit the options (see tune_socket)
                tune_socket(lsock)
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
                tune_socket(sock)  # accepted connections inherit the options (see tune_socket)
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        self._acceptors = [_Acceptor(loop, sock, factory, self) for sock in socks]


async def listen(factory: Callable[[], Any], host: str, port: int, what: str, backlog: int = 1024,
                 proxies: Optional[TrustedProxies] = None, header_timeout: float = 3.0, ssl: Any = None) -> Listener:
    """Listen on ``host:port`` (every address it resolves to), making a protocol per connection.
    With ``proxies``, a PROXY protocol v2 header from those addresses names the peer (used when
    present); one from any other address closes the connection. With ``ssl`` (a server
    ``SSLContext``) every connection is TLS, the handshake done before the protocol sees it; a
    protocol with a ``gate`` (a ``ConnectionGate``) is counted in it at the accept, before the
    handshake, and given an ``Admitted`` as its gate instead."""
    listener = Listener(what, proxies or None, header_timeout, ssl)
    await listener._bind(factory, host, port, backlog)
    return listener


def _host_of(protocol: Any, conn: socket.socket) -> str:
    """The host a connection counts under: a trusted proxy's visitor, or the socket's peer."""
    peer = getattr(protocol, "peer_address", None) or conn.getpeername()
    return peer[0] if isinstance(peer, tuple) else str(peer)


def _with_peer(factory: Callable[[], Any], peer: Any) -> Any:
    protocol = factory()
    protocol.peer_address = peer  # the visitor a trusted proxy named: used for caps, throttles and logs
    return protocol
