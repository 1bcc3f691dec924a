"""The stream half of ``TunnelConnection`` (a mixin): opening streams, and the ``CoreListener``
callbacks that hand a stream's events to its ``VirtualStream`` (and so to its sink or reader)."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional, cast

from ..errors import ConnectionLostError, StreamClosedError
from ..frames import Protocol, StreamPriority
from ..protocol.streams import CoreStream
from .stream import VirtualStream

if TYPE_CHECKING:
    from ..config import StreamConfig
    from ..protocol.core import SessionCore
    from .connection import TunnelConnection
    from .session import Session

__all__ = ["StreamEvents", "StreamHandler"]

log = logging.getLogger("ferrotunnel.session")

_REF = weakref.ref


def _stream_of(st: CoreStream) -> Optional[VirtualStream]:
    """The stream's ``VirtualStream``, or None once nobody holds it: ``st.app`` is a weak
    reference to it, or the stream itself while a sink holds it (``attach_sink(hold=True)``)."""
    app = st.app
    return app() if app.__class__ is _REF else app  # type: ignore[no-any-return]


StreamHandler = Callable[[VirtualStream], Awaitable[None]]


class _NoFlush:
    """Stands in the list of sinks to flush for one that failed (see ``sink_failed``)."""

    __slots__ = ()

    def flush_out(self) -> None:
        pass


_NO_FLUSH = _NoFlush()


class StreamEvents:
    """Stream methods of ``TunnelConnection`` (each ``self`` is one)."""

    if TYPE_CHECKING:  # TunnelConnection's, as these methods use them
        core: SessionCore
        config: StreamConfig
        opened: bool
        stream_handler: Optional[StreamHandler]

        @property
        def closed(self) -> bool: ...

        @property
        def session(self) -> Session: ...

        def spawn(self, coro: Any) -> None: ...

        def consumed(self, st: CoreStream, n: int) -> None: ...

    def open_stream(self, protocol: Protocol, priority: StreamPriority,
                    headers: Any = ()) -> VirtualStream:
        if not self.opened or self.closed:
            raise ConnectionLostError("the session is not connected")
        st = self.core.open_stream(protocol, priority, headers)
        vs = VirtualStream(cast("TunnelConnection", self), st)
        st.app = weakref.ref(vs)  # weak: a finished stream and its core state free each other by refcount
        return vs

    # CoreListener
    def on_stream_opened(self, st: CoreStream) -> None:
        vs = VirtualStream(cast("TunnelConnection", self), st)
        st.app = weakref.ref(vs)
        if log.isEnabledFor(logging.DEBUG):  # (the names cost, even with the line off)
            log.debug("stream %d opened by peer (%s, %s)", st.id, st.protocol.name, st.priority.name)
        handler = self.stream_handler
        if handler is not None:
            self.spawn(run_handler(handler, vs))
        elif not self.session.enqueue_accepted(vs):
            log.warning("refusing stream %d: %d streams wait for accept() (max_accept_queue)", st.id,
                        self.config.max_accept_queue)
            vs.abort()

    def on_stream_data(self, st: CoreStream, payload: memoryview) -> None:
        app = st.app  # (_stream_of, inlined: this runs once per frame)
        vs: Optional[VirtualStream] = app() if app.__class__ is _REF else app
        if vs is None:  # nobody holds the stream any more: nobody will read it
            self.stream_abandoned(st)
            return
        sink = vs.sink
        if sink is not None:
            try:
                sink.tunnel_data(payload)
            except Exception as exc:
                self.sink_failed(sink, exc, "tunnel_data", vs)
        else:
            vs.feed_data(payload)

    def sink_failed(self, sink: Any, exc: BaseException, where: str, vs: Optional[VirtualStream] = None) -> None:
        """A ``StreamSink`` raised (an application's bug): only the stream it serves (``vs``, or
        found among the session's) ends. The stream is reset and what it held unread is dropped
        (the sink will not pass it on); a turn later the sink is told of the reset once
        (``tunnel_reset``, unless that is what raised), so that it can let its own resources go.
        It is not called otherwise: a flush it asked for is not made. The session and its other
        streams go on."""
        conn = cast("TunnelConnection", self)
        if conn.sink_errors:
            log.warning("a stream sink %s raised in %s (%s: %s); resetting its stream", type(sink).__name__,
                        where, type(exc).__name__, exc)
        else:
            log.error("a stream sink %s raised in %s; resetting its stream (later sink errors on this "
                      "session are logged without the traceback)", type(sink).__name__, where, exc_info=exc)
        conn.sink_errors += 1
        dirty = conn.dirty_sinks
        for i in range(len(dirty)):  # (in place: a flush loop may be going through the list)
            if dirty[i] is sink:
                dirty[i] = cast(Any, _NO_FLUSH)
        found = [vs] if vs is not None else [
            v for v in map(_stream_of, list(self.core.streams.values())) if v is not None and v.sink is sink]
        for v in found:
            if where == "tunnel_reset" and v.sink is sink:
                v.detach_sink()  # (told of a reset already: that is what failed)
            v.abort()  # a sink still attached is told at the next turn (see VirtualStream.abort)
            v.abandon_unread()

    def stream_abandoned(self, st: CoreStream) -> None:
        """Nobody holds ``st``'s ``VirtualStream`` any more (collected without ``close()``, or
        found so by a frame for it): bytes it held unread are dropped, and then the stream is reset
        as abandoned. A stream that lost no bytes is left as it is (what it wrote still goes) until
        the peer sends data for it (a reset) or its end (a close: see ``on_stream_eof``)."""
        if self.closed:
            return
        if st.unread and not st.done:
            self.core.reset(st, "stream abandoned")
        self.drop_unread(st)  # (after the reset: no credit for a stream that is gone)

    def drop_unread(self, st: CoreStream) -> None:
        """What ``st`` holds unread will never be read: it leaves the session's count, and credit
        held back for the budget may go (without flow control: reading may resume)."""
        self.core.windows.drop_unread(st)
        self.consumed(st, 0)

    def on_stream_eof(self, st: CoreStream) -> None:
        vs = _stream_of(st)
        if vs is not None:
            vs.feed_eof()
        elif not st.done:  # nobody will write or close it: closed (what it wrote still goes), not left
            self.core.close(st)

    def on_stream_reset(self, st: CoreStream, exc: Exception) -> None:
        vs = _stream_of(st)
        if vs is not None:
            vs.feed_reset(exc)

    def on_stream_writable(self, st: CoreStream) -> None:
        vs = _stream_of(st)
        if vs is not None:
            vs.feed_writable()


async def run_handler(handler: StreamHandler, vs: VirtualStream) -> None:
    """Run a stream handler; the stream is reset if it fails, closed if it returns without
    handing the stream to a sink."""
    try:
        await handler(vs)
    except asyncio.CancelledError:
        vs.abort()
        raise
    except (StreamClosedError, ConnectionLostError) as exc:
        log.debug("stream %d handler ended: %s", vs.stream_id, exc)
        vs.abort()
    except Exception:
        log.exception("stream %d handler failed; resetting the stream", vs.stream_id)
        vs.abort()
    else:
        if vs.sink is None:
            await vs.aclose()
