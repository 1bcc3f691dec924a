"""TunnelServer: accepts tunnel clients, authenticates them, keeps one Session per client."""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
import uuid
from typing import Any, Deque, Dict, Iterator, Optional, Tuple, Union

from ._model import PROTOCOL_VERSION, Handshake, HandshakeAck, HandshakeStatus
from .auth import TokenFormatError, constant_time_eq, validate_token_format
from .config import ServerConfig
from .core import EXT_CAPABILITY, SessionCore, flow_capability
from .errors import ConnectionLostError, FrameError
from .frames import encode
from .session import Session, StreamHandler, TunnelConnection, _ServerTls
from .transport import Transport, bound_address, resolve_transport

__all__ = ["TunnelServer", "SessionStore"]

log = logging.getLogger("ferrotunnel.server")

MAX_CAPABILITIES = 32
MAX_CAPABILITY_LEN = 64
MAX_TUNNEL_ID_LEN = 255


class SessionStore:
    """Live sessions, by session id, by tunnel id and by capability."""

    def __init__(self) -> None:
        self._by_id: Dict[uuid.UUID, Session] = {}
        self._by_tunnel: Dict[str, Session] = {}

    def add(self, session: Session) -> None:
        self._by_id[session.id] = session
        self._by_tunnel[session.tunnel_id] = session

    def remove(self, session: Session) -> None:
        if self._by_id.get(session.id) is session:
            del self._by_id[session.id]
        if self._by_tunnel.get(session.tunnel_id) is session:
            del self._by_tunnel[session.tunnel_id]

    def get(self, session_id: uuid.UUID) -> Optional[Session]:
        return self._by_id.get(session_id)

    def get_by_tunnel_id(self, tunnel_id: str) -> Optional[Session]:
        return self._by_tunnel.get(tunnel_id)

    def find_with_capability(self, capability: str) -> Optional[Session]:
        """The first live session (oldest first) that announced ``capability``."""
        for s in self._by_id.values():
            if capability in s.capabilities and not s.is_closed:
                return s
        return None

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_id.values()))

    def __contains__(self, session: object) -> bool:
        return isinstance(session, Session) and self._by_id.get(session.id) is session


class AuthThrottle:
    """Counts failed handshakes per source address; past the threshold the address is throttled."""

    MAX_TRACKED = 10_000

    def __init__(self, threshold: int, window: float) -> None:
        self.threshold = threshold
        self.window = window
        self._fails: "collections.OrderedDict[str, Deque[float]]" = collections.OrderedDict()

    def _recent(self, host: str, now: float) -> Deque[float]:
        q = self._fails.get(host)
        if q is None:
            return collections.deque()
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._fails[host]
        return q

    def throttled(self, host: str, now: float) -> bool:
        return self.threshold > 0 and len(self._recent(host, now)) >= self.threshold

    def failure(self, host: str, now: float) -> None:
        q = self._fails.get(host)
        if q is None:
            if len(self._fails) >= self.MAX_TRACKED:
                self._fails.popitem(last=False)
            q = self._fails[host] = collections.deque(maxlen=max(self.threshold, 1))
        q.append(now)
        self._fails.move_to_end(host)


class ServerConnection(TunnelConnection):
    """Server end of one tunnel connection: the handshake, then the session."""

    def __init__(self, server: "TunnelServer") -> None:
        super().__init__(asyncio.get_running_loop(), server.config, tls=server.transport.is_tls)
        self.server = server
        self._hs_timer: Optional[asyncio.TimerHandle] = None
        self._pending = False
        self._counted = False
        self.stream_handler = server.stream_handler

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        srv = self.server
        if srv._closing:
            transport.abort()
            return
        if srv._pending >= srv.config.max_pending_handshakes:
            log.warning("refusing connection from %s: %d handshakes pending (max_pending_handshakes)",
                        self.peer_address, srv._pending)
            transport.abort()
            return
        srv._pending += 1
        self._pending = True
        srv._connections.add(self)
        self._hs_timer = self.loop.call_later(srv.config.handshake_timeout, self._handshake_timeout)
        ctx = srv.transport.server_ssl()
        if ctx is not None:
            self._stls = _ServerTls(ctx)

    def eof_received(self) -> Optional[bool]:
        if self._stls is not None and not self._stls.established and not self.closed:
            self.tls_failed(ConnectionLostError("the client closed the connection during the TLS handshake"))
            return False
        return super().eof_received()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._stls is not None and not self._stls.established and not self.closed:
            self.tls_failed(exc or ConnectionLostError("the connection was lost during the TLS handshake"))
        super().connection_lost(exc)

    def tls_failed(self, exc: BaseException) -> None:
        why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        log.info("TLS handshake from %s failed: %s", self.peer_address, why)
        self.server.tls_failures += 1
        self.server._auth_failure(self.peer_address)
        self.close()

    def _handshake_timeout(self) -> None:
        self._hs_timer = None
        if self.core is None and not self.closed:
            log.info("closing connection from %s: no handshake within %.1fs", self.peer_address,
                     self.server.config.handshake_timeout)
            self.server._auth_failure(self.peer_address)
            self.close()

    def _end_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.server._pending -= 1
        if self._hs_timer is not None:
            self._hs_timer.cancel()
            self._hs_timer = None

    def handshake_data(self, data: memoryview) -> None:
        if self.closed:
            return
        try:
            frames = self.handshake_decoder.feed(data)
        except FrameError as exc:
            log.info("closing connection from %s: malformed handshake: %s", self.peer_address, exc)
            self.server._auth_failure(self.peer_address)
            self.close()
            return
        if not frames:
            return
        first = frames[0]
        if type(first) is not Handshake:
            log.info("closing connection from %s: first frame was %s, not Handshake", self.peer_address,
                     type(first).__name__)
            self.server._auth_failure(self.peer_address)
            self.close()
            return
        if self.server._handshake(self, first):
            self.dispatch_pipelined(frames[1:])

    def reject(self, status: HandshakeStatus, session_id: Optional[uuid.UUID] = None) -> None:
        ack = HandshakeAck(session_id or uuid.UUID(int=0), status, 0, ())
        self.send_raw(encode(ack))
        self._end_pending()
        self.closed = True
        self.transport.close()  # flushes the ack first
        self.transport_closed(None)

    def on_closed(self) -> None:
        self._end_pending()
        srv = self.server
        srv._connections.discard(self)
        if self.core is not None and not self._counted:
            self._counted = True
            srv.totals_closed[0] += self.core.frames_in
            srv.totals_closed[1] += self.core.bytes_in
            srv.totals_closed[2] += self.core.sched.drained_frames
            srv.totals_closed[3] += self.core.sched.drained_bytes
        if self.session is not None:
            if self.session in srv.sessions:
                log.info("session %s (tunnel %s) from %s closed%s", self.session.id, self.session.tunnel_id,
                         self.peer_address, f": {self.close_exc}" if self.close_exc else "")
            srv.sessions.remove(self.session)
        for task in list(self._tasks):
            task.cancel()


class TunnelServer:
    """Listens for tunnel clients. Use ``async with server:`` or ``await server.start()``.

    ``stream_handler`` (optional) runs for each stream a client opens; without one, such streams
    wait for ``await session.accept()``.
    """

    def __init__(self, address: Tuple[str, int], token: str, *, tls: Union[None, ssl.SSLContext, Transport] = None,
                 config: ServerConfig = ServerConfig(), stream_handler: Optional[StreamHandler] = None) -> None:
        try:
            validate_token_format(token)
        except TokenFormatError as exc:
            raise ValueError(f"invalid server token: {exc}") from None
        self._token = token
        self._bind = address
        self.config = config
        self.transport: Transport = resolve_transport(tls)
        self.stream_handler = stream_handler
        self.sessions = SessionStore()
        self._server: Optional[asyncio.Server] = None
        self._pending = 0
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
            core = s._conn.core
            if core is not None and not s._conn._counted:  # type: ignore[attr-defined]
                t[0] += core.frames_in
                t[1] += core.bytes_in
                t[2] += core.sched.drained_frames
                t[3] += core.sched.drained_bytes
        return t[0], t[1], t[2], t[3]

    def __repr__(self) -> str:  # the token stays out
        return f"<TunnelServer {self._bind} sessions={len(self.sessions)}>"

    @property
    def address(self) -> Tuple[str, int]:
        return bound_address(self._server, "server")

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        host, port = self._bind
        self._server = await loop.create_server(lambda: ServerConnection(self), host, port, backlog=1024,
                                                reuse_address=True)
        log.info("tunnel server listening on %s:%s%s", *self.address, " (TLS)" if self.transport.is_tls else "")

    async def __aenter__(self) -> "TunnelServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    # ------------------------------------------------------------------ handshake

    def _auth_failure(self, peer: Any) -> None:
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        self._throttle.failure(host, time.monotonic())

    def _handshake(self, conn: ServerConnection, hs: Handshake) -> bool:
        cfg = self.config
        peer = conn.peer_address
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        now = time.monotonic()

        def fail(status: HandshakeStatus, why: str, count: bool = True, sid: Optional[uuid.UUID] = None) -> bool:
            log.info("handshake from %s refused (%s): %s", peer, status.name, why)
            self.handshake_failures[status.name] += 1
            if count:
                self._throttle.failure(host, now)
            conn.reject(status, sid)
            return False

        if self._throttle.throttled(host, now):
            return fail(HandshakeStatus.RATE_LIMITED, "too many failed handshakes from this address", count=False)
        try:
            validate_token_format(hs.token)
        except TokenFormatError as exc:
            return fail(HandshakeStatus.INVALID_TOKEN, f"malformed token ({exc})")
        if not constant_time_eq(hs.token, self._token):
            return fail(HandshakeStatus.INVALID_TOKEN, "wrong token")
        if hs.max_version < PROTOCOL_VERSION or hs.min_version > PROTOCOL_VERSION or hs.min_version > hs.max_version:
            return fail(HandshakeStatus.VERSION_MISMATCH,
                        f"client speaks versions {hs.min_version}..{hs.max_version}, server {PROTOCOL_VERSION}")
        session_id = uuid.uuid4()
        tunnel_id = hs.tunnel_id if hs.tunnel_id is not None else str(session_id)
        if not tunnel_id or len(tunnel_id.encode()) > MAX_TUNNEL_ID_LEN:
            return fail(HandshakeStatus.UNSUPPORTED_VERSION, f"tunnel id must be 1..{MAX_TUNNEL_ID_LEN} bytes")
        existing = self.sessions.get_by_tunnel_id(tunnel_id)
        if existing is not None:
            if self._is_stale(existing):
                log.info("tunnel %s: replacing stale session %s with a new connection from %s",
                         tunnel_id, existing.id, peer)
                existing.close(ConnectionLostError("replaced by a new connection for the same tunnel id"))
                self.sessions.remove(existing)
            else:
                return fail(HandshakeStatus.TUNNEL_ID_TAKEN, f"tunnel id {tunnel_id!r} is in use", count=False,
                            sid=uuid.uuid4())
        if len(self.sessions) >= cfg.max_sessions:
            return fail(HandshakeStatus.RATE_LIMITED, f"{len(self.sessions)} sessions (max_sessions)", count=False)
        caps = [c for c in hs.capabilities if len(c.encode()) <= MAX_CAPABILITY_LEN][:MAX_CAPABILITIES]
        server_caps = ["basic", EXT_CAPABILITY]
        if cfg.flow_control:
            server_caps.append(flow_capability(cfg.initial_window))
        # the ack goes out before the session is routable, so no OpenStream can precede it
        conn.send_raw(encode(HandshakeAck(session_id, HandshakeStatus.SUCCESS, PROTOCOL_VERSION, server_caps)))
        conn._end_pending()
        core = SessionCore(is_client=False, config=cfg, peer_capabilities=caps, listener=conn, now=time.monotonic())
        session = Session(conn, session_id, tunnel_id, peer, caps)
        conn.start_session(core, session)
        self.sessions.add(session)
        self._session_added.set()
        self._session_added = asyncio.Event()
        log.info("session %s (tunnel %s) from %s established%s", session_id, tunnel_id, peer,
                 " with flow control" if core.flow else "")
        return True

    def _is_stale(self, session: Session) -> bool:
        conn = session._conn
        if conn.closed:
            return True
        stale_after = self.config.stale_session_after or 2 * self.config.heartbeat_interval
        core = conn.core
        if core is None or core._paused_at is not None:
            return False  # silence while we ourselves paused reading is not the peer's fault
        return time.monotonic() - core.last_seen > stale_after

    # ------------------------------------------------------------------ lookups and lifecycle

    async def wait_for_session(self, tunnel_id: Optional[str] = None, timeout: Optional[float] = None) -> Session:
        """The live session for ``tunnel_id`` (any session if None); TimeoutError if none in time."""
        async with asyncio.timeout(timeout):
            while True:
                if tunnel_id is None:
                    for s in self.sessions:
                        if not s.is_closed:
                            return s
                else:
                    found = self.sessions.get_by_tunnel_id(tunnel_id)
                    if found is not None and not found.is_closed:
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
        if self._server is not None:
            try:
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            except TimeoutError:
                pass
        await asyncio.sleep(0)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let open streams finish for up to ``grace`` seconds, then close."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while asyncio.get_running_loop().time() < deadline:
            if not any(len(s.multiplexer) for s in self.sessions):
                break
            await asyncio.sleep(0.05)
        await self.close()
