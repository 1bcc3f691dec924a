"""The local connect of a forwarded stream: ``forward()``, its timeout without reference cycles,
and ``DialSlots``, the bound on such connects in flight at once."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Deque, Optional, Tuple

from ..addr import as_address
from ..lograte import LogRate
from .bridge import TcpBridge
from .stream import VirtualStream

__all__ = ["DialSlots", "MAX_CONNECTS_IN_FLIGHT", "dial", "forward"]

log = logging.getLogger("ferrotunnel.forward")

#: Failed dials of a local service: logged once per address every LOG_RATE_INTERVAL (visitors cause them).
_unreachable = LogRate()

#: Default of ``ClientConfig.max_connects_in_flight``: local connects a client makes at once.
MAX_CONNECTS_IN_FLIGHT = 256


class DialSlots:
    """At most ``limit`` local connects at once; the streams beyond them wait their turn, in order.

    Without it a server opening streams faster than the local service accepts them (a burst of
    visitors, a service that stopped answering SYNs) makes as many connects at once as the session
    has streams, each a descriptor and a socket. A stream reset while it waits is never dialed: it
    leaves the line when it comes to its turn, or when the line is swept (each time it has doubled
    since the last sweep), so the line holds at most about twice the streams still waiting."""

    __slots__ = ("limit", "busy", "_line", "_sweep_at")

    def __init__(self, limit: int = MAX_CONNECTS_IN_FLIGHT) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_connects_in_flight must be an integer of at least 1, got {limit!r}")
        self.limit = limit
        self.busy = 0  # connects in flight (slots taken)
        self._line: Deque[Tuple[asyncio.Future[bool], VirtualStream]] = collections.deque()
        self._sweep_at = limit

    @property
    def waiting(self) -> int:
        """Streams in line (some may have been reset and not swept yet)."""
        return len(self._line)

    async def wait_turn(self, stream: VirtualStream) -> bool:
        """Wait in line for a slot for ``stream``'s connect (the caller found none free: ``busy`` is
        ``limit``); True with the slot (give it back with ``give_back()``), False, holding none, if
        the stream was reset while it waited."""
        if len(self._line) >= self._sweep_at:
            self._sweep()
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._line.append((turn, stream))
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self.give_back()  # handed a slot as it was cancelled: it goes to the next one
            raise

    def give_back(self) -> None:
        """A connect ended (made or failed): its slot goes to the first live stream in line."""
        line = self._line
        while line:
            turn, stream = line.popleft()
            if turn.done():  # its task was cancelled
                continue
            if stream.exception is not None:
                turn.set_result(False)
                continue
            turn.set_result(True)  # the slot passes on: busy stays
            break
        else:
            self.busy -= 1
        n = 2 * len(line)
        if n < self._sweep_at and self._sweep_at > self.limit:  # the line shrank: the next sweep comes sooner
            self._sweep_at = n if n > self.limit else self.limit

    def _sweep(self) -> None:
        live: Deque[Tuple[asyncio.Future[bool], VirtualStream]] = collections.deque()
        for turn, stream in self._line:
            if turn.done():
                continue
            if stream.exception is not None:
                turn.set_result(False)
            else:
                live.append((turn, stream))
        self._line = live
        self._sweep_at = max(self.limit, 2 * len(live))


async def forward(stream: VirtualStream, address: Tuple[str, int], connect_timeout: float = 10.0,
                  wait: bool = True, prefix: bytes = b"", slots: Optional[DialSlots] = None) -> None:
    """Pipe ``stream`` and a new TCP connection to ``address`` both ways until both ends finish.

    If the address cannot be reached the stream is reset and the ``OSError`` is raised. With
    ``wait=False`` it returns once the pipe is set up; the two protocols then run on their own,
    so an idle forwarded stream costs no coroutine or task. ``prefix`` is written to the
    connection before the stream's bytes. A stream reset before its turn came is not dialed at all;
    with ``slots``, the connect waits for one of them (``connect_timeout`` counts from then).
    """
    if stream.exception is not None:  # (a visitor that came and went: no connection to the service)
        return
    host, port = as_address(address, "address")
    if slots is not None:
        if slots.busy < slots.limit:
            slots.busy += 1
        elif not await slots.wait_turn(stream):
            return  # reset while it waited its turn: it holds no slot
        elif stream.exception is not None:  # reset between its turn and this step: the slot goes on
            slots.give_back()
            return
    bridge = TcpBridge()
    try:
        error = await dial(bridge, host, port, connect_timeout)
    finally:
        if slots is not None:
            slots.give_back()
    if error is not None:
        _unreachable.warning(log, (host, port), time.monotonic(), "stream %d: cannot reach local service %s:%s: %s",
                             stream.stream_id, host, port,
                             str(error) or f"{type(error).__name__} (connect_timeout {connect_timeout:g}s)")
        stream.abort()
        try:
            raise error
        finally:  # the traceback holds this frame: it must not hold the error back (a cycle)
            del error
    if log.isEnabledFor(logging.INFO):
        log.info("stream %d (%s) forwarded to %s:%s", stream.stream_id, stream.protocol.name, host, port)
    if prefix:  # e.g. a PROXY protocol header: before any byte of the stream
        bridge.transport.write(prefix)
    bridge.attach(stream)
    if wait:
        await bridge.done


async def dial(bridge: asyncio.BaseProtocol, host: str, port: int, timeout: float) -> Optional[BaseException]:
    """Connect ``bridge`` to ``host:port``; the error, or None. A failed connect leaves the loop's
    exception, its traceback and futures in a reference cycle (a timeout: the cancellation's too),
    holding every frame it passed through until the cyclic GC runs. So this frame knows no stream,
    the bridge is reached through a box that a failure empties, and the caller gets a fresh error.
    The timeout is ``asyncio.timeout``'s rule (a cancellation of ours becomes TimeoutError, anyone
    else's goes on) with one timer handle: the context manager cost ~30,000 instructions per stream open."""
    box = [bridge]
    del bridge
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)  # (given the loop it is not looked up again: a getpid() call less)
    assert task is not None
    cancelling = task.cancelling()
    expired: list = []
    timer = loop.call_later(timeout, _expire, task, expired)
    try:
        await loop.create_connection(lambda: box[0], host, port)
    except OSError as exc:
        box.clear()
        return type(exc)(*exc.args)
    except asyncio.CancelledError:
        if expired and task.uncancel() <= cancelling:
            box.clear()
            return TimeoutError()
        raise
    finally:
        timer.cancel()
    if expired:  # the connection was made as the time ran out: the cancellation is ours, not the caller's
        task.uncancel()
    return None


def _expire(task: "asyncio.Task[Any]", expired: list) -> None:
    expired.append(True)
    task.cancel()
