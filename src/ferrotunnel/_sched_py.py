"""Pure-Python twin of the compiled priority scheduler (`_sched.pyx`): same names, same behaviour.

Outbound queue of one tunnel connection. Connection-level control frames (heartbeats, acks,
flow-control updates) leave first, in FIFO order; then stream frames by urgency CRITICAL, HIGH,
NORMAL, LOW, round-robin between the streams of one level, one frame per turn. A stream's
frames keep their order (its CloseStream never overtakes its Data).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from ._frames_py import data_header
from ._model import DATA_HEADER_SIZE, MAX_DATA_PAYLOAD

__all__ = ["PriorityScheduler", "DEFAULT_DRAIN_BUDGET", "DEFAULT_COALESCE"]

#: Bytes one ``drain`` hands out at most (beyond the one frame that always goes).
DEFAULT_DRAIN_BUDGET = 256 * 1024
#: Payloads shorter than this are copied into the joined buffer; longer ones are passed by reference.
DEFAULT_COALESCE = 16 * 1024

# wire StreamPriority value -> level (0 is connection control)
_LEVEL_OF = (3, 4, 2, 1)  # NORMAL, LOW, HIGH, CRITICAL
_NUM_LEVELS = 5


class _StreamQueue:
    __slots__ = ("stream_id", "level", "items", "nbytes", "dead")

    def __init__(self, stream_id: int, level: int) -> None:
        self.stream_id = stream_id
        self.level = level
        self.items: Deque[Tuple[Optional[bytes], Any]] = deque()
        self.nbytes = 0
        self.dead = False


class PriorityScheduler:
    """Queue frames, then ``drain`` them into as few buffers as possible for ``writelines``."""

    def __init__(self) -> None:
        self._control: Deque[Any] = deque()
        self._rings: List[Deque[_StreamQueue]] = [deque() for _ in range(_NUM_LEVELS)]
        self._streams: Dict[int, _StreamQueue] = {}
        self._frames = 0
        self._bytes = 0
        #: Wire bytes of connection-level frames queued (replies, credit): what a peer that does
        #: not read makes us hold, since stream data is bounded per stream by its writers.
        self.control_bytes = 0
        #: Frames and wire bytes handed out by ``drain`` so far (for metrics).
        self.drained_frames = 0
        self.drained_bytes = 0

    def __len__(self) -> int:
        return self._frames

    def __bool__(self) -> bool:
        return self._frames > 0

    @property
    def pending_bytes(self) -> int:
        """Wire bytes queued and not yet drained."""
        return self._bytes

    def stream_pending(self, stream_id: int) -> int:
        """Wire bytes queued for one stream."""
        q = self._streams.get(stream_id)
        return q.nbytes if q is not None else 0

    def push_control(self, frame_bytes: Any) -> None:
        """A connection-level frame, sent ahead of all stream traffic."""
        self._control.append(frame_bytes)
        self.control_bytes += len(frame_bytes)
        self._frames += 1
        self._bytes += len(frame_bytes)

    def _queue(self, stream_id: int, priority: int) -> _StreamQueue:
        q = self._streams.get(stream_id)
        if q is None:
            if not 0 <= priority <= 3:
                raise ValueError(f"invalid StreamPriority {priority!r}")
            q = _StreamQueue(stream_id, _LEVEL_OF[priority])
            self._streams[stream_id] = q
        if not q.items:
            self._rings[q.level].append(q)
        return q

    def push(self, stream_id: int, priority: int, frame_bytes: Any) -> None:
        """An encoded frame of a stream (OpenStream, CloseStream, a whole data frame)."""
        q = self._queue(stream_id, priority)
        q.items.append((None, frame_bytes))
        n = len(frame_bytes)
        q.nbytes += n
        self._frames += 1
        self._bytes += n

    def push_data(self, stream_id: int, priority: int, payload: Any, end_of_stream: bool = False) -> None:
        """A data frame; its header is made here and ``payload`` is not copied until drained."""
        n = len(payload)
        if n > MAX_DATA_PAYLOAD:
            raise ValueError(f"data payload of {n} bytes exceeds the maximum of {MAX_DATA_PAYLOAD}")
        if not 0 <= stream_id <= 0xFFFFFFFF:
            raise ValueError(f"stream_id must be in 0..4294967295, got {stream_id}")
        header = data_header(stream_id, n, end_of_stream)
        q = self._queue(stream_id, priority)
        q.items.append((header, payload))
        q.nbytes += n + DATA_HEADER_SIZE
        self._frames += 1
        self._bytes += n + DATA_HEADER_SIZE

    def discard(self, stream_id: int) -> int:
        """Drop everything queued for a stream (a reset); returns the wire bytes dropped."""
        q = self._streams.pop(stream_id, None)
        if q is None:
            return 0
        q.dead = True
        n = q.nbytes
        self._frames -= len(q.items)
        self._bytes -= n
        q.items.clear()
        return n

    @property
    def queued_streams(self) -> int:
        """Streams with frames queued (an idle stream costs the scheduler nothing)."""
        return len(self._streams)

    def _next(self, touched: Optional[List[int]]) -> Optional[Tuple[Optional[bytes], Any]]:
        if self._control:
            frame = self._control.popleft()
            self.control_bytes -= len(frame)
            return None, frame
        for level in range(1, _NUM_LEVELS):
            ring = self._rings[level]
            while ring:
                q = ring.popleft()
                if q.dead or not q.items:
                    continue
                item = q.items.popleft()
                q.nbytes -= (DATA_HEADER_SIZE if item[0] is not None else 0) + len(item[1])
                if touched is not None:
                    touched.append(q.stream_id)
                if q.items:
                    ring.append(q)
                else:  # an idle stream keeps no scheduler state
                    q.dead = True
                    del self._streams[q.stream_id]
                return item
        return None

    def drain(self, budget: int = DEFAULT_DRAIN_BUDGET, coalesce: int = DEFAULT_COALESCE,
              touched: Optional[List[int]] = None) -> List[Any]:
        """Take frames in send order until ``budget`` wire bytes (at least one frame).

        Headers and payloads shorter than ``coalesce`` are copied into joined buffers; longer
        payloads are returned as they were queued, so bulk data is not copied. Pass a
        ``coalesce`` above ``budget`` to get a single contiguous buffer (what TLS wants).
        ``touched``, if given, gets the stream id of each stream frame taken, in order (whose
        queues shrank: the only streams whose writers can have room now).
        """
        if touched is not None and type(touched) is not list:  # (as the compiled twin's typed argument)
            raise TypeError(f"touched must be a list or None, got {type(touched).__name__}")
        out: List[Any] = []
        chunk = bytearray()
        total = 0
        frames = 0
        while total < budget:
            item = self._next(touched)
            if item is None:
                break
            header, payload = item
            frames += 1
            if header is not None:
                chunk += header
                total += DATA_HEADER_SIZE
            n = len(payload)
            total += n
            if n >= coalesce:
                if chunk:
                    out.append(chunk)
                    chunk = bytearray()
                out.append(payload)
            else:
                chunk += payload
        if chunk:
            out.append(chunk)
        self._frames -= frames
        self._bytes -= total
        self.drained_frames += frames
        self.drained_bytes += total
        return out
