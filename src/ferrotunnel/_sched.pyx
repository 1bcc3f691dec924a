# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled priority scheduler (twin: ``_sched_py.py``, same names and behaviour; see its docs)."""

from collections import deque

from libc.stdint cimport uint32_t

# inlined at C level from _frames.pxd: no runtime import of the codec
from ._frames cimport DATA_HEADER_SIZE, data_header
from ._model import MAX_DATA_PAYLOAD

__all__ = ["PriorityScheduler", "DEFAULT_DRAIN_BUDGET", "DEFAULT_COALESCE"]

DEFAULT_DRAIN_BUDGET = 256 * 1024
DEFAULT_COALESCE = 16 * 1024
cdef Py_ssize_t _MAX_PAYLOAD = MAX_DATA_PAYLOAD
cdef int[4] _LEVEL_OF = [3, 4, 2, 1]
DEF NUM_LEVELS = 5


cdef class _StreamQueue:
    cdef readonly object stream_id
    cdef int level
    cdef object items
    cdef Py_ssize_t nbytes
    cdef bint dead

    def __cinit__(self, stream_id, int level):
        self.stream_id = stream_id
        self.level = level
        self.items = deque()
        self.nbytes = 0
        self.dead = False


cdef class PriorityScheduler:
    """Queue frames, then ``drain`` them into as few buffers as possible for ``writelines``."""

    cdef object _control
    cdef list _rings
    cdef dict _streams
    cdef Py_ssize_t _frames, _bytes
    cdef public long long drained_frames, drained_bytes
    # wire bytes of connection-level frames queued (what a peer that does not read makes us hold)
    cdef readonly Py_ssize_t control_bytes

    def __cinit__(self):
        self._control = deque()
        self._rings = [deque() for _ in range(NUM_LEVELS)]
        self._streams = {}
        self._frames = 0
        self._bytes = 0
        self.control_bytes = 0
        self.drained_frames = 0
        self.drained_bytes = 0

    def __len__(self):
        return self._frames

    def __bool__(self):
        return self._frames > 0

    @property
    def pending_bytes(self):
        """Wire bytes queued and not yet drained."""
        return self._bytes

    def stream_pending(self, stream_id):
        """Wire bytes queued for one stream."""
        q = self._streams.get(stream_id)
        return (<_StreamQueue>q).nbytes if q is not None else 0

    def push_control(self, frame_bytes):
        """A connection-level frame, sent ahead of all stream traffic."""
        self._control.append(frame_bytes)
        self.control_bytes += len(frame_bytes)
        self._frames += 1
        self._bytes += len(frame_bytes)

    cdef _StreamQueue _queue(self, object stream_id, int priority):
        cdef _StreamQueue q
        obj = self._streams.get(stream_id)
        if obj is None:
            if not 0 <= priority <= 3:
                raise ValueError(f"invalid StreamPriority {priority!r}")
            q = _StreamQueue(stream_id, _LEVEL_OF[priority])
            self._streams[stream_id] = q
        else:
            q = <_StreamQueue>obj
        if not q.items:
            (<object>self._rings[q.level]).append(q)
        return q

    def push(self, stream_id, int priority, frame_bytes):
        """An encoded frame of a stream (OpenStream, CloseStream, a whole data frame)."""
        cdef _StreamQueue q = self._queue(stream_id, priority)
        q.items.append((None, frame_bytes))
        cdef Py_ssize_t n = len(frame_bytes)
        q.nbytes += n
        self._frames += 1
        self._bytes += n

    def push_data(self, stream_id, int priority, payload, bint end_of_stream=False):
        """A data frame; its header is made here and ``payload`` is not copied until drained."""
        cdef Py_ssize_t n = len(payload)
        if n > _MAX_PAYLOAD:
            raise ValueError(f"data payload of {n} bytes exceeds the maximum of {_MAX_PAYLOAD}")
        if not 0 <= stream_id <= 0xFFFFFFFF:
            raise ValueError(f"stream_id must be in 0..4294967295, got {stream_id}")
        header = data_header(<uint32_t>stream_id, n, end_of_stream)
        cdef _StreamQueue q = self._queue(stream_id, priority)
        q.items.append((header, payload))
        q.nbytes += n + DATA_HEADER_SIZE
        self._frames += 1
        self._bytes += n + DATA_HEADER_SIZE

    def discard(self, stream_id):
        """Drop everything queued for a stream (a reset); returns the wire bytes dropped."""
        obj = self._streams.pop(stream_id, None)
        if obj is None:
            return 0
        cdef _StreamQueue q = <_StreamQueue>obj
        q.dead = True
        n = q.nbytes
        self._frames -= len(q.items)
        self._bytes -= n
        q.items.clear()
        return n

    @property
    def queued_streams(self):
        """Streams with frames queued (an idle stream costs the scheduler nothing)."""
        return len(self._streams)

    cdef tuple _next(self, list touched):
        cdef _StreamQueue q
        cdef int level
        if self._control:
            frame = self._control.popleft()
            self.control_bytes -= len(frame)
            return (None, frame)
        for level in range(1, NUM_LEVELS):
            ring = self._rings[level]
            while ring:
                q = <_StreamQueue>ring.popleft()
                if q.dead or not q.items:
                    continue
                item = <tuple>q.items.popleft()
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

    def drain(self, Py_ssize_t budget=DEFAULT_DRAIN_BUDGET, Py_ssize_t coalesce=DEFAULT_COALESCE,
              list touched=None):
        """Take frames in send order until ``budget`` wire bytes (at least one frame); see the twin."""
        cdef list out = []
        cdef bytearray chunk = bytearray()
        cdef Py_ssize_t total = 0, frames = 0, n
        cdef tuple item
        while total < budget:
            item = self._next(touched)
            if item is None:
                break
            header = item[0]
            payload = item[1]
            frames += 1
            if header is not None:
                chunk += <bytes>header
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
