"""TunnelClient: dials the server, handshakes, keeps the session alive, reconnects with backoff."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import socket
import time
import ssl
import uuid
from typing import Any, Awaitable, Callable, Dict, Optional, Sequence, Set, Tuple, Union

from ..addr import Address, as_address, format_address, parse_address
from ..aio.dial import DialSlots, forward
from ..aio.connection import StreamHandler
from ..aio.session import Session
from ..aio.stream import VirtualStream
from ..aio.transport import Transport, resolve_transport
from ..auth import TokenFormatError, validate_token_format
from ..config import ClientConfig
from ..protocol.handshake import ClientHandshake
from ..protocol.extensions import TUNNELS_CAPABILITY, VISITOR_HEADER, new_instance_capability
from ..protocol.proxyproto import header_for
from .connection import ClientConnection
from .diagnose import describe_error
from .explain import explain
from .reconnect import Backoff, suspect
from .tunnels import RegisterWaiters, Tunnel, dispatching_handler, register_capabilities, register_protocol, tunnels_by_id
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

__all__ = ["TunnelClient", "ClientConnection", "parse_address", "format_address", "describe_error"]

log = logging.getLogger("ferrotunnel.client")

_PROCESS_TUNNEL_ID: Optional[str] = None


def _process_tunnel_id() -> str:
    """One random tunnel id per process, kept across reconnects so ingress routing survives."""
    global _PROCESS_TUNNEL_ID
    if _PROCESS_TUNNEL_ID is None:
        _PROCESS_TUNNEL_ID = str(uuid.uuid4())
    return _PROCESS_TUNNEL_ID


OnConnected = Callable[[Session], Union[None, Awaitable[None]]]
OnPublicUrls = Callable[[Tuple[str, ...]], None]
OnRegistered = Callable[[Tunnel, Tuple[str, ...]], None]

#: Seconds between checks whether a new session is up beside a retiring one (its node is leaving).
RETIRE_POLL = 0.05

#: Attempts in a row that fail the same way suggesting a setting that does not match the server
#: (``SuspectedMisconfiguration``) or a tunnel id another client holds (TunnelIdTaken), over at
#: least ``SUSPECT_WINDOW`` seconds: then the client gives up (about 15 s with the default backoff).
MAX_SUSPECT_ATTEMPTS = 3
SUSPECT_WINDOW = 10.0

#: Drain notices in a row, each on a session younger than ``BackoffConfig.stable_after``, that are
#: followed by a new session at once; after these the client waits its backoff (a server that sends
#: every new session away must not get a reconnect storm).
DRAIN_MOVES_AT_ONCE = 3
#: Sessions whose node is leaving, kept beside the live one while their streams finish; beyond
#: this the oldest is closed.
MAX_RETIRING = 4

_RETRYABLE = (OSError, ConnectionLostError, RetryableHandshakeError, TunnelTimeoutError, TimeoutError, FrameError)


class TunnelClient:
    """Client end of a tunnel. ``connect_and_run(handler)`` serves streams until cancelled.

    ``server_addr`` and ``local_addr`` (where the default handler forwards streams; default
    ``config.local_addr``) are ``"host:port"`` or ``(host, port)``. ``async with`` starts
    nothing; leaving the block cancels a running ``connect_and_run`` and closes the client.
    ``more_tunnels`` (``Tunnel``s) are served on the same connection when the server negotiates
    ``tunnels/1`` (see ``carries_more_tunnels``)."""

    def __init__(self, server_addr: Address, token: str, *, tunnel_id: Optional[str] = None,
                 tls: Union[None, ssl.SSLContext, Transport] = None, server_name: Optional[str] = None,
                 config: ClientConfig = ClientConfig(), local_addr: Optional[Address] = None,
                 more_tunnels: Sequence[Tunnel] = ()) -> None:
        self.host, self.port = as_address(server_addr, "server_addr")
        local = as_address(config.local_addr if local_addr is None else local_addr, "local_addr")
        if local != config.local_addr:
            config = dataclasses.replace(config, local_addr=local)
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        try:
            validate_token_format(token)
        except TokenFormatError as exc:
            raise ValueError(f"invalid client token: {exc}") from None
        self._token = token
        self.tunnel_id = tunnel_id if tunnel_id is not None else _process_tunnel_id()
        self.transport = resolve_transport(tls)
        self.server_name = server_name or self.host
        self.config = config
        if more_tunnels and not config.extensions:
            raise ValueError("more_tunnels need extensions=True (they are registered with the tunnels/1 extension)")
        self._more: Dict[str, Tunnel] = tunnels_by_id(more_tunnels, self.tunnel_id)
        self._instance = new_instance_capability()
        self._hello_config = self._hello()
        #: ``HOST:PORT`` of the server, as it appears in messages.
        self.address = format_address(self.host, self.port)
        self._conn: Optional[ClientConnection] = None
        #: Sessions on a node that is leaving (drain), kept until their streams are done.
        self._retiring: Dict[ClientConnection, None] = {}  # oldest first
        self._on_public_urls: Optional[OnPublicUrls] = None
        self._runs: Set["asyncio.Task[Any]"] = set()  # tasks inside connect_and_run
        #: The default handlers' local connects in flight, all tunnels and sessions of this client.
        self.dial_slots = DialSlots(config.max_connects_in_flight)

    def __repr__(self) -> str:  # the token stays out
        return f"<TunnelClient {self.address} tunnel_id={self.tunnel_id!r}>"

    def _hello(self) -> ClientConfig:
        """The handshake's config: this client's instance id is announced too, and ``tunnels/1``
        with more tunnels (extensions only)."""
        config = self.config
        more = (TUNNELS_CAPABILITY,) if self._more else ()
        return dataclasses.replace(config, capabilities=config.capabilities + (self._instance,) + more) \
            if config.extensions else config

    @property
    def more_tunnels(self) -> Tuple[Tunnel, ...]:
        """The further tunnels this client registers on its connection."""
        return tuple(self._more.values())

    @property
    def carries_more_tunnels(self) -> bool:
        """Whether the live session serves ``more_tunnels`` too (the server answered ``tunnels/1``)."""
        conn = self._conn
        return bool(self._more) and conn is not None and not conn.closed and conn.opened and conn.core.tunnels

    def carry_alone(self) -> None:
        """Serve the handshake's tunnel only from the next connection on (the caller serves the
        others, e.g. on connections of their own, because the server cannot carry them)."""
        self._more = {}
        self._hello_config = self._hello()

    async def __aenter__(self) -> "TunnelClient":
        """Nothing starts here: call ``connect`` or ``connect_and_run`` inside the block."""
        return self

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> None:
        """Cancel every ``connect_and_run`` still running (other than the one this block runs in)
        and wait for it to end, then ``close()``."""
        me = asyncio.current_task()
        runs = [t for t in self._runs if t is not me and not t.done()]
        for task in runs:
            task.cancel()
        try:
            if runs:
                await asyncio.wait(runs)
        finally:
            await self.close()

    @property
    def local_addr(self) -> Tuple[str, int]:
        """Where the default handler forwards each stream (``config.local_addr``)."""
        return self.config.local_addr

    @property
    def session(self) -> Optional[Session]:
        """The live session, if connected."""
        conn = self._conn
        if conn is None or conn.closed:
            return None
        return conn.session

    @property
    def open_streams(self) -> int:
        """Streams open on the live session and on one it replaces (a hand-over's, still in flight)."""
        conns = {c for c in (self._conn, *self._retiring) if c is not None and not c.closed and c.session is not None}
        return sum(c.session.multiplexer.stream_count for c in conns)  # type: ignore[union-attr]

    @property
    def public_urls(self) -> Tuple[str, ...]:
        """Where visitors reach this tunnel, as the server said for the live session: e.g.
        ``("http://web.example.test:8080", "tcp://example.test:9000")``; an ``http://HOST:PORT``
        without the tunnel id in its host name is routed by ``Host: <tunnel id>``. Empty while
        not connected, until the server has said, and with a server that does not (a Rust one,
        or one that knows no public address)."""
        conn = self._conn
        if conn is None or conn.closed or not conn.opened:
            return ()
        return conn.core.public_urls

    @property
    def remote_port(self) -> Optional[int]:
        """The public TCP port the server gave the live session (``ClientConfig(remote_port=)``);
        None while not connected and when none was asked for."""
        conn = self._conn
        return conn.core.negotiated.get("remote_port") if conn is not None and conn.opened and not conn.closed else None

    def report_public_urls(self, conn: ClientConnection) -> None:
        """Hand ``conn``'s public URLs to ``connect_and_run``'s ``on_public_urls`` (once they are
        known and while ``conn`` is the live connection)."""
        hook = self._on_public_urls
        if hook is None or conn is not self._conn or conn.closed or not conn.core.public_urls:
            return
        try:
            hook(conn.core.public_urls)
        except Exception:  # the caller's bug must not end the session
            log.exception("on_public_urls failed")

    def _default_handler(self, config: Optional[ClientConfig] = None) -> StreamHandler:
        addr = (config or self.config).local_addr
        version = (config or self.config).proxy_protocol
        slots = self.dial_slots

        async def handle(stream: VirtualStream) -> None:
            prefix = header_for(version, dict(stream.headers).get(VISITOR_HEADER), addr) if version else b""
            try:
                await forward(stream, addr, wait=False, prefix=prefix, slots=slots)  # the pipe then runs by itself
            except (OSError, TimeoutError):
                pass  # forward() logged it once and reset the stream; no traceback per stream

        return handle

    async def connect(self, handler: Optional[StreamHandler] = None, *, sock: Optional[socket.socket] = None,
                      accept: bool = False) -> Session:
        """One connection and handshake; the session's streams go to ``handler`` (default: forward
        each to ``local_addr``), or with ``accept=True`` to ``session.accept()`` and ``async for
        stream in session``. Raises AuthenticationError, TlsVerificationError,
        HandshakeError (also for a peer that is demonstrably not a tunnel server of the expected
        kind: a TLS answer to a plaintext client, a plaintext or HTTP answer), or a retryable error
        (OSError, ConnectionLostError, RetryableHandshakeError, TimeoutError). Every message names
        the likely cause and the flag that fixes it. With ``sock`` (connected already, e.g. after a
        preamble of the caller's own) the handshake runs on it instead of a new connection."""
        loop = asyncio.get_running_loop()
        if accept and handler is not None:
            raise ValueError("connect(): give a handler or accept=True, not both")
        if not accept:
            handler = handler or self._default_handler()
        more = dict(self._more)
        if more and not accept:
            handler = dispatching_handler(handler, {k: t.handler or self._default_handler(t.config)
                                                    for k, t in more.items()})
        conn: Optional[ClientConnection] = None

        def factory() -> ClientConnection:
            nonlocal conn
            conn = ClientConnection(self, handler, ClientHandshake(self._token, self.tunnel_id, self._hello_config))
            return conn

        ctx = self.transport.client_ssl()
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                if sock is not None:
                    await loop.create_connection(factory, sock=sock, ssl=ctx,
                                                 server_hostname=self.server_name if ctx else None)
                else:
                    await loop.create_connection(factory, self.host, self.port, ssl=ctx,
                                                 server_hostname=self.server_name if ctx else None)
                assert conn is not None
                await conn.ack
                if more and conn.core.tunnels:  # the further tunnels, answered in order
                    conn.registered = await self._register_all(conn, more)
        except BaseException as exc:
            if conn is not None:
                conn.close()
                if conn.ack.done() and not conn.ack.cancelled():
                    conn.ack.exception()  # retrieved: what we raise says it better
            better = explain(self, exc, conn)
            if better is None:
                raise
            raise better from exc
        assert conn is not None
        self._conn = conn
        log.info("connected to %s: session %s, tunnel id %s%s", self.address, conn.session.id,
                 self.tunnel_id, " (flow control)" if conn.core.flow else "")
        return conn.session

    async def _register_all(self, conn: ClientConnection, more: Dict[str, Tunnel]) -> Dict[str, Tuple[str, ...]]:
        """Register each of ``more`` on ``conn``; their public URLs, or the first refusal raised."""
        waiters = conn.register_waiters = RegisterWaiters(conn.loop)
        futures = {key: waiters.expect(key) for key in more}
        for key, t in more.items():
            conn.core.send_register(key, register_protocol(t), register_capabilities(t))
        return {key: await fut for key, fut in futures.items()}

    async def connect_and_run(self, handler: Optional[StreamHandler] = None,
                              on_connected: Optional[OnConnected] = None, *,
                              on_public_urls: Optional[OnPublicUrls] = None,
                              on_registered: Optional[OnRegistered] = None) -> None:
        """Serve streams with ``handler`` (default: forward to ``config.local_addr``), reconnecting
        with backoff after passing failures, until cancelled. Raises AuthenticationError for a
        rejected token, TlsVerificationError for a certificate that fails verification and
        HandshakeError for a version mismatch, a refused tunnel id (e.g. not a DNS label for a
        server with a domain) or a peer that is no tunnel server of the expected kind (see
        ``connect``). ``on_public_urls(urls)`` runs once per session, after ``on_connected``, when
        the server says where visitors reach the tunnel (see ``public_urls``); then
        ``on_registered(tunnel, urls)`` once per tunnel of ``more_tunnels`` the session carries."""
        backoff = Backoff(self.config.backoff)
        # a drain is no failed attempt: its waits grow on their own, never using up max_attempts
        drains = Backoff(dataclasses.replace(self.config.backoff, max_attempts=None))
        suspects, since, quick_drains = 0, 0.0, 0
        self._on_public_urls = on_public_urls
        # no local for the task: a traceback holding this frame would make a cycle through it
        self._runs.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while True:
                try:
                    session = await self.connect(handler)
                except (AuthenticationError, TlsVerificationError) as exc:
                    log.debug("%s", exc)  # raised to the caller, who reports it (the CLI: once)
                    raise
                except _RETRYABLE as exc:
                    if not suspect(exc):
                        suspects = 0
                    else:
                        suspects, since = suspects + 1, since if suspects else time.monotonic()
                    await self._wait_retry(backoff, exc, suspects if time.monotonic() - since >= SUSPECT_WINDOW else 0)
                    continue
                except HandshakeError as exc:
                    if isinstance(exc, RetryableHandshakeError):  # pragma: no cover - caught above
                        continue
                    log.debug("%s", exc)
                    raise
                started = time.monotonic()
                suspects, since = 0, 0.0  # (give-up counts failures in a row: a session broke the row)
                if on_connected is not None:
                    result = on_connected(session)
                    if inspect.isawaitable(result):
                        await result
                conn = self._conn
                if conn is not None and conn.session is session:
                    conn.serving = True
                    self.report_public_urls(conn)
                    for key, urls in conn.registered.items():
                        if on_registered is not None and key in self._more:
                            on_registered(self._more[key], urls)
                moved = await self._until_closed_or_moved(session)
                lived = time.monotonic() - started
                short = lived < backoff.config.stable_after
                if not short:
                    backoff.reset()  # a session that lasted: the delays start over
                    drains.reset()
                    quick_drains = 0
                if moved:  # the server's node is leaving: a new session at once, unless it keeps doing so
                    quick_drains += short
                    if quick_drains <= DRAIN_MOVES_AT_ONCE:
                        continue
                    await self._wait_retry(drains, ConnectionLostError(
                        f"the server sent {quick_drains} sessions in a row away (drain) within "
                        f"{backoff.config.stable_after:g}s of their start"))
                    continue
                conn = self._conn
                reason = conn.close_exc if conn is not None else None
                if short:  # (the delays keep growing: say why)
                    said = describe_error(reason) if reason is not None else "the server ended the session"
                    reason = ConnectionLostError(f"{said} {lived:.1f}s after the handshake")
                await self._wait_retry(backoff, reason or ConnectionLostError("session ended"))
        finally:
            self._runs.discard(asyncio.current_task())  # type: ignore[arg-type]
            for old in list(self._retiring):
                old.close()
            if self._conn is not None:
                self._conn.close()

    async def _until_closed_or_moved(self, session: Session) -> bool:
        """Wait until the session ends (False) or its server node says it is leaving (True: the
        session is retired, see ``_retire``, and the caller connects again at once)."""
        waits = [asyncio.ensure_future(session.closed_event.wait()), asyncio.ensure_future(session.draining.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not session.draining.is_set():
            return False
        conn = self._conn
        streams = len(session.multiplexer)
        log.info("the server at %s is leaving (drain): opening a new session through %s now%s", self.address,
                 self.address, f"; {streams} streams finish on the old one" if streams else "")
        if conn is not None and not conn.closed:
            while len(self._retiring) >= MAX_RETIRING:
                oldest = next(iter(self._retiring))
                log.info("closing a retired session to %s: more than %d are kept", self.address, MAX_RETIRING)
                self._retiring.pop(oldest, None)
                oldest.close()
            self._retiring[conn] = None
            asyncio.get_running_loop().create_task(self._retire(conn))
        return True

    async def _retire(self, conn: ClientConnection) -> None:
        """An old session whose node is leaving: it serves its streams (and any that still arrive
        on it) until a new session is up; then it tells the server it moved, and the server closes
        it once its last stream is done (only the server knows when the last byte went out). It
        is closed here only when the client stops."""
        try:
            while not conn.closed:
                new = self._conn
                if new is not conn and new is not None and not new.closed and new.opened:
                    conn.session.send_drain()
                    await conn.closed_future
                    break
                await asyncio.sleep(RETIRE_POLL)
        finally:
            self._retiring.pop(conn, None)

    def _give_up(self, exc: BaseException, attempts: int) -> HandshakeError:
        """The error that ends ``connect_and_run`` after ``attempts`` suspect failures in a row."""
        if isinstance(exc, RetryableHandshakeError):  # TunnelIdTaken
            said = f" ({exc.reason})" if exc.reason else ""
            return HandshakeError(f"tunnel id {getattr(exc, 'tunnel_id', self.tunnel_id)!r} is held by another "
                                  f"client{said}: refused "
                                  f"{attempts} times in a row; stop that client, or choose another --tunnel-id",
                                  exc.status, exc.reason)
        return HandshakeError(f"{describe_error(exc)} (the same failure {attempts} times in a row: giving up)")

    async def _wait_retry(self, backoff: Backoff, exc: BaseException, suspects: int = 0) -> None:
        """Sleep before the next attempt, saying why (the retry line); raise instead when the
        backoff's attempts are used up, or after ``MAX_SUSPECT_ATTEMPTS`` suspect failures."""
        delay = backoff.next_delay()
        hint = exc.retry_after if isinstance(exc, RetryableHandshakeError) else None
        if hint is not None and delay is not None:  # the server said when (a cluster handover)
            delay = min(delay, hint)
        if delay is None:
            n = backoff.attempts  # (max_attempts counts retries: the first attempt is none)
            raise FerroTunnelError(f"giving up after {n} {'retry' if n == 1 else 'retries'} ({n + 1} attempts) to "
                                   f"reach {self.address}: {describe_error(exc)}") from exc
        if suspects >= MAX_SUSPECT_ATTEMPTS:
            raise self._give_up(exc, suspects) from exc
        # "reconnecting in N.Ns" is part of the output contract (operators' scripts read it)
        log.warning("tunnel to %s: %s; reconnecting in %.1fs", self.address, describe_error(exc), delay)
        await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close the live session (and any retiring one): its streams end with ConnectionLostError.
        A running ``connect_and_run`` would connect again: cancel it (or leave ``async with``)."""
        for old in list(self._retiring):
            old.close()
        if self._conn is not None:
            self._conn.close()
            await asyncio.sleep(0)
