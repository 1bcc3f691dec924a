"""Public ingress: TcpIngress turns each accepted TCP connection into a TCP stream of a session."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple, Union

from ..aio.bridge import IdleSweeper, TcpBridge
from ..aio.listen import Listener, listen
from ..aio.stream import VirtualStream
from ..aio.transport import bound_address
from ..errors import FerroTunnelError
from ..frames import Protocol, StreamPriority
from .registry import Route, first_with_capability
from .server import TunnelServer

__all__ = ["TcpIngress", "Ingress", "Opened"]

#: What ``Ingress.open_stream`` reports: the route (None: no tunnel) and the stream, or why not.
Opened = Callable[[Optional[Route], Union[VirtualStream, FerroTunnelError, None]], None]

log = logging.getLogger("ferrotunnel.ingress")


class _IngressBridge(TcpBridge):
    __slots__ = ("ingress", "peer", "_held")

    def __init__(self, ingress: "TcpIngress") -> None:
        super().__init__()
        self.ingress = ingress
        self.peer: Any = None
        self._held = False  # reading paused while the registry looks the tunnel up

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.finished:  # over a connection cap
            return
        self.peer = self.peer_address
        self.ingress.sweeper.add(self)
        if not self.ingress.open_stream(self.ingress.tunnel_id, Protocol.TCP, self._opened, self.peer):
            self._held = True  # what the visitor sends waits in the socket until there is a stream
            self.hold_reading()

    def _opened(self, route: Optional[Route], result: Union[VirtualStream, FerroTunnelError, None]) -> None:
        ing = self.ingress
        if route is None:
            log.info("ingress %s: no session for %s; closing %s", ing.describe_bind(),
                     ing.tunnel_id or "a tcp-capable client", self.peer)
            self.close()  # nothing was cut: a plain close
        elif not isinstance(result, VirtualStream):
            log.warning("ingress %s: cannot open a stream: %s", ing.describe_bind(), result)
            self.abort()
        elif self.finished:  # the visitor left while the route was looked up
            result.abort()
        else:
            ing.connections += 1
            log.info("ingress %s: %s -> tunnel %s, stream %d", ing.describe_bind(), self.peer, route.tunnel_id,
                     result.stream_id)
            self.attach(result)
            if self._held:
                self._held = False
                self.release_reading()


class Ingress:
    """A public listening port whose connections the subclass's protocol turns into streams."""

    kind = "ingress"

    def __init__(self, server: TunnelServer, address: Tuple[str, int], priority: Any = None) -> None:
        self.server = server
        self._bind = address
        self.priority = StreamPriority.NORMAL if priority is None else StreamPriority(priority)
        self._server: Optional[Listener] = None
        self.connections = 0
        self.sweeper = IdleSweeper(server.config.ingress_idle_timeout)
        self._lookups: "set[asyncio.Task[None]]" = set()
        self._where = "%s:%s" % address  # the bound address once started

    def protocol_factory(self) -> TcpBridge:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _make_protocol(self) -> TcpBridge:
        bridge = self.protocol_factory()
        bridge.gate = self.server.ingress_gate
        return bridge

    def describe(self) -> str:
        return ""

    def describe_bind(self) -> str:
        return self._where

    def lookup(self, tunnel_id: Optional[str]) -> Optional[Route]:
        """The local route for ``tunnel_id`` through the server's registry, without waiting (None:
        not here; the registry's awaitable ``lookup`` may still know it, see ``open_stream``)."""
        return self.server.registry.lookup_local(tunnel_id) if tunnel_id is not None else None

    def open_stream(self, tunnel_id: Optional[str], protocol: Protocol, then: Opened, visitor: Any = None,
                    host: Optional[str] = None) -> bool:
        """Open a stream to the tunnel and report it to ``then``: synchronously when the route is
        local (no await on the path of a new connection; returns True), after the registry
        answered otherwise (returns False: the caller holds the visitor's bytes meanwhile).
        Ingresses find tunnels only here, through the registry. ``visitor`` and ``host`` travel
        with a stream that a route carries on to another node."""
        route = self.lookup(tunnel_id)
        registry = self.server.registry
        if route is not None or tunnel_id is None or registry.local_only:
            self._open(route, protocol, then, visitor, host)
            return True
        task = asyncio.get_running_loop().create_task(
            self._open_later(registry.lookup(tunnel_id), protocol, then, visitor, host))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)
        return False

    async def _open_later(self, found: Awaitable[Optional[Route]], protocol: Protocol, then: Opened, visitor: Any,
                          host: Optional[str]) -> None:
        try:
            route = await found
        except Exception as exc:  # the registry failed: no route, said once in the log
            log.warning("%s: registry lookup failed: %s", self.kind, exc)
            route = None
        self._open(route, protocol, then, visitor, host)

    def _open(self, route: Optional[Route], protocol: Protocol, then: Opened, visitor: Any = None,
              host: Optional[str] = None) -> None:
        if route is None:
            then(None, None)
            return
        try:
            stream = route.open_stream_nowait(protocol, self.priority, visitor, host)
        except FerroTunnelError as exc:
            then(route, exc)
            return
        then(route, stream)

    @property
    def listener_exhaustion(self) -> Dict[str, int]:
        """Times accepting paused because accept() ran out of descriptors or memory, by errno name."""
        return dict(self._server.exhaustion) if self._server is not None else {}

    @property
    def address(self) -> Tuple[str, int]:
        return bound_address(self._server, "ingress")

    async def start(self) -> None:
        host, port = self._bind
        self._server = await listen(self._make_protocol, host, port, self.kind, proxies=self.server.trusted_proxies,
                                    header_timeout=self.server.config.proxy_header_timeout)
        self._where = "%s:%s" % self.address
        log.info("%s listening on %s%s", self.kind, self._where, self.describe())

    def stop_listening(self) -> None:
        """Close the listening socket (a balancer's health checks now fail); connections already
        accepted keep being served."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
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

    def __init__(self, server: TunnelServer, address: Tuple[str, int], tunnel_id: Optional[str] = None, *,
                 idle_timeout: Optional[float] = None, priority: Any = None) -> None:
        super().__init__(server, address, priority)
        self.tunnel_id = tunnel_id
        self.idle_timeout = idle_timeout if idle_timeout is not None else server.config.ingress_idle_timeout
        self.sweeper.timeout = self.idle_timeout

    def protocol_factory(self) -> TcpBridge:
        return _IngressBridge(self)

    def describe(self) -> str:
        return f" -> {self.tunnel_id or 'first tcp session'}"

    def lookup(self, tunnel_id: Optional[str]) -> Optional[Route]:
        if tunnel_id is None:  # the first local session that offers tcp
            return first_with_capability(self.server.registry, "tcp")
        return super().lookup(tunnel_id)
