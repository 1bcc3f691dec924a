"""Receive-side buffering and per-stream flow control (the ``flow-control/1`` extension).

With flow control a sender never has more than the granted credit of payload in flight per
stream; the receiver grants more as the application consumes data, and grows a stream's window
(up to ``max_window``) while its reader keeps up. The session budget bounds what all streams
together may hold unread: over it, credit waits. Without flow control (a Rust peer) a stream
with ``stream_recv_buffer`` bytes unread makes the tunnel stop reading until it drains.

Credit travels in ``PluginData`` frames under ``ft.flow/1``: (stream id u32 BE, increment u32 BE)
pairs.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

# MAX_WINDOW (2^31 - 1): the largest window a peer may announce and the most credit a stream may
# hold; config.py has it, so a config's own windows are checked against it
from ..config import MAX_WINDOW, StreamConfig
from ..errors import FerroTunnelError, LimitExceededError, StreamResetError
from ..frames import ErrorCode
from .streams import HALF_CLOSED_LOCAL, OPEN, CoreStream

__all__ = ["FLOW_CAPABILITY", "FLOW_PLUGIN_ID", "MAX_WINDOW", "flow_capability", "parse_flow_capability",
           "encode_credit", "decode_credit", "FlowWindows", "RecvAccount"]

FLOW_CAPABILITY = "flow-control/1"
FLOW_PLUGIN_ID = "ft.flow/1"
log = logging.getLogger("ferrotunnel.core")  # (the core's own: these lines are its)

_UPDATE = struct.Struct(">II")
_WINDOW_PREFIX = FLOW_CAPABILITY + ";window="
_WINDOW_DIGITS = len(str(MAX_WINDOW))


def flow_capability(window: int) -> str:
    return f"{_WINDOW_PREFIX}{window}"


def parse_flow_capability(caps: Iterable[str]) -> Optional[int]:
    """The peer's initial per-stream window, or None if it did not announce flow control."""
    for cap in caps:
        if cap.startswith(_WINDOW_PREFIX):
            value = cap[len(_WINDOW_PREFIX):]
            # at most MAX_WINDOW's digits before int(): thousands of them would raise ValueError
            if value.isascii() and value.isdigit() and len(value) <= _WINDOW_DIGITS and 0 < int(value) <= MAX_WINDOW:
                return int(value)
    return None


def encode_credit(sid: int, inc: int) -> bytes:
    return _UPDATE.pack(sid, min(inc, 0xFFFFFFFF))


def decode_credit(data: Any) -> Optional[List[Tuple[int, int]]]:
    """The (stream id, increment) pairs of a credit update, or None if it is malformed."""
    raw = bytes(data)
    if len(raw) % _UPDATE.size:
        return None
    return list(_UPDATE.iter_unpack(raw))


def _limit_reset(sid: int, whose: str, holds: str, unread: int, n: int, limit: int,
                 said: bool) -> Tuple[ErrorCode, str, FerroTunnelError]:
    """A stream reset by ``session_recv_limit`` or ``server_recv_limit`` (``whose``), logged (at
    WARNING the first time for the session or server, ``said`` after that)."""
    log.log(logging.DEBUG if said else logging.WARNING, "stream %d: reset: %s %d bytes unread and %d more "
            "would pass %s_recv_limit (%d)%s", sid, holds, unread, n, whose, limit,
            "" if said else f" (said once a {whose})")
    return (ErrorCode.SERVICE_UNAVAILABLE, f"receive limit of the {whose} reached",
            LimitExceededError(f"stream {sid}: reset, the {whose}'s unread data would pass {whose}_recv_limit "
                               f"({limit} bytes)"))


def _unread(st: CoreStream) -> int:
    return st.unread


class RecvAccount:
    """What the sessions of one server hold delivered and unread together, against
    ``server_recv_limit``: with flow control, a Data frame that would take ``unread`` past
    ``limit`` resets its stream (see ``FlowWindows.take``). Unlike ``session_recv_limit`` it is
    not counted in grants: it is the last bound against many sessions each near their own limit,
    and a peer that keeps to its credit can meet it when the server is that full."""

    __slots__ = ("limit", "unread", "said")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.unread = 0
        self.said = False  # a stream reset by it was logged (once a server: then debug)


class FlowWindows:
    """Unread bytes per stream and per session, receive windows and the credit they earn.

    Methods that may earn the peer credit return the increment to send (0: nothing now)."""

    __slots__ = ("enabled", "initial_window", "max_window", "stream_limit", "budget", "limit", "total_unread",
                 "credit_out", "limit_said", "over_limit", "deferred", "account", "budget_since")

    def __init__(self, config: StreamConfig, enabled: bool, account: Optional[RecvAccount] = None) -> None:
        self.enabled = enabled
        #: The server's account of unread bytes (``server_recv_limit``), shared by its sessions.
        self.account = account
        self.initial_window = config.initial_window
        self.max_window = config.max_window
        self.stream_limit = config.stream_recv_buffer
        self.budget = config.session_recv_budget
        self.limit = config.session_recv_limit  # (with flow control) what take() never lets unread pass
        self.total_unread = 0
        #: Credit the peer holds on live streams (their ``recv_avail``): with ``total_unread``, what
        #: it may make this session hold. Grants keep the two under ``limit`` (see ``grant``).
        self.credit_out = 0
        self.limit_said = False  # a stream reset by the limit was logged (once a session: then debug)
        # without flow control: streams over stream_recv_buffer, and since when (monotonic)
        self.over_limit: Dict[int, float] = {}
        #: without flow control: since when the session holds more than session_recv_budget unread
        self.budget_since: Optional[float] = None
        self.deferred: Set[CoreStream] = set()  # credit held back while the session is over budget

    @property
    def blocked(self) -> bool:
        """True while the tunnel should not be read (bounded buffering). With flow control the
        peer cannot send past its credit, so the budget binds credit, never reading: one stream
        whose reader stalls cannot stop the others."""
        if self.enabled:
            return False
        return bool(self.over_limit) or self.total_unread > self.budget

    def arrived(self, st: CoreStream, n: int) -> bool:
        """``n`` payload bytes arrived for ``st``; False if they overran its window."""
        if self.enabled:
            if n > st.recv_avail:
                return False
            st.recv_avail -= n
            self.credit_out -= n
        return True

    def take(self, st: CoreStream, n: int, now: float) -> bool:
        """``arrived`` and then ``delivered`` in one call (the path of every Data frame that the
        application gets): False, and nothing taken, if the ``n`` bytes overran the window or
        would make the session hold more than ``session_recv_limit`` unread (``refusal`` tells
        which)."""
        account = self.account
        if self.enabled:
            avail = st.recv_avail
            total = self.total_unread + n
            if n > avail or total > self.limit or (account is not None and account.unread + n > account.limit):
                return False
            st.recv_avail = avail - n
            self.credit_out -= n
            st.unread += n
            self.total_unread = total
            if account is not None:
                account.unread += n
            return True
        st.unread += n
        self.total_unread += n
        if account is not None:
            account.unread += n
        if st.unread > self.stream_limit and st.id not in self.over_limit:
            self.over_limit[st.id] = now
        if self.total_unread > self.budget and self.budget_since is None:
            self.budget_since = now
        return True

    def refusal(self, st: CoreStream, n: int) -> Tuple[ErrorCode, str, FerroTunnelError]:
        """After ``take`` or ``arrived`` refused ``n`` bytes for ``st``: the stream's reset (the
        code and text for the peer, the error for the stream's reader), logged. Bytes within the
        stream's credit were refused by ``session_recv_limit``; the others overran the window."""
        sid = st.id
        account = self.account
        if self.enabled and n <= st.recv_avail:
            if self.total_unread + n <= self.limit and account is not None:  # the server's limit, not ours
                said, account.said = account.said, True
                return _limit_reset(sid, "server", "the server's sessions hold", account.unread, n, account.limit, said)
            said, self.limit_said = self.limit_said, True
            return _limit_reset(sid, "session", "the session holds", self.total_unread, n, self.limit, said)
        log.debug("stream %d: peer overran its window (%d > %d)", sid, n, st.recv_avail)
        return (ErrorCode.PROTOCOL_ERROR, "flow-control window exceeded",
                StreamResetError(f"stream {sid}: peer exceeded the flow-control window"))

    def delivered(self, st: CoreStream, n: int, now: float = 0.0) -> None:
        """``n`` bytes went to the application, which has not consumed them yet."""
        st.unread += n
        self.total_unread += n
        if self.account is not None:
            self.account.unread += n
        if not self.enabled:
            if st.unread > self.stream_limit and st.id not in self.over_limit:
                self.over_limit[st.id] = now
            if self.total_unread > self.budget and self.budget_since is None:
                self.budget_since = now

    def discarded(self, st: CoreStream, n: int) -> int:
        """``n`` bytes arrived for a stream that discards its input: the peer gets them back."""
        if not self.enabled:
            return 0
        st.owed += n
        return self.grant(st)

    def consumed(self, st: CoreStream, n: int) -> int:
        # the count never goes below what the stream holds (a close while a sink still owed bytes
        # dropped them already), but their credit is still owed to the peer
        held = n if n <= st.unread else st.unread
        st.unread -= held
        self.total_unread -= held
        if self.account is not None:
            self.account.unread -= held
        over = self.over_limit
        if over and st.id in over and st.unread <= self.stream_limit // 2:
            del over[st.id]
        if self.budget_since is not None and self.total_unread <= self.budget:
            self.budget_since = None
        if self.enabled:
            state = st.state
            if state is OPEN or state is HALF_CLOSED_LOCAL:  # st.receiving, without the property
                st.owed = owed = st.owed + n
                if owed < st.window // 2 and not st.discarding:
                    return 0  # grant's first test, without the call: too little to grant yet
                return self.grant(st)
        return 0

    def stalled(self, now: float, timeout: float, streams: Dict[int, CoreStream]) -> List[int]:
        """Streams to reset, without flow control: those over ``stream_recv_buffer`` for longer than
        ``timeout``; and when the session has held more than ``session_recv_budget`` that long (no
        stream over its own buffer, or not yet), the one holding the most unread (then the clock
        starts over for the next one) -- when the open streams hold enough to bring the session
        under its budget (bytes of streams already ended, held by slow readers, are not theirs)."""
        out = [sid for sid, since in self.over_limit.items() if now - since > timeout]
        since = self.budget_since
        if since is not None and now - since > timeout and streams:
            self.budget_since = now
            if sum(map(_unread, streams.values())) >= self.total_unread - self.budget:
                most = max(streams.values(), key=_unread)
                if most.unread and most.id not in out:
                    out.append(most.id)
        return out

    def stall_deadline(self, timeout: float) -> float:
        """When ``stalled`` will have a stream to reset (inf: no stream over its buffer, nor the session
        over its budget)."""
        over = self.over_limit
        first = min(over.values()) if over else float("inf")
        if self.budget_since is not None and self.budget_since < first:
            first = self.budget_since
        return first + timeout

    def undeferred(self) -> List[CoreStream]:
        """Streams whose held-back credit may go now (the session fell well under its budget, and
        its unread bytes and the peer's credit under its limit)."""
        if not self.deferred or self.total_unread >= self.budget // 2 or (
                self.total_unread + self.credit_out >= self.limit):
            return []
        out = list(self.deferred)
        self.deferred.clear()
        return out

    def grant(self, st: CoreStream) -> int:
        discarding = st.discarding
        if st.owed < st.window // 2 and not (discarding and st.owed):
            return 0
        if not st.receiving:
            return 0
        # the reader keeps up: a bigger window lets one fast stream beat window / RTT, as far as
        # the limit leaves room for
        grow = (min(st.window, self.max_window - st.window)
                if st.unread == 0 and st.window < self.max_window and not discarding else 0)
        free = self.limit - self.total_unread - self.credit_out  # what grants may still give
        room = free - st.owed
        if grow > room:
            grow = room if room > 0 else 0
        if not discarding and (self.total_unread > self.budget or room < 0):
            # The session holds too much unread, or this credit would let the peer make it hold
            # more than session_recv_limit. Credit waits, except that a stream holding less than
            # its initial window is topped up to it, as far as the limit allows: the streams
            # holding the most pay, and a reader that keeps up is not starved by readers that
            # stall (until the session holds session_recv_limit: then only their reading helps).
            # With so many streams open that their first windows alone pass the limit (a peer may
            # then pass it with no grant of ours: ``take`` resets what would), what the session
            # holds decides: capping by the credit out would leave every stream, once it used its
            # first window, waiting for good behind idle streams' credit.
            floor = min(self.initial_window - st.unread - st.recv_avail,
                        free if self.credit_out <= self.limit else self.limit - self.total_unread)
            if floor <= 0:
                self.deferred.add(st)
                return 0
            inc = min(st.owed, floor)
            st.owed -= inc
            st.recv_avail += inc
            self.credit_out += inc
            if st.owed:
                self.deferred.add(st)
            return inc
        if self.deferred:
            self.deferred.discard(st)
        st.window += grow
        inc = st.owed + grow
        st.owed = 0
        st.recv_avail += inc
        self.credit_out += inc
        return inc

    def added(self, st: CoreStream) -> None:
        """A new stream: the peer holds its first window of credit."""
        self.credit_out += st.recv_avail

    def stopped(self, st: CoreStream) -> None:
        """The peer ended its side of ``st``: the credit it held there can never be used."""
        self.credit_out -= st.recv_avail
        st.recv_avail = 0
        self.deferred.discard(st)

    def drop_unread(self, st: CoreStream) -> None:
        """The application will never read what ``st`` holds (it closed the stream)."""
        if st.unread:
            self.total_unread -= st.unread
            if self.account is not None:
                self.account.unread -= st.unread
            st.unread = 0
            self.over_limit.pop(st.id, None)
            if self.budget_since is not None and self.total_unread <= self.budget:
                self.budget_since = None

    def removed(self, st: CoreStream, live: bool = True) -> None:
        """``st`` left the session (``live``: it was still one of its streams, so its credit goes)."""
        if live:
            self.credit_out -= st.recv_avail
        if st.discarding:
            self.drop_unread(st)
        self.over_limit.pop(st.id, None)
        self.deferred.discard(st)

    def clear(self) -> None:
        """The session ended: what it still counts leaves the server's account (its streams'
        buffers go with it; their late ``consumed`` calls are not counted there again)."""
        self.over_limit.clear()
        self.budget_since = None
        self.deferred.clear()
        account, self.account = self.account, None
        if account is not None:
            account.unread -= self.total_unread
