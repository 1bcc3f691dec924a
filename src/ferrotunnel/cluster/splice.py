"""Two virtual streams joined end to end: what a node does with a stream that arrives over a node
link for a tunnel whose client session is local. Bytes, half-closes and resets pass both ways,
and credit flows back only as fast as the other stream takes the bytes, so a slow end slows
its peer and what waits for it stays within the stream's window per direction.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sized, cast

from ..aio.bridge import OWN_THRESHOLD
from ..aio.stream import VirtualStream
from ..errors import FerroTunnelError

__all__ = ["Splice", "splice"]

log = logging.getLogger("ferrotunnel.cluster")

#: Splices in progress, held until both directions end (the streams know their sinks, but a
#: session need not hold its streams: see aio/bridge.py for the same rule).
_LIVE: "set[Splice]" = set()


class _Half:
    """The sink of one stream: what it receives goes out on the other."""

    __slots__ = ("src", "dst", "splice", "owed", "eof", "partner", "dirty", "pinned", "held", "held_bytes")

    def __init__(self, src: VirtualStream, dst: VirtualStream, splice: "Splice") -> None:
        self.src = src
        self.dst = dst
        self.splice = splice
        self.owed = 0  # bytes passed on that the other stream has not taken yet: credit waits
        self.eof = False
        self.partner: Optional[_Half] = None
        self.dirty = False  # written during the current read of src: flushed once after it
        #: The read buffer a view passed on during the current read of src belongs to: the rest of
        #: that read's payloads pass as views too (they pin nothing more). None between reads.
        self.pinned: object = None
        #: Payloads of the current read of src that arrived while dst was backed up, in order:
        #: written at the end of the read, as views or as copies (see ``_write_held``).
        self.held: Optional[List[memoryview]] = None
        self.held_bytes = 0

    def tunnel_data(self, payload: memoryview) -> None:
        n = len(payload)
        if self.splice.done:
            self.src.consumed(n)
            return
        dst = self.dst
        held = self.held
        if held is not None:  # an earlier payload of this read waits: this one goes after it
            held.append(payload)
            self.held_bytes += n
        else:
            try:
                # A view of the tunnel's read buffer while dst takes its bytes (they leave at the
                # end of this read: see flush_out), and for every later payload of a buffer that
                # such a view pins already. When dst is backed up, a payload of at least
                # OWN_THRESHOLD waits for the end of the read (``_write_held``); a smaller one is
                # copied now.
                if n >= OWN_THRESHOLD and (payload.obj is self.pinned or dst.can_write()):
                    self.pinned = payload.obj
                    dst.write_queued(payload, True)
                elif n >= OWN_THRESHOLD:
                    self.held = [payload]
                    self.held_bytes = n
                else:
                    dst.write_queued(bytes(payload), True)
            except FerroTunnelError as exc:
                self.splice.end(exc)
                self.src.consumed(n)  # (counted as delivered: gone with the splice)
                return
        if not self.dirty:
            self.dirty = True
            self.src.defer_flush(self)
        if self.held is not None:
            self.owed += n  # credit once the held bytes are queued (see _write_held)
        elif dst.can_write():
            self.src.consumed(n)
        else:
            self.owed += n
            dst.request_writable()  # the partner's tunnel_writable gives the credit back

    def give_back(self) -> None:
        if self.held is not None:
            # dst drained while bytes of this read still wait to be queued on it (another
            # stream's flush in the same pass): their credit waits until they are queued
            return
        owed, self.owed = self.owed, 0
        if owed and not self.splice.done:
            self.src.consumed(owed)

    def tunnel_eof(self) -> None:
        self.eof = True
        if self.held is not None and not self._write_held():  # the bytes before the end go first
            return
        try:
            self.dst.write_eof()
        except FerroTunnelError as exc:
            self.splice.end(exc)
            return
        self.splice.maybe_finished()

    def tunnel_reset(self, exc: BaseException) -> None:
        self.splice.end(exc)

    def tunnel_writable(self) -> None:
        # this stream (the partner's destination) has room again: the partner's credit may flow
        if self.partner is not None:
            self.partner.give_back()

    def flush_out(self) -> None:
        # every frame of one read of src goes to dst's transport at once (one writev), not per frame
        self.dirty = False
        self.pinned = None
        if self.held is not None and not self._write_held():
            return
        if not self.splice.done:
            self.dst.flush()

    def _write_held(self) -> bool:
        """Queue the payloads held back during this read of src on dst; False if the splice ended.

        dst is backed up, so what is queued now stays until it drains (its credit is held back
        meanwhile). Views pin their whole read buffers for that time: they are passed only when
        these payloads fill at least half of the buffers they lie in (at most twice their size
        pinned: a bulk stream, whose read buffers hold little else); otherwise each is copied, so
        that small frames of a slow stream never keep large buffers alive."""
        held, nbytes = self.held or [], self.held_bytes
        self.held, self.held_bytes = None, 0
        if self.splice.done:
            return False
        sizes = {id(p.obj): len(cast(Sized, p.obj)) for p in held}  # (the read buffers)
        as_views = nbytes * 2 >= sum(sizes.values())
        try:
            for p in held:
                self.dst.write_queued(p if as_views else bytes(p), True)
        except FerroTunnelError as exc:
            self.splice.end(exc)
            return False
        if self.owed:
            self.dst.request_writable()  # now counted in dst's queue: credit when it drains
        return True


class Splice:
    """``a`` and ``b`` joined; ``done`` once both directions ended or either was reset."""

    __slots__ = ("a", "b", "halves", "done", "__weakref__")

    def __init__(self, a: VirtualStream, b: VirtualStream) -> None:
        self.a = a
        self.b = b
        self.done = False
        ab, ba = _Half(a, b, self), _Half(b, a, self)
        ab.partner, ba.partner = ba, ab
        self.halves = (ab, ba)

    def start(self) -> None:
        _LIVE.add(self)
        ab, ba = self.halves
        # Both sinks first, then what arrived before (each stream's early bytes go first). Handing
        # a's early bytes to b can fill b's send buffer and drain it again at once: the wake-up
        # for b must find b's sink, or the credit for those bytes stays owed and a stalls for good.
        self.a.attach_sink(ab, hold=True, deliver=False)
        self.b.attach_sink(ba, hold=True, deliver=False)
        self.a.deliver_buffered()
        if not self.done:
            self.b.deliver_buffered()

    def maybe_finished(self) -> None:
        if self.done or not all(h.eof for h in self.halves):
            return
        self._release()
        self.a.close()
        self.b.close()

    def end(self, exc: Optional[BaseException]) -> None:
        """A reset (or a failed write) on either side: both streams are reset."""
        if self.done:
            return
        self._release()
        log.debug("splice of streams %d and %d reset: %s", self.a.stream_id, self.b.stream_id, exc)
        self.a.abort()
        self.b.abort()

    def _release(self) -> None:
        self.done = True
        _LIVE.discard(self)
        for half in self.halves:
            half.partner = None
            half.held, half.held_bytes = None, 0
            # Credit still owed for bytes passed on (the other stream was backed up when this one
            # ended) goes back now: the streams are done with it, and the session would otherwise
            # count those bytes as unread for good (its session_recv_budget creeping up).
            owed, half.owed = half.owed, 0
            if owed:
                half.src.consumed(owed)
        self.a.detach_sink()  # no cycle between finished streams and this splice
        self.b.detach_sink()


def splice(a: VirtualStream, b: VirtualStream) -> Splice:
    """Join ``a`` and ``b`` both ways until both ends finish (or either is reset)."""
    s = Splice(a, b)
    s.start()
    return s
