"""Sans-IO core of one tunnel session: streams, flow control, heartbeats. No sockets, no event loop.

Bytes from the peer go in through ``receive(data, now)``; what to send comes out of
``data_to_send()``; time is passed in. Stream events are reported to a listener object (the
asyncio adapter in production, a recorder in tests). Everything protocol-shaped lives here.

Extensions, switched on only when the peer announced them in its handshake capabilities:

- ``ferrotunnel-py/1``: the peer is this package. It accepts client-opened streams, answers
  server heartbeats, and understands ``Error{stream_id}`` as a stream reset.
- ``flow-control/1;window=N``: per-stream credit. A side may have at most the granted credit of
  payload in flight per stream; the receiver grants more with ``PluginData`` frames under plugin
  id ``ft.flow/1`` whose data is a list of (stream id u32 BE, increment u32 BE) pairs.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Protocol as TypingProtocol, Sequence, Set

from ._model import (
    DATA_HEADER_SIZE,
    CloseReason,
    CloseStream,
    Data,
    Error,
    ErrorCode,
    Heartbeat,
    HeartbeatAck,
    OpenStream,
    PluginData,
    Protocol,
    StreamPriority,
)
from .config import RateLimits, StreamConfig
from .errors import (
    ConnectionLostError,
    FerroTunnelError,
    LimitExceededError,
    PeerUnsupportedError,
    StreamClosedError,
    StreamResetError,
)
from .frames import FrameDecoder, encode
from .scheduler import PriorityScheduler

__all__ = [
    "EXT_CAPABILITY",
    "FLOW_CAPABILITY",
    "FLOW_PLUGIN_ID",
    "flow_capability",
    "parse_flow_capability",
    "CoreStream",
    "SessionCore",
    "CoreListener",
]

log = logging.getLogger("ferrotunnel.core")

EXT_CAPABILITY = "ferrotunnel-py/1"
FLOW_CAPABILITY = "flow-control/1"
FLOW_PLUGIN_ID = "ft.flow/1"
_MAX_WINDOW = 0x7FFFFFFF
_UPDATE = struct.Struct(">II")
_RESET_MEMORY = 1024


def flow_capability(window: int) -> str:
    return f"{FLOW_CAPABILITY};window={window}"


def parse_flow_capability(caps: Iterable[str]) -> Optional[int]:
    """The peer's initial per-stream window, or None if it did not announce flow control."""
    for cap in caps:
        if cap.startswith(FLOW_CAPABILITY + ";window="):
            value = cap[len(FLOW_CAPABILITY) + 8:]
            if value.isdigit() and 0 < int(value) <= _MAX_WINDOW:
                return int(value)
    return None


class CoreListener(TypingProtocol):
    def on_stream_opened(self, st: "CoreStream") -> None: ...
    def on_stream_data(self, st: "CoreStream", payload: memoryview) -> None: ...
    def on_stream_eof(self, st: "CoreStream") -> None: ...
    def on_stream_reset(self, st: "CoreStream", exc: Exception) -> None: ...
    def on_stream_writable(self, st: "CoreStream") -> None: ...
    def on_session_error(self, exc: Exception) -> None: ...
    def on_output(self) -> None: ...


class CoreStream:
    """Protocol state of one stream. ``app`` is the adapter's object for it."""

    __slots__ = (
        "id", "protocol", "priority", "local", "app",
        "send_credit", "pending", "pending_bytes", "eof_requested", "local_eof", "remote_eof",
        "closing", "done", "window", "recv_avail", "owed", "unread",
    )

    def __init__(self, sid: int, protocol: Protocol, priority: StreamPriority, local: bool,
                 send_credit: int, window: int) -> None:
        self.id = sid
        self.protocol = protocol
        self.priority = priority
        self.local = local
        self.app: Any = None
        self.send_credit = send_credit      # payload bytes we may still send (flow control)
        self.pending: Optional[Deque[memoryview]] = None  # written, waiting for credit
        self.pending_bytes = 0
        self.eof_requested = False          # write_eof() asked; CloseStream follows pending data
        self.local_eof = False              # our CloseStream is queued
        self.remote_eof = False             # the peer's CloseStream arrived
        self.closing = False                # close(): discard what still arrives
        self.done = False                   # removed from the session (closed both ways or reset)
        self.window = window                # current receive window target
        self.recv_avail = window            # bytes the peer may still send before more credit
        self.owed = 0                       # consumed bytes not yet granted back
        self.unread = 0                     # delivered to the app, not yet consumed

    def __repr__(self) -> str:
        return f"<CoreStream {self.id} {self.protocol.name} {self.priority.name}>"


class _Bucket:
    __slots__ = ("rate", "cap", "level", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.cap = max(rate * burst, 1.0)
        self.level = self.cap
        self.at = now

    def take(self, n: float, now: float) -> float:
        """Take n tokens; returns 0 if they were there, else seconds until the deficit refills."""
        self.level = min(self.cap, self.level + (now - self.at) * self.rate)
        self.at = now
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate


class SessionCore:
    """One session's protocol state machine (after the handshake)."""

    def __init__(self, *, is_client: bool, config: StreamConfig, peer_capabilities: Sequence[str],
                 listener: CoreListener, now: float) -> None:
        self.is_client = is_client
        self.config = config
        self.listener = listener
        caps = list(peer_capabilities)
        self.peer_is_ext = EXT_CAPABILITY in caps
        peer_window = parse_flow_capability(caps)
        self.flow = bool(config.flow_control and peer_window is not None)
        self.peer_window = peer_window or 0
        self.streams: Dict[int, CoreStream] = {}
        self.sched = PriorityScheduler()
        self.decoder = FrameDecoder(config.max_frame_size)
        self._next_id = 1 if is_client else 2
        self._peer_parity = 0 if is_client else 1
        self.last_seen = now
        self._paused_at: Optional[float] = None
        self._hb_sent: Deque[float] = deque()
        # a client heartbeats every server; a server only peers of this package (Rust never acks)
        self.sends_heartbeats = is_client or self.peer_is_ext
        self._next_heartbeat = now
        self.rtt: Optional[float] = None
        self.total_unread = 0
        self._over_limit: Set[int] = set()
        self._blocked: Dict[CoreStream, int] = {}
        self._deferred: Set[CoreStream] = set()
        self._reset_sent: Set[int] = set()
        self.closed = False
        self.close_exc: Optional[Exception] = None
        self._now = now
        self.frames_in = 0
        self.bytes_in = 0  # wire bytes received; what was sent is counted by the scheduler
        rl: RateLimits = config.rate_limits
        self._open_bucket = _Bucket(rl.streams_per_second, rl.burst, now) if rl.streams_per_second else None
        self._byte_bucket = _Bucket(rl.bytes_per_second, rl.burst, now) if rl.bytes_per_second else None
        self.throttle_until = 0.0

    # ------------------------------------------------------------------ input

    def receive(self, data: Any, now: float) -> None:
        """Feed bytes read from the tunnel connection. Raises FrameError on a protocol violation."""
        self._now = now
        self.last_seen = now
        self.bytes_in += len(data)
        self.decoder.feed_raw(data, self._on_data, self._on_control)
        if self._byte_bucket is not None:
            wait = self._byte_bucket.take(len(data), now)
            if wait:
                self.throttle_until = now + wait

    def dispatch(self, frame: Any, now: float) -> None:
        """Process one already-decoded frame (frames pipelined behind the handshake)."""
        self._now = now
        if type(frame) is Data:
            self._on_data(frame.stream_id, 1 if frame.end_of_stream else 0, memoryview(frame.data))
        else:
            self._on_control(frame)

    @property
    def reading_blocked(self) -> bool:
        """True while the adapter should stop reading the tunnel (bounded buffering)."""
        return bool(self._over_limit) or self.total_unread > self.config.session_recv_budget

    def _on_data(self, sid: int, flags: int, payload: memoryview) -> None:
        self.frames_in += 1
        n = len(payload)
        st = self.streams.get(sid)
        if st is None or st.remote_eof:
            if st is None:
                self._unknown_stream(sid)
            return
        if self.flow:
            if n > st.recv_avail:
                log.debug("stream %d: peer overran its window (%d > %d)", sid, n, st.recv_avail)
                self._reset(st, ErrorCode.PROTOCOL_ERROR, "flow-control window exceeded",
                            StreamResetError(f"stream {sid}: peer exceeded the flow-control window"))
                return
            st.recv_avail -= n
        if st.closing:
            if self.flow:
                st.owed += n
                self._grant(st)
            return
        if n == 0:
            return
        st.unread += n
        self.total_unread += n
        if not self.flow and st.unread > self.config.stream_recv_buffer:
            self._over_limit.add(sid)
        self.listener.on_stream_data(st, payload)

    def _unknown_stream(self, sid: int) -> None:
        # a peer of this package is told once, so it stops sending (like TCP's RST)
        if self.peer_is_ext and sid not in self._reset_sent:
            if len(self._reset_sent) >= _RESET_MEMORY:
                self._reset_sent.clear()
            self._reset_sent.add(sid)
            self._control(Error(sid, ErrorCode.STREAM_NOT_FOUND, "stream is closed"))

    def _on_control(self, frame: Any) -> None:
        self.frames_in += 1
        t = type(frame)
        if t is OpenStream:
            self._peer_open(frame)
        elif t is CloseStream:
            st = self.streams.get(frame.stream_id)
            if st is not None and not st.remote_eof:
                st.remote_eof = True
                if not st.closing:
                    self.listener.on_stream_eof(st)
                self._maybe_done(st)
        elif t is Heartbeat:
            self._control(HeartbeatAck(int(time.time() * 1000)))
        elif t is HeartbeatAck:
            if self._hb_sent:
                self.rtt = self._now - self._hb_sent.popleft()
        elif t is PluginData:
            if frame.plugin_id == FLOW_PLUGIN_ID and self.flow:
                self._on_credit(frame.data)
            else:
                log.debug("ignoring PluginData for plugin %r", frame.plugin_id)
        elif t is Error:
            if frame.stream_id is None:
                exc = FerroTunnelError(f"peer ended the session: {frame.code.name}: {frame.message}")
                self.listener.on_session_error(exc)
            else:
                st = self.streams.get(frame.stream_id)
                if st is not None:
                    self._remove(st)
                    self.sched.discard(st.id)
                    self.listener.on_stream_reset(
                        st, StreamResetError(f"stream {st.id} reset by peer: {frame.code.name}: {frame.message}"))
        else:  # Register, RegisterAck, StreamAck, a late Handshake/HandshakeAck: not used by v1 peers
            log.debug("ignoring %s frame", t.__name__)

    def _peer_open(self, frame: OpenStream) -> None:
        sid = frame.stream_id
        if sid in self.streams:
            log.debug("ignoring duplicate OpenStream for live stream %d", sid)
            return
        if sid == 0 or sid % 2 != self._peer_parity:
            log.debug("refusing stream %d: wrong parity for the peer's side", sid)
            self._refuse(sid, "stream id has the wrong parity")
            return
        if len(self.streams) >= self.config.max_streams_per_session:
            log.warning("refusing stream %d: %d streams open (max_streams_per_session)", sid, len(self.streams))
            self._refuse(sid, "too many streams")
            return
        if self._open_bucket is not None and self._open_bucket.take(1, self._now):
            log.warning("refusing stream %d: stream-open rate limit", sid)
            self._refuse(sid, "stream-open rate limit exceeded")
            return
        st = CoreStream(sid, frame.protocol, frame.priority, False, self.peer_window, self.config.initial_window)
        self.streams[sid] = st
        self.listener.on_stream_opened(st)

    def _refuse(self, sid: int, why: str) -> None:
        if self.peer_is_ext:
            self._control(Error(sid, ErrorCode.SERVICE_UNAVAILABLE, why))
        else:  # all a Rust peer understands: end of stream
            self.sched.push(sid, StreamPriority.NORMAL, encode(CloseStream(sid, CloseReason.NORMAL)))
            self.listener.on_output()

    def _on_credit(self, data: Any) -> None:
        raw = bytes(data)
        if len(raw) % 8:
            log.debug("ignoring malformed flow-control update of %d bytes", len(raw))
            return
        for sid, inc in _UPDATE.iter_unpack(raw):
            st = self.streams.get(sid)
            if st is not None:
                st.send_credit += inc
                if st.pending_bytes or st.eof_requested:
                    self._pump(st)
        self._wake_writers()

    # ------------------------------------------------------------------ stream operations

    def open_stream(self, protocol: Protocol = Protocol.TCP, priority: StreamPriority = StreamPriority.NORMAL) -> CoreStream:
        if self.closed:
            raise ConnectionLostError("the session is closed")
        if self.is_client and not self.peer_is_ext:
            raise PeerUnsupportedError(
                "this server does not accept client-opened streams (it did not announce the "
                f"{EXT_CAPABILITY} capability; a Rust FerroTunnel server drops them)")
        if len(self.streams) >= self.config.max_streams_per_session:
            raise LimitExceededError(
                f"{len(self.streams)} streams are open on this session (max_streams_per_session); "
                "close some or raise the limit")
        protocol = Protocol(protocol)
        priority = StreamPriority(priority)
        sid = self._next_id
        while sid in self.streams or sid == 0:
            sid = (sid + 2) & 0xFFFFFFFF
        self._next_id = (sid + 2) & 0xFFFFFFFF
        if self._next_id < 3:  # wrapped: keep our parity
            self._next_id = 1 if self.is_client else 2
        st = CoreStream(sid, protocol, priority, True, self.peer_window, self.config.initial_window)
        self.streams[sid] = st
        self.sched.push(sid, priority, encode(OpenStream(sid, protocol, (), None, priority)))
        self.listener.on_output()
        return st

    def send(self, st: CoreStream, data: Any, owned: bool = False) -> None:
        """Queue payload on a stream; it leaves as credit allows. With ``owned`` the caller hands
        its buffer over and it is queued without a copy."""
        if st.done or st.eof_requested:
            raise StreamClosedError(f"stream {st.id} is closed for writing")
        if not owned and type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer
        if not data:
            return  # never an empty Data frame: a Rust peer reads it as EOF
        if st.pending is None:
            st.pending = deque()
        st.pending.append(memoryview(data))
        st.pending_bytes += len(data)
        self._pump(st)

    def send_now(self, st: CoreStream, n: int) -> bool:
        """The small-write fast path. When nothing at all is queued (no frame of any stream waits
        in the scheduler, and this stream's own queue is empty) and an ``n``-byte payload fits one
        Data frame and the stream's credit, it is counted as sent and True is returned: the caller
        then writes that frame to the transport itself, at once, which is exactly what queueing and
        draining would have produced. Otherwise False, and the caller uses ``send``."""
        sched = self.sched
        if sched or st.pending is not None or st.done or st.eof_requested or n <= 0 or n > self.config.max_chunk:
            return False
        if self.flow:
            if st.send_credit < n:
                return False
            st.send_credit -= n
        sched.drained_frames += 1
        sched.drained_bytes += n + DATA_HEADER_SIZE
        return True

    def writable(self, st: CoreStream) -> bool:
        """Whether a writer may queue more (below the stream's send buffer)."""
        return st.done or st.pending_bytes + self.sched.stream_pending(st.id) < self.config.stream_send_buffer

    def wait_writable(self, st: CoreStream, below: Optional[int] = None) -> None:
        """Ask for ``on_stream_writable`` once the stream has fewer than ``below`` bytes queued
        (default: its send buffer; 1 means fully handed to the transport), or is done."""
        self._blocked[st] = self.config.stream_send_buffer if below is None else below
        if st.done or st.pending_bytes + self.sched.stream_pending(st.id) < self._blocked[st]:
            del self._blocked[st]
            self.listener.on_stream_writable(st)

    def queued(self, st: CoreStream) -> int:
        """Bytes of this stream not yet handed to the transport."""
        return st.pending_bytes + self.sched.stream_pending(st.id)

    def send_eof(self, st: CoreStream) -> None:
        """Half-close: CloseStream(Normal) after everything already written."""
        if st.eof_requested or st.done:
            return
        st.eof_requested = True
        self._pump(st)

    def close(self, st: CoreStream) -> None:
        """Graceful close: flush, half-close, and discard whatever still arrives."""
        if st.done:
            return
        st.closing = True
        if st.unread:
            self.total_unread -= st.unread
            st.unread = 0
            self._over_limit.discard(st.id)
        self.send_eof(st)
        self._maybe_done(st)

    def reset(self, st: CoreStream, message: str = "stream aborted") -> None:
        """Abort: drop queued data and tell the peer (a reset for our peers, EOF for Rust)."""
        if st.done:
            return
        self._reset(st, ErrorCode.INTERNAL_SERVER_ERROR, message, None)

    def _reset(self, st: CoreStream, code: ErrorCode, message: str, exc: Optional[Exception]) -> None:
        self.sched.discard(st.id)
        if self.peer_is_ext:
            self._control(Error(st.id, code, message))
        elif not st.local_eof:
            self.sched.push(st.id, st.priority, encode(CloseStream(st.id, CloseReason.NORMAL)))
            self.listener.on_output()
        st.local_eof = st.eof_requested = True
        self._remove(st)
        if exc is not None:
            self.listener.on_stream_reset(st, exc)

    def consumed(self, st: CoreStream, n: int) -> None:
        """The application took ``n`` delivered bytes off the stream: free them, grant credit."""
        if n <= 0:
            return
        st.unread -= n
        self.total_unread -= n
        if st.id in self._over_limit and st.unread <= self.config.stream_recv_buffer // 2:
            self._over_limit.discard(st.id)
        if self.flow and not st.done and not st.remote_eof:
            st.owed += n
            self._grant(st)
            if self._deferred and self.total_unread < self.config.session_recv_budget // 2:
                for other in list(self._deferred):
                    self._deferred.discard(other)
                    self._grant(other)

    def _grant(self, st: CoreStream) -> None:
        if st.owed < st.window // 2 and not (st.closing and st.owed):
            return
        if st.done or st.remote_eof:
            return
        if self.total_unread > self.config.session_recv_budget and not st.closing:
            self._deferred.add(st)  # the session holds too much unread: credit waits
            return
        inc = st.owed
        if st.unread == 0 and st.window < self.config.max_window and not st.closing:
            # the reader keeps up: a bigger window lets one fast stream beat window / RTT
            grow = min(st.window, self.config.max_window - st.window)
            st.window += grow
            inc += grow
        st.owed = 0
        st.recv_avail += inc
        self._control(PluginData(FLOW_PLUGIN_ID, _UPDATE.pack(st.id, min(inc, 0xFFFFFFFF))))

    # ------------------------------------------------------------------ internals

    def _pump(self, st: CoreStream) -> None:
        pending = st.pending
        if pending:
            flow = self.flow
            chunk_max = self.config.max_chunk
            sid, prio = st.id, st.priority
            push = self.sched.push_data
            while pending:
                credit = st.send_credit
                if flow and credit <= 0:
                    break
                head = pending[0]
                take = len(head)
                if take > chunk_max:
                    take = chunk_max
                if flow and take > credit:
                    take = credit
                if take == len(head):
                    pending.popleft()
                    push(sid, prio, head)
                else:
                    pending[0] = head[take:]
                    push(sid, prio, head[:take])
                st.pending_bytes -= take
                if flow:
                    st.send_credit = credit - take
            if not pending:
                st.pending = None
            self.listener.on_output()
        if st.eof_requested and not st.local_eof and not st.pending_bytes:
            st.local_eof = True
            self.sched.push(st.id, st.priority, encode(CloseStream(st.id, CloseReason.NORMAL)))
            self.listener.on_output()
            self._maybe_done(st)

    def _maybe_done(self, st: CoreStream) -> None:
        if not st.done and st.local_eof and (st.remote_eof or st.closing):
            self._remove(st)

    def _remove(self, st: CoreStream) -> None:
        st.done = True
        # queued payload goes now (after a graceful end there is none; after a reset it is dropped)
        st.pending = None
        st.pending_bytes = 0
        if self.streams.get(st.id) is st:
            del self.streams[st.id]
        if st.unread and st.closing:
            self.total_unread -= st.unread
            st.unread = 0
        self._over_limit.discard(st.id)
        self._deferred.discard(st)
        if st in self._blocked:
            del self._blocked[st]
            self.listener.on_stream_writable(st)

    def _control(self, frame: Any) -> None:
        self.sched.push_control(encode(frame))
        self.listener.on_output()

    def _wake_writers(self) -> None:
        if self._blocked:
            pending = self.sched.stream_pending
            for st in [s for s, below in self._blocked.items() if s.done or s.pending_bytes + pending(s.id) < below]:
                del self._blocked[st]
                self.listener.on_stream_writable(st)

    # ------------------------------------------------------------------ output and time

    def data_to_send(self, budget: int, coalesce: int) -> List[Any]:
        out = self.sched.drain(budget, coalesce)
        if self._blocked:
            self._wake_writers()
        return out

    @property
    def has_output(self) -> bool:
        return bool(self.sched)

    def tick(self, now: float) -> float:
        """Run timers; returns when to call again. Raises TunnelTimeoutError for a dead peer."""
        from .errors import TunnelTimeoutError

        self._now = now
        if self._paused_at is None and now - self.last_seen > self.config.session_timeout:
            raise TunnelTimeoutError(
                f"no frame from the peer for {now - self.last_seen:.1f}s (session_timeout "
                f"{self.config.session_timeout}s)")
        deadline = self.last_seen + self.config.session_timeout
        if self.sends_heartbeats:
            if now >= self._next_heartbeat:
                self._hb_sent.append(now)
                if len(self._hb_sent) > 8:  # unanswered ones: keep the bookkeeping small
                    self._hb_sent.popleft()
                self._control(Heartbeat(int(time.time() * 1000)))
                self._next_heartbeat = now + self.config.heartbeat_interval
            deadline = min(deadline, self._next_heartbeat)
        return deadline

    def reading_paused(self, now: float) -> None:
        if self._paused_at is None:
            self._paused_at = now

    def reading_resumed(self, now: float) -> None:
        # time we ourselves did not read is not the peer's silence
        if self._paused_at is not None:
            self.last_seen += now - self._paused_at
            self._paused_at = None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        """The connection is gone: every open stream ends with an error."""
        if self.closed:
            return
        self.closed = True
        err = exc if isinstance(exc, FerroTunnelError) else ConnectionLostError(
            "tunnel connection lost" + (f": {exc}" if exc else ""))
        self.close_exc = err
        streams = list(self.streams.values())
        self.streams.clear()
        for st in streams:
            st.done = True
            self.listener.on_stream_reset(st, err)
        self._blocked.clear()
        self._deferred.clear()
