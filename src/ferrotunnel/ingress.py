"""Public ingress: TcpIngress turns each accepted TCP connection into a TCP stream of a session."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, Tuple

from ._model import Protocol
from .errors import FerroTunnelError
from .forward import IdleSweeper, TcpBridge
from .server import TunnelServer
from .transport import bound_address
from .session import Session

__all__ = ["TcpIngress", "Ingress"]

log = logging.getLogger("ferrotunnel.ingress")


class _IngressBridge(TcpBridge):
    __slots__ = ("ingress",)

    def __init__(self, ingress: "TcpIngress") -> None:
        super().__init__()
        self.ingress = ingress

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.ingress.sweeper.add(self)
        session = self.ingress.route()
        if session is None:
            log.info("ingress %s: no session for %s; closing %s", self.ingress._bind,
                     self.ingress.tunnel_id or "a tcp-capable client", transport.get_extra_info("peername"))
            self._finish(abort=True)
            return
        try:
            stream = session._conn.open_stream(Protocol.TCP, self.ingress.priority)
        except FerroTunnelError as exc:
            log.warning("ingress %s: cannot open a stream: %s", self.ingress._bind, exc)
            self._finish(abort=True)
            return
        self.ingress.connections += 1
        log.info("ingress %s:%s: %s -> tunnel %s, stream %d", *self.ingress.address,
                 transport.get_extra_info("peername"), session.tunnel_id, stream.stream_id)
        self.attach(stream)


class Ingress:
    """A public listening port whose connections the subclass's protocol turns into streams."""

    kind = "ingress"

    def __init__(self, server: TunnelServer, address: Tuple[str, int], priority: Any = None) -> None:
        from ._model import StreamPriority

        self.server = server
        self._bind = address
        self.priority = StreamPriority.NORMAL if priority is None else StreamPriority(priority)
        self._server: Optional[asyncio.Server] = None
        self.connections = 0
        self.sweeper = IdleSweeper(server.config.ingress_idle_timeout)

    def protocol_factory(self) -> asyncio.BaseProtocol:  # pragma: no cover - subclasses
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    @property
    def address(self) -> Tuple[str, int]:
        return bound_address(self._server, "ingress")

    async def start(self) -> None:
        host, port = self._bind
        self._server = await asyncio.get_running_loop().create_server(self.protocol_factory, host, port,
                                                                      backlog=1024, reuse_address=True)
        log.info("%s listening on %s:%s%s", self.kind, *self.address, self.describe())

    async def close(self) -> None:
        self.sweeper.close()
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

    def protocol_factory(self) -> asyncio.BaseProtocol:
        return _IngressBridge(self)

    def describe(self) -> str:
        return f" -> {self.tunnel_id or 'first tcp session'}"

    def route(self) -> Optional[Session]:
        if self.tunnel_id is not None:
            s = self.server.sessions.get_by_tunnel_id(self.tunnel_id)
            return s if s is not None and not s.is_closed else None
        return self.server.sessions.find_with_capability("tcp")
