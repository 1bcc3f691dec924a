"""Public ingress: TcpIngress turns each accepted TCP connection into a TCP stream of a session."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, Optional, Tuple, Union

from ..addr import Address, as_address, format_peer
from ..aio.bridge import IdleSweeper, TcpBridge
from ..aio.listen import Listener, listen
from ..aio.stream import VirtualStream
from ..aio.transport import bound_address
from ..errors import FerroTunnelError
from ..frames import Protocol, StreamPriority
from ..lograte import LogRate
from ..protocol.remoteport import remote_port_capability
from .admission import shown_id
from .guard import AccessRefused, kind_of, refusal, route_access
from .http_names import printable
from .public import PublicEndpoint
from .registry import LocalRoute, Route, first_with_capability
from .routes import moved_away

if TYPE_CHECKING:  # the server makes the ingresses of ports on request (PortLeases): no import cycle
    from .server import TunnelServer

__all__ = ["TcpIngress", "Ingress", "Opened", "PortLeases", "PortUnavailable", "parse_port_range"]

#: What ``Ingress.open_stream`` reports: the route (None: no tunnel) and the stream, or why not.
Opened = Callable[[Optional[Route], Union[VirtualStream, FerroTunnelError, None]], None]

log = logging.getLogger("ferrotunnel.ingress")


class _IngressBridge(TcpBridge):
    __slots__ = ("ingress", "_held")

    def __init__(self, ingress: "TcpIngress") -> None:
        super().__init__()
        self.ingress = ingress
        self._held = False  # reading paused while the registry looks the tunnel up

    @property
    def peer(self) -> Any:
        """The visitor's address (``peer_address``)."""
        return self.peer_address

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.finished:  # over a connection cap
            return
        self.ingress.sweeper.add(self)  # (which holds the bridge while it lives)
        if not self.ingress.open_stream(self.ingress.tunnel_id, Protocol.TCP, self._opened, self.peer_address):
            self._held = True  # what the visitor sends waits in the socket until there is a stream
            self.hold_reading()

    def tunnel_reset(self, exc: BaseException) -> None:
        if moved_away(self.ingress.server.registry, self.ingress.tunnel_id, exc, self.stream):  # the next visitor asks again
            log.info("ingress %s: tunnel %s moved to another node; closing %s", self.ingress.describe_bind(),
                     shown_id(self.ingress.tunnel_id or ""), format_peer(self.peer))
        super().tunnel_reset(exc)

    def _opened(self, route: Optional[Route], result: Union[VirtualStream, FerroTunnelError, None]) -> None:
        ing = self.ingress
        if route is None:  # (visitors can ask for these lines at will: one per kind every LOG_RATE_INTERVAL)
            ing.log_rate.log(log, logging.INFO, "none", time.monotonic(), "ingress %s: no session for %s; closing %s",
                             ing.describe_bind(), shown_id(ing.tunnel_id) if ing.tunnel_id else "a tcp-capable client",
                             format_peer(self.peer))
            self.close()  # nothing was cut: a plain close
        elif isinstance(result, AccessRefused):  # the tunnel's allow list: a refused connection
            log.info("ingress %s: %s refused by tunnel %s's access rules", ing.describe_bind(), format_peer(self.peer),
                     shown_id(route.tunnel_id))
            self.abort()
        elif not isinstance(result, VirtualStream):
            ing.log_rate.warning(log, repr(type(result)), time.monotonic(), "ingress %s: cannot open a stream: %s",
                                 ing.describe_bind(), printable(str(result)))
            self.abort()
        elif self.finished:  # the visitor left while the route was looked up
            result.abort()
        else:
            ing.connections += 1
            if log.isEnabledFor(logging.INFO):
                log.info("ingress %s: %s -> tunnel %s, stream %d", ing.describe_bind(), format_peer(self.peer),
                         shown_id(route.tunnel_id), result.stream_id)
            if result.peername == self.peer_address:  # (a copy of it): one tuple for both, not two
                self.peer_address = result.peername
            self.attach(result)
            if self._held:
                self._held = False
                self.release_reading()


class Ingress:
    """A public listening port whose connections the subclass's protocol turns into streams."""

    kind = "ingress"

    def __init__(self, server: TunnelServer, address: Address, priority: Any = None) -> None:
        self.server = server
        self._bind = address = as_address(address, "address", bind=True)
        self.priority = StreamPriority.NORMAL if priority is None else StreamPriority(priority)
        self._server: Optional[Listener] = None
        self.connections = 0
        #: Visitors refused by a tunnel's access rules, by HTTP status ("401", "403").
        self.refused: Dict[str, int] = {}
        self.sweeper = IdleSweeper(server.config.ingress_idle_timeout)
        self._lookups: "set[asyncio.Task[None]]" = set()
        self._where = "%s:%s" % address  # the bound address once started
        #: Lines a visitor can cause (no session, a stream not opened): one per kind and interval.
        self.log_rate = LogRate()

    def protocol_factory(self) -> TcpBridge:  # pragma: no cover - subclasses
        """A new protocol (a ``TcpBridge``) for one accepted visitor connection; each kind of
        ingress makes its own. The ingress then gives it the server's connection caps."""
        raise NotImplementedError

    #: A server ``SSLContext`` for an ingress that terminates TLS (the HTTPS ingress); None: plain.
    ssl_context: Any = None

    def _make_protocol(self) -> TcpBridge:
        bridge = self.protocol_factory()
        bridge.gate = self.server.ingress_gate
        return bridge

    def describe(self) -> str:
        """Where the ingress sends visitors ("-> ..."), for its log line; "" when it says nothing."""
        return ""

    def describe_bind(self) -> str:
        """The listening address as ``host:port``, for log lines: the bound one (port 0 resolved)
        once ``start`` has run, the one asked for before."""
        return self._where

    def lookup(self, tunnel_id: Optional[str]) -> Optional[Route]:
        """The local route for ``tunnel_id`` through the server's registry, without waiting (None:
        not here; the registry's awaitable ``lookup`` may still know it, see ``open_stream``)."""
        return self.server.registry.lookup_local(tunnel_id) if tunnel_id is not None else None

    def open_stream(self, tunnel_id: Optional[str], protocol: Protocol, then: Opened, visitor: Any = None,
                    host: Optional[str] = None, authorization: Optional[Tuple[bytes, ...]] = None) -> bool:
        """Open a stream to the tunnel and report it to ``then``: synchronously when the route is
        local (no await on the path of a new connection; returns True), after the registry
        answered otherwise (returns False: the caller holds the visitor's bytes meanwhile).
        Ingresses find tunnels only here, through the registry. ``visitor`` and ``host`` travel
        with a stream that a route carries on to another node. The tunnel's access rules are
        checked first (``guard``): a tunnel not served by this kind of ingress is not found, a
        visitor they refuse gets ``AccessRefused`` (``authorization``: an HTTP request's
        Authorization values)."""
        route = self.lookup(tunnel_id)
        registry = self.server.registry
        if route is not None or tunnel_id is None or registry.local_only:
            self._open(route, protocol, then, visitor, host, authorization)
            return True
        task = asyncio.get_running_loop().create_task(
            self._open_later(registry.lookup(tunnel_id), protocol, then, visitor, host, authorization))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)
        return False

    async def _open_later(self, found: Awaitable[Optional[Route]], protocol: Protocol, then: Opened, visitor: Any,
                          host: Optional[str], authorization: Optional[Tuple[bytes, ...]]) -> None:
        try:
            route = await found
        except asyncio.CancelledError:  # the ingress closes: the visitor waiting for this answer is let go
            then(None, None)
            raise
        except Exception as exc:  # the registry failed: no route, said once in the log
            log.warning("%s: registry lookup failed: %s", self.kind, printable(str(exc)))
            route = None
        self._open(route, protocol, then, visitor, host, authorization)

    def _open(self, route: Optional[Route], protocol: Protocol, then: Opened, visitor: Any = None,
              host: Optional[str] = None, authorization: Optional[Tuple[bytes, ...]] = None) -> None:
        access = route_access(route) if route is not None else None
        if access is not None:
            kind = kind_of(protocol)
            if not access.serves(kind):  # a tunnel for the other kind of ingress: not here
                route = None
            else:
                refused = refusal(access, kind, visitor, authorization)
                if refused is not None:
                    self.count_refused(refused)
                    then(route, refused)
                    return
        if route is None:
            then(None, None)
            return
        try:
            stream = route.open_stream_nowait(protocol, self.priority, visitor, host)
        except FerroTunnelError as exc:
            then(route, exc)
            return
        then(route, stream)

    def count_refused(self, refused: AccessRefused) -> None:
        """Count one visitor refused by a tunnel's access rules in ``refused`` (the dict attribute),
        under the 3-digit HTTP status of the refusal (``"401"``, ``"403"``)."""
        code = refused.status[:3]
        self.refused[code] = self.refused.get(code, 0) + 1

    @property
    def listener_exhaustion(self) -> Dict[str, int]:
        """Times accepting paused because accept() ran out of descriptors or memory, by errno name."""
        return dict(self._server.exhaustion) if self._server is not None else {}

    @property
    def address(self) -> Tuple[str, int]:
        """The ``(host, port)`` the ingress is bound to, port 0 resolved to the port the system
        chose; RuntimeError before ``start``."""
        return bound_address(self._server, "ingress")

    async def start(self) -> None:
        """Bind and start accepting visitors (``async with`` calls it): every address the host
        resolves to, with the server's trusted proxies and this ingress's TLS context, if any; then
        log where it listens. OSError when the address cannot be bound (in use, not local)."""
        host, port = self._bind
        self._server = await listen(self._make_protocol, host, port, self.kind, proxies=self.server.trusted_proxies,
                                    header_timeout=self.server.config.proxy_header_timeout, ssl=self.ssl_context)
        self._where = "%s:%s" % self.address
        said = self.describe()
        log.info("%s listening on %s%s", self.kind, self._where, " " + said if said else "")

    def stop_listening(self) -> None:
        """Close the listening socket (a balancer's health checks now fail); connections already
        accepted keep being served."""
        if self._server is not None:
            self._server.stop_listening()

    async def close(self) -> None:
        """Stop the ingress (leaving ``async with`` calls it): the idle sweeper stops, registry
        lookups still pending are cancelled, the listening socket closes, and the close is awaited
        for at most 1 s. Connections already accepted are not cut here; they end with their streams."""
        self.sweeper.close()
        for task in list(self._lookups):
            task.cancel()
        if self._server is not None:
            self._server.close()
            try:
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            except TimeoutError:
                pass

    async def __aenter__(self) -> "Ingress":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class TcpIngress(Ingress):
    """A public TCP port: each connection becomes a ``Protocol.TCP`` stream to the session named
    ``tunnel_id``, or without one to the first session that announced the ``tcp`` capability."""

    kind = "TCP ingress"

    def __init__(self, server: TunnelServer, address: Address, tunnel_id: Optional[str] = None, *,
                 idle_timeout: Optional[float] = None, priority: Any = None) -> None:
        super().__init__(server, address, priority)
        self.tunnel_id = tunnel_id
        self.idle_timeout = idle_timeout if idle_timeout is not None else server.config.ingress_idle_timeout
        self.sweeper.timeout = self.idle_timeout

    def protocol_factory(self) -> TcpBridge:
        """A bridge for one visitor connection: it opens a ``Protocol.TCP`` stream to the tunnel
        (``open_stream``; reading is paused while a remote lookup runs) and pipes both ways."""
        return _IngressBridge(self)

    def describe(self) -> str:
        """Where visitors go, for the log line: ``"-> <tunnel_id>"``, or ``"-> first tcp session"``."""
        return f"-> {shown_id(self.tunnel_id) if self.tunnel_id else 'first tcp session'}"

    def lookup(self, tunnel_id: Optional[str]) -> Optional[Route]:
        """The route for a visitor: with ``tunnel_id`` as ``Ingress.lookup``; without one, the
        oldest established local session (or its pool) that announced the ``tcp`` capability and
        whose access rules take TCP visitors without basic auth. None when none does."""
        if tunnel_id is None:  # the first local session that offers tcp and takes TCP visitors
            route = first_with_capability(self.server.registry, "tcp")
            access = route_access(route) if route is not None else None
            if access is None or (access.serves("tcp") and access.digest is None):
                return route
            for s in self.server.registry.local_sessions():  # rare: skip sessions for HTTP only
                candidate = LocalRoute(s)
                access = route_access(candidate)
                if (s.established and "tcp" in s.capabilities
                        and (access is None or (access.serves("tcp") and access.digest is None))):
                    return candidate
            return None
        return super().lookup(tunnel_id)


class PortUnavailable(Exception):
    """A port asked for cannot be given; the message is the reason the client is told."""


def parse_port_range(text: str) -> Tuple[int, int]:
    """``"LO-HI"`` (or one port ``"N"``) as ``(LO, HI)``; ValueError unless 1 <= LO <= HI <= 65535."""
    lo, sep, hi = text.strip().partition("-")
    if not (lo.strip().isdigit() and (hi.strip().isdigit() or not sep)) or len(text) > 20:
        raise ValueError(f"a port range is LO-HI, e.g. 20000-20100, got {text!r}")
    return check_port_range((int(lo), int(hi) if sep else int(lo)))


def check_port_range(port_range: Tuple[int, int]) -> Tuple[int, int]:
    lo, hi = (int(x) for x in port_range)
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"a port range needs 1 <= LO <= HI <= 65535, got {lo}-{hi}")
    return lo, hi


class PortLeases:
    """Public TCP ports given to sessions on request (the ``remote-port/1`` extension): each leased
    port is a ``TcpIngress`` for its session's tunnel id, bound on ``host``, for as long as the
    session lives; ``release`` closes its listening socket at once, so the port is free again.
    ``public_host`` (default: ``host``) is what the ``tcp://`` URL told to the client shows.
    Without a ``port_range`` every request is refused (the server has no ports to give)."""

    #: Binds tried, at most, when any free port of the range is asked for.
    MAX_TRIES = 64

    def __init__(self, server: "TunnelServer", port_range: Optional[Tuple[int, int]], host: str,
                 public_host: Optional[str] = None) -> None:
        self.server = server
        self.range = check_port_range(port_range) if port_range is not None else None
        self.host = host
        self.public_host = public_host or host
        self.ingresses: Dict[int, Optional[TcpIngress]] = {}  # by port; None while it is being bound
        self.ports: Dict[Any, int] = {}  # by session
        self._closing: "set[asyncio.Task[None]]" = set()

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.range[0]}-{self.range[1]}" if self.range else "none"

    def refusal(self, port: Optional[int]) -> Optional[str]:
        """Why ``port`` (0: any; None: no request) cannot be asked for at all; None if it may be."""
        if port is None:
            return None
        if self.range is None:
            return "this server gives no ports on request (it has no --tcp-port-range)"
        lo, hi = self.range
        if port and not lo <= port <= hi:
            return f"remote port {port} is outside this server's range {lo}-{hi}"
        return None

    def endpoints(self) -> Tuple[PublicEndpoint, ...]:
        """One tcp endpoint per leased port, routed to its tunnel id."""
        return tuple(PublicEndpoint("tcp", self.public_host, port, ing.tunnel_id)
                     for port, ing in self.ingresses.items() if ing is not None)

    async def grant(self, session: Any, port: Optional[int], replaced: Any = None) -> Tuple[str, ...]:
        """What the ack adds for ``session``, which asked for ``port`` (None: nothing): the port's
        ``remote-port/1`` capability once it is bound. ``replaced`` (the session the new one
        replaces) gives its port back first, so a reconnecting client may have the same port."""
        if replaced is not None:
            self.release(replaced)
        if port is None:
            return ()
        return (remote_port_capability(await self.lease(session, port)),)

    async def lease(self, session: Any, port: int) -> int:
        """Bind ``port`` (0: any free one of the range) for ``session``; the port bound, or
        PortUnavailable with the reason."""
        why = self.refusal(port)
        if why is not None or self.range is None:
            raise PortUnavailable(why)
        if port:
            return await self._bind(session, port)
        lo, hi = self.range
        free = [p for p in range(lo, hi + 1) if p not in self.ingresses]
        start = random.randrange(len(free)) if free else 0
        for p in (free[start:] + free[:start])[:self.MAX_TRIES]:
            try:
                return await self._bind(session, p)
            except PortUnavailable:
                continue
        raise PortUnavailable(f"no free port in this server's range {lo}-{hi}")

    async def _bind(self, session: Any, port: int) -> int:
        if port in self.ingresses:
            raise PortUnavailable(f"remote port {port} is taken by another tunnel")
        self.ingresses[port] = None  # reserved while the bind awaits
        ingress = TcpIngress(self.server, (self.host, port), tunnel_id=session.tunnel_id)
        try:
            await ingress.start()
        except BaseException as exc:  # a cancelled handshake too: the reservation must not outlive it
            del self.ingresses[port]
            if not isinstance(exc, OSError):
                ingress.stop_listening()  # if it got as far as listening
                raise
            taken = exc.errno == errno.EADDRINUSE
            log.info("remote port %s for tunnel %s: %s", port, shown_id(session.tunnel_id), exc)
            raise PortUnavailable(f"remote port {port} is taken" if taken else
                                  f"remote port {port} cannot be bound ({exc.strerror or exc})") from None
        self.ingresses[port] = ingress
        self.ports[session] = port
        log.info("remote port %s leased to tunnel %s (session %s)", port, shown_id(session.tunnel_id), session.id)
        return port

    def release(self, session: Any) -> None:
        """``session`` ended (closed, replaced, or the server is closing): its port is free now."""
        port = self.ports.pop(session, None)
        ingress = self.ingresses.pop(port, None) if port is not None else None
        if ingress is None:
            return
        ingress.stop_listening()  # the socket closes now; accepted connections end with their streams
        log.info("remote port %s of tunnel %s released", port, shown_id(session.tunnel_id))
        task = asyncio.get_running_loop().create_task(ingress.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Release every port and wait (briefly) for their ingresses to close."""
        for session in list(self.ports):
            self.release(session)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=2.0)
