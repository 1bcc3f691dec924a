"""The writers of a session's streams: what each stream and the whole session have queued for the
peer, who waits for room, and the frames that go out.

A stream's writer waits while its stream has ``stream_send_buffer`` queued; every writer waits
while the session has ``session_send_limit`` of frames waiting for the transport, so a peer that
stops reading holds at most that much of our memory for all its streams together, not
``stream_send_buffer`` for each of them. (Payload held back for a stream's credit does not count:
a stream whose reader stalls must not hold up the others; it is bounded per stream, by the
stream's buffer and by what a forwarded connection may read into it: ``SinkSeam.send_room``.)
Writers held by the session's limit are woken together once the frames fell to half of it."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from ..config import StreamConfig
from .listener import CoreListener
from .streams import CLOSED, CoreStream

__all__ = ["WritersMixin"]


class WritersMixin:
    """The writers' part of ``SessionCore`` (``init_writers`` from its ``__init__``)."""

    config: StreamConfig
    listener: CoreListener
    streams: Dict[int, CoreStream]
    sched: Any

    def init_writers(self) -> None:
        #: Streams whose writer waits for room, with the queue mark it waits for.
        self.waiting_writers: Dict[CoreStream, int] = {}
        #: A writer waits for the session's frames to fall under ``session_send_limit`` (then half of it).
        self.send_capped = False
        self.send_limit = self.config.session_send_limit

    def queued(self, st: CoreStream) -> int:
        """Bytes of this stream not yet handed to the transport."""
        return st.pending_bytes + self.sched.stream_pending(st.id)

    def writable(self, st: CoreStream) -> bool:
        """Whether a writer may queue more: below the stream's send buffer and the session's limit."""
        return st.state is CLOSED or (st.pending_bytes + self.sched.stream_pending(st.id) < self.config.stream_send_buffer
                                      and self.sched.pending_bytes < self.send_limit)

    def wait_writable(self, st: CoreStream, below: Optional[int] = None) -> None:
        """Ask for ``on_stream_writable`` once the stream has fewer than ``below`` bytes queued (1:
        all handed to the transport), or is done; by default once ``writable`` says so."""
        if below is None:
            ok = self.writable(st)
            if not ok and self.queued(st) < self.config.stream_send_buffer:
                self.send_capped = True  # only the session's limit holds it
            below = self.config.stream_send_buffer
        else:
            ok = st.state is CLOSED or self.queued(st) < below
        if ok:
            self.waiting_writers.pop(st, None)
            self.listener.on_stream_writable(st)
        else:
            self.waiting_writers[st] = below

    def writer_gone(self, st: CoreStream) -> None:
        """``st`` left the session: its writer, if one waits, is woken (it sees the stream done); its
        frames may have been dropped with it (a reset), which may end the session's wait too."""
        if st in self.waiting_writers:
            del self.waiting_writers[st]
            self.listener.on_stream_writable(st)
        if self.send_capped and self.sched.pending_bytes <= self.send_limit // 2:
            self._wake_capped()

    def _wake_writers(self, sids: Sequence[int]) -> None:
        """Wake the writers waiting on these streams (only their queues shrank) that are now under
        their marks: the cost follows the frames sent, not the number of streams waiting. While
        the session is held by its limit, only those that wait for their queue to empty (a mark
        under the send buffer) go."""
        waiting, streams, pending = self.waiting_writers, self.streams, self.sched.stream_pending
        buffer = self.config.stream_send_buffer if self.send_capped else 1 << 62
        for sid in sids:
            st = streams.get(sid)
            if st is not None and st in waiting:
                mark = waiting[st]
                if st.state is CLOSED or (st.pending_bytes + pending(sid) < mark and mark < buffer):
                    del waiting[st]
                    self.listener.on_stream_writable(st)

    def _wake_capped(self) -> None:
        """The session's queue fell to half its limit: every writer under its own mark goes on."""
        self.send_capped = False
        waiting, pending = self.waiting_writers, self.sched.stream_pending
        for st, mark in list(waiting.items()):
            if st in waiting and (st.state is CLOSED or st.pending_bytes + pending(st.id) < mark):
                del waiting[st]  # (a writer woken before may have ended another: it is gone then)
                self.listener.on_stream_writable(st)

    def data_to_send(self, budget: int, coalesce: int) -> List[Any]:
        """Frames to write now (at most about ``budget`` bytes, small ones joined up to ``coalesce``)."""
        touched: Optional[List[int]] = [] if self.waiting_writers else None  # the streams whose frames left
        out = self.sched.drain(budget, coalesce, touched)
        if touched:
            self._wake_writers(touched)
        if self.send_capped and self.sched.pending_bytes <= self.send_limit // 2:
            self._wake_capped()
        return out
