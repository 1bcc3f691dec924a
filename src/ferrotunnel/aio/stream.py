"""``VirtualStream``: one multiplexed stream in the asyncio streams idiom, and ``StreamSink``,
the typed seam through which a consumer such as a TCP bridge takes a stream's data directly."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any, AsyncIterator, Deque, List, Optional, Protocol as TypingProtocol, Sequence, Tuple

from ..errors import FerroTunnelError, StreamClosedError
from ..frames import Protocol, StreamPriority
from ..protocol.streams import CoreStream

if TYPE_CHECKING:
    from .connection import TunnelConnection
    from .session import Session

__all__ = ["VirtualStream", "StreamSink", "READ_BUFFER", "SMALL_WRITE"]

#: Default chunk size of ``async for`` on a stream.
READ_BUFFER = 65536
#: Writes below this size may take the fast path (one frame written at once, payload copied once).
SMALL_WRITE = 16 * 1024


class StreamSink(TypingProtocol):
    """Takes a stream's events instead of its read buffer, once ``VirtualStream.attach_sink``
    is called. Tunnel data arrives as views of the tunnel's read buffer: a sink copies what it
    keeps past the call, and returns credit with ``VirtualStream.consumed`` when the bytes are
    gone. ``flush_out`` runs once after each tunnel read that gave it data (see ``defer_flush``)."""

    def tunnel_data(self, payload: memoryview) -> None: ...
    def tunnel_eof(self) -> None: ...
    def tunnel_reset(self, exc: BaseException) -> None: ...
    def tunnel_writable(self) -> None: ...
    def flush_out(self) -> None: ...


class VirtualStream:
    """One multiplexed stream, in the asyncio streams idiom.

    ``read`` returns bytes the caller owns. After the peer's half-close ``read`` returns ``b""``;
    writing after close raises ``StreamClosedError``; a reset or a lost connection raises
    ``StreamResetError`` (or ``ConnectionLostError``) from every pending and later call.
    """

    __slots__ = ("_conn", "_st", "_rbuf", "_rsize", "_eof", "_exc", "_reader", "_writer", "_closed", "sink",
                 "__weakref__")

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
        #: The consumer that takes this stream's data directly (a forwarding bridge), if any.
        self.sink: Optional[StreamSink] = None

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
    def headers(self) -> Tuple[Tuple[str, str], ...]:
        """The (name, value) pairs its OpenStream carried (empty for most streams)."""
        return tuple(self._st.headers)

    @property
    def session(self) -> "Session":
        return self._conn.session

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("eof" if self._eof else "open")
        return f"<VirtualStream id={self._st.id} {self._st.protocol.name} {self._st.priority.name} {state}>"

    # -- events from the tunnel connection
    def feed_data(self, payload: memoryview) -> None:
        if self._closed:
            self.consumed(len(payload))
            return
        if self._rbuf is None:
            self._rbuf = collections.deque()
        self._rbuf.append(bytes(payload))
        self._rsize += len(payload)
        self._wake_reader()

    def feed_eof(self) -> None:
        self._eof = True
        if self.sink is not None:
            self.sink.tunnel_eof()
        self._wake_reader()

    def feed_reset(self, exc: BaseException) -> None:
        self._set_exc(exc)
        if self.sink is not None:
            self.sink.tunnel_reset(exc)

    def feed_writable(self) -> None:
        w = self._writer
        if w is not None and not w.done():
            w.set_result(None)
        if self.sink is not None:
            self.sink.tunnel_writable()

    # -- the sink seam
    def attach_sink(self, sink: StreamSink) -> None:
        """From now on tunnel data, EOF and reset go to ``sink``; what already arrived goes first."""
        self.sink = sink
        buf = self._rbuf
        if buf:
            self._rbuf = None
            self._rsize = 0
            for chunk in buf:
                sink.tunnel_data(memoryview(chunk))
            sink.flush_out()
        if self._exc is not None:
            sink.tunnel_reset(self._exc)
        elif self._eof:
            sink.tunnel_eof()

    def consumed(self, n: int) -> None:
        """``n`` delivered bytes are gone (the sink wrote them out): the peer may send more."""
        self._conn.consumed(self._st, n)

    def defer_flush(self, sink: StreamSink) -> None:
        """Call ``sink.flush_out()`` once the current tunnel read is processed (one write per read)."""
        self._conn.dirty_sinks.append(sink)

    def write_owned(self, data: Any) -> None:
        """``write`` for a caller that gives its buffer up: it is queued without a copy."""
        self._write(data, True)

    def try_send_frame(self, buf: bytearray, n: int) -> bool:
        """The small-write fast path for a payload at ``buf[DATA_HEADER_SIZE:DATA_HEADER_SIZE + n]``
        (room for the header in front): True if it left at once as one frame; ``buf`` is not kept."""
        return self._conn.send_frame_now(self._st, buf, n)

    def request_writable(self) -> None:
        """Have ``sink.tunnel_writable()`` called once the send buffer has room again."""
        self._conn.core.wait_writable(self._st)

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
        self.consumed(k)
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
        if self._closed or self._st.write_shut:
            raise StreamClosedError(f"stream {self._st.id} is closed for writing")

    def write(self, data: Any) -> None:
        self._write(data, False)

    def _write(self, data: Any, owned: bool) -> None:
        self._check_writable()
        conn = self._conn
        if type(data) is bytes and len(data) < SMALL_WRITE and conn.send_small_now(self._st, data):
            return
        conn.send(self._st, data, owned)

    def write_queued(self, data: Any, owned: bool = False) -> None:
        """``write`` that leaves handing the frames to the transport to ``flush()`` (or the end of
        this event-loop turn): a sink relaying every frame of one tunnel read writes them out at
        once. With ``owned`` the caller gives ``data`` up (a view too) and it is queued without a copy."""
        self._check_writable()
        self._conn.core.send(self._st, data, owned)

    def flush(self) -> None:
        """Hand what ``write_queued`` left to the transport now."""
        self._conn.flush_now()

    def writelines(self, chunks: Sequence[Any]) -> None:
        for c in chunks:
            self.write(c)

    def can_write(self) -> bool:
        return self._conn.core.writable(self._st)

    async def _wait_queue(self, below: Optional[int]) -> None:
        core = self._conn.core
        while True:
            if self._exc is not None:
                raise self._exc
            fut = self._conn.loop.create_future()
            self._writer = fut
            core.wait_writable(self._st, below)
            if not fut.done():
                await fut
            self._writer = None
            if self._exc is not None:
                raise self._exc
            if self._st.done or core.queued(self._st) < (below or core.config.stream_send_buffer):
                return

    async def drain(self) -> None:
        """Wait until the stream's send buffer has room (flow control and transport permitting)."""
        if self._exc is not None:
            raise self._exc
        if self._conn.core.writable(self._st):
            return
        await self._wait_queue(None)

    def write_eof(self) -> None:
        """Half-close: the peer reads EOF after everything written so far."""
        if self._exc is not None:
            raise self._exc
        self._conn.core.send_eof(self._st)

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
            self._conn.core.close(self._st)
        self._wake_reader()

    async def wait_closed(self) -> None:
        """Wait until everything written (and the CloseStream) went to the transport."""
        if self._exc is not None or self._st.done and not self._conn.core.queued(self._st):
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
            self._conn.core.reset(self._st)
            self._set_exc(StreamClosedError(f"stream {self._st.id} was aborted"))
        self._closed = True

    def _set_exc(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        if self._rsize:
            self.consumed(self._rsize)
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
