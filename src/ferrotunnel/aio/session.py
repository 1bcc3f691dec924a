"""The facades of a live tunnel session: ``Session``, its ``Multiplexer`` and ``SessionStats``."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Deque, Optional, Sequence, Tuple

from ..errors import ConnectionLostError
from ..frames import Protocol, StreamPriority
from ..protocol.tunnels import TUNNEL_HEADER
from .connection import OPEN, TunnelConnection
from .stream import VirtualStream

__all__ = ["Session", "TunnelAlias", "Multiplexer", "SessionStats"]



@dataclass(frozen=True)
class SessionStats:
    """Traffic of one session's tunnel connection so far."""

    frames_in: int
    bytes_in: int
    frames_out: int
    bytes_out: int
    streams: int
    rtt: Optional[float]


class _StreamOpener:
    """``open_stream`` in its three spellings, over one ``open_stream_nowait``."""

    _conn: TunnelConnection

    def open_stream_nowait(self, protocol: Protocol = Protocol.TCP,
                           priority: StreamPriority = StreamPriority.NORMAL,
                           headers: Sequence[Tuple[str, str]] = (), *,
                           peername: Optional[Tuple[str, int]] = None) -> VirtualStream:
        """Open a stream now (the OpenStream frame is queued, carrying ``headers``: name/value
        pairs the peer reads as ``VirtualStream.headers``); ConnectionLostError if the session is
        not connected, LimitExceededError at ``max_streams_per_session``. ``peername`` (the
        visitor's address, if the caller knows it) is what ``get_extra_info("peername")`` says
        on this end."""
        stream = self._conn.open_stream(protocol, priority, tuple(headers))
        if peername is not None:
            stream.peername = peername
        return stream

    async def open_stream(self, protocol: Protocol = Protocol.TCP,
                          priority: StreamPriority = StreamPriority.NORMAL) -> VirtualStream:
        """``open_stream_nowait`` as a coroutine (the frame is queued; nothing waits for the peer)."""
        return self.open_stream_nowait(protocol, priority)

    async def open_stream_with_priority(self, protocol: Protocol, priority: StreamPriority) -> VirtualStream:
        """``open_stream(protocol, priority)``: the spelling of the Rust API."""
        return self.open_stream_nowait(protocol, priority)


class Multiplexer(_StreamOpener):
    """The streams of one session. Open streams here or through the ``Session`` shortcuts."""

    def __init__(self, conn: TunnelConnection) -> None:
        self._conn = conn

    @property
    def stream_count(self) -> int:
        """Open streams on this session (either side opened)."""
        return len(self._conn.core.streams) if self._conn.opened else 0

    def __len__(self) -> int:
        return self.stream_count

    @property
    def flow_control(self) -> bool:
        """Whether per-stream flow control was negotiated with the peer."""
        return self._conn.opened and self._conn.core.flow


class Session(_StreamOpener):
    """A live tunnel session, on either end."""

    def __init__(self, conn: TunnelConnection, session_id: uuid.UUID, tunnel_id: str,
                 peer_address: Any, capabilities: Sequence[str]) -> None:
        self._conn = conn
        self.id = session_id
        self.tunnel_id = tunnel_id
        self.peer_address = peer_address
        self.capabilities: Tuple[str, ...] = tuple(capabilities)
        self.connected_at = time.time()
        self.multiplexer = Multiplexer(conn)
        self._accept_queue: Optional[Deque[VirtualStream]] = None
        #: The ``accept()`` callers waiting, first come first served: each queued stream wakes one.
        self._accept_waiters: Deque[asyncio.Future[None]] = collections.deque()
        self.closed_event = asyncio.Event()
        #: The drain extension. Client side: set when the server said its node is leaving (the
        #: client opens a new session and lets this one's streams finish). Server side: ``moved``
        #: is set when the client, asked to leave, said its new session is up.
        self.draining = asyncio.Event()
        self.moved = asyncio.Event()

    @property
    def primary(self) -> "Session":
        """The session whose handshake opened the connection: itself (see ``TunnelAlias``; a
        property, so that a session holds no reference to itself)."""
        return self

    def alias(self, session_id: uuid.UUID, tunnel_id: str, capabilities: Sequence[str]) -> "TunnelAlias":
        """Another tunnel id served on this session's connection (the tunnels extension)."""
        return TunnelAlias(self, session_id, tunnel_id, capabilities)

    def __repr__(self) -> str:
        return f"<Session {self.id} tunnel_id={self.tunnel_id!r} peer={self.peer_address}>"

    @property
    def connection(self) -> TunnelConnection:
        """The tunnel connection carrying this session."""
        return self._conn

    @property
    def established(self) -> bool:
        """The handshake completed and the session has not closed: streams can be opened."""
        return self._conn.phase is OPEN

    @property
    def last_seen(self) -> float:
        """Wall-clock time of the last frame received."""
        if not self._conn.opened:
            return self.connected_at
        return time.time() - (time.monotonic() - self._conn.core.last_seen)

    def silent_for(self, now: float) -> float:
        """Seconds (monotonic ``now``) since the peer's last frame, not counting time we paused reading."""
        if not self._conn.opened:
            return 0.0
        return self._conn.core.keepalive.silent_for(now)

    @property
    def rtt(self) -> Optional[float]:
        """Heartbeat round trip in seconds, from our send time to the ack; None until measured."""
        return self._conn.core.rtt if self._conn.opened else None

    @property
    def is_closed(self) -> bool:
        """The session ended (its connection is closed)."""
        return self._conn.closed

    @property
    def flow_control(self) -> bool:
        """Whether per-stream flow control was negotiated with the peer."""
        return self.multiplexer.flow_control

    def stats(self) -> SessionStats:
        """Frames and bytes each way, open streams and the heartbeat round trip, so far."""
        if not self._conn.opened:
            return SessionStats(0, 0, 0, 0, 0, None)
        core = self._conn.core
        return SessionStats(core.frames_in, core.bytes_in, core.sched.drained_frames, core.sched.drained_bytes,
                            len(core.streams), core.rtt)

    def enqueue_accepted(self, stream: VirtualStream) -> bool:
        """A stream the peer opened, for ``accept()`` (when no stream handler is set). False when
        ``max_accept_queue`` streams already wait (streams reset while waiting do not count)."""
        queue = self._accept_queue
        if queue is None:
            queue = self._accept_queue = collections.deque()
        limit = self._conn.config.max_accept_queue
        if len(queue) >= limit:
            for dead in [s for s in queue if s.exception is not None]:
                queue.remove(dead)  # reset before anyone accepted it: nothing of it stays
            if len(queue) >= limit:
                return False
        queue.append(stream)
        self._wake_acceptor()
        return True

    def _wake_acceptor(self) -> None:
        """Wake the caller of ``accept()`` that waits longest (a stream waits for it)."""
        waiters = self._accept_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def accept(self) -> VirtualStream:
        """Next stream the peer opened (when no stream handler is set). Several callers may wait
        at once: each stream goes to one of them, the one that waited longest."""
        while True:
            queue = self._accept_queue
            while queue:
                stream = queue.popleft()
                if stream.exception is None:  # one reset before it was accepted is dropped
                    return stream
            if self._conn.closed:
                raise ConnectionLostError("the session is closed")
            waiter = self._conn.loop.create_future()
            self._accept_waiters.append(waiter)
            closed = asyncio.ensure_future(self.closed_event.wait())
            try:
                await asyncio.wait({waiter, closed}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                if waiter.done() and self._accept_queue:
                    # woken for a stream, then cancelled before taking it: the next caller takes it
                    self._wake_acceptor()
                raise
            finally:
                closed.cancel()
                if not waiter.done():
                    self._accept_waiters.remove(waiter)

    def send_drain(self) -> bool:
        """The drain extension. Server side: tell the client this node is leaving, so that it opens
        a new session now. Client side: tell the server the new session is up (after it asked).
        False when the peer did not negotiate it, the session is closed, or nobody asked."""
        return self.established and self._conn.core.send_drain()

    def close(self, exc: Optional[BaseException] = None, *, tell_peer: bool = False) -> None:
        """End the session: the connection is closed and every stream ends with an error. With
        ``tell_peer``, the peer is sent ``exc``'s message first, so that it can say why."""
        if tell_peer and exc is not None and self.established:
            self._conn.core.send_goodbye(str(exc))
            self._conn.flush_now()
        self._conn.close(exc)

    async def wait_closed(self) -> None:
        """Wait until the session ended."""
        await self.closed_event.wait()

    def __aiter__(self) -> AsyncIterator[VirtualStream]:
        """``async for stream in session``: each stream the peer opens (see ``accept``), until the
        session closes. RuntimeError for a session whose streams go to a stream handler."""
        if self._conn.stream_handler is not None:
            raise RuntimeError("the streams of this session go to its stream handler, not to accept(): iterate a "
                               "session without one (TunnelServer(stream_handler=None), "
                               "TunnelClient.connect(accept=True))")
        return self._streams()

    async def _streams(self) -> AsyncIterator[VirtualStream]:
        while True:
            try:
                stream = await self.accept()
            except ConnectionLostError:
                return
            yield stream


class TunnelAlias(Session):
    """A further tunnel id on a session's connection (server side of the tunnels extension): a
    ``Session`` of its own for the registry, routes and access rules (``capabilities`` are the
    ones its Register carried), sharing the connection, its events and its streams with
    ``primary``. Each stream it opens carries ``("ft-tunnel", tunnel_id)``. Closing it closes the
    connection (the client then connects again and registers every tunnel anew); its traffic
    counts in ``primary``'s stats."""

    def __init__(self, primary: Session, session_id: uuid.UUID, tunnel_id: str,
                 capabilities: Sequence[str]) -> None:
        super().__init__(primary.connection, session_id, tunnel_id, primary.peer_address, capabilities)
        self._primary = primary
        self.multiplexer = _AliasMultiplexer(self)
        self.closed_event, self.draining, self.moved = primary.closed_event, primary.draining, primary.moved
        self._tunnel_header = ((TUNNEL_HEADER, tunnel_id),)

    @property
    def primary(self) -> Session:
        """The session whose handshake opened the connection."""
        return self._primary

    def __repr__(self) -> str:
        return f"<TunnelAlias {self.id} tunnel_id={self.tunnel_id!r} of {self.primary.id}>"

    def open_stream_nowait(self, protocol: Protocol = Protocol.TCP,
                           priority: StreamPriority = StreamPriority.NORMAL,
                           headers: Sequence[Tuple[str, str]] = (), *,
                           peername: Optional[Tuple[str, int]] = None) -> VirtualStream:
        """``Session.open_stream_nowait``, the stream naming this tunnel in its headers."""
        return super().open_stream_nowait(protocol, priority, self._tunnel_header + tuple(headers), peername=peername)

    def stats(self) -> SessionStats:
        """No traffic of its own: the connection's counts (streams too) are ``primary``'s."""
        return SessionStats(0, 0, 0, 0, 0, self.rtt)

    def send_drain(self) -> bool:
        """The primary session tells the client (once per connection)."""
        return False

    async def accept(self) -> VirtualStream:
        """Streams the client opens go to the primary session."""
        raise RuntimeError("streams the client opens arrive at the primary session of the connection")


class _AliasMultiplexer(Multiplexer):
    """A ``TunnelAlias``'s multiplexer: streams opened here name the alias's tunnel too; the
    count is the connection's (as ``primary.multiplexer`` says)."""

    def __init__(self, alias: TunnelAlias) -> None:
        super().__init__(alias.connection)
        self._tunnel_header = ((TUNNEL_HEADER, alias.tunnel_id),)  # (no reference back: no cycle)

    def open_stream_nowait(self, protocol: Protocol = Protocol.TCP,
                           priority: StreamPriority = StreamPriority.NORMAL,
                           headers: Sequence[Tuple[str, str]] = (), *,
                           peername: Optional[Tuple[str, int]] = None) -> VirtualStream:
        """``Multiplexer.open_stream_nowait``, the stream naming the alias's tunnel."""
        return super().open_stream_nowait(protocol, priority, self._tunnel_header + tuple(headers), peername=peername)
