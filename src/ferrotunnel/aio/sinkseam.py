"""The sink seam of ``VirtualStream`` (a mixin): what a consumer that takes a stream's data
directly, a ``StreamSink`` such as a TCP bridge, calls on the stream; and the end of a stream
that nobody closed (``__del__``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .streaminfo import BytesLike, StreamSink

if TYPE_CHECKING:
    from ..protocol.streams import CoreStream
    from .connection import TunnelConnection

__all__ = ["SinkSeam"]

#: Bits of ``VirtualStream._ended``: the peer half-closed; ``close()`` or ``abort()`` was called.
ENDED_EOF, ENDED_CLOSED = 1, 2


class SinkSeam:
    """Sink methods of ``VirtualStream`` (each ``self`` is one)."""

    if not TYPE_CHECKING:  # (no __dict__ for VirtualStream; to mypy the attributes below are its)
        __slots__ = ()
    else:  # VirtualStream's, as these methods use them
        _conn: TunnelConnection
        _st: CoreStream
        _rbuf: Any
        _rsize: int
        _credited: int
        _ended: int
        _exc: Any
        sink: Any

        def _write(self, data: BytesLike, owned: bool) -> None: ...

    def __del__(self) -> None:
        # Collected without close() or abort() (the application let it go): what it held unread
        # went with it, and the stream is abandoned. The session forgets both at the next turn
        # of the loop (not here: a collection may come in the middle of the session's own work).
        try:
            if self._ended & ENDED_CLOSED or self._exc is not None:
                return  # close(), abort() or a reset did the accounting
            st = self._st
            if st.unread or not st.done:
                conn = self._conn
                if not conn.loop.is_closed():  # (a collection may run in any thread)
                    conn.loop.call_soon_threadsafe(conn.stream_abandoned, st)
        except Exception:  # (a stream half made, or the interpreter shutting down)
            pass

    def attach_sink(self, sink: StreamSink, hold: bool = False, deliver: bool = True) -> None:
        """From now on tunnel data, EOF and reset go to ``sink``; what already arrived goes first.

        ``hold=True`` is for a sink that calls ``detach_sink`` whenever it is done with the stream
        (this package's bridges and splices): until then the session holds this stream itself
        instead of a weak reference to it (80 bytes less per piped stream). Otherwise the session
        knows the stream weakly, as without a sink: a stream nobody holds is reset as abandoned.

        ``deliver=False`` only sets the sink: what arrived before waits for ``deliver_buffered``,
        to be called once and before control returns to the event loop (bytes arriving meanwhile
        would reach the sink ahead of the older ones). A sink that writes to another stream sets
        that stream's sink first, so that a wake-up for it while these bytes are handed over
        reaches its sink (see cluster/splice.py)."""
        self.sink = sink
        if hold and self._exc is None:
            self._st.app = self
        if deliver:
            self.deliver_buffered()

    def deliver_buffered(self) -> None:
        """Hand the sink what arrived before it was attached: data, then EOF or the reset."""
        sink = self.sink
        if sink is None:
            return
        try:
            buf = self._rbuf
            if buf:
                self._rbuf = None
                self._rsize = 0
                for chunk in buf:
                    sink.tunnel_data(memoryview(chunk))
                sink.flush_out()
            if self._exc is not None:
                sink.tunnel_reset(self._exc)
            elif self._ended & ENDED_EOF:
                sink.tunnel_eof()
        except Exception as exc:  # the stream ends (as when the sink fails later), and the caller is told
            self._conn.sink_failed(sink, exc, "deliver_buffered", self)  # type: ignore[arg-type]
            raise

    def consumed(self, n: int) -> None:
        """``n`` delivered bytes are gone (the sink wrote them out): the peer may send more."""
        c = self._credited
        if c:  # their credit went back while a read waited for more
            d = c if c < n else n
            self._credited = c - d
            n -= d
            if not n:
                return
        self._conn.consumed(self._st, n)

    def call_sink(self, event: str, *args: Any) -> None:
        """Tell the sink of an ``event`` (``tunnel_eof``, ``tunnel_reset``, ``tunnel_writable``): a
        sink that raises ends this stream only (see ``TunnelConnection.sink_failed``)."""
        sink = self.sink
        try:
            getattr(sink, event)(*args)
        except Exception as exc:
            self._conn.sink_failed(sink, exc, event, self)  # type: ignore[arg-type]

    def abandon_unread(self) -> None:
        """What this stream holds unread will never be read (its sink failed): the session stops
        counting it."""
        self._conn.drop_unread(self._st)

    def defer_flush(self, sink: StreamSink) -> None:
        """Call ``sink.flush_out()`` once the current tunnel read is processed (one write per read)."""
        self._conn.dirty_sinks.append(sink)

    def write_owned(self, data: BytesLike) -> None:
        """``write`` for a caller that gives its buffer up: it is queued without a copy."""
        self._write(data, True)

    def try_send_frame(self, buf: bytearray, n: int) -> bool:
        """The small-write fast path for a payload at ``buf[DATA_HEADER_SIZE:DATA_HEADER_SIZE + n]``
        (room for the header in front): True if it left at once as one frame; ``buf`` is not kept."""
        return self._conn.send_frame_now(self._st, buf, n)

    def request_writable(self) -> None:
        """Have ``sink.tunnel_writable()`` called once the send buffer has room again."""
        self._conn.core.wait_writable(self._st)

    def send_room(self) -> int:
        """Bytes the stream may still take before its writer waits: a sink reads no more than this
        at a time from its source (``bridge.MIN_CAPPED_READ`` at least). The session's room under
        ``session_send_limit``, and with flow control no more than the stream's credit and what
        its ``stream_send_buffer`` has left of payload held for credit: a peer that grants no
        credit then makes a stream hold its buffer and at most one small read, not a whole read
        (up to 1 MiB) beyond it, for each of up to ``max_streams_per_session`` streams."""
        core = self._conn.core
        room = core.send_limit - core.sched.pending_bytes
        if core.flow:
            st = self._st
            own = st.send_credit + core.config.stream_send_buffer - st.pending_bytes
            if own < room:
                return own
        return room
