"""``ClientConnection``: the client end of one tunnel connection — it sends the Handshake, reads
the server's answer and, when that is no HandshakeAck, says what answered instead."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from ..aio.connection import StreamHandler, TunnelConnection
from ..aio.session import Session
from ..errors import ConnectionLostError, HandshakeError, SuspectedMisconfiguration
from ..frames import RegisterStatus
from ..protocol.core import SessionCore
from ..protocol.handshake import ClientHandshake, HandshakeResult
from .tunnels import RegisterWaiters
from .diagnose import HINT_ADD_TLS, HINT_CLIENT_CERT, client_cert_hint, describe_error, looks_like_tls

if TYPE_CHECKING:
    from .client import TunnelClient

__all__ = ["ClientConnection"]

log = logging.getLogger("ferrotunnel.client")


class ClientConnection(TunnelConnection):
    """The protocol object of a client's tunnel connection (made by ``TunnelClient.connect``)."""

    is_client = True

    def __init__(self, client: "TunnelClient", handler: Optional[StreamHandler], handshake: ClientHandshake) -> None:
        super().__init__(asyncio.get_running_loop(), client.config, tls=client.transport.is_tls)
        # a proxy: the client holds its connection, and a connection that held its client back would
        # keep both (and the session) alive after close until the cyclic GC ran
        self.client: "TunnelClient" = weakref.proxy(client)
        self.stream_handler = handler
        self.handshake = handshake
        self.ack: asyncio.Future[HandshakeResult] = self.loop.create_future()
        #: connection_made ran: TCP (and TLS, with a context) is up and the Handshake is sent.
        self.made = False
        #: Bytes of the server's answer so far, and the first few of them (to recognise a TLS
        #: record or an HTTP response where a HandshakeAck should be).
        self.received = 0
        self._head = b""
        #: connect_and_run took this session over: public URLs that arrive are reported.
        self.serving = False
        #: The tunnels extension: the answers awaited, and the registered ids' public URLs.
        self.register_waiters: Optional[RegisterWaiters] = None
        self.registered: Dict[str, Tuple[str, ...]] = {}

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.made = True
        transport.write(self.handshake.data_to_send())

    def _fail(self, exc: BaseException) -> None:
        self.ack.set_exception(exc)
        self.close()

    def handshake_data(self, data: memoryview) -> None:
        if self.ack.done():
            return
        self.received += len(data)
        if len(self._head) < 5:
            self._head += bytes(data[:5 - len(self._head)])
        client = self.client
        if not client.transport.is_tls and looks_like_tls(self._head):
            self._fail(HandshakeError(f"the server at {client.address} answered with TLS: {HINT_ADD_TLS}"))
            return
        hs = self.handshake
        try:
            hs.receive_data(data)
        except HandshakeError as exc:
            self._fail(self._explain_reply(exc))
            return
        result = hs.result
        if result is None:
            return
        core = SessionCore(is_client=True, config=self.client.config, negotiated=result.negotiated, listener=self,
                           now=time.monotonic())
        session = Session(self, result.session_id, self.client.tunnel_id, self.peer_address,
                          result.server_capabilities)
        self.ack.set_result(result)  # first: bytes behind the ack may end the session at once
        self.open_session(core, session, hs.leftover)

    def public_urls_received(self, urls: Tuple[str, ...]) -> None:
        """The server said where visitors reach this session (the public-URLs extension)."""
        log.debug("public URLs of session %s: %s", self.session.id, ", ".join(urls) or "none")
        if self.serving:
            try:
                self.client.report_public_urls(self)
            except ReferenceError:  # the client is gone
                pass

    def _explain_reply(self, exc: HandshakeError) -> HandshakeError:
        """A refusal (with a status) stands as it is; a reply that is no HandshakeAck says what
        answered instead."""
        if exc.status is not None:
            return exc
        addr = self.client.address
        if self._head.startswith(b"HTTP"):
            return HandshakeError(
                f"the server at {addr} answered in HTTP: {self.client.port} is an HTTP port (an HTTP ingress, "
                f"--http-bind, or a web server), not a tunnel port: point --server at the port the tunnel server "
                f"listens on (server --bind)")
        return HandshakeError(f"{exc} (from {addr}): is {addr} the tunnel port of a ferrotunnel server "
                              f"(server --bind)?")

    def on_register_ack(self, tunnel_id: str, status: RegisterStatus, text: str) -> None:
        """A RegisterAck (the tunnels extension) for ``tunnel_id``."""
        if self.register_waiters is not None:
            self.register_waiters.answered(tunnel_id, status, text)

    def on_closed(self) -> None:
        if not self.ack.done():
            self.ack.set_exception(self.closed_early())
        if self.register_waiters is not None:
            self.register_waiters.fail(self.close_exc or ConnectionLostError("the connection closed before the "
                                                                           "server answered every Register"))

    def closed_early(self) -> ConnectionLostError:
        """The connection ended before the HandshakeAck: what most likely happened."""
        exc = self.close_exc
        what = "the server closed the connection before answering the handshake"
        cert = client_cert_hint(exc)
        if cert is not None:
            return SuspectedMisconfiguration(f"{what}: {cert}")
        # our own "the peer closed the tunnel connection" says nothing new here
        if exc is not None and not isinstance(exc, ConnectionLostError):
            what += f" ({describe_error(exc)})"
        if self.received:
            return ConnectionLostError(
                f"{what}, after {self.received} bytes of an answer: is {self.client.address} the tunnel port of a "
                f"ferrotunnel server (server --bind)? Its log may say more")
        if not self.client.transport.is_tls:  # (or a balancer whose backend is down: retried as usual)
            return ConnectionLostError(
                f"{what}: either it expects TLS — {HINT_ADD_TLS} — or it turned the connection away (at a "
                f"connection or descriptor limit, or throttling this address after failed logins: its log says)")
        return SuspectedMisconfiguration(
            f"{what}: its log says why — most often a client certificate it requires ({HINT_CLIENT_CERT}), "
            f"or a port that is not its tunnel port (server --bind)")
