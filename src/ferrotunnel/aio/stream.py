"""``VirtualStream``: one multiplexed stream in the asyncio streams idiom (seam types: ``streaminfo``)."""

from __future__ import annotations

import asyncio
import collections
import weakref
from typing import TYPE_CHECKING, Any, AsyncIterator, Deque, Iterable, List, Optional, Tuple, Union

from ..errors import FerroTunnelError, LimitExceededError, StreamClosedError
from ..frames import Protocol, StreamPriority
from ..protocol.streams import CoreStream
from .sinkseam import ENDED_CLOSED as _CLOSED, ENDED_EOF as _EOF, SinkSeam
from .streaminfo import BytesLike, StreamSink, check_limit, extra_info, visitor_address

if TYPE_CHECKING:
    from .connection import TunnelConnection
    from .session import Session

__all__ = ["VirtualStream", "StreamSink", "BytesLike", "READ_BUFFER", "SMALL_WRITE", "READ_TO_EOF_LIMIT",
           "READ_LINE_LIMIT"]

#: Default chunk size of ``async for`` on a stream.
READ_BUFFER = 65536
#: ``read()`` (to EOF) raises LimitExceededError beyond this many bytes; per stream
#: ``VirtualStream.read_limit``, per call ``read(limit=)``.
READ_TO_EOF_LIMIT = 16 * 1024 * 1024
#: ``readline``/``readuntil`` give up beyond this many bytes without the separator (asyncio's
#: default); per stream ``VirtualStream.line_limit``, per call ``limit=``.
READ_LINE_LIMIT = 64 * 1024
#: Writes below this size may take the fast path (one frame written at once, payload copied once).
SMALL_WRITE = 16 * 1024


class VirtualStream(SinkSeam):
    """One multiplexed stream: an ``asyncio.StreamReader`` and ``StreamWriter`` in one object.

    ``read()`` reads to EOF (up to ``read_limit``), ``read(n)`` up to ``n`` bytes; ``readexactly``,
    ``readline`` and ``readuntil`` behave as asyncio's. After the peer's half-close reads return
    ``b""``; writing after close raises ``StreamClosedError``; a reset or a lost connection raises
    ``StreamResetError`` (or ``ConnectionLostError``) from every pending and later call.
    """

    # (kept small: many idle streams may be open; _ended has a bit for EOF and one for closed)
    __slots__ = ("_conn", "_st", "_rbuf", "_rsize", "_credited", "_ended", "_exc", "_reader", "_writer",
                 "_peername", "sink", "read_limit", "line_limit", "__weakref__")

    def __init__(self, conn: "TunnelConnection", st: CoreStream) -> None:
        self._conn = conn
        self._st = st
        self._rbuf: Optional[Deque[bytes]] = None
        self._rsize = 0
        self._credited = 0  # buffered bytes whose credit went back already (a read that waits for more)
        self._ended = 0  # _EOF | _CLOSED
        self._exc: Optional[BaseException] = None
        self._reader: Optional[asyncio.Future[None]] = None
        self._writer: Union[None, asyncio.Future[None], List[asyncio.Future[None]]] = None  # a list: several wait
        self._peername: Optional[Tuple[str, int]] = None
        #: The consumer that takes this stream's data directly (a forwarding bridge), if any.
        self.sink: Optional[StreamSink] = None
        #: This stream's cap for ``read()`` to EOF (None: ``READ_TO_EOF_LIMIT``).
        self.read_limit: Optional[int] = None
        #: This stream's cap for ``readline``/``readuntil`` (None: ``READ_LINE_LIMIT``).
        self.line_limit: Optional[int] = None

    # -- identity
    @property
    def stream_id(self) -> int:
        """The stream's id on the wire (odd: opened by the client, even: by the server)."""
        return self._st.id

    @property
    def protocol(self) -> Protocol:
        """The protocol its OpenStream named (``Protocol.TCP`` for most streams)."""
        return self._st.protocol

    @property
    def priority(self) -> StreamPriority:
        """Its priority among the session's streams when frames leave."""
        return self._st.priority

    @property
    def headers(self) -> Tuple[Tuple[str, str], ...]:
        """The (name, value) pairs its OpenStream carried (empty for most streams)."""
        return tuple(self._st.headers)

    @property
    def dialed(self) -> bool:
        """Whether this process dialed the connection carrying it (a client's session, a node's link)."""
        return self._conn.core.is_client

    @property
    def session(self) -> "Session":
        """The session that carries this stream (ConnectionLostError once it is closed and gone)."""
        return self._conn.session

    @property
    def peername(self) -> Optional[Tuple[str, int]]:
        """The visitor's ``(host, port)``: the opener's word, else the ``ft-visitor`` header, else None."""
        return self._peername if self._peername is not None else visitor_address(self._st.headers)

    @peername.setter
    def peername(self, value: Optional[Tuple[str, int]]) -> None:
        self._peername = value

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As ``asyncio.StreamWriter.get_extra_info``: ``"peername"``, ``"tunnel_id"``, ``"session_id"``,
        ``"protocol"``, ``"stream_id"``, ``"priority"``, ``"headers"``; else ``default``."""
        return extra_info(self, name, default)

    def __repr__(self) -> str:
        state = "closed" if self._ended & _CLOSED else ("eof" if self._ended else "open")
        return f"<VirtualStream id={self._st.id} {self._st.protocol.name} {self._st.priority.name} {state}>"

    # -- events from the tunnel connection
    def feed_data(self, payload: memoryview) -> None:
        """Tunnel data for this stream (called by the connection)."""
        if self._ended & _CLOSED:
            self.consumed(len(payload))
            return
        if self._rbuf is None:
            self._rbuf = collections.deque()
        self._rbuf.append(bytes(payload))
        self._rsize += len(payload)
        self._wake_reader()

    def feed_eof(self) -> None:
        """The peer half-closed (called by the connection)."""
        self._ended |= _EOF
        if self.sink is not None:
            self.call_sink("tunnel_eof")
        self._wake_reader()

    def feed_reset(self, exc: BaseException) -> None:
        """The stream was reset or its connection lost (called by the connection)."""
        news = self._exc is None  # (not after our own abort(), whose word to the sink is on its way)
        self._set_exc(exc)
        if news and self.sink is not None:
            self.call_sink("tunnel_reset", exc)
        self._let_go()  # the stream is gone from its session: no cycle with it stays

    def feed_writable(self) -> None:
        """The send buffer has room again (called by the connection)."""
        self._wake_writers()
        if self.sink is not None:
            self.call_sink("tunnel_writable")

    # -- the sink seam (the rest is SinkSeam's)
    def detach_sink(self) -> None:
        """The sink is done: events go to the read buffer again; the session holds the stream weakly."""
        self.sink = None
        self._let_go()

    def _let_go(self) -> None:
        """The session knows this stream weakly again (no cycle with it stays; waiting writers still wake)."""
        st = self._st
        if st.app is self:
            st.app = weakref.ref(self)

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

    async def _wait_more(self) -> None:
        """Wait for more, keeping what is buffered; its credit goes back first (the caller caps it)."""
        n = self._rsize - self._credited
        if n > 0:
            self._credited = self._rsize
            self._conn.consumed(self._st, n)
        await self._wait_readable()

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

    async def read(self, n: int = -1, *, limit: Optional[int] = None) -> bytes:
        """Up to ``n`` bytes, waiting for at least one; ``b""`` at end of stream. Without ``n`` (or
        ``n < 0``): everything up to EOF, as ``asyncio.StreamReader.read()`` — LimitExceededError
        once more than ``limit`` bytes (default ``read_limit``, else ``READ_TO_EOF_LIMIT``) arrived
        before EOF; those bytes stay buffered for ``read(n)``."""
        if n < 0:
            return await self._read_to_eof(limit)
        return await self.read_some(n)

    async def read_some(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of what is buffered (all of it for ``n < 0``), waiting for at least
        one; ``b""`` at end of stream. The read for a consumer that relays chunks as they come."""
        if n == 0:
            return b""
        while True:
            if self._rsize:
                return self._take(n)
            if self._exc is not None:
                raise self._exc
            if self._ended:
                return b""
            await self._wait_readable()

    async def _read_to_eof(self, limit: Optional[int]) -> bytes:
        cap = check_limit(limit if limit is not None else READ_TO_EOF_LIMIT if self.read_limit is None else self.read_limit)
        while True:
            if self._exc is not None:
                raise self._exc
            if self._rsize > cap:
                raise LimitExceededError(f"stream {self._st.id}: more than {cap} bytes before EOF (read()'s limit=, "
                                         f"read_limit or READ_TO_EOF_LIMIT): raise it or read(n) in parts")
            if self._ended:
                return self._take(-1) if self._rsize else b""
            await self._wait_more()

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ``asyncio.IncompleteReadError`` (with the bytes read) if the stream
        ends first."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        parts: List[bytes] = []
        got = 0
        while got < n:
            chunk = await self.read_some(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    async def readuntil(self, separator: bytes = b"\n", *, limit: Optional[int] = None) -> bytes:
        """The bytes up to and including ``separator``, as ``asyncio.StreamReader.readuntil``: at
        EOF before it ``asyncio.IncompleteReadError`` with what was left (``partial``); when it is
        not within ``limit`` bytes (default ``line_limit``, else ``READ_LINE_LIMIT``)
        ``asyncio.LimitOverrunError`` and the bytes stay buffered."""
        if not separator:
            raise ValueError("separator should be at least one-byte string")
        cap = check_limit(limit if limit is not None else READ_LINE_LIMIT if self.line_limit is None else self.line_limit)
        seplen = len(separator)
        offset = 0
        while True:
            buf = self._rbuf
            if buf:
                if len(buf) > 1:
                    whole = b"".join(buf)
                    buf.clear()
                    buf.append(whole)
                data = buf[0]
                at = data.find(separator, offset)
                if at >= 0:
                    if at > cap:
                        raise asyncio.LimitOverrunError("Separator is found, but chunk is longer than limit", at)
                    return self._take(at + seplen)
                offset = max(0, len(data) + 1 - seplen)
                if offset > cap:
                    raise asyncio.LimitOverrunError("Separator is not found, and chunk exceed the limit", offset)
            if self._exc is not None:
                raise self._exc
            if self._ended:
                raise asyncio.IncompleteReadError(self._take(-1) if self._rsize else b"", None)
            await self._wait_more()

    async def readline(self, *, limit: Optional[int] = None) -> bytes:
        """One line with its ``\\n``, or what is left at EOF (``b""`` at EOF), as
        ``asyncio.StreamReader.readline``; a line longer than the limit (see ``readuntil``) is
        dropped and ValueError raised."""
        try:
            return await self.readuntil(b"\n", limit=limit)
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:
            buf = self._rbuf
            if buf and buf[0].startswith(b"\n", exc.consumed):
                self._take(exc.consumed + 1)
            elif self._rsize:
                self._take(-1)
            raise ValueError(f"stream {self._st.id}: {exc.args[0]} (limit=, line_limit or READ_LINE_LIMIT)") from None

    def at_eof(self) -> bool:
        """True once the peer half-closed (or the stream was closed) and nothing is left to read."""
        return bool(self._ended) and not self._rsize

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.read_some(READ_BUFFER)
            if not chunk:
                return
            yield chunk

    # -- writing
    def _check_writable(self) -> None:
        if self._exc is not None:
            raise self._exc
        if self._ended & _CLOSED or self._st.write_shut:
            raise StreamClosedError(f"stream {self._st.id} is closed for writing")

    def write(self, data: BytesLike) -> None:
        """Queue ``data`` (bytes, bytearray or memoryview; copied when it is not bytes) for the
        peer; ``drain()`` waits for room. StreamClosedError after ``write_eof``/``close``."""
        if type(data) is not bytes and not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, bytearray or memoryview, got {type(data).__name__}"
                            f"{' (encode text first, e.g. data.encode())' if isinstance(data, str) else ''}")
        self._write(data, False)

    def _write(self, data: BytesLike, owned: bool) -> None:
        self._check_writable()
        conn = self._conn
        if type(data) is bytes and len(data) < SMALL_WRITE and conn.send_small_now(self._st, data):
            return
        conn.send(self._st, data, owned)

    def write_queued(self, data: BytesLike, owned: bool = False) -> None:
        """``write`` that leaves handing the frames to the transport to ``flush()`` (or the end of
        this event-loop turn): a sink relaying every frame of one tunnel read writes them out at
        once. With ``owned`` the caller gives ``data`` up (a view too) and it is queued without a copy."""
        self._check_writable()
        self._conn.core.send(self._st, data, owned)

    def flush(self) -> None:
        """Hand what ``write_queued`` left to the transport now."""
        self._conn.flush_now()

    def writelines(self, chunks: Iterable[BytesLike]) -> None:
        """``write`` each of ``chunks`` in order."""
        for c in chunks:
            self.write(c)

    def can_write(self) -> bool:
        """Whether the send buffer has room (a ``write`` now would not need a ``drain``)."""
        return self._conn.core.writable(self._st)

    def _wake_writers(self) -> None:
        """Wake every ``drain()``/``wait_closed()`` waiting: each looks again at what it waits for."""
        w, self._writer = self._writer, None
        for fut in () if w is None else w if isinstance(w, list) else (w,):
            if not fut.done():
                fut.set_result(None)

    async def _wait_queue(self, below: Optional[int]) -> None:
        core = self._conn.core
        while True:
            if self._exc is not None:
                raise self._exc
            fut = self._conn.loop.create_future()
            w = self._writer
            self._writer = fut if w is None else [w, fut] if not isinstance(w, list) else w + [fut]
            # One mark per stream in the session, the last asked for, wakes every waiter, each to look
            # again: each asks for its own (one above another's need would wake that one over and over;
            # a drain() behind a wait_closed() may wait for the empty queue, never for ever).
            core.wait_writable(self._st, below)
            try:
                await fut  # (at once if wait_writable woke it)
            finally:
                if fut.cancelled():  # this one leaves unwoken: the others stay
                    w = self._writer
                    if isinstance(w, list) and fut in w:
                        w.remove(fut)
                    self._writer = w if w and w is not fut else None
            if self._exc is not None:
                raise self._exc
            if self._st.done or (core.queued(self._st) < below if below else core.writable(self._st)):
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
        """Always True: a stream can be half-closed."""
        return True

    # -- closing
    def close(self) -> None:
        """Graceful close: queued data is flushed, then CloseStream; later data is discarded. A sink
        is not told (sinks close the streams they are done with; to cut a sink's stream, abort it)."""
        if self._ended & _CLOSED:
            return
        self._ended |= _CLOSED
        if self._rsize:
            # dropped unread, counted as read: a tunnel paused for this buffer (no flow control)
            # resumes, and a stream the session forgot (both halves ended) leaves no count behind
            self.consumed(self._rsize)
        self._rbuf, self._rsize, self._credited = None, 0, 0
        if self._exc is None:
            self._conn.core.close(self._st)
        self._wake_reader()

    def is_closing(self) -> bool:
        """True once ``close`` or ``abort`` was called or the stream was reset."""
        return bool(self._ended & _CLOSED) or self._exc is not None

    async def wait_closed(self) -> None:
        """Wait until everything written (and the CloseStream) went to the transport."""
        if self._exc is not None or self._st.done and not self._conn.core.queued(self._st):
            return
        try:
            await self._wait_queue(1)
        except (StreamClosedError, FerroTunnelError):
            pass

    async def aclose(self) -> None:
        """``close()`` then ``wait_closed()``."""
        self.close()
        await self.wait_closed()

    def abort(self, code: Any = None, message: str = "stream aborted") -> None:
        """Reset now: queued data is dropped and the peer sees a reset (``code``, an ``ErrorCode``, and
        ``message``; EOF for a Rust peer). A sink still attached at the next turn is told (``_tell_sink``)."""
        if self._exc is None:
            core = self._conn.core
            if not core.closed:  # (closing, the session ends each stream: a sink told of one may abort another)
                core.reset(self._st, message, code)
            self._set_exc(exc := StreamClosedError(f"stream {self._st.id} was aborted"))
            if self.sink is not None and not self._conn.loop.is_closed():
                self._conn.loop.call_soon(_tell_sink, weakref.ref(self), self.sink, exc)
        self._ended |= _CLOSED
        self._let_go()

    def _set_exc(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        if self._rsize:
            self.consumed(self._rsize)
        self._rbuf, self._rsize, self._credited = None, 0, 0
        self._wake_reader()
        self._wake_writers()

    @property
    def exception(self) -> Optional[BaseException]:
        """The error that ended the stream (a reset, a lost connection, an abort), or None."""
        return self._exc

    async def __aenter__(self) -> "VirtualStream":
        return self

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> None:
        if e is not None and not isinstance(e, (StreamClosedError, asyncio.CancelledError)):
            self.abort()
        else:
            await self.aclose()


def _tell_sink(ref: "weakref.ref[VirtualStream]", sink: StreamSink, exc: BaseException) -> None:
    """``abort``'s word to a sink, a turn later: a sink may abort its own stream amid its work
    (a bridge finishing, a splice ending, the HTTP ingress refusing a body) and let it go by then;
    told at once, it would be re-entered. The stream is known weakly: one nobody holds is freed
    at once, as any aborted stream, and its sink (which did not hold it) has nothing of it to end."""
    stream = ref()
    if stream is not None and stream.sink is sink:
        stream.call_sink("tunnel_reset", exc)
