"""TunnelClient: dials the server, handshakes, keeps the session alive, reconnects with backoff."""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import time
import uuid
from typing import Any, Awaitable, Callable, Optional, Tuple, Union

from ..aio.bridge import forward
from ..aio.connection import StreamHandler, TunnelConnection
from ..aio.session import Session
from ..aio.stream import VirtualStream
from ..aio.transport import Transport, resolve_transport
from ..auth import TokenFormatError, validate_token_format
from ..config import ClientConfig
from ..protocol.core import SessionCore
from ..protocol.handshake import ClientHandshake, HandshakeResult
from .reconnect import Backoff
from ..errors import (
    AuthenticationError,
    ConnectionLostError,
    FerroTunnelError,
    FrameError,
    HandshakeError,
    RetryableHandshakeError,
    TlsVerificationError,
    TunnelTimeoutError,
)

__all__ = ["TunnelClient", "parse_address"]

log = logging.getLogger("ferrotunnel.client")

_PROCESS_TUNNEL_ID: Optional[str] = None


def _process_tunnel_id() -> str:
    """One random tunnel id per process, kept across reconnects so ingress routing survives."""
    global _PROCESS_TUNNEL_ID
    if _PROCESS_TUNNEL_ID is None:
        _PROCESS_TUNNEL_ID = str(uuid.uuid4())
    return _PROCESS_TUNNEL_ID


def parse_address(addr: str) -> Tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port); ValueError with the reason otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address must be HOST:PORT with a port in 1..65535, got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class ClientConnection(TunnelConnection):
    is_client = True

    def __init__(self, client: "TunnelClient", handler: Optional[StreamHandler], handshake: ClientHandshake) -> None:
        super().__init__(asyncio.get_running_loop(), client.config, tls=client.transport.is_tls)
        self.client = client
        self.stream_handler = handler
        self.handshake = handshake
        self.ack: asyncio.Future[HandshakeResult] = self.loop.create_future()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        transport.write(self.handshake.data_to_send())

    def handshake_data(self, data: memoryview) -> None:
        if self.ack.done():
            return
        hs = self.handshake
        try:
            hs.receive_data(data)
        except HandshakeError as exc:
            self.ack.set_exception(exc)
            self.close()
            return
        result = hs.result
        if result is None:
            return
        core = SessionCore(is_client=True, config=self.client.config, negotiated=result.negotiated, listener=self,
                           now=time.monotonic())
        session = Session(self, result.session_id, self.client.tunnel_id, self.peer_address,
                          result.server_capabilities)
        self.open_session(core, session, hs.leftover)
        self.ack.set_result(result)

    def on_closed(self) -> None:
        if not self.ack.done():
            self.ack.set_exception(ConnectionLostError(
                f"the server closed the connection before answering the handshake{f': {self.close_exc}' if self.close_exc else ''}"))


OnConnected = Callable[[Session], Union[None, Awaitable[None]]]

_RETRYABLE = (OSError, ConnectionLostError, RetryableHandshakeError, TunnelTimeoutError, TimeoutError, FrameError)


class TunnelClient:
    """Client end of a tunnel. ``connect_and_run(handler)`` serves streams until cancelled."""

    def __init__(self, server_addr: str, token: str, *, tunnel_id: Optional[str] = None,
                 tls: Union[None, ssl.SSLContext, Transport] = None, server_name: Optional[str] = None,
                 config: ClientConfig = ClientConfig()) -> None:
        try:
            validate_token_format(token)
        except TokenFormatError as exc:
            raise ValueError(f"invalid client token: {exc}") from None
        self.host, self.port = parse_address(server_addr)
        self._token = token
        self.tunnel_id = tunnel_id if tunnel_id is not None else _process_tunnel_id()
        self.transport = resolve_transport(tls)
        self.server_name = server_name or self.host
        self.config = config
        self._conn: Optional[ClientConnection] = None

    def __repr__(self) -> str:  # the token stays out
        return f"<TunnelClient {self.host}:{self.port} tunnel_id={self.tunnel_id!r}>"

    @property
    def session(self) -> Optional[Session]:
        """The live session, if connected."""
        conn = self._conn
        if conn is None or conn.closed:
            return None
        return conn.session

    def _default_handler(self) -> StreamHandler:
        addr = self.config.local_addr

        async def handle(stream: VirtualStream) -> None:
            try:
                await forward(stream, addr, wait=False)  # the pipe runs by itself: no task per stream
            except (OSError, TimeoutError):
                pass  # forward() logged it once and reset the stream; no traceback per stream

        return handle

    async def connect(self, handler: Optional[StreamHandler] = None) -> Session:
        """One connection and handshake. Raises AuthenticationError, HandshakeError, or a
        retryable error (OSError, ConnectionLostError, RetryableHandshakeError, TimeoutError)."""
        loop = asyncio.get_running_loop()
        handler = handler or self._default_handler()
        conn: Optional[ClientConnection] = None

        def factory() -> ClientConnection:
            nonlocal conn
            conn = ClientConnection(self, handler, ClientHandshake(self._token, self.tunnel_id, self.config))
            return conn

        ctx = self.transport.client_ssl()
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await loop.create_connection(factory, self.host, self.port, ssl=ctx,
                                             server_hostname=self.server_name if ctx else None)
                assert conn is not None
                await conn.ack
        except ssl.SSLCertVerificationError as exc:
            raise TlsVerificationError(
                f"the TLS certificate of {self.server_name} ({self.host}:{self.port}) failed verification: "
                f"{exc.verify_message or exc.reason}; check the CA (--tls-ca) and the server name") from None
        except TimeoutError:
            if conn is not None:
                conn.close()
            raise TunnelTimeoutError(
                f"no handshake answer from {self.host}:{self.port} within {self.config.handshake_timeout}s") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        assert conn is not None
        self._conn = conn
        log.info("connected to %s:%s: session %s, tunnel id %s%s", self.host, self.port, conn.session.id,
                 self.tunnel_id, " (flow control)" if conn.core.flow else "")
        return conn.session

    async def connect_and_run(self, handler: Optional[StreamHandler] = None,
                              on_connected: Optional[OnConnected] = None) -> None:
        """Serve streams with ``handler`` (default: forward to ``config.local_addr``), reconnecting
        with backoff after passing failures, until cancelled. Raises AuthenticationError for a
        rejected token and HandshakeError for a version mismatch."""
        backoff = Backoff(self.config.backoff)
        try:
            while True:
                try:
                    session = await self.connect(handler)
                except (AuthenticationError, TlsVerificationError) as exc:
                    log.error("%s", exc)
                    raise
                except _RETRYABLE as exc:
                    await self._wait_retry(backoff, exc)
                    continue
                except HandshakeError as exc:
                    if isinstance(exc, RetryableHandshakeError):  # pragma: no cover - caught above
                        continue
                    log.error("%s", exc)
                    raise
                backoff.reset()
                if on_connected is not None:
                    result = on_connected(session)
                    if inspect.isawaitable(result):
                        await result
                await session.wait_closed()
                conn = self._conn
                reason = conn.close_exc if conn is not None else None
                await self._wait_retry(backoff, reason or ConnectionLostError("session ended"))
        finally:
            if self._conn is not None:
                self._conn.close()

    async def _wait_retry(self, backoff: Backoff, exc: BaseException) -> None:
        delay = backoff.next_delay()
        if delay is None:
            raise FerroTunnelError(
                f"giving up after {backoff.attempts} attempts to reach {self.host}:{self.port}: {exc}") from exc
        log.warning("tunnel to %s:%s: %s; reconnecting in %.1fs", self.host, self.port, exc or "disconnected", delay)
        await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await asyncio.sleep(0)
