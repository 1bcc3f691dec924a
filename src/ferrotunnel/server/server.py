"""TunnelServer: accepts tunnel clients, authenticates them, keeps one Session per client.

The handshake bytes are the protocol layer's (``ServerHandshake``); what to answer is decided
here, by ``TunnelServer.authorize``, which may await (the registry may be on the network).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple, Union

from ..addr import Address, as_address, format_peer as _where
from ..auth import TokenFormatError, constant_time_eq, validate_token_format
from ..config import ServerConfig
from ..errors import ConnectionLostError
from ..frames import HandshakeStatus
from ..aio.listen import ConnectionGate, FdHeadroom, Listener, RefusalLog, listen
from ..protocol.flow import RecvAccount
from ..protocol.proxyproto import TrustedProxies
from ..aio.connection import StreamHandler
from ..aio.session import Session
from ..aio.transport import Transport, bound_address, resolve_transport
from ..protocol.extensions import instance_of
from ..protocol.handshake import HandshakeRequest
from .connection import ServerConnection
from .ingress import PortUnavailable
from .ports import IndexedPortLeases, PortQuotaExceeded
from .admission import MAX_TUNNEL_ID_LEN, Refusal, replace_own, shown_id, vet
from ..addr import address_key as _who, peer_host as _host
from .public import PublicEndpoint, normalize_domain, public_urls
from .registry import LocalRegistry, SessionRegistry, SessionStore
from .throttle import AuthThrottle

__all__ = ["TunnelServer", "ServerConnection", "MAX_TUNNEL_ID_LEN"]

log = logging.getLogger("ferrotunnel.server")

#: The retry-after a handshake refused by ``max_ports_per_address`` carries (RateLimited: a Rust
#: client retries with its own backoff; ours after this many seconds, at most MAX_RETRY_AFTER).
QUOTA_RETRY_AFTER = 5.0

#: A refusal of connections from one address for one reason is logged at most this often.
REFUSAL_LOG_INTERVAL = 10.0


class TunnelServer:
    """Listens for tunnel clients. Use ``async with server:`` or ``await server.start()``.

    ``stream_handler`` (optional) runs for each stream a client opens; without one, such streams
    wait for ``await session.accept()``. ``registry`` decides who serves which tunnel id
    (default: a ``LocalRegistry`` of this process). Tunnel ids are claimed in lower case; with a
    ``domain`` (visitors reach ``ID.DOMAIN``) an id that cannot be a DNS label is refused.
    ``public_endpoints`` (assignable once the ingresses are bound) say where visitors arrive;
    each client that negotiated ``public-urls/1`` is told its URLs after the handshake.
    ``tcp_port_range=(LO, HI)`` gives ports on request: a client that asks (``remote-port/1``,
    ``ClientConfig(remote_port=)``) gets a ``TcpIngress`` of its own on ``tcp_port_host`` (default:
    the host of ``address``) for the life of its session (``ports``; ``tcp_port_public_host`` is
    what its URL shows); a port outside the range or taken, or any without a range, is refused.
    """

    def __init__(self, address: Address, token: str, *, tls: Union[None, ssl.SSLContext, Transport] = None,
                 config: ServerConfig = ServerConfig(), stream_handler: Optional[StreamHandler] = None,
                 registry: Optional[SessionRegistry] = None, domain: Optional[str] = None,
                 public_endpoints: Sequence[PublicEndpoint] = (), tcp_port_range: Optional[Tuple[int, int]] = None,
                 tcp_port_host: Optional[str] = None, tcp_port_public_host: Optional[str] = None) -> None:
        address = as_address(address, "address", bind=True)
        try:
            validate_token_format(token)
        except TokenFormatError as exc:
            raise ValueError(f"invalid server token: {exc}") from None
        #: Visitors reach tunnel ``ID`` as ``ID.<domain>`` (lower case; None: no domain).
        self.domain = normalize_domain(domain) if domain else None
        self.public_endpoints: Tuple[PublicEndpoint, ...] = tuple(public_endpoints)
        self._token = token
        self._bind = address
        #: Ports on request (without a ``tcp_port_range`` every request is refused).
        self.ports = IndexedPortLeases(self, tcp_port_range, tcp_port_host or address[0], tcp_port_public_host)
        self.config = config
        self.transport: Transport = resolve_transport(tls)
        self.stream_handler = stream_handler
        self.registry: SessionRegistry = registry if registry is not None else LocalRegistry()
        self.sessions = SessionStore(self.registry)
        self._server: Optional[Listener] = None
        self.pending_handshakes = 0
        self._pending_by_host: Dict[str, int] = {}
        #: Bytes held by the first frames of pending handshakes, all together.
        self.preauth_bytes = 0
        #: Bytes its sessions hold delivered and unread, together (``server_recv_limit``).
        self.recv_account = RecvAccount(self.config.server_recv_limit)
        #: Connections refused before their handshake, by the limit that refused them.
        self._refusals = RefusalLog("tunnel port", REFUSAL_LOG_INTERVAL)
        self.refused_connections: Dict[str, int] = self._refusals.counts
        #: Connection caps shared by all ingresses of this server; each new one must leave
        #: ``ingress_fd_reserve`` file descriptors free, so tunnel clients can still connect.
        self.ingress_gate = ConnectionGate(config.ingress_max_per_address, config.ingress_max_connections, "ingress",
                                           config.ingress_fd_reserve)
        self._headroom = FdHeadroom(config.tunnel_fd_reserve)
        #: Balancers whose PROXY v2 header names the peer (ValueError here for a bad CIDR).
        self.trusted_proxies = TrustedProxies(config.trusted_proxies) if config.trusted_proxies else None
        self._connections: "set[ServerConnection]" = set()
        self._closing = False
        self._throttle = AuthThrottle(config.auth_failure_threshold, config.auth_failure_window)
        self._session_added = asyncio.Event()
        self.handshake_failures: Dict[str, int] = collections.Counter()
        self.tls_failures = 0
        #: frames in, wire bytes in, frames out, wire bytes out of sessions that have ended
        self.totals_closed = [0, 0, 0, 0]

    def traffic_totals(self) -> Tuple[int, int, int, int]:
        """(frames in, bytes in, frames out, bytes out) over all sessions, live and ended."""
        t = list(self.totals_closed)
        for s in self.sessions:
            if not s.is_closed:
                st = s.stats()
                t[0] += st.frames_in
                t[1] += st.bytes_in
                t[2] += st.frames_out
                t[3] += st.bytes_out
        return t[0], t[1], t[2], t[3]

    def __repr__(self) -> str:  # the token stays out
        return f"<TunnelServer {self._bind} sessions={len(self.sessions)}>"

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) the tunnel port is bound to (after ``start``; the real port for port 0)."""
        return bound_address(self._server, "server")

    @property
    def listener_exhaustion(self) -> Dict[str, int]:
        """Times accepting paused because accept() ran out of descriptors or memory, by errno name."""
        return dict(self._server.exhaustion) if self._server is not None else {}

    @property
    def is_serving(self) -> bool:
        """Started, and not closing."""
        return self._server is not None and not self._closing

    async def start(self) -> None:
        """Bind the tunnel port and accept clients (once; OSError when the port cannot be bound)."""
        if self._server is not None:
            return
        host, port = self._bind
        self._server = await listen(lambda: ServerConnection(self), host, port, "tunnel port",
                                    proxies=self.trusted_proxies, header_timeout=self.config.proxy_header_timeout)
        log.info("tunnel server listening on %s:%s%s", *self.address, " (TLS)" if self.transport.is_tls else "")

    async def adopt(self, sock: Any) -> None:
        """Serve one connection accepted elsewhere (a connected socket), as if the tunnel port had
        accepted it: admission limits, handshake and session as usual."""
        await asyncio.get_running_loop().connect_accepted_socket(lambda: ServerConnection(self), sock)

    async def __aenter__(self) -> "TunnelServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        """``start``, then serve until cancelled."""
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    # ------------------------------------------------------------------ connections and handshakes

    def admit(self, conn: ServerConnection) -> bool:
        """A new connection: may it start a handshake? Refusals are counted by reason and logged
        at most once per address and reason every ``REFUSAL_LOG_INTERVAL`` seconds."""
        if self._closing:
            return False
        cfg = self.config
        host = _who(conn.peer_address)
        if self.pending_handshakes >= cfg.max_pending_handshakes:
            return self._refusals.refuse(host, "max_pending_handshakes", f"{self.pending_handshakes} handshakes pending")
        if self._headroom.exhausted(conn.transport):
            return self._refusals.refuse(host, "tunnel_fd_reserve", self._headroom.why(conn.transport))
        if self._pending_by_host.get(host, 0) >= cfg.max_pending_per_address:
            return self._refusals.refuse(host, "max_pending_per_address",
                                f"{self._pending_by_host[host]} handshakes pending from this address")
        if self.preauth_bytes >= cfg.max_preauth_bytes:
            return self._refusals.refuse(host, "max_preauth_bytes", f"{self.preauth_bytes} bytes held by pending handshakes")
        if self.transport.is_tls and self._throttle.throttled(host, time.monotonic()):  # not even a TLS handshake
            return self._refusals.refuse(host, "auth_failure_threshold", "too many failed logins from this address lately")
        self.pending_handshakes += 1
        self._pending_by_host[host] = self._pending_by_host.get(host, 0) + 1
        self._connections.add(conn)
        return True

    def preauth_grew(self, conn: ServerConnection, nbytes: int) -> bool:
        """``nbytes`` more arrived on a pending handshake (``conn`` counts them as held): False
        when they take the bytes all pending handshakes hold over ``max_preauth_bytes``, and the
        connection must close (counted and logged as a refusal, at most once per address every
        ``REFUSAL_LOG_INTERVAL`` seconds; no failed login: the bytes of others filled the pool)."""
        self.preauth_bytes += nbytes
        if self.preauth_bytes <= self.config.max_preauth_bytes:
            return True
        host = _host(conn.peer_address)
        if self._refusals.due(host, "max_preauth_bytes"):
            log.warning("tunnel port: closing connections from %s in their handshake: pending handshakes would "
                        "hold %d bytes (max_preauth_bytes %d); said once per %.0fs", host, self.preauth_bytes,
                        self.config.max_preauth_bytes, REFUSAL_LOG_INTERVAL)
        return False

    def handshake_ended(self, conn: ServerConnection, held: int) -> None:
        """A connection left the handshake phase (done, refused or closed), holding ``held`` bytes."""
        self.pending_handshakes -= 1
        self.preauth_bytes -= held
        host = _who(conn.peer_address)
        n = self._pending_by_host.get(host, 0) - 1
        if n > 0:
            self._pending_by_host[host] = n
        else:
            self._pending_by_host.pop(host, None)

    def auth_failure(self, peer: Any) -> None:
        """Count a failed login from ``peer``'s address toward the throttle (see ``throttled``)."""
        self._throttle.failure(_who(peer), time.monotonic())

    def throttled(self, peer: Any) -> bool:
        """Whether ``peer``'s address has failed too many logins lately (its handshakes get RateLimited)."""
        return self._throttle.throttled(_who(peer), time.monotonic())

    def token_ok(self, token: str) -> bool:
        """Whether a Handshake's token admits it (constant time); subclasses may widen this."""
        return constant_time_eq(token, self._token)

    def claim_policy(self, token: str) -> Callable[[str], Optional[str]]:
        """For a session that ``token`` admitted: why it may not claim a further tunnel id (one it
        registers), or None; subclasses with per-client tokens narrow this."""
        return lambda tunnel_id: None

    async def authorize(self, conn: ServerConnection, req: HandshakeRequest) -> None:
        """The server's policy for one Handshake: accept it or refuse it, with a reason."""
        if conn.closed:
            return None
        cfg = self.config
        peer = conn.peer_address
        host = _who(peer)
        now = time.monotonic()

        def fail(status: HandshakeStatus, why: str, count: bool = True) -> None:
            log.info("handshake from %s refused (%s): %s", _where(peer), status.name, why)
            self.handshake_failures[status.name] += 1
            if count:
                self._throttle.failure(host, now)
            conn.reject(status, why)

        if self._throttle.throttled(host, now):
            return fail(HandshakeStatus.RATE_LIMITED, "too many failed handshakes from this address (a wrong token?): "
                        "check the client's token; refused for a while", count=False)
        asked = vet(self, req)
        if isinstance(asked, Refusal):
            return fail(asked.status, asked.why, asked.counts)
        session_id, tunnel_id, wanted = asked.session_id, asked.tunnel_id, asked.remote_port
        live = len(self.registry.local_sessions())
        if live >= cfg.max_sessions:
            return fail(HandshakeStatus.RATE_LIMITED, f"{live} sessions (max_sessions)", count=False)
        session = Session(conn, session_id, tunnel_id, peer, req.capabilities)
        replace_own(self.registry, tunnel_id, instance_of(req.capabilities))
        try:  # cancelled (the connection closed while the registry or a port bind was awaited): see below
            claim = await (self.registry.claim(tunnel_id, session, self.is_stale, pool=True) if asked.pool
                           else self.registry.claim(tunnel_id, session, self.is_stale))
            if conn.closed:  # gone while the registry answered
                if claim.granted:
                    await self.registry.release(tunnel_id, session)
                return None
            if not claim.granted and claim.retry_after is not None:  # a cluster handover: retry soon
                return fail(HandshakeStatus.RATE_LIMITED, f"tunnel id {tunnel_id!r}: {claim.reason or 'handover pending'}; "
                            f"retry-after={claim.retry_after:g}", count=False)
            if not claim.granted:
                said = f" ({claim.reason})" if claim.reason else ""
                return fail(HandshakeStatus.TUNNEL_ID_TAKEN, f"tunnel id {tunnel_id!r} is in use{said}", count=False)
            if claim.replaced is not None:
                log.info("tunnel %s: replacing stale session %s with a new connection from %s",
                         shown_id(tunnel_id), claim.replaced.id, _where(peer))
                claim.replaced.close(ConnectionLostError("replaced by a new connection for the same tunnel id"))
            try:  # a port on request is bound now, for the life of the session
                granted = await self.ports.grant(session, wanted, claim.replaced)
            except PortQuotaExceeded as exc:  # a quota that frees up as the address's tunnels end: retry
                await self.registry.release(tunnel_id, session)
                return fail(HandshakeStatus.RATE_LIMITED, f"retry-after={QUOTA_RETRY_AFTER:g}; {exc}", count=False)
            except PortUnavailable as exc:
                await self.registry.release(tunnel_id, session)
                return fail(HandshakeStatus.UNSUPPORTED_VERSION, str(exc), count=False)
            if conn.closed:  # gone while the port was bound
                self.ports.release(session)
                await self.registry.release(tunnel_id, session)
                return None
        except asyncio.CancelledError:
            # the claim (or the port) may be held already: the session that never opened lets both go
            if not conn.opened:
                self.ports.release(session)
                self.registry.session_ended(session)
            raise
        conn.may_claim = self.claim_policy(req.token)
        try:
            core = conn.accept(session, asked.answers(granted))
        except Exception:  # a bug must not leave the tunnel id claimed by a connection that is gone
            log.exception("handshake from %s failed after the tunnel id was claimed", _where(peer))
            self.registry.session_ended(session)
            self.ports.release(session)
            conn.close()
            return None
        urls = self.public_urls(tunnel_id, req.capabilities)
        if urls:
            core.send_public_urls(urls)
        self._session_added.set()
        self._session_added = asyncio.Event()
        log.info("session %s (tunnel %s) from %s established%s", session_id, shown_id(tunnel_id), _where(peer),
                 " with flow control" if core.flow else "")
        return None

    def public_urls(self, tunnel_id: str, capabilities: Tuple[str, ...] = ("tcp",)) -> Tuple[str, ...]:
        """Where visitors reach ``tunnel_id`` through ``public_endpoints`` and its ports on request
        (see ``public.public_urls``)."""
        endpoints = self.public_endpoints + self.ports.endpoints_for(tunnel_id)  # (not every leased port)
        return public_urls(endpoints, tunnel_id.lower(), capabilities, self.domain)

    def is_stale(self, session: Session) -> bool:
        """Whether a claim of ``session`` may be taken over (closed, or silent too long)."""
        if session.is_closed:
            return True
        stale_after = self.config.stale_session_after or 2 * self.config.heartbeat_interval
        return session.silent_for(time.monotonic()) > stale_after

    def connection_closed(self, conn: ServerConnection) -> None:
        """A tunnel connection ended: its port on request, its tunnel id and its counts are let go."""
        self._connections.discard(conn)
        if not conn.opened:
            return
        session = conn.session
        self.ports.release(session)
        st = session.stats()
        for i, v in enumerate((st.frames_in, st.bytes_in, st.frames_out, st.bytes_out)):
            self.totals_closed[i] += v
        if session in self.sessions:
            log.info("session %s (tunnel %s) from %s closed%s", session.id, shown_id(session.tunnel_id),
                     _where(conn.peer_address), f": {conn.close_exc}" if conn.close_exc else "")
        self.registry.session_ended(session)

    # ------------------------------------------------------------------ lookups and lifecycle

    async def wait_for_session(self, tunnel_id: Optional[str] = None, timeout: Optional[float] = None) -> Session:
        """The live session for ``tunnel_id`` (any session if None; ids are matched in lower case,
        as they are claimed); TimeoutError if none in time."""
        tunnel_id = tunnel_id.lower() if tunnel_id is not None else None
        async with asyncio.timeout(timeout):
            while True:
                if tunnel_id is None:
                    for s in self.sessions:
                        if s.established:
                            return s
                else:
                    found = self.sessions.get_by_tunnel_id(tunnel_id)
                    if found is not None and found.established:
                        return found
                await self._session_added.wait()

    async def close(self) -> None:
        """Stop accepting, end every session and stream with an error (returns within a second)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        err = ConnectionLostError("the tunnel server is shutting down")
        for conn in list(self._connections):
            conn.close(err)
        await self.ports.close()
        if self._server is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            except TimeoutError:
                pass
        await asyncio.sleep(0)

    def stop_listening(self) -> None:
        """Close the tunnel port and refuse handshakes from now on; open sessions carry on."""
        self._closing = True
        if self._server is not None:
            self._server.close()

    async def shutdown(self, grace: float, *, handover: bool = False,
                       busy: Optional[Callable[[], bool]] = None) -> None:
        """Stop accepting, let open streams finish for up to ``grace`` seconds, then close.

        ``handover`` (a cluster node leaving): clients that negotiated the drain extension are told
        to open a new session now (through the balancer, on another node); their old session is
        closed once the client said its new one is up and the old one has no stream left. Other
        sessions are waited for until their streams are done. ``busy()``, if given, also holds the
        exit while it returns True (streams this node carries to other nodes)."""
        self.stop_listening()
        told: Set[Session] = set()
        if handover:
            told = {s for s in self.sessions if s.send_drain()}
            log.info("draining: told %d of %d clients to move to another node", len(told), len(self.sessions))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline:
            waiting = False
            for s in list(self.sessions):
                if s.is_closed:
                    continue
                if len(s.multiplexer):
                    waiting = True
                elif s in told:
                    if s.moved.is_set():  # the client's new session is up and this one is done
                        s.close()
                    else:
                        waiting = True
            if not waiting and not (busy is not None and busy()):
                break
            await asyncio.sleep(0.05)
        await self.close()
