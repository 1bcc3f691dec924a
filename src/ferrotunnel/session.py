"""asyncio adapters: the tunnel connection protocol, ``VirtualStream``, ``Multiplexer``, ``Session``.

One ``TunnelConnection`` (an ``asyncio.BufferedProtocol``) carries one ``SessionCore`` over a TCP
or TLS transport. It reads into buffers from the pool, hands the bytes to the core, and writes
what the core's scheduler drains, only while the transport is not paused, so urgent frames never
queue behind more than one drain budget of bulk data.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Deque, List, Optional, Sequence, Tuple

from ._model import DATA_HEADER_SIZE, Protocol, StreamPriority
from .config import StreamConfig
from .core import CoreStream, SessionCore
from .errors import ConnectionLostError, FerroTunnelError, FrameError, StreamClosedError
from .frames import FrameDecoder, encode_data_header, encode_data_header_into
from .pool import acquire_bytes, release_bytes

__all__ = ["VirtualStream", "Multiplexer", "Session", "TunnelConnection", "StreamHandler"]

log = logging.getLogger("ferrotunnel.session")

StreamHandler = Callable[["VirtualStream"], Awaitable[None]]

READ_BUFFER = 65536  # default chunk size of `async for` on a stream
#: Reads start at this size and grow (up to the configured maximum) while they come back full,
#: and shrink again when they come back mostly empty: small traffic uses small buffers, which
#: the pool keeps, and bulk traffic gets few, large reads.
MIN_READ = 64 * 1024


def adapt_read_size(size: int, got: int, maximum: int) -> int:
    if got >= size // 2 and size < maximum:
        return min(size * 2, maximum)
    if got < size // 16 and size > MIN_READ:
        return max(size // 2, MIN_READ)
    return size
DRAIN_BUDGET = 256 * 1024
#: Writes below this size may take the fast path (one frame written at once, payload copied once).
SMALL_WRITE = 16 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class _ServerTls:
    """TLS over memory BIOs for the server end: the handshake runs inside our own protocol, so it
    counts as a pending handshake, obeys the handshake timeout, never blocks accepting, and each
    failure is seen (and logged) by us. Records are decrypted into pooled buffers."""

    __slots__ = ("obj", "incoming", "outgoing", "established")

    def __init__(self, ctx: Any) -> None:
        import ssl

        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.established = False


class VirtualStream:
    """One multiplexed stream, in the asyncio streams idiom.

    ``read`` returns bytes the caller owns. After the peer's half-close ``read`` returns ``b""``;
    writing after close raises ``StreamClosedError``; a reset or a lost connection raises
    ``StreamResetError`` (or ``ConnectionLostError``) from every pending and later call.
    """

    __slots__ = ("_conn", "_st", "_rbuf", "_rsize", "_eof", "_exc", "_reader", "_writer", "_closed",
                 "_sink", "_sink_owed", "_sink_paused", "__weakref__")

    def __init__(self, conn: "TunnelConnection", st: CoreStream) -> None:
        self._conn = conn
        self._st = st
        self._rbuf: Optional[Deque[bytes]] = None
        self._rsize = 0
        self._eof = False
        self._exc: Optional[BaseException] = None
        self._reader: Optional[asyncio.Future[None]] = None
        self._writer: Optional[asyncio.Future[None]] = None
        self._closed = False
        self._sink: Any = None  # a forwarding target: tunnel data goes straight to its transport
        self._sink_owed = 0
        self._sink_paused = False

    # -- identity
    @property
    def stream_id(self) -> int:
        return self._st.id

    @property
    def protocol(self) -> Protocol:
        return self._st.protocol

    @property
    def priority(self) -> StreamPriority:
        return self._st.priority

    @property
    def session(self) -> "Session":
        return self._conn.session  # type: ignore[return-value]

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("eof" if self._eof else "open")
        return f"<VirtualStream id={self._st.id} {self._st.protocol.name} {self._st.priority.name} {state}>"

    # -- reading
    def _wake_reader(self) -> None:
        w = self._reader
        if w is not None:
            self._reader = None
            if not w.done():
                w.set_result(None)

    async def _wait_readable(self) -> None:
        if self._reader is not None:
            raise RuntimeError("another coroutine is already reading from this stream")
        fut = self._conn.loop.create_future()
        self._reader = fut
        try:
            await fut
        finally:
            self._reader = None

    def _take(self, n: int) -> bytes:
        buf = self._rbuf
        assert buf
        if n < 0 or n >= self._rsize:
            data = buf[0] if len(buf) == 1 else b"".join(buf)
            buf.clear()
        else:
            head = buf[0]
            if len(head) > n:
                data = head[:n]
                buf[0] = head[n:]
            else:
                parts: List[bytes] = []
                got = 0
                while got < n:
                    head = buf[0]
                    if got + len(head) <= n:
                        parts.append(buf.popleft())
                        got += len(head)
                    else:
                        parts.append(head[: n - got])
                        buf[0] = head[n - got:]
                        got = n
                data = b"".join(parts)
        k = len(data)
        self._rsize -= k
        if not buf:
            self._rbuf = None  # an idle stream keeps no buffer
        self._conn.consumed(self._st, k)
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all buffered if n < 0); ``b""`` at end of stream."""
        if n == 0:
            return b""
        while True:
            if self._rsize:
                return self._take(n)
            if self._exc is not None:
                raise self._exc
            if self._eof or self._closed:
                return b""
            await self._wait_readable()

    async def readexactly(self, n: int) -> bytes:
        parts: List[bytes] = []
        got = 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def at_eof(self) -> bool:
        return (self._eof or self._closed) and not self._rsize

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.read(READ_BUFFER)
            if not chunk:
                return
            yield chunk

    # -- writing
    def _check_writable(self) -> None:
        if self._exc is not None:
            raise self._exc
        if self._closed or self._st.eof_requested:
            raise StreamClosedError(f"stream {self._st.id} is closed for writing")

    def write(self, data: Any) -> None:
        self._write(data, False)

    def _write(self, data: Any, owned: bool) -> None:
        # ``owned``: the caller gives the buffer up (it is queued without a copy)
        self._check_writable()
        conn = self._conn
        if type(data) is bytes and len(data) < SMALL_WRITE and conn.send_small_now(self._st, data):
            return
        conn._flush_follows = True
        try:
            conn.score.send(self._st, data, owned)
        finally:
            conn._flush_follows = False
        conn.flush_now()

    def writelines(self, chunks: Sequence[Any]) -> None:
        for c in chunks:
            self.write(c)

    def can_write(self) -> bool:
        return self._conn.score.writable(self._st)

    async def _wait_queue(self, below: Optional[int]) -> None:
        while True:
            if self._exc is not None:
                raise self._exc
            fut = self._conn.loop.create_future()
            self._writer = fut
            self._conn.score.wait_writable(self._st, below)
            if not fut.done():
                await fut
            self._writer = None
            if self._exc is not None:
                raise self._exc
            core = self._conn.score
            if self._st.done or core.queued(self._st) < (below or core.config.stream_send_buffer):
                return

    async def drain(self) -> None:
        """Wait until the stream's send buffer has room (flow control and transport permitting)."""
        if self._exc is not None:
            raise self._exc
        if self._conn.score.writable(self._st):
            return
        await self._wait_queue(None)

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after everything written so far."""
        if self._exc is not None:
            raise self._exc
        self._conn.score.send_eof(self._st)

    def can_write_eof(self) -> bool:
        return True

    # -- closing
    def close(self) -> None:
        """Graceful close: queued data is flushed, then CloseStream; later data is discarded."""
        if self._closed:
            return
        self._closed = True
        self._rbuf = None
        self._rsize = 0
        if self._exc is None:
            self._conn.score.close(self._st)
        self._wake_reader()

    async def wait_closed(self) -> None:
        """Wait until everything written (and the CloseStream) went to the transport."""
        if self._exc is not None or self._st.done and not self._conn.score.queued(self._st):
            return
        try:
            await self._wait_queue(1)
        except (StreamClosedError, FerroTunnelError):
            pass

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    def abort(self) -> None:
        """Reset now: queued data is dropped and the peer sees a reset (EOF for a Rust peer)."""
        if self._exc is None:
            self._conn.score.reset(self._st)
            self._set_exc(StreamClosedError(f"stream {self._st.id} was aborted"))
        self._closed = True

    def _set_exc(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        if self._rsize:
            self._conn.consumed(self._st, self._rsize)
        self._rbuf = None
        self._rsize = 0
        self._wake_reader()
        w = self._writer
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def exception(self) -> Optional[BaseException]:
        return self._exc

    async def __aenter__(self) -> "VirtualStream":
        return self

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> None:
        if e is not None and not isinstance(e, (StreamClosedError, asyncio.CancelledError)):
            self.abort()
        else:
            await self.aclose()


class Multiplexer:
    """The streams of one session. Open streams here or through the ``Session`` shortcuts."""

    def __init__(self, conn: "TunnelConnection") -> None:
        self._conn = conn

    async def open_stream(self, protocol: Protocol = Protocol.TCP,
                          priority: StreamPriority = StreamPriority.NORMAL) -> VirtualStream:
        return self._conn.open_stream(protocol, priority)

    async def open_stream_with_priority(self, protocol: Protocol, priority: StreamPriority) -> VirtualStream:
        return self._conn.open_stream(protocol, priority)

    @property
    def stream_count(self) -> int:
        """Open streams on this session (either side opened)."""
        return len(self._conn.score.streams) if self._conn.core else 0

    def __len__(self) -> int:
        return self.stream_count

    @property
    def flow_control(self) -> bool:
        """Whether per-stream flow control was negotiated with the peer."""
        return bool(self._conn.core and self._conn.score.flow)


class Session:
    """A live tunnel session, on either end."""

    def __init__(self, conn: "TunnelConnection", session_id: uuid.UUID, tunnel_id: str,
                 peer_address: Any, capabilities: Sequence[str]) -> None:
        self._conn = conn
        self.id = session_id
        self.tunnel_id = tunnel_id
        self.peer_address = peer_address
        self.capabilities: Tuple[str, ...] = tuple(capabilities)
        self.connected_at = time.time()
        self.multiplexer = Multiplexer(conn)
        self._accept_queue: Optional[asyncio.Queue[VirtualStream]] = None
        self.closed_event = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Session {self.id} tunnel_id={self.tunnel_id!r} peer={self.peer_address}>"

    @property
    def last_seen(self) -> float:
        """Wall-clock time of the last frame received."""
        core = self._conn.core
        if core is None:
            return self.connected_at
        return time.time() - (time.monotonic() - core.last_seen)

    @property
    def rtt(self) -> Optional[float]:
        """Heartbeat round trip in seconds, from our send time to the ack; None until measured."""
        return self._conn.score.rtt if self._conn.core else None

    @property
    def is_closed(self) -> bool:
        return self._conn.closed

    @property
    def flow_control(self) -> bool:
        return self.multiplexer.flow_control

    async def open_stream(self, protocol: Protocol = Protocol.TCP,
                          priority: StreamPriority = StreamPriority.NORMAL) -> VirtualStream:
        return await self.multiplexer.open_stream(protocol, priority)

    async def open_stream_with_priority(self, protocol: Protocol, priority: StreamPriority) -> VirtualStream:
        return await self.multiplexer.open_stream(protocol, priority)

    async def accept(self) -> VirtualStream:
        """Next stream the peer opened (when no stream handler is set)."""
        if self._accept_queue is None:
            self._accept_queue = asyncio.Queue()
        if self._conn.closed and self._accept_queue.empty():
            raise ConnectionLostError("the session is closed")
        getter = asyncio.ensure_future(self._accept_queue.get())
        closed = asyncio.ensure_future(self.closed_event.wait())
        try:
            await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if getter.done():
            return getter.result()
        getter.cancel()
        raise ConnectionLostError("the session is closed")

    def close(self, exc: Optional[BaseException] = None) -> None:
        """End the session: the connection is closed and every stream ends with an error."""
        self._conn.close(exc)

    async def wait_closed(self) -> None:
        await self.closed_event.wait()


class TunnelConnection(asyncio.BufferedProtocol):
    """The protocol object of one tunnel connection (handshake handled by subclasses)."""

    is_client = False

    def __init__(self, loop: asyncio.AbstractEventLoop, config: StreamConfig, tls: bool = False) -> None:
        self.loop = loop
        self.config = config
        self.transport: Any = None
        self.core: Optional[SessionCore] = None
        self.session: Optional[Session] = None
        self.closed = False
        self.close_exc: Optional[BaseException] = None
        self.peer_address: Any = None
        self._tls = tls
        self._rbuf: Optional[bytearray] = None
        self._flush_scheduled = False
        self._write_paused = False
        self._read_paused = False
        self._eof = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._resume_timer: Optional[asyncio.TimerHandle] = None
        self.stream_handler: Optional[StreamHandler] = None
        self._tasks: set = set()
        self._coalesce = DRAIN_BUDGET + 1 if tls else 16 * 1024
        self._stls: Optional[_ServerTls] = None
        self._rview: Optional[memoryview] = None
        self._dirty_sinks: List[Any] = []
        self._flush_follows = False
        self.closed_future: asyncio.Future[None] = loop.create_future()
        self.handshake_decoder = FrameDecoder(config.max_frame_size)

    @property
    def score(self) -> SessionCore:
        """The session core (streams exist only once it does)."""
        core = self.core
        assert core is not None
        return core

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer_address = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune_socket(sock)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        # Every read takes its buffer from the pool, and the previous one goes back (the loop has
        # released it by now). A payload view that escaped (to a transport that could not send it
        # at once) keeps it exported, and the pool refuses it then, so a buffer someone still reads
        # is never reused. (Measured: a fresh buffer per read beat reading into the same one,
        # 0.66-0.70x vs 0.49-0.56x of a 1:1 relay, 0.8 vs 1.1 CPU s/GB; see bench/e2e.py.)
        # A memoryview, not the bytearray: asyncio's SSL transport reads into slices of what we
        # return, and a bytearray slice would be a copy.
        self._rview = None
        if self._rbuf is not None:
            release_bytes(self._rbuf)
        self._rbuf = buf = acquire_bytes(self.config.read_buffer_size)
        self._rview = view = memoryview(buf)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        data = self._rview[:nbytes]  # type: ignore[index]
        try:
            if self._stls is not None:
                self._tls_received(data)
            else:
                self.data_received_view(data)
        except FrameError as exc:
            log.warning("closing tunnel connection from %s: protocol error: %s", self.peer_address, exc)
            self.close(exc)
        finally:
            data.release()

    # ------------------------------------------------------------------ server-side TLS

    def _tls_received(self, data: memoryview) -> None:
        import ssl

        tls = self._stls
        assert tls is not None
        tls.incoming.write(data)
        if not tls.established:
            try:
                tls.obj.do_handshake()
            except ssl.SSLWantReadError:
                self._tls_send_pending()
                return
            except (ssl.SSLError, OSError) as exc:
                self._tls_send_pending()
                self.tls_failed(exc)
                return
            tls.established = True
            self._tls_send_pending()
        size = self.config.read_buffer_size
        while not self.closed:
            buf = acquire_bytes(size)
            try:
                n = tls.obj.read(size, buf)
            except ssl.SSLWantReadError:
                release_bytes(buf)
                break
            except ssl.SSLZeroReturnError:
                release_bytes(buf)
                self.eof_received()
                break
            except (ssl.SSLError, OSError) as exc:
                release_bytes(buf)
                log.warning("closing TLS connection from %s: %s", self.peer_address, exc)
                self.close(ConnectionLostError(f"TLS error: {exc}"))
                break
            view = memoryview(buf)[:n]
            try:
                self.data_received_view(view)
            finally:
                view.release()
                release_bytes(buf)  # refused by the pool if a payload view escaped
            if n == 0:
                break

    def _tls_send_pending(self) -> None:
        out = self._stls.outgoing.read() if self._stls is not None else b""
        if out and self.transport is not None:
            self.transport.write(out)

    def tls_failed(self, exc: BaseException) -> None:  # pragma: no cover - the server overrides
        self.close()

    def send_raw(self, data: Any) -> None:
        """Write bytes to the peer (through TLS when the server terminates it)."""
        tls = self._stls
        if tls is None:
            self.transport.write(data)
            return
        view = memoryview(data)
        while view:
            n = tls.obj.write(view)
            view = view[n:]
        self._tls_send_pending()

    def _return_buffer(self) -> None:
        self._rview = None
        if self._rbuf is not None:
            release_bytes(self._rbuf)
            self._rbuf = None

    def data_received_view(self, data: memoryview) -> None:
        core = self.core
        if core is None:
            self.handshake_data(data)
            return
        now = time.monotonic()
        self._flush_follows = True
        try:
            core.receive(data, now)
        finally:
            self._flush_follows = False
        sinks = self._dirty_sinks
        if sinks:
            # every forwarding target written once per read (one writev), not once per frame
            self._dirty_sinks = []
            for sink in sinks:
                sink.flush_out()
        self._after_receive(now)
        if core.has_output and not self._write_paused:
            self._flush()  # acks and credit now, not an event-loop turn later

    def _after_receive(self, now: Optional[float] = None) -> None:
        core = self.core
        if core is None or self._read_paused or self.closed:
            return
        if now is None:
            now = time.monotonic()
        if core.reading_blocked or core.throttle_until > now:
            self._pause_reading(now)
            if core.throttle_until > now and self._resume_timer is None:
                self._resume_timer = self.loop.call_later(core.throttle_until - now, self._maybe_resume)

    def _pause_reading(self, now: float) -> None:
        if not self._read_paused and not self._eof:
            self._read_paused = True
            self.transport.pause_reading()
            if self.core:
                self.core.reading_paused(now)

    def _maybe_resume(self) -> None:
        self._resume_timer = None
        core = self.core
        if not self._read_paused or core is None or self.closed or self._eof:
            return
        now = time.monotonic()
        if core.reading_blocked:
            return
        if core.throttle_until > now:
            self._resume_timer = self.loop.call_later(core.throttle_until - now, self._maybe_resume)
            return
        self._read_paused = False
        core.reading_resumed(now)
        self.transport.resume_reading()  # never after EOF: guarded above (uvloop aborts otherwise)

    def consumed(self, st: CoreStream, n: int) -> None:
        core = self.core
        if core is None:
            return
        core.consumed(st, n)
        if self._read_paused and not core.reading_blocked:
            self._maybe_resume()

    def eof_received(self) -> Optional[bool]:
        self._eof = True
        self.close(ConnectionLostError("the peer closed the tunnel connection"))
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._eof = True
        self.transport_closed(exc)
        self._return_buffer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flush()

    # ------------------------------------------------------------------ output

    def on_output(self) -> None:
        if self._flush_follows:
            return  # the caller flushes as soon as the core returns
        if not self._flush_scheduled and not self._write_paused and not self.closed:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _may_send_now(self, st: CoreStream, n: int) -> bool:
        # the small-write fast path: see SessionCore.send_now (never while the transport pushes back)
        core = self.core
        return core is not None and not self._write_paused and not self.closed and core.send_now(st, n)

    def send_frame_now(self, st: CoreStream, buf: bytearray, n: int) -> bool:
        """Fast path for a small read from a forwarded connection: ``buf`` holds the payload at
        ``[DATA_HEADER_SIZE:DATA_HEADER_SIZE + n]`` with room for the header in front. If nothing
        is queued, the frame is written at once, as one buffer, and True is returned; ``buf`` is
        not kept. Otherwise False, and nothing happened."""
        if not self._may_send_now(st, n):
            return False
        encode_data_header_into(buf, 0, st.id, n)
        self.send_raw(buf[:n + DATA_HEADER_SIZE])  # a copy: the read buffer goes straight back
        return True

    def send_small_now(self, st: CoreStream, data: bytes) -> bool:
        """``send_frame_now`` for a small ``bytes`` payload written through the stream API."""
        if not self._may_send_now(st, len(data)):
            return False
        self.send_raw(encode_data_header(st.id, len(data)) + data)
        return True

    def flush_now(self) -> None:
        """Hand queued frames to the transport now (latency) instead of at the next loop turn."""
        core = self.core
        if core is not None and core.has_output and not self._write_paused and not self.closed:
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        core = self.core
        if core is None or self.closed:
            return
        transport = self.transport
        while core.has_output and not self._write_paused:
            bufs = core.data_to_send(DRAIN_BUDGET, self._coalesce)
            if self._stls is not None:
                for b in bufs:
                    self.send_raw(b)
            elif len(bufs) == 1:
                transport.write(bufs[0])
            else:
                transport.writelines(bufs)

    # ------------------------------------------------------------------ session setup and timers

    def start_session(self, core: SessionCore, session: Session) -> None:
        # bytes already buffered behind the handshake stay in order: the core keeps our decoder
        core.decoder = self.handshake_decoder
        self.core = core
        self.session = session
        self._schedule_timer(core.tick(time.monotonic()))
        self._flush()

    def dispatch_pipelined(self, frames: Sequence[Any]) -> None:
        """Frames that arrived in the same read as the handshake, in order."""
        core = self.score
        now = time.monotonic()
        for frame in frames:
            core.dispatch(frame, now)
        self._after_receive()

    def _schedule_timer(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        core = self.core
        if core is None or self.closed:
            return
        try:
            deadline = core.tick(time.monotonic())
        except FerroTunnelError as exc:
            log.warning("session %s (%s): %s; closing", self.session and self.session.id, self.peer_address, exc)
            self.close(exc)
            return
        self._schedule_timer(deadline)

    def handshake_data(self, data: memoryview) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    # ------------------------------------------------------------------ streams

    def open_stream(self, protocol: Protocol, priority: StreamPriority) -> VirtualStream:
        core = self.core
        if core is None or self.closed:
            raise ConnectionLostError("the session is not connected")
        st = core.open_stream(protocol, priority)
        vs = VirtualStream(self, st)
        st.app = vs
        return vs

    # CoreListener
    def on_stream_opened(self, st: CoreStream) -> None:
        vs = VirtualStream(self, st)
        st.app = vs
        log.debug("stream %d opened by peer (%s, %s)", st.id, st.protocol.name, st.priority.name)
        handler = self.stream_handler
        if handler is not None:
            task = self.loop.create_task(self._run_handler(handler, vs))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif self.session is not None:
            if self.session._accept_queue is None:
                self.session._accept_queue = asyncio.Queue()
            self.session._accept_queue.put_nowait(vs)

    async def _run_handler(self, handler: StreamHandler, vs: VirtualStream) -> None:
        try:
            await handler(vs)
        except asyncio.CancelledError:
            vs.abort()
            raise
        except (StreamClosedError, ConnectionLostError) as exc:
            log.debug("stream %d handler ended: %s", vs.stream_id, exc)
            vs.abort()
        except Exception:
            log.exception("stream %d handler failed; resetting the stream", vs.stream_id)
            vs.abort()
        else:
            if vs._sink is None:
                await vs.aclose()

    def on_stream_data(self, st: CoreStream, payload: memoryview) -> None:
        vs: VirtualStream = st.app
        sink = vs._sink
        if sink is not None:
            sink.tunnel_data(payload)
            return
        if vs._closed:
            self.consumed(st, len(payload))
            return
        if vs._rbuf is None:
            vs._rbuf = collections.deque()
        vs._rbuf.append(bytes(payload))
        vs._rsize += len(payload)
        vs._wake_reader()

    def on_stream_eof(self, st: CoreStream) -> None:
        vs: VirtualStream = st.app
        vs._eof = True
        if vs._sink is not None:
            vs._sink.tunnel_eof()
        vs._wake_reader()

    def on_stream_reset(self, st: CoreStream, exc: Exception) -> None:
        vs: Optional[VirtualStream] = st.app
        if vs is None:
            return
        vs._set_exc(exc)
        if vs._sink is not None:
            vs._sink.tunnel_reset(exc)

    def on_stream_writable(self, st: CoreStream) -> None:
        vs: Optional[VirtualStream] = st.app
        if vs is None:
            return
        w = vs._writer
        if w is not None and not w.done():
            w.set_result(None)
        if vs._sink is not None:
            vs._sink.tunnel_writable()

    def on_session_error(self, exc: Exception) -> None:
        log.warning("session %s: %s", self.session and self.session.id, exc)
        self.close(exc)

    # ------------------------------------------------------------------ closing

    def close(self, exc: Optional[BaseException] = None) -> None:
        """Close the connection; every stream ends with ``exc`` (or ConnectionLostError)."""
        if self.closed:
            return
        if self.core is not None and self.core.has_output and self.transport is not None and exc is None:
            self._flush()
        self.closed = True
        self.close_exc = exc
        if self.transport is not None:
            self.transport.close()
        self.transport_closed(exc)

    def transport_closed(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        if self.close_exc is None:
            self.close_exc = exc
        for h in (self._timer, self._resume_timer):
            if h is not None:
                h.cancel()
        self._timer = self._resume_timer = None
        core = self.core
        if core is not None and not core.closed:
            core.connection_lost(exc if isinstance(exc, Exception) else None)
        if self.session is not None:
            self.session.closed_event.set()
        if not self.closed_future.done():
            self.closed_future.set_result(None)
        self.on_closed()

    def on_closed(self) -> None:
        """Hook for the server and client."""


def _tune_socket(sock: Any) -> None:
    import socket

    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    except OSError:  # not fatal: a socket type without these options
        pass
