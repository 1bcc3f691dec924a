"""``TunnelConnection``: the asyncio protocol of one tunnel connection, carrying one ``SessionCore``.

It reads into buffers from the pool, hands the bytes to the handshake and then to the core, and
writes what the core's scheduler drains, only while the transport is not paused, so urgent frames
never queue behind more than one drain budget of bulk data. The handshake is the subclass's
(server or client); after it the connection always has a core."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, List, Optional

from ..config import StreamConfig
from ..errors import ConnectionLostError, FerroTunnelError, FrameError, LimitExceededError
from ..frames import DATA_HEADER_SIZE, encode_data_header, encode_data_header_into
from ..pool import acquire_bytes, release_bytes
from ..protocol.core import SessionCore
from ..protocol.listener import NULL_LISTENER
from ..protocol.streams import CoreStream
from .stream import StreamSink
from .streamevents import StreamEvents, StreamHandler
from .tlsbio import ServerTls, TlsHandshakeFailed
from .transport import tune_socket

if TYPE_CHECKING:
    from .session import Session

__all__ = ["TunnelConnection", "ConnectionPhase", "StreamHandler"]

log = logging.getLogger("ferrotunnel.session")

DRAIN_BUDGET = 256 * 1024
#: A tunnel connection's first read size: a read that fills half of it makes the next ones
#: ``read_buffer_size`` until the connection's next timer tick (heartbeat interval), which brings
#: them back to this. (Not halved on small reads, as a bridge's are: under bulk traffic some reads
#: come back small, and halving on them cost ~15 % more CPU per byte on one stream.)
FIRST_READ = 256 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class ConnectionPhase(enum.Enum):
    HANDSHAKE = "handshake"  # bytes go to the handshake; there is no core yet
    OPEN = "open"            # the session runs: ``core`` and ``session`` are set
    CLOSED = "closed"


HANDSHAKE, OPEN, CLOSED = ConnectionPhase.HANDSHAKE, ConnectionPhase.OPEN, ConnectionPhase.CLOSED


class TunnelConnection(StreamEvents, asyncio.BufferedProtocol):
    """The protocol object of one tunnel connection (the handshake is the subclass's)."""

    is_client = False
    core: SessionCore          # set when the phase becomes OPEN, never unset

    def __init__(self, loop: asyncio.AbstractEventLoop, config: StreamConfig, tls: bool = False) -> None:
        self.loop = loop
        self.config = config
        self.phase = HANDSHAKE
        #: The handshake succeeded once: ``core`` and ``session`` exist (the phase may be CLOSED).
        self.opened = False
        self.transport: Any = None
        self.close_exc: Optional[BaseException] = None
        self.peer_address: Any = None
        self._rbuf: Optional[bytearray] = None
        self._rview: Optional[memoryview] = None
        self._read_size = min(FIRST_READ, config.read_buffer_size)
        self._flush_scheduled = False
        self._flush_follows = False
        self._write_paused = False
        self._read_paused = False
        self._eof = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._deadline = 0.0  # when _timer fires (monotonic)
        self._resume_timer: Optional[asyncio.TimerHandle] = None
        self._output_over_since: Optional[float] = None  # when queued output went over its cap
        self.stream_handler: Optional[StreamHandler] = None
        self._tasks: "set[asyncio.Task[None]]" = set()
        self._coalesce = DRAIN_BUDGET + 1 if tls else 16 * 1024
        self.tls: Optional[ServerTls] = None
        #: Sinks that got tunnel data during the current read: each is flushed once after it.
        #: The list is never replaced (it is cleared in place), so its ``append`` may be kept.
        self.dirty_sinks: List[StreamSink] = []
        self.sink_errors = 0  # sinks that raised (see ``sink_failed``)
        self.closed_future: asyncio.Future[None] = loop.create_future()
        # The session: held strongly while open, weakly after, so a closed connection and its session
        # are freed without the cyclic GC (the session keeps the connection: its owner holds that).
        self._session: Optional["Session"] = None
        self._session_ref: Optional["weakref.ref[Session]"] = None

    @property
    def closed(self) -> bool:
        return self.phase is CLOSED

    @property
    def session(self) -> "Session":
        """The session this connection carries (after the handshake)."""
        session = self._session
        if session is None:
            ref = self._session_ref
            session = ref() if ref is not None else None
            if session is None:
                raise ConnectionLostError("the session is closed and gone")
        return session

    @property
    def read_paused(self) -> bool:
        return self._read_paused

    @property
    def read_size(self) -> int:
        """The size of the next read from the transport: FIRST_READ, or ``read_buffer_size`` after a read that filled half of it."""
        return self._read_size

    # ------------------------------------------------------------------ transport callbacks

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer_address = self.peer_address or transport.get_extra_info("peername")  # a PROXY header's first
        sock = transport.get_extra_info("socket")
        if sock is not None:
            tune_socket(sock)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        # A fresh buffer per read (the last one goes back to the pool, which refuses it while a
        # payload view still exports it); measured faster than reusing one. A memoryview: the SSL
        # transport reads into slices of it, and a bytearray slice would be a copy.
        buf = self._rbuf
        if buf is not None:
            self._rview = None  # (first: the pool refuses a buffer a view still exports)
            release_bytes(buf)
        self._rbuf = buf = acquire_bytes(self._read_size)
        self._rview = view = memoryview(buf)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        size = self._read_size
        if nbytes >= size >> 1 and size < self.config.read_buffer_size:
            self._read_size = self.config.read_buffer_size  # bulk traffic: the largest reads
        data = self._rview[:nbytes]  # type: ignore[index]
        try:
            if self.phase is OPEN and self.tls is None:
                # data_received_view's open-session path, inlined: this runs once per read
                core = self.core
                now = time.monotonic()
                self._flush_follows = True
                try:
                    core.receive(data, now)
                finally:
                    self._flush_follows = False
                if self.dirty_sinks:  # every forwarding target written once per read (one writev), not per frame
                    self._flush_sinks()
                if core.sched and not self._write_paused:
                    self._flush()  # acks and credit now, not an event-loop turn later
                # _after_receive, unless it would do nothing for sure: with flow control nothing
                # blocks reading, and no throttle, no queued replies over max_queued_output
                if not self._read_paused and self.phase is OPEN and (
                        not core.flow or core.rates.throttle_until > now or self._output_over_since is not None
                        or core.sched.control_bytes > self.config.max_queued_output):
                    self._after_receive(now)
            elif self.tls is not None:
                self._tls_received(data)
            else:
                self.data_received_view(data)
        except FrameError as exc:
            log.warning("closing tunnel connection from %s: protocol error: %s", self.peer_address, exc)
            self.close(exc)
        finally:
            data.release()

    def _tls_received(self, data: memoryview) -> None:
        tls = self.tls
        assert tls is not None
        if not tls.established and not self.tls_handshake_bytes(len(data)):
            return
        try:
            ended = tls.receive(data, self._read_size, self.data_received_view)  # plaintext <= what was read
        except TlsHandshakeFailed as exc:
            self._tls_send_pending()
            self.tls_failed(exc.cause)
            return
        except ConnectionLostError as exc:
            log.warning("closing TLS connection from %s: %s", self.peer_address, exc)
            self.close(exc)
            return
        self._tls_send_pending()
        if ended:
            self.eof_received()

    def _tls_send_pending(self) -> None:
        out = self.tls.pending_output() if self.tls is not None else b""
        if out and self.transport is not None:
            self.transport.write(out)

    def tls_failed(self, exc: BaseException) -> None:  # pragma: no cover - the server overrides
        self.close()

    def tls_handshake_bytes(self, n: int) -> bool:  # pragma: no cover - the server overrides
        """``n`` encrypted bytes arrived before the TLS handshake completed; False closed the connection."""
        return True

    def send_raw(self, data: Any) -> None:
        """Write bytes to the peer (through TLS when the server terminates it)."""
        tls = self.tls
        if tls is None:
            self.transport.write(data)
        else:
            self.transport.write(tls.encrypt(data))

    def _return_buffer(self) -> None:
        self._rview = None
        if self._rbuf is not None:
            release_bytes(self._rbuf)
            self._rbuf = None

    def data_received_view(self, data: memoryview) -> None:
        if self.phase is not OPEN:
            if self.phase is HANDSHAKE:
                self.handshake_data(data)
            return
        core = self.core
        now = time.monotonic()
        self._flush_follows = True
        try:
            core.receive(data, now)
        finally:
            self._flush_follows = False
        if self.dirty_sinks:  # (see buffer_updated)
            self._flush_sinks()
        if core.sched and not self._write_paused:
            self._flush()
        self._after_receive(now)

    def _flush_sinks(self) -> None:
        sinks = self.dirty_sinks
        n = len(sinks)
        for i in range(n):
            sink = sinks[i]
            try:
                sink.flush_out()
            except Exception as exc:
                self.sink_failed(sink, exc, "flush_out")
        del sinks[:n]  # a sink deferred again by its own flush_out waits for the next read

    def _after_receive(self, now: float) -> None:
        if self._read_paused or self.phase is not OPEN:
            return
        core = self.core
        if core.reading_blocked or core.rates.throttle_until > now or self._output_over(now):
            self._pause_reading(now)
            stall = core.windows.stall_deadline(self.config.stalled_stream_timeout)  # (inf: no stream over)
            if stall < self._deadline:  # a stalled stream is reset at its time, not at the next tick's
                self._schedule_timer(stall)
            if core.rates.throttle_until > now and self._resume_timer is None:
                self._resume_timer = self.loop.call_later(core.rates.throttle_until - now, self._maybe_resume)

    def hold_reading(self) -> None:
        """Stop reading the transport until ``release_reading`` (e.g. while a policy decides)."""
        self._pause_reading(time.monotonic())

    def release_reading(self) -> None:
        """Read again, unless the session itself must not (bounded buffering, rate limit)."""
        self._maybe_resume()

    def _pause_reading(self, now: float) -> None:
        if not self._read_paused and not self._eof:
            self._read_paused = True
            self.transport.pause_reading()
            if self.phase is OPEN:
                self.core.reading_paused(now)

    def _maybe_resume(self) -> None:
        self._resume_timer = None
        if not self._read_paused or self.phase is not OPEN or self._eof:
            return
        core = self.core
        now = time.monotonic()
        if core.reading_blocked or self._output_over(now):
            return
        if core.rates.throttle_until > now:
            self._resume_timer = self.loop.call_later(core.rates.throttle_until - now, self._maybe_resume)
            return
        self._read_paused = False
        core.reading_resumed(now)
        self.transport.resume_reading()  # never after EOF: guarded above (uvloop aborts otherwise)

    def _output_over(self, now: float) -> bool:
        """Whether more than ``max_queued_output`` of replies waits for a peer that does not read:
        then nothing more is read from it (reading is what makes replies). Stream data is bounded
        per stream by its writers (``stream_send_buffer``) and does not count."""
        if self.core.sched.control_bytes <= self.config.max_queued_output:
            self._output_over_since = None
            return False
        if self._output_over_since is None:
            self._output_over_since = now
        return True

    def consumed(self, st: CoreStream, n: int) -> None:
        if self.phase is CLOSED:
            return
        core = self.core
        core.consumed(st, n)
        if self._read_paused and not core.reading_blocked:  # (``and``: no property call unless paused)
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
        if not self._flush_scheduled and not self._write_paused and self.phase is OPEN:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def send(self, st: CoreStream, data: Any, owned: bool) -> None:
        """Queue stream payload and hand it to the transport now (latency)."""
        core = self.core
        self._flush_follows = True
        try:
            core.send(st, data, owned)
        finally:
            self._flush_follows = False
        if self.phase is OPEN and not self._write_paused and core.sched:  # flush_now, inlined
            self._flush()

    def send_frame_now(self, st: CoreStream, buf: bytearray, n: int) -> bool:
        """Fast path for a small read from a forwarded connection: ``buf`` holds the payload at
        ``[DATA_HEADER_SIZE:DATA_HEADER_SIZE + n]`` with room for the header in front. If nothing
        is queued, the frame is written at once, as one buffer, and True is returned; ``buf`` is
        not kept. Otherwise False, and nothing happened."""
        # the small-write fast path: see SessionCore.send_now (never while the transport pushes back)
        if self.phase is not OPEN or self._write_paused or not self.core.send_now(st, n):
            return False
        encode_data_header_into(buf, 0, st.id, n)
        frame = buf[:n + DATA_HEADER_SIZE]  # a copy: the read buffer goes straight back
        tls = self.tls
        self.transport.write(frame if tls is None else tls.encrypt(frame))  # send_raw, inlined
        return True

    def send_small_now(self, st: CoreStream, data: bytes) -> bool:
        """``send_frame_now`` for a small ``bytes`` payload written through the stream API."""
        if self.phase is not OPEN or self._write_paused or not self.core.send_now(st, len(data)):
            return False
        self.send_raw(encode_data_header(st.id, len(data)) + data)
        return True

    def flush_now(self) -> None:
        """Hand queued frames to the transport now (latency) instead of at the next loop turn."""
        if self.phase is OPEN and not self._write_paused and self.core.sched:
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.phase is not OPEN:
            return
        core = self.core
        transport = self.transport
        while core.sched and not self._write_paused:
            if self.tls is not None:  # encrypt_many fills records from the frames as they lie: no join
                transport.writelines(self.tls.encrypt_many(core.data_to_send(DRAIN_BUDGET, 16 * 1024)))
                continue
            bufs = core.data_to_send(DRAIN_BUDGET, self._coalesce)
            if len(bufs) == 1:
                transport.write(bufs[0])
            else:
                transport.writelines(bufs)
        if self._output_over_since is not None and self._read_paused:
            self._maybe_resume()  # replies went out: the peer may be read again

    # ------------------------------------------------------------------ session setup and timers

    def open_session(self, core: SessionCore, session: "Session", leftover: bytes = b"") -> None:
        """The handshake succeeded: from now on bytes go to ``core``, starting with ``leftover``
        (frames the peer pipelined behind its handshake)."""
        self.core = core
        self._session = session
        self._session_ref = weakref.ref(session)
        self.opened = True
        self.phase = OPEN
        self._schedule_timer(core.tick(time.monotonic()))
        if leftover:
            self.data_received_view(memoryview(leftover))
        self._flush()

    def _schedule_timer(self, deadline: float) -> None:
        self._deadline = deadline
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.phase is not OPEN:
            return
        # Between ticks a quiet connection holds its last read's buffer (up to read_buffer_size):
        # it goes now, and the next reads start at most at FIRST_READ again (traffic that fills
        # half of one grows them back at once).
        self._return_buffer()
        if self._read_size > FIRST_READ:
            self._read_size = FIRST_READ
        now = time.monotonic()
        try:
            since = self._output_over_since  # the more telling reason first: the pause has the same age
            if since is not None and self._output_over(now) and now - since > self.config.session_timeout:
                raise LimitExceededError(
                    f"the peer has not read for {now - since:.0f}s with more than {self.config.max_queued_output} "
                    "bytes waiting for it (max_queued_output, session_timeout)")
            deadline = self.core.tick(now)
        except FerroTunnelError as exc:
            log.warning("session %s (%s): %s; closing", self.session.id, self.peer_address, exc)
            self.close(exc)
            return
        self._schedule_timer(deadline)

    def handshake_data(self, data: memoryview) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task of this connection: cancelled when the connection closes."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ session events (CoreListener)
    # (the stream events are StreamEvents', in streamevents.py)

    def on_session_error(self, exc: Exception) -> None:
        log.warning("session %s: %s", self.session.id, exc)
        self.close(exc)

    def on_peer_draining(self) -> None:  # the drain extension: see Session.draining / moved
        (self.session.draining if self.is_client else self.session.moved).set()

    # ------------------------------------------------------------------ closing

    def close(self, exc: Optional[BaseException] = None) -> None:
        """Close the connection; every stream ends with ``exc`` (or ConnectionLostError)."""
        if self.phase is CLOSED:
            return
        if exc is None and self.phase is OPEN and self.core.has_output and self.transport is not None:
            self._flush()
        self.close_exc = exc
        if self.transport is not None:
            self.transport.close()
        self.transport_closed(exc)

    def transport_closed(self, exc: Optional[BaseException]) -> None:
        was = self.phase
        self.phase = CLOSED
        if self.close_exc is None:
            self.close_exc = exc
        if self.tls is not None:
            self.tls.stopped = True
        for h in (self._timer, self._resume_timer):
            if h is not None:
                h.cancel()
        self._timer = self._resume_timer = None
        if was is OPEN:
            core = self.core
            if not core.closed:
                core.connection_lost(exc if isinstance(exc, Exception) else None)
            self.session.closed_event.set()
            core.listener = NULL_LISTENER  # no cycle between a closed core and this connection
        if not self.closed_future.done():
            self.closed_future.set_result(None)
        if was is not CLOSED:
            for task in list(self._tasks):  # stream handlers (and the server's handshake policy)
                task.cancel()
            self.on_closed()
        self._session = None  # from now on held by its owner only (see __init__)

    def on_closed(self) -> None:
        """Hook for the server and client (runs once)."""
