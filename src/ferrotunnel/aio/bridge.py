"""Byte pipes between a virtual stream and a TCP connection, protocol to protocol.

No coroutine per chunk: tunnel data is written straight to the TCP transport from the tunnel's
read callback, TCP data goes straight into the stream's send queue, and each direction pushes
back on the other (``pause_reading`` / credit), with half-close carried through.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, Dict, Optional

from ..errors import FerroTunnelError, StreamClosedError
from ..frames import DATA_HEADER_SIZE
from ..pool import acquire_bytes, release_bytes
from .listen import ConnectionGate
from .stream import VirtualStream
from .readsize import MIN_READ, adapt_read_size  # noqa: F401  (MIN_READ: as before, from here too)
from .sweeper import IDLE_TICKS, IdleSweeper  # noqa: F401  (IDLE_TICKS: as before, from here too)
from .transport import is_loopback_peer, tune_socket

#: Smallest read from a forwarded TCP connection while its session is near ``session_send_limit``
#: (reads are cut to the room left; a writer over the limit then waits, so one read is all it adds).
MIN_CAPPED_READ = 16 * 1024
#: Largest read from a forwarded TCP connection (reads adapt between MIN_READ and this).
BRIDGE_READ_SIZE = 1024 * 1024
#: A forwarded connection's first read size (a read that fills half of it makes the next ones
#: BRIDGE_READ_SIZE: aio/readsize.py).
BRIDGE_FIRST_READ = 256 * 1024
#: Reads at least this big are handed to the tunnel as they are (no copy); smaller ones are copied
#: so the read buffer goes straight back.
OWN_THRESHOLD = 16 * 1024

__all__ = ["TcpBridge", "IdleSweeper"]  # (forward: aio/dial.py)

#: Bridges piping a stream, held here until they finish. Nothing else need hold one: a bridge
#: whose TCP side is paused (waiting for credit) with nothing to write is let go by the event loop,
#: and a session need not hold its streams (it knows them weakly, except while a sink holds one:
#: ``attach_sink(hold=True)``), so without this the bridge, its stream and the transfer could be
#: collected in the middle. A finished bridge leaves, and is freed by reference counting. A
#: bridge in an idle sweeper is held by the sweeper instead (see sweeper.py).
_PIPING: "set[TcpBridge]" = set()

# TcpBridge._flags: what was one bool attribute each (an idle bridge is ~1,000 bytes of loop
# transport and this object; each attribute is 8 bytes of it).
_TCP_EOF = 1         # the TCP side finished sending (we half-closed the stream)
_TUNNEL_EOF = 2      # the stream finished (we half-closed the TCP side)
_FINISHED = 4
_READING_PAUSED = 8  # we paused the TCP side's reading (waiting for credit)
_OUT_PAUSED = 16     # the TCP side pushes back: credit for what we wrote waits
_GATED = 32          # counted by ``gate`` (under the host of ``peer_address``): leave it once
_TICK_SHIFT = 8
_TICK = 1 << _TICK_SHIFT  # one idle sweep without traffic (``idle_tick``); traffic clears them
_NO_TICKS = _TICK - 1

#: The ``done`` futures of bridges someone waits for (made only then; removed when they finish).
_WAITED: "Dict[TcpBridge, asyncio.Future[None]]" = {}


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends RST

log = logging.getLogger("ferrotunnel.forward")


class TcpBridge(asyncio.BufferedProtocol):
    """Joins one TCP connection and one ``VirtualStream``; ``done`` resolves when both ends finish.

    The TCP side is read into pooled buffers taken only when data is there (an idle connection
    holds none); a big read goes into the stream's send queue without being copied.

    An idle bridge is kept small: its flags are bits of one int, the lists it uses exist only
    while they hold something, and it defines no ``data_received`` (an event loop keeps a bound
    method of each of ``data_received``, ``get_buffer`` and ``buffer_updated`` that the protocol
    has, per connection). A subclass may define ``data_received``: reads that are copied go to it.
    """

    __slots__ = ("stream", "transport", "_flags", "sweeper", "bytes_up", "bytes_down",
                 "_outq", "_rbuf", "_read_size", "_owed", "gate", "peer_address")

    def __init__(self, stream: Optional[VirtualStream] = None) -> None:
        self.stream = stream
        self.transport: Any = None
        self._flags = 0  # the bits below _TICK, and above them the sweeps without traffic in a row
        self._owed = 0              # tunnel bytes written while paused, credited on resume
        self.gate: Optional[ConnectionGate] = None  # set by an ingress: connection caps
        self.peer_address: Any = None  # the visitor's address (set first when a PROXY header named it)
        self.sweeper: Optional[IdleSweeper] = None
        self.bytes_up = 0
        self.bytes_down = 0
        # Before a stream is attached: the TCP bytes read so far (kept until it is). After: the
        # tunnel payloads waiting for this read's single writev. None while there are none.
        self._outq: Optional[list] = None
        self._rbuf: Optional[bytearray] = None
        self._read_size = BRIDGE_FIRST_READ  # grows while reads come back full, shrinks while small

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        received = getattr(cls, "data_received", None)
        if received is not None:  # a subclass that takes the copied reads itself
            cls._received = received  # type: ignore[method-assign]

    def _received(self, data: bytes) -> None:
        """A copied read (no ``data_received``): to the stream."""
        self._to_tunnel(data, False)

    @property
    def done(self) -> "asyncio.Future[None]":
        fut = _WAITED.get(self)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            if self._flags & _FINISHED:
                fut.set_result(None)
            else:
                _WAITED[self] = fut
        return fut

    @property
    def finished(self) -> bool:
        return bool(self._flags & _FINISHED)

    @property
    def _reading_paused(self) -> bool:  # (for a subclass: reading waits for the stream's credit)
        return bool(self._flags & _READING_PAUSED)

    @_reading_paused.setter
    def _reading_paused(self, paused: bool) -> None:
        self._flags = self._flags | _READING_PAUSED if paused else self._flags & ~_READING_PAUSED

    def idle_tick(self) -> int:
        """One sweep without traffic; returns how many in a row. A read buffer taken for a read
        that found nothing goes now (the loop asks for one before every read)."""
        if self._rbuf is not None:
            self._drop_read_buffer()
        flags = self._flags
        self._flags = flags + _TICK
        return flags >> _TICK_SHIFT

    def abort(self, reset_peer: bool = True) -> None:
        """End both sides now: the stream is reset and the TCP connection aborted, with an RST
        unless ``reset_peer`` is False (an idle timeout cut nothing)."""
        self._finish(abort=True, rst=reset_peer)

    def close(self) -> None:
        """End both sides gracefully: the TCP side is flushed and closed, the stream closed."""
        self._finish(abort=False)

    def hold_reading(self) -> None:
        """Stop reading the TCP side until ``release_reading`` (while no stream is attached)."""
        self.transport.pause_reading()
        # uvloop starts reading after connection_made returns, undoing a pause made in it: again
        # at the next loop turn, before the loop polls for I/O
        asyncio.get_running_loop().call_soon(self._hold_again)

    def _hold_again(self) -> None:
        if self.stream is None and not self._flags & _FINISHED:
            self.transport.pause_reading()

    def release_reading(self) -> None:
        if not self._flags & (_FINISHED | _TCP_EOF | _READING_PAUSED):
            self.transport.resume_reading()

    # -- for subclasses that move a connection between streams (the HTTP ingress)
    def to_tunnel(self, data: Any) -> None:
        """Send visitor bytes (a copy or a buffer not reused) to the current stream."""
        self._to_tunnel(data, False)

    def detach(self) -> None:
        """Let the current stream go: what was queued for the TCP side is written, credit owed is
        given back, the stream is closed gracefully and whatever it still sends is discarded.
        The TCP side stays; ``attach`` may join it to another stream."""
        stream = self.stream
        if stream is None:
            return
        self.flush_out()
        self._give_back()
        stream.detach_sink()
        _PIPING.discard(self)
        stream.close()
        self.stream = None
        self._flags &= ~(_TUNNEL_EOF | _READING_PAUSED)

    def release_read_buffer(self) -> None:
        """No more reads will come (an EOF kept back by a subclass): the pooled buffer goes back."""
        self._drop_read_buffer()

    # -- wiring
    def attach(self, stream: VirtualStream) -> None:
        """Start piping (called once both the transport and the stream exist)."""
        if self._flags & _FINISHED:  # the TCP side is gone already: the stream is cut
            stream.abort()
            return
        early, self._outq = self._outq, None  # TCP bytes read before now: the stream's first
        self.stream = stream
        if self.sweeper is None:  # (a swept bridge is held by its sweeper)
            _PIPING.add(self)
        stream.attach_sink(self, hold=True)  # tunnel data that arrived before the TCP side was ready goes first
        for chunk in early or ():
            self._to_tunnel(chunk, True)
        if self._flags & _TCP_EOF and not self._flags & _FINISHED:
            self._flags &= ~_TCP_EOF
            self.eof_received()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        gate = self.gate
        if gate is not None:  # a public connection (ingress bridges are gated): who it is
            self.peer_address = peer = self.peer_address or transport.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) else str(peer)
            if not gate.enter(host, transport):
                self._flags |= _FINISHED  # subclasses check ``finished`` after this
                transport.abort()
                return
            self._flags |= _GATED
        elif not is_loopback_peer(transport.get_extra_info("peername")):  # dialed; accepted ones: listen
            sock = transport.get_extra_info("socket")
            if sock is not None:
                tune_socket(sock)
        if self.stream is not None:
            self.attach(self.stream)

    def _leave_gate(self) -> None:
        if self._flags & _GATED and self.gate is not None:
            self._flags &= ~_GATED
            peer = self.peer_address  # the host it entered under (connection_made)
            self.gate.leave(peer[0] if isinstance(peer, tuple) else str(peer))

    # -- TCP side
    def get_buffer(self, sizehint: int) -> memoryview:
        # data lands behind room for a Data frame header, so a small read can leave as one frame
        size, stream = self._read_size, self.stream
        if stream is not None and size > MIN_CAPPED_READ:  # no read past the session's send limit
            room = stream.send_room()
            if room < size:
                size = room if room > MIN_CAPPED_READ else MIN_CAPPED_READ
                self._rbuf = buf = acquire_bytes(size)
                return memoryview(buf)[DATA_HEADER_SIZE:size]  # (the pool may hand out a bigger one)
        self._rbuf = buf = acquire_bytes(size)
        return memoryview(buf)[DATA_HEADER_SIZE:]

    def read_buffer(self) -> bytearray:
        """The buffer of the read being reported (in ``buffer_updated``): the bytes read start at
        DATA_HEADER_SIZE. A subclass may rewrite them there, then ``send_read`` them."""
        buf = self._rbuf
        assert buf is not None
        return buf

    def send_read(self, nbytes: int, n: int) -> None:
        """Instead of ``buffer_updated(nbytes)``: send the ``n`` bytes now at DATA_HEADER_SIZE in
        ``read_buffer()`` to the stream (as one frame, with no copy, when nothing is queued)."""
        buf = self._rbuf
        self._rbuf = None
        assert buf is not None
        self._read_size = adapt_read_size(self._read_size, nbytes, BRIDGE_READ_SIZE)
        stream = self.stream
        if stream is not None and not self._flags & _FINISHED and stream.try_send_frame(buf, n):
            self._flags &= _NO_TICKS
            self.bytes_up += n
            release_bytes(buf)
            return
        data = bytes(memoryview(buf)[DATA_HEADER_SIZE:DATA_HEADER_SIZE + n])
        release_bytes(buf)
        self._to_tunnel(data, False)

    def buffer_updated(self, nbytes: int) -> None:
        buf = self._rbuf
        self._rbuf = None
        assert buf is not None
        self._read_size = adapt_read_size(self._read_size, nbytes, BRIDGE_READ_SIZE)
        if nbytes >= OWN_THRESHOLD:
            if self.pass_owned():
                self._to_tunnel(memoryview(buf)[DATA_HEADER_SIZE:DATA_HEADER_SIZE + nbytes], True)
                return
        else:
            stream = self.stream
            # nothing queued anywhere: the frame goes out now, header and payload in one write
            if (stream is not None and not self._flags & _FINISHED and self.pass_owned()
                    and stream.try_send_frame(buf, nbytes)):
                self._flags &= _NO_TICKS
                self.bytes_up += nbytes
                release_bytes(buf)
                return
        data = bytes(memoryview(buf)[DATA_HEADER_SIZE:DATA_HEADER_SIZE + nbytes])
        release_bytes(buf)
        self._received(data)

    def _drop_read_buffer(self) -> None:
        # The loop asks for a buffer before every read, so when the connection ends (EOF, error,
        # close) the last one was never filled. Let it go now: a finished bridge can sit in a
        # reference cycle until the next garbage collection, and up to BRIDGE_READ_SIZE each adds up
        # under churn. (A read that fills its buffer is followed by another try at once, which may
        # find nothing: that buffer stays until the next read, an idle sweep or the end.)
        buf = self._rbuf
        if buf is not None:
            self._rbuf = None
            release_bytes(buf)

    def pass_owned(self) -> bool:
        """Whether reads may go to the tunnel as they are (a subclass may still need the bytes)."""
        return True

    def _to_tunnel(self, data: Any, owned: bool) -> None:
        stream = self.stream
        if stream is None:  # not attached yet: kept until it is (the owner pauses reading meanwhile)
            if not self._flags & _FINISHED:
                if self._outq is None:
                    self._outq = []
                self._outq.append(bytes(data))
            return
        if self._flags & _FINISHED:
            return
        self._flags &= _NO_TICKS
        self.bytes_up += len(data)
        try:
            # flushed to the tunnel at once (latency); big reads make big writes
            if owned:
                stream.write_owned(data)
            else:
                stream.write(data)
        except (StreamClosedError, FerroTunnelError):
            self._finish(abort=True)
            return
        if not stream.can_write() and not self._flags & _READING_PAUSED:
            self._flags |= _READING_PAUSED
            self.transport.pause_reading()
            stream.request_writable()

    def eof_received(self) -> bool:
        self._flags |= _TCP_EOF
        self._drop_read_buffer()  # no more reads on this side
        if self.stream is not None and not self._flags & _FINISHED:
            try:
                self.stream.write_eof()
            except FerroTunnelError:
                self._finish(abort=True)
                return False
        self._maybe_done()
        return True  # keep our sending half open

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._drop_read_buffer()
        self._leave_gate()
        flags = self._flags
        if not flags & _FINISHED:
            # the TCP side went away before both halves finished: reset the stream
            self._finish(abort=flags & (_TCP_EOF | _TUNNEL_EOF) != _TCP_EOF | _TUNNEL_EOF, exc=exc)

    def pause_writing(self) -> None:
        self._flags |= _OUT_PAUSED

    def resume_writing(self) -> None:
        self._flags &= ~_OUT_PAUSED
        self._give_back()

    def _give_back(self) -> None:
        owed, self._owed = self._owed, 0
        if owed and self.stream is not None:
            self.stream.consumed(owed)

    # -- tunnel side (called by the tunnel connection)
    def tunnel_data(self, payload: memoryview) -> None:
        stream = self.stream
        assert stream is not None
        n = len(payload)
        self._flags = flags = self._flags & _NO_TICKS
        self.bytes_down += n
        if flags & _FINISHED:
            stream.consumed(n)
            return
        q = self._outq
        if q is None:
            self._outq = q = []
            stream.defer_flush(self)
        # A view would pin the whole read buffer for as long as the transport holds it: a small
        # payload is copied, and so is every payload for a TCP side that is not taking its bytes
        # (a stalled reader would otherwise hold up to read_buffer_size for each max_chunk of
        # its window). A reader that keeps up gets views, which it sends on at once.
        if flags & _OUT_PAUSED:
            q.append(bytes(payload))
            self._owed += n  # credit returns once the TCP side drains
        else:
            q.append(payload if n >= OWN_THRESHOLD else bytes(payload))
            stream.consumed(n)

    def flush_out(self) -> None:
        q = self._outq
        if q is not None and self.stream is not None:  # (before a stream: the TCP side's early bytes)
            self._outq = None
            if not self._flags & _FINISHED:
                if len(q) == 1:
                    self.transport.write(q[0])
                else:
                    self.transport.writelines(q)

    def tunnel_eof(self) -> None:
        self._flags |= _TUNNEL_EOF
        self.flush_out()  # data before the end of stream
        # When the TCP side has finished too, close() (which flushes, then sends FIN) says the
        # same thing; write_eof is kept for a real half-close only, since uvloop 0.23 has aborted
        # ("double free or corruption") on write_eof paths under connection churn.
        if not self._flags & (_FINISHED | _TCP_EOF):
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                # TLS (the SSL transport cannot half-close): the end is the connection's end, after
                # what was written; waiting for the other side to go first could wait for good
                self._finish(abort=False)
                return
        self._maybe_done()

    def tunnel_reset(self, exc: BaseException) -> None:
        self._finish(abort=True, exc=exc, from_tunnel=True)

    def tunnel_writable(self) -> None:
        if self._flags & (_READING_PAUSED | _TCP_EOF | _FINISHED) == _READING_PAUSED:
            self._flags &= ~_READING_PAUSED
            self.transport.resume_reading()  # never after EOF (uvloop aborts on that)

    # -- ending
    def _maybe_done(self) -> None:
        if self._flags & (_TCP_EOF | _TUNNEL_EOF) == _TCP_EOF | _TUNNEL_EOF:
            self._finish(abort=False)

    def _finish(self, abort: bool, exc: Optional[BaseException] = None, from_tunnel: bool = False,
                rst: bool = True) -> None:
        if self._flags & _FINISHED:
            return
        self._flags |= _FINISHED
        self._outq = None  # (early bytes of a stream that never came)
        _PIPING.discard(self)
        if self.sweeper is not None:
            self.sweeper.discard(self)
        stream = self.stream
        if stream is not None:
            if log.isEnabledFor(logging.INFO):
                log.info("stream %d %s: %d bytes to the tunnel, %d from it", stream.stream_id,
                         "reset" if abort else "closed", self.bytes_up, self.bytes_down)
            self._give_back()
            if abort and not from_tunnel:
                stream.abort()
            elif not abort:
                stream.close()
            stream.detach_sink()  # no cycle between a finished bridge and its stream
            self.stream = None
        if self.transport is not None:
            if abort:
                # RST, not FIN: the peer must not take a cut connection for a complete one
                sock = self.transport.get_extra_info("socket") if rst else None
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    except OSError:
                        pass
                self.transport.abort()
            else:
                self.transport.close()
        fut = _WAITED.pop(self, None) if _WAITED else None
        if fut is not None and not fut.done():
            fut.set_result(None)
