"""``ServerConnection``: the server end of one tunnel connection — the handshake, then the
session, and the further tunnel ids its client registers (the tunnels extension)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Tuple

from ..addr import format_peer as _where
from ..errors import ConnectionLostError, FrameError
from ..frames import HandshakeStatus, Protocol
from ..aio.connection import TunnelConnection
from ..aio.session import Session
from ..aio.tlsbio import ServerTls
from ..protocol.core import SessionCore
from ..protocol.handshake import ServerHandshake, plaintext_refusal
from .tunnels import Registrations

if TYPE_CHECKING:
    from .server import TunnelServer

__all__ = ["ServerConnection"]

log = logging.getLogger("ferrotunnel.server")

#: OpenSSL's reasons when a plaintext client talks to a TLS server.
_PLAINTEXT_REASONS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "WRONG_SSL_VERSION",
                      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}


class ServerConnection(TunnelConnection):
    """Server end of one tunnel connection: the handshake, then the session."""

    def __init__(self, server: "TunnelServer") -> None:
        super().__init__(asyncio.get_running_loop(), server.config, tls=server.transport.is_tls)
        self.server = server
        self.handshake = ServerHandshake(server.config)
        self.deciding = False
        self._hs_timer: Optional[asyncio.TimerHandle] = None
        self._pending = False
        #: Bytes received in the handshake phase (the first frame so far, and what followed it),
        #: counted in server.preauth_bytes until the handshake is accepted, refused or closed
        self._held = 0
        self.stream_handler = server.stream_handler
        #: The tunnel ids this connection's client registered (the tunnels extension).
        self.registrations: Optional[Registrations] = None
        #: Why the handshake's token may not claim a tunnel id, or None (set when accepted).
        self.may_claim: Callable[[str], Optional[str]] = lambda tunnel_id: None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        srv = self.server
        if not srv.admit(self):
            transport.abort()
            return
        self._pending = True
        self._hs_timer = self.loop.call_later(srv.config.handshake_timeout, self._handshake_timeout)
        ctx = srv.transport.server_ssl()
        if ctx is not None:
            self.tls = ServerTls(ctx)

    def eof_received(self) -> Optional[bool]:
        if self.tls is not None and not self.tls.established and not self.closed:
            self.tls_failed(ConnectionLostError("the client closed the connection during the TLS handshake"))
            return False
        return super().eof_received()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.tls is not None and not self.tls.established and not self.closed:
            self.tls_failed(exc or ConnectionLostError("the connection was lost during the TLS handshake"))
        super().connection_lost(exc)

    def tls_failed(self, exc: BaseException) -> None:
        if self.tls is not None and not self.tls.seen:  # closed before its first byte: a health check
            log.debug("connection from %s closed before its first byte", _where(self.peer_address))
            self.close()
            return
        why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        if why in _PLAINTEXT_REASONS:
            why = f"{why} (the client speaks plaintext: it needs --tls)"
            if self.transport is not None and getattr(exc, "reason", None) != "HTTP_REQUEST":  # told in plaintext
                self.transport.write(plaintext_refusal("this port speaks TLS: connect with --tls (and --tls-ca if "
                                                       "its certificate is self-signed)"))
        log.info("TLS handshake from %s failed: %s", _where(self.peer_address), why)
        self.server.tls_failures += 1
        self.server.auth_failure(self.peer_address)
        self.close()

    def tls_handshake_bytes(self, n: int) -> bool:
        """Encrypted bytes that arrive before the TLS handshake is complete count toward
        ``max_preauth_bytes`` like the tunnel handshake's own: what OpenSSL has not processed yet
        (a partial record, a client certificate in pieces) is held by this connection too."""
        if self._pending:
            self._held += n
            if not self.server.preauth_grew(self, n):
                self.close()
                return False
        return True

    def _handshake_timeout(self) -> None:
        self._hs_timer = None
        if not self.opened and not self.closed:
            log.info("closing connection from %s: no handshake within %.1fs", _where(self.peer_address),
                     self.server.config.handshake_timeout)
            if not self.deciding:  # (while the server decides, the time is the server's, not the client's)
                self.server.auth_failure(self.peer_address)
            self.close()

    def end_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.server.handshake_ended(self, self._held)
            self._held = 0
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None

    def handshake_data(self, data: memoryview) -> None:
        hs = self.handshake
        try:
            hs.receive_data(data)
        except FrameError as exc:
            log.info("closing connection from %s: not a handshake: %s", _where(self.peer_address), exc)
            if len(data) > 1 and data[0] == 0x16 and data[1] == 0x03 and self.tls is None:  # a TLS ClientHello:
                self.transport.write(plaintext_refusal("this port speaks plaintext: connect without --tls"))
            self.server.auth_failure(self.peer_address)
            self.close()
            return
        if self._pending:
            # Counted as they arrive, not only when the connection was admitted: connections
            # admitted while the total was low could each grow to max_handshake_frame. What
            # arrived stays counted until the policy has decided (the decoded Handshake, and
            # what the client pipelined after it, are held that long).
            self._held += len(data)
            if not self.server.preauth_grew(self, len(data)):
                self.close()
                return
        if hs.request is not None and not self.deciding:
            # the policy may await: hold further bytes in the transport until it has decided
            self.deciding = True
            self.hold_reading()
            self.spawn(self.server.authorize(self, hs.request))

    def reject(self, status: HandshakeStatus, reason: Optional[str]) -> None:
        if self.closed:
            return
        self.send_raw(self.handshake.reject(status, reason))
        self.end_pending()
        self.close()  # the transport flushes the ack first

    def accept(self, session: Session, extra_capabilities: Sequence[str] = ()) -> SessionCore:
        hs = self.handshake
        # the ack goes out before the session is routable, so no OpenStream can precede it
        self.send_raw(hs.accept(session.id, extra_capabilities))
        self.end_pending()
        assert hs.negotiated is not None
        cfg = self.server.config
        core = SessionCore(is_client=False, config=cfg, negotiated=hs.negotiated, listener=self,
                           now=time.monotonic(), accept_peer_streams=cfg.accept_client_streams,
                           recv_account=self.server.recv_account)
        self.open_session(core, session, hs.take_leftover())
        self.release_reading()
        return core

    def on_register(self, tunnel_id: str, protocol: Protocol, capabilities: Tuple[str, ...]) -> None:
        """A Register (the tunnels extension): another tunnel id for this session."""
        if self.closed or not self.opened:
            return
        if self.registrations is None:
            self.registrations = Registrations(self.server, self, self.session, self.may_claim)
        self.registrations.received(tunnel_id, protocol, capabilities)

    def on_closed(self) -> None:
        self.end_pending()
        regs, self.registrations = self.registrations, None  # (no cycle left through them)
        if regs is not None:
            regs.closed()
        self.server.connection_closed(self)
