"""Sans-IO core of one tunnel session. Bytes from the peer go in through ``receive(data, now)``,
what to send comes out of ``data_to_send()``, time is passed in, stream events go to a
``CoreListener``. The policies are classes of their own (``FlowWindows``, ``Keepalive``,
``RatePolicy``); the negotiated extensions come from the table in extensions.py."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Dict, Optional, Sequence, Set

from ..config import StreamConfig
from ..lograte import LogRate
from ..errors import (ConnectionLostError, FerroTunnelError, LimitExceededError, PeerUnsupportedError,
                      StreamClosedError, StreamResetError)
from ..frames import (DATA_FRAME_OVERHEAD, DATA_HEADER_SIZE, FLAG_PARTIAL, CloseReason, CloseStream, Error, ErrorCode, FrameDecoder,
                      Heartbeat, HeartbeatAck, OpenStream, PluginData, Protocol, StreamPriority, encode)
from ..scheduler import PriorityScheduler
from .drain import DrainMixin
from .publicurls import PublicUrlsMixin
from .tunnels import TunnelsMixin, clean_text
from .writers import WritersMixin
from .extensions import EXT_CAPABILITY, Negotiated, negotiate, plugin_handlers
from .flow import FLOW_PLUGIN_ID, MAX_WINDOW, FlowWindows, RecvAccount, decode_credit, encode_credit
from .keepalive import Keepalive
from .listener import CoreListener
from .ratelimit import RatePolicy, TokenBucket
from .streams import CLOSED, HALF_CLOSED_LOCAL, OPEN, CoreStream, StreamEvent, kept_headers

__all__ = ["SessionCore", "CoreListener", "CoreStream"]

log = logging.getLogger("ferrotunnel.core")

#: Stream ids remembered as "already told the peer it is gone" (bounded; cleared when full).
RESET_MEMORY = 1024


class SessionCore(WritersMixin, DrainMixin, PublicUrlsMixin, TunnelsMixin):
    """One session's protocol state machine (after the handshake).

    ``negotiated`` (from the handshake) or the peer's raw ``peer_capabilities`` say which
    extensions are on. Bytes pipelined behind the handshake go to ``receive`` like any others."""

    def __init__(self, *, is_client: bool, config: StreamConfig, listener: CoreListener, now: float,
                 negotiated: Optional[Negotiated] = None, peer_capabilities: Sequence[str] = (),
                 accept_peer_streams: bool = True, recv_account: Optional[RecvAccount] = None) -> None:
        self.is_client = is_client
        self.config = config
        self.listener = listener
        self.negotiated = negotiated if negotiated is not None else negotiate(config, peer_capabilities)
        self.peer_is_ext = self.negotiated.peer_is_ext
        peer_window = self.negotiated.flow_window
        self.flow = peer_window is not None
        self.peer_window = peer_window or 0
        #: Largest payload per Data frame this side sends: ``max_chunk`` to a peer with flow control
        #: that announced the frame size it accepts (within it), else at most ``legacy_max_chunk``.
        peer_frame = self.negotiated.get("frames")
        self.max_chunk = (max(1, min(config.max_chunk, peer_frame - DATA_FRAME_OVERHEAD))
                          if self.flow and peer_frame else min(config.max_chunk, config.legacy_max_chunk))
        #: The same for a stream whose data is all that waits to be sent (``solo_max_chunk``).
        self.solo_chunk = (max(self.max_chunk, min(config.solo_max_chunk, peer_frame - DATA_FRAME_OVERHEAD))
                           if self.flow and peer_frame else self.max_chunk)
        self.windows = FlowWindows(config, self.flow, recv_account)
        self.streams: Dict[int, CoreStream] = {}
        self.sched = PriorityScheduler()
        self.decoder = FrameDecoder(config.max_frame_size, config.max_control_frame)
        self._next_id = 1 if is_client else 2
        self._peer_parity = 0 if is_client else 1
        # a client heartbeats every server; a server only peers of this package (Rust never acks)
        self.keepalive = Keepalive(config.heartbeat_interval, config.session_timeout,
                                   is_client or self.peer_is_ext, now)
        self.rates = RatePolicy(config.rate_limits, now)
        self.accept_peer_streams = accept_peer_streams
        # rapid reset (CVE-2023-44487): a peer that resets streams faster than this ends the session
        self._peer_resets = TokenBucket(config.max_peer_resets_per_second, 1.0, now)
        # unbound functions (a bound method here would make a reference cycle)
        self._plugins = {pid: getattr(type(self), name) for pid, name in plugin_handlers(self.negotiated).items()}
        self.init_writers()
        self._reset_sent: Set[int] = set()
        self._warn: Optional[LogRate] = None  # (made at the first refusal)
        self.closed = False
        self.close_exc: Optional[Exception] = None
        self._now = now
        self.frames_in = 0
        self.bytes_in = 0  # wire bytes received; what was sent is counted by the scheduler
        self.malformed_credit = 0  # flow-control updates ignored: malformed, or for unknown streams
        self.unknown_credit = 0

    @property
    def rtt(self) -> Optional[float]:
        return self.keepalive.rtt

    @property
    def last_seen(self) -> float:
        return self.keepalive.last_seen

    @property
    def total_unread(self) -> int:
        return self.windows.total_unread

    @property
    def reading_blocked(self) -> bool:
        """True while the adapter should stop reading the tunnel (bounded buffering)."""
        return self.windows.blocked

    @property
    def has_output(self) -> bool:
        return bool(self.sched)

    # ------------------------------------------------------------------ input

    def receive(self, data: Any, now: float) -> None:
        """Feed bytes read from the tunnel connection. Raises FrameError on a protocol violation."""
        self._now = now
        self.keepalive.last_seen = now
        n = len(data)
        self.bytes_in += n
        self.decoder.feed_raw(data, self._on_data, self._on_control)
        rates = self.rates
        if rates.bytes is not None:  # (without a byte rate limit: no call)
            rates.received(n, now)

    def _on_data(self, sid: int, flags: int, payload: memoryview) -> None:
        if flags < FLAG_PARTIAL:  # a frame split across reads counts once, at its last piece
            self.frames_in += 1
        n = len(payload)
        st = self.streams.get(sid)
        if st is None:
            self._unknown_stream(sid)
            return
        state = st.state
        if state is not OPEN and state is not HALF_CLOSED_LOCAL:
            return  # after the peer's CloseStream: ignored, as the Rust peer does
        windows = self.windows
        if n and not st.discarding:  # the common case first: arrived and delivered in one call
            if windows.take(st, n, self._now):
                self.listener.on_stream_data(st, payload)
                return
        elif windows.arrived(st, n):
            if st.discarding:
                self._credit(st, windows.discarded(st, n))
            return
        self._reset(st, *windows.refusal(st, n))  # over its window, or over session_recv_limit

    def _unknown_stream(self, sid: int) -> None:
        # a peer of this package is told once, so it stops sending (like TCP's RST)
        if self.peer_is_ext and sid not in self._reset_sent:
            if len(self._reset_sent) >= RESET_MEMORY:
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
            if st is not None and st.receiving:
                self.windows.stopped(st)  # its credit ends with the peer's end
                if st.move(StreamEvent.RECV_EOF) is CLOSED:
                    self._remove(st)
                if not st.discarding:
                    self.listener.on_stream_eof(st)
        elif t is Heartbeat:
            self._control(HeartbeatAck(int(time.time() * 1000)))
        elif t is HeartbeatAck:
            self.keepalive.acked(self._now)
        elif t is PluginData:
            handler = self._plugins.get(frame.plugin_id)
            if handler is not None:
                handler(self, frame.data)
            else:
                log.debug("ignoring PluginData for plugin %r", frame.plugin_id)
        elif t is Error:
            said = f"{frame.code.name}: {clean_text(frame.message)}"  # the peer's own text: escaped and cut for logs
            if frame.stream_id is None:
                self.listener.on_session_error(FerroTunnelError(f"peer ended the session: {said}"))
            else:
                st = self.streams.get(frame.stream_id)
                if st is not None:
                    # rapid reset: a client that opens and resets streams faster than the limit
                    if not self.is_client and not st.local and not self._peer_resets.try_take(1, self._now):
                        self.listener.on_session_error(LimitExceededError(
                            f"the peer reset more than {self.config.max_peer_resets_per_second:g} streams a "
                            "second (max_peer_resets_per_second)"))
                        if st.state is CLOSED:  # the session ended just now
                            return
                    self.sched.discard(st.id)
                    self._remove(st, StreamEvent.RECV_RESET)
                    self.listener.on_stream_reset(st, StreamResetError(f"stream {st.id} reset by peer: {said}", code=frame.code))
        else:  # Register, RegisterAck (tunnels.py), StreamAck, a late Handshake/HandshakeAck
            self.on_other_frame(frame)

    def _peer_open(self, frame: OpenStream) -> None:
        sid = frame.stream_id
        if sid in self.streams:
            log.debug("ignoring duplicate OpenStream for live stream %d", sid)
            return
        if not self.accept_peer_streams:
            log.debug("refusing stream %d: streams opened by this peer are not accepted", sid)
            self._refuse(sid, "this end does not accept streams opened by its peer")
            return
        if sid == 0 or sid % 2 != self._peer_parity:
            log.debug("refusing stream %d: wrong parity for the peer's side", sid)
            self._refuse(sid, "stream id has the wrong parity")
            return
        if len(self.streams) >= self.config.max_streams_per_session:
            self._refuse(sid, "too many streams", "max_streams_per_session", f"{len(self.streams)} streams open")
            return
        if not self.rates.allow_open(self._now):
            self._refuse(sid, "stream-open rate limit exceeded", "rate_limits.streams_per_second", "rate limit")
            return
        st = CoreStream(sid, frame.protocol, frame.priority, False, self.peer_window, self.config.initial_window,
                        kept_headers(frame.headers) if frame.headers else ())
        self.streams[sid] = st
        self.windows.added(st)
        self.listener.on_stream_opened(st)

    def _refuse(self, sid: int, why: str, limit: str = "", detail: str = "") -> None:
        if limit:  # (a peer can ask for these lines at will: one per limit every LOG_RATE_INTERVAL)
            self._warn = self._warn or LogRate()
            self._warn.warning(log, limit, self._now, "refusing stream %d: %s (%s)", sid, detail, limit)
        if self.peer_is_ext:
            self._control(Error(sid, ErrorCode.SERVICE_UNAVAILABLE, why))
        else:  # all a Rust peer understands: end of stream (a reply: it counts as control output)
            self._control(CloseStream(sid, CloseReason.NORMAL))

    def on_credit(self, data: Any) -> None:
        """PluginData of the flow-control extension: more send credit for some streams (past 2^31 - 1
        the stream is reset, as HTTP/2 does; a malformed update or an unknown stream's: counted)."""
        pairs = decode_credit(data)
        if pairs is None:
            self.malformed_credit += 1
            log.debug("ignoring malformed flow-control update of %d bytes", len(data))
            return
        for sid, inc in pairs:
            st = self.streams.get(sid)
            if st is None:
                self.unknown_credit += 1
            elif st.send_credit + inc > MAX_WINDOW:
                self._reset(st, ErrorCode.PROTOCOL_ERROR, "flow-control window overflow",
                            StreamResetError(f"stream {sid}: the peer granted credit past 2^31 - 1"))
            else:
                st.send_credit += inc
                if st.pending_bytes or st.write_shut:
                    self._pump(st)  # (moves bytes into the scheduler: no queue shrinks, no writer wakes)

    # ------------------------------------------------------------------ stream operations

    def open_stream(self, protocol: Protocol = Protocol.TCP, priority: StreamPriority = StreamPriority.NORMAL,
                    headers: Any = ()) -> CoreStream:
        if self.closed:
            raise ConnectionLostError("the session is closed")
        if self.is_client and not self.peer_is_ext:
            raise PeerUnsupportedError("this server does not accept client-opened streams (it did not announce "
                                       f"the {EXT_CAPABILITY} capability; a Rust FerroTunnel server drops them)")
        if len(self.streams) >= self.config.max_streams_per_session:
            raise LimitExceededError(f"{len(self.streams)} streams are open on this session "
                                     "(max_streams_per_session); close some or raise the limit")
        if type(protocol) is not Protocol:
            protocol = Protocol(protocol)
        if type(priority) is not StreamPriority:
            priority = StreamPriority(priority)
        sid = self._next_id
        while sid in self.streams or sid == 0:
            sid = (sid + 2) & 0xFFFFFFFF
        self._next_id = (sid + 2) & 0xFFFFFFFF
        if self._next_id < 3:  # wrapped: keep our parity
            self._next_id = 1 if self.is_client else 2
        frame = encode(OpenStream(sid, protocol, headers, None, priority))  # first: bad headers take no slot
        st = CoreStream(sid, protocol, priority, True, self.peer_window, self.config.initial_window, headers)
        self.streams[sid] = st
        self.windows.added(st)
        self.sched.push(sid, priority, frame)
        self.listener.on_output()
        return st

    def send(self, st: CoreStream, data: Any, owned: bool = False) -> None:
        """Queue payload on a stream; it leaves as credit allows. With ``owned`` the caller hands
        its buffer over and it is queued without a copy."""
        if st.write_shut or st.state is CLOSED:
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
        """The small-write fast path: with nothing queued anywhere, an ``n``-byte payload that fits
        one frame and the stream's credit is counted as sent and True returned; the caller writes
        that frame at once (exactly what queueing and draining would produce). Else False: ``send``."""
        sched = self.sched
        if sched or st.pending is not None or st.write_shut or st.state is CLOSED or n <= 0 or n > self.max_chunk:
            return False
        if self.flow:
            if st.send_credit < n:
                return False
            st.send_credit -= n
        sched.drained_frames += 1
        sched.drained_bytes += n + DATA_HEADER_SIZE
        return True

    def send_eof(self, st: CoreStream) -> None:
        """Half-close: CloseStream(Normal) after everything already written."""
        if st.write_shut or st.state is CLOSED:
            return
        st.write_shut = True
        self._pump(st)

    def close(self, st: CoreStream) -> None:
        """Graceful close: flush, half-close, and discard whatever still arrives."""
        if st.state is CLOSED:
            return
        st.discarding = True
        self.windows.drop_unread(st)
        self.send_eof(st)
        if st.state is HALF_CLOSED_LOCAL:
            st.move(StreamEvent.ABANDON)
            self._remove(st)

    def reset(self, st: CoreStream, message: str = "stream aborted", code: Optional[ErrorCode] = None) -> None:
        """Abort: drop queued data and tell the peer (a reset with ``code``, else INTERNAL_SERVER_ERROR; EOF for Rust)."""
        if st.state is not CLOSED:
            self._reset(st, code or ErrorCode.INTERNAL_SERVER_ERROR, message, None)

    def _reset(self, st: CoreStream, code: ErrorCode, message: str, exc: Optional[Exception]) -> None:
        dropped = self.sched.discard(st.id)  # with a queued half-close: its CloseStream is the last frame
        if self.peer_is_ext:
            self._control(Error(st.id, code, message))
        elif dropped or not st.local_eof:  # all a Rust peer knows (no reset, no timeout): its EOF, once
            self.sched.push(st.id, st.priority, encode(CloseStream(st.id, CloseReason.NORMAL)))
            self.listener.on_output()
        st.write_shut = True
        self._remove(st, StreamEvent.SEND_RESET)
        if exc is not None:
            self.listener.on_stream_reset(st, exc)

    def consumed(self, st: CoreStream, n: int) -> None:
        """The application took ``n`` delivered bytes off the stream: free them, grant credit (0:
        some were dropped, see ``FlowWindows.drop_unread``; credit held back may go now)."""
        windows = self.windows
        inc = windows.consumed(st, n) if n > 0 else 0
        if inc:
            self._credit(st, inc)
        if windows.deferred:
            for other in windows.undeferred():
                self._credit(other, windows.grant(other))

    def _credit(self, st: CoreStream, inc: int) -> None:
        if inc:
            self._control(PluginData(FLOW_PLUGIN_ID, encode_credit(st.id, inc)))

    # ------------------------------------------------------------------ internals

    def _pump(self, st: CoreStream) -> None:
        pending = st.pending
        if pending:
            flow, sched, sid, prio = self.flow, self.sched, st.id, st.priority
            # no other stream's frames queued: frames up to solo_max_chunk (the README says the cost)
            alone = sched.queued_streams == (1 if sched.stream_pending(sid) else 0)
            chunk_max = self.solo_chunk if alone else self.max_chunk
            push = sched.push_data
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
        if st.write_shut and not st.pending_bytes and not st.local_eof:
            self.sched.push(st.id, st.priority, encode(CloseStream(st.id, CloseReason.NORMAL)))
            self.listener.on_output()
            if st.move(StreamEvent.SEND_EOF) is CLOSED:
                self._remove(st)
            elif st.discarding:
                st.move(StreamEvent.ABANDON)
                self._remove(st)

    def _remove(self, st: CoreStream, event: Optional[StreamEvent] = None) -> None:
        """Take a stream out of the session (its state is CLOSED, or ``event`` makes it so)."""
        if event is not None:
            st.move(event)
        # queued payload goes now (after a graceful end there is none; after a reset it is dropped)
        st.pending = None
        st.pending_bytes = 0
        live = self.streams.get(st.id) is st
        if live:
            del self.streams[st.id]
        self.windows.removed(st, live)
        self.writer_gone(st)

    def _control(self, frame: Any) -> None:
        self.sched.push_control(encode(frame))
        self.listener.on_output()

    def tick(self, now: float) -> float:
        """Run timers; returns when to call again. Raises TunnelTimeoutError for a dead peer."""
        self._now = now
        windows = self.windows
        stalling = windows.over_limit or windows.budget_since is not None
        if stalling:  # without flow control: a reader stalled this long costs its stream
            timeout = self.config.stalled_stream_timeout
            for sid in windows.stalled(now, timeout, self.streams):
                st = self.streams.get(sid)
                if st is not None:
                    log.warning("stream %d: %d bytes unread (the session holds %d) for %gs (stalled_stream_timeout); "
                                "resetting it", sid, st.unread, windows.total_unread, timeout)
                    self._reset(st, ErrorCode.TIMEOUT, "the reader stalled",
                                StreamResetError(f"stream {sid}: nothing read for {timeout:g}s (stalled_stream_timeout)"))
        send, deadline = self.keepalive.tick(now)
        if stalling:
            deadline = min(deadline, max(windows.stall_deadline(self.config.stalled_stream_timeout), now + 0.05))
        if send:
            self._control(Heartbeat(int(time.time() * 1000)))
        return deadline

    def reading_paused(self, now: float) -> None:
        self.keepalive.reading_paused(now)

    def reading_resumed(self, now: float) -> None:
        # time we ourselves did not read is not the peer's silence
        self.keepalive.reading_resumed(now)

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
            st.move(StreamEvent.CONNECTION_LOST)
            self.listener.on_stream_reset(st, err)
        self.waiting_writers.clear()
        self.windows.clear()
