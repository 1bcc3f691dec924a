"""The state of one stream: an enum, the events that move it, and the one transition function.

::

    OPEN --SEND_EOF--> HALF_CLOSED_LOCAL --RECV_EOF / ABANDON--> CLOSED
    OPEN --RECV_EOF--> HALF_CLOSED_REMOTE --SEND_EOF-----------> CLOSED
    any  --RESET (either side) / CONNECTION_LOST--------------> CLOSED

``ABANDON``: we closed our half and discard whatever still arrives (``close()``), so the stream
needs nothing more from the peer. Two intents of the application sit beside the state, because
they are not protocol states: ``write_shut`` (no more writes; our CloseStream follows the queued
data) and ``discarding`` (what still arrives is dropped).
"""

from __future__ import annotations

import enum
from typing import Any, Deque, Dict, Optional, Tuple

from ..errors import FerroTunnelError
from ..frames import Protocol, StreamPriority

__all__ = ["StreamState", "StreamEvent", "transition", "StreamStateError", "CoreStream", "kept_headers",
           "MAX_KEPT_HEADER_BYTES"]

#: Characters (names and values) of a peer's OpenStream headers kept with its stream for the
#: stream's life (``VirtualStream.headers``); past them only this package's own (``ft-``) headers
#: of up to ``MAX_KEPT_HEADER_VALUE`` characters each (name and value) stay, as many as fit. A peer
#: may send up to the codec's ``MAX_HEADER_BYTES``.
MAX_KEPT_HEADER_BYTES = 8 * 1024
MAX_KEPT_HEADER_VALUE = 512


def kept_headers(headers: Any) -> Any:
    """``headers`` if they fit ``MAX_KEPT_HEADER_BYTES``, else the ``ft-`` ones that fit."""
    n = 0
    for name, value in headers:
        n += len(name) + len(value)
    if n <= MAX_KEPT_HEADER_BYTES:
        return headers
    out, n = [], 0
    for name, value in headers:
        m = len(name) + len(value)
        if name.startswith("ft-") and m <= MAX_KEPT_HEADER_VALUE and n + m <= MAX_KEPT_HEADER_BYTES:
            out.append((name, value))
            n += m
    return out


class StreamState(enum.IntEnum):
    OPEN = 0
    HALF_CLOSED_LOCAL = 1   # our CloseStream is queued; the peer may still send
    HALF_CLOSED_REMOTE = 2  # the peer's CloseStream arrived; we may still send
    CLOSED = 3              # removed from the session


class StreamEvent(enum.IntEnum):
    SEND_EOF = 0
    RECV_EOF = 1
    ABANDON = 2
    SEND_RESET = 3
    RECV_RESET = 4
    CONNECTION_LOST = 5


class StreamStateError(FerroTunnelError):
    """An event that the stream's state does not allow (a bug in the caller, not the peer)."""


OPEN = StreamState.OPEN
HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
HALF_CLOSED_REMOTE = StreamState.HALF_CLOSED_REMOTE
CLOSED = StreamState.CLOSED

_E = StreamEvent
_TABLE: Dict[Tuple[StreamState, StreamEvent], StreamState] = {
    (OPEN, _E.SEND_EOF): HALF_CLOSED_LOCAL,
    (OPEN, _E.RECV_EOF): HALF_CLOSED_REMOTE,
    (HALF_CLOSED_LOCAL, _E.RECV_EOF): CLOSED,
    (HALF_CLOSED_LOCAL, _E.ABANDON): CLOSED,
    (HALF_CLOSED_REMOTE, _E.SEND_EOF): CLOSED,
}
for _s in (OPEN, HALF_CLOSED_LOCAL, HALF_CLOSED_REMOTE):
    for _ev in (_E.SEND_RESET, _E.RECV_RESET, _E.CONNECTION_LOST):
        _TABLE[(_s, _ev)] = CLOSED
del _s, _ev


def transition(state: StreamState, event: StreamEvent) -> StreamState:
    """The state after ``event``; StreamStateError if the state does not allow it."""
    try:
        return _TABLE[(state, event)]
    except KeyError:
        raise StreamStateError(f"{event.name} is not allowed in state {state.name}") from None


class CoreStream:
    """Protocol state of one stream. ``app`` is the adapter's object for it."""

    __slots__ = (
        "id", "protocol", "priority", "local", "app", "state", "write_shut", "discarding",
        "send_credit", "pending", "pending_bytes", "window", "recv_avail", "owed", "unread", "headers",
    )

    def __init__(self, sid: int, protocol: Protocol, priority: StreamPriority, local: bool,
                 send_credit: int, window: int, headers: Any = ()) -> None:
        self.id = sid
        # (name, value) pairs of its OpenStream; none: the one shared () (an idle stream keeps no list)
        self.headers = headers or ()
        self.protocol = protocol
        self.priority = priority
        self.local = local                  # we opened it
        self.app: Any = None
        self.state = OPEN
        self.write_shut = False             # write_eof()/close() asked: CloseStream follows the queue
        self.discarding = False             # close(): what still arrives is dropped
        self.send_credit = send_credit      # payload bytes we may still send (flow control)
        self.pending: Optional[Deque[memoryview]] = None  # written, waiting for credit
        self.pending_bytes = 0
        self.window = window                # current receive window target
        self.recv_avail = window            # bytes the peer may still send before more credit
        self.owed = 0                       # consumed bytes not yet granted back
        self.unread = 0                     # delivered to the app, not yet consumed

    def move(self, event: StreamEvent) -> StreamState:
        self.state = state = transition(self.state, event)
        return state

    @property
    def done(self) -> bool:
        return self.state is CLOSED

    @property
    def receiving(self) -> bool:
        """The peer may still send data on this stream."""
        state = self.state
        return state is OPEN or state is HALF_CLOSED_LOCAL

    @property
    def local_eof(self) -> bool:
        """Our CloseStream is queued (or the stream is gone)."""
        state = self.state
        return state is HALF_CLOSED_LOCAL or state is CLOSED

    def __repr__(self) -> str:
        return f"<CoreStream {self.id} {self.protocol.name} {self.priority.name} {self.state.name}>"
