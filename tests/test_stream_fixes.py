"""Fixes of the second audit in ``VirtualStream`` and ``Session`` (reproductions in its report):

1. ``close()`` hands the unread count of what it drops back to the session, so that a tunnel
   paused for that stream resumes (no flow control) and the session's unread total does not
   creep up (a stream whose halves were both closed before ``close()``);
2. concurrent ``drain()``/``wait_closed()`` on one stream are all woken;
3. concurrent ``Session.accept()`` callers each get a stream, and a cancelled one loses none;
4. ``abort()`` of a stream that has a sink (a TCP bridge, a splice) tells the sink;
5. a sink that aborts another stream of a session while its connection goes down raises nothing.

Real TunnelServer/TunnelClient pairs on 127.0.0.1, on uvloop and asyncio.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any, Callable, List

import pytest
from conftest import tunnel

import ferrotunnel as ft
from ferrotunnel.aio import bridge as bridge_mod
from ferrotunnel.aio.dial import forward
from ferrotunnel.cluster.splice import splice
from ferrotunnel.errors import StreamClosedError

KiB = 1024


async def until(cond: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Poll ``cond`` (a state with no event to wait for) until it holds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.005)
    assert cond(), what


async def scripted(stream: ft.VirtualStream) -> None:
    """Client handler, by the first five bytes: ``bulk?`` gets far more bytes than any receive
    buffer; ``half?`` 150 kB and EOF; ``give!`` 100 kB (no EOF); ``ping?`` ``pong`` and EOF."""
    first = await stream.readexactly(5)
    if first == b"bulk?":
        try:
            for _ in range(64):
                stream.write(b"x" * (64 * KiB))
                await stream.drain()
            stream.write_eof()
        except ft.FerroTunnelError:
            pass
        return
    if first == b"half?":
        stream.write(b"h" * 150_000)
        stream.write_eof()
    elif first == b"give!":
        stream.write(b"g" * 100_000)
    else:
        stream.write(b"pong")
        stream.write_eof()
    await stream.read()


async def ping(session: Any) -> bytes:
    p = await session.open_stream()
    p.write(b"ping?")
    try:
        return await asyncio.wait_for(p.read(), 10)
    finally:
        p.close()


# ---------------------------------------------------------------- 1. close() and the unread count

def test_close_of_a_stream_that_paused_the_tunnel_resumes_reading(run):
    """Without flow control (a Rust peer) a stream holding more than ``stream_recv_buffer``
    unread pauses reading of the whole tunnel. ``close()`` drops those bytes: reading must
    resume, or every other stream of the session starves (and ``session_timeout`` ends it)."""
    async def body():
        cfg = ft.ServerConfig(flow_control=False, stream_recv_buffer=64 * KiB)
        async with tunnel(scripted, server_config=cfg) as (server, client, session):
            assert not session.flow_control
            conn = session.connection
            s = await session.open_stream()
            s.write(b"bulk?")
            await until(lambda: conn.read_paused, "reading never paused: the test tests nothing")
            assert conn.core.reading_blocked
            s.close()  # the application gives up on the stream without reading it
            assert not conn.core.reading_blocked
            assert not conn.read_paused, "close() dropped the unread bytes but reading stays paused"
            assert await ping(session) == b"pong"
    run(body)


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "no-flow"])
def test_close_after_both_halves_ended_releases_the_unread_bytes(run, flow):
    """The peer sent data and EOF, the application half-closes too (the core forgets the stream)
    and then closes it unread: the bytes it held must leave the session's unread total, which
    otherwise grows per stream until it blocks the session."""
    async def body():
        cfg = ft.ServerConfig(flow_control=flow, session_recv_budget=250_000)
        async with tunnel(scripted, server_config=cfg) as (server, client, session):
            assert session.flow_control is flow
            core = session.connection.core
            for _ in range(3):
                s = await session.open_stream()
                s.write(b"half?")
                await until(lambda: s._ended & 1, "the peer's EOF never came")  # (no event for it)
                assert core.total_unread > 0
                s.write_eof()  # both halves ended: the stream leaves the session
                s.close()      # ... and what it held is not wanted
                assert core.total_unread == 0
            assert await ping(session) == b"pong"
            assert core.total_unread == 0
    run(body)


def test_close_after_a_read_returned_credit_for_buffered_bytes(run):
    """A ``read()`` to EOF that hits its limit has given the buffered bytes' credit back already
    (``_credited``): ``close()`` must not count them twice."""
    async def body():
        async with tunnel(scripted) as (server, client, session):
            core = session.connection.core
            s = await session.open_stream()
            s.write(b"give!")
            with pytest.raises(ft.LimitExceededError):
                await s.read(limit=50_000)
            s.close()
            assert core.total_unread == 0
            assert await ping(session) == b"pong"
    run(body)


# ---------------------------------------------------------------- 2. concurrent drain / wait_closed

@pytest.mark.parametrize("order", ["drain-first", "wait_closed-first"])
def test_concurrent_drain_and_wait_closed_are_all_woken(run, order):
    """Two drains and a wait_closed on one backed-up stream: every one returns once the peer
    reads (none is overwritten by a later one)."""
    async def body():
        go = asyncio.Event()
        got = asyncio.get_running_loop().create_future()

        async def late_reader(stream):
            await go.wait()
            n = 0
            async for chunk in stream:
                n += len(chunk)
                if n >= 2_000_000 and not got.done():
                    got.set_result(n)

        async with tunnel(late_reader) as (server, client, session):
            s = await session.open_stream()
            s.write(b"x" * 2_000_000)  # far past the credit and the send buffer
            assert not s.can_write()
            waits = [s.drain(), s.wait_closed(), s.drain()]
            if order == "wait_closed-first":
                waits.reverse()
            tasks = []
            for w in waits:
                tasks.append(asyncio.ensure_future(w))
                await asyncio.sleep(0)  # each registers before the next
            assert not any(t.done() for t in tasks)
            go.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            assert await asyncio.wait_for(got, 15) == 2_000_000
    run(body)


def test_two_wait_closed_on_a_stream_below_its_send_buffer_wait_quietly(run, monkeypatch):
    """Two wait_closed() (e.g. aclose() in one task and wait_closed() in another) on a stream whose
    peer does not read, its queue under the send buffer: both wait without waking each other over
    and over (a busy loop), and both return once the peer reads."""
    from ferrotunnel.protocol.core import SessionCore

    asks = []
    wait_writable = SessionCore.wait_writable

    def counting(self, st, below=None):
        asks.append(below)
        return wait_writable(self, st, below)

    monkeypatch.setattr(SessionCore, "wait_writable", counting)

    async def body():
        go = asyncio.Event()

        async def late_reader(stream):
            await go.wait()
            async for _ in stream:
                pass

        async with tunnel(late_reader, client_config=ft.ClientConfig(initial_window=16 * KiB)) as (
                server, client, session):
            s = await session.open_stream()
            s.write(b"x" * (48 * KiB))  # past the peer's credit, under the send buffer
            await until(lambda: 0 < s._conn.core.queued(s._st) < s._conn.config.stream_send_buffer, "backed up")
            tasks = [asyncio.ensure_future(s.wait_closed()), asyncio.ensure_future(s.wait_closed())]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in tasks)
            assert len(asks) < 20, f"{len(asks)} wake-ups in 0.3 s: a busy loop"
            go.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
    run(body)


def test_concurrent_drain_and_wait_closed_all_fail_when_the_session_closes(run):
    async def body():
        async def never_reads(stream):
            await asyncio.sleep(3600)

        async with tunnel(never_reads) as (server, client, session):
            s = await session.open_stream()
            s.write(b"x" * 2_000_000)
            a = asyncio.ensure_future(s.drain())
            await asyncio.sleep(0)
            b = asyncio.ensure_future(s.wait_closed())
            await asyncio.sleep(0)
            c = asyncio.ensure_future(s.drain())
            await asyncio.sleep(0)
            assert not (a.done() or b.done() or c.done())
            session.close(ft.FerroTunnelError("going away"))
            done, pending = await asyncio.wait({a, b, c}, timeout=10)
            for t in pending:
                t.cancel()
            assert not pending, "a waiter stayed pending after the session closed"
            assert isinstance(a.exception(), ft.FerroTunnelError)
            assert isinstance(c.exception(), ft.FerroTunnelError)
            assert b.exception() is None  # wait_closed: the stream is closed, one way or another
            assert s._writer is None  # nothing kept by an ended stream
    run(body)


def test_a_cancelled_drain_leaves_the_others_waiting(run):
    async def body():
        go = asyncio.Event()

        async def late_reader(stream):
            await go.wait()
            async for _ in stream:
                pass

        async with tunnel(late_reader) as (server, client, session):
            s = await session.open_stream()
            s.write(b"x" * 2_000_000)
            a = asyncio.ensure_future(s.drain())
            await asyncio.sleep(0)
            b = asyncio.ensure_future(s.drain())
            await asyncio.sleep(0)
            a.cancel()
            with pytest.raises(asyncio.CancelledError):
                await a
            assert not b.done()
            go.set()
            await asyncio.wait_for(b, 15)
            await asyncio.wait_for(s.wait_closed(), 15)
            assert s._writer is None
    run(body)


# ---------------------------------------------------------------- 3. concurrent accept()

ACCEPTING = dict(server_kwargs={"stream_handler": None}, server_config=ft.ServerConfig(accept_client_streams=True))


def test_concurrent_accepts_each_get_a_stream(run):
    async def body():
        async with tunnel(**ACCEPTING) as (server, client, session):
            t1 = asyncio.ensure_future(session.accept())
            await asyncio.sleep(0)
            t2 = asyncio.ensure_future(session.accept())
            await asyncio.sleep(0)
            opened = [client.session.open_stream_nowait() for _ in range(2)]
            for cs in opened:
                cs.write(b"hi")
            got = await asyncio.wait_for(asyncio.gather(t1, t2), 10)
            assert sorted(s.stream_id for s in got) == sorted(cs.stream_id for cs in opened)
            # a later stream still reaches a later caller
            t3 = asyncio.ensure_future(session.accept())
            await asyncio.sleep(0)
            cs = client.session.open_stream_nowait()
            cs.write(b"hi")
            assert (await asyncio.wait_for(t3, 10)).stream_id == cs.stream_id
            assert not session._accept_waiters
    run(body)


@pytest.mark.parametrize("cancelled", [0, 1], ids=["first-cancelled", "second-cancelled"])
def test_a_cancelled_accept_loses_no_stream(run, cancelled):
    """A stream is queued while two callers wait, and one of them is cancelled before it runs
    (whichever was woken): the other gets the stream."""
    async def body():
        async with tunnel(**ACCEPTING) as (server, client, session):
            cs = client.session.open_stream_nowait()
            cs.write(b"hi")
            stream = await asyncio.wait_for(session.accept(), 10)
            tasks = []
            for _ in range(2):
                tasks.append(asyncio.ensure_future(session.accept()))
                await asyncio.sleep(0)
            assert session.enqueue_accepted(stream)  # wakes one caller ...
            tasks[cancelled].cancel()                # ... which may never get to take it
            assert await asyncio.wait_for(tasks[1 - cancelled], 10) is stream
            with pytest.raises(asyncio.CancelledError):
                await tasks[cancelled]
            assert not session._accept_waiters and not session._accept_queue
    run(body)


def test_concurrent_accepts_all_end_when_the_session_closes(run):
    async def body():
        async with tunnel(**ACCEPTING) as (server, client, session):
            tasks = [asyncio.ensure_future(session.accept()) for _ in range(3)]
            await asyncio.sleep(0)
            session.close(ft.FerroTunnelError("going away"))
            done, pending = await asyncio.wait(tasks, timeout=10)
            assert not pending
            assert all(isinstance(t.exception(), ft.ConnectionLostError) for t in done)
    run(body)


# ---------------------------------------------------------------- 4. abort() and the sink

async def local_service(conns: List[Any], ended: "asyncio.Future[bytes]"):
    async def on_local(r, w):
        conns.append(w)
        try:
            data = await r.read()  # waits for the visitor's request: an idle connection
        except ConnectionError:
            data = b"<reset>"
        if not ended.done():
            ended.set_result(data)
        w.close()

    return await asyncio.start_server(on_local, "127.0.0.1", 0)


@pytest.mark.parametrize("how", ["abort", "cancelled-forward"])
def test_abort_of_a_forwarded_stream_ends_its_tcp_connection(run, how):
    """The application resets a stream a bridge forwards (after ``forward(wait=False)``, or a
    ``forward()`` whose handler is cancelled: ``run_handler`` aborts the stream): the bridge must
    be told, or its idle local connection stays open for good."""
    async def body():
        conns: List[Any] = []
        ended = asyncio.get_running_loop().create_future()
        srv = await local_service(conns, ended)
        port = srv.sockets[0].getsockname()[1]
        forwarded = asyncio.get_running_loop().create_future()

        async def handler(stream):
            if how == "abort":
                await forward(stream, ("127.0.0.1", port), wait=False)
                forwarded.set_result((stream, None))
            else:
                forwarded.set_result((stream, asyncio.current_task()))
                await forward(stream, ("127.0.0.1", port))

        async with srv, tunnel(handler) as (server, client, session):
            s = await session.open_stream()
            cs, task = await asyncio.wait_for(forwarded, 10)
            await until(lambda: conns and cs.sink is not None, "the bridge never attached")
            bridge = cs.sink
            if how == "abort":
                cs.abort()
            else:
                task.cancel()
            assert await asyncio.wait_for(ended, 10) in (b"", b"<reset>")
            assert bridge.finished and bridge not in bridge_mod._PIPING
            assert cs.sink is None
            with pytest.raises(ft.StreamResetError):
                await asyncio.wait_for(s.read(), 10)  # the peer sees the reset
    run(body)


def test_a_bridge_that_aborts_its_stream_is_not_told_back(run):
    """The local service resets its connection: the bridge aborts the stream itself, and has let
    it go by the time the abort's word to a sink would come: its ``_finish`` runs once."""
    async def body():
        errors: List[Any] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        conns: List[Any] = []
        srv = await asyncio.start_server(lambda r, w: conns.append(w), "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        forwarded = asyncio.get_running_loop().create_future()

        async def handler(stream):
            await forward(stream, ("127.0.0.1", port), wait=False)
            forwarded.set_result(stream)

        async with srv, tunnel(handler) as (server, client, session):
            s = await session.open_stream()
            cs = await asyncio.wait_for(forwarded, 10)
            await until(lambda: conns and cs.sink is not None, "the bridge never attached")
            bridge = cs.sink
            calls = []
            orig = bridge_mod.TcpBridge._finish

            def counting(self, *a, **k):
                calls.append(k)
                return orig(self, *a, **k)

            bridge_mod.TcpBridge._finish = counting
            try:
                # the local service cuts the connection (SO_LINGER 0: a RST, not a FIN)
                conns[0].get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                             struct.pack("ii", 1, 0))
                conns[0].transport.abort()
                with pytest.raises(ft.StreamResetError):
                    await asyncio.wait_for(s.read(), 10)
            finally:
                bridge_mod.TcpBridge._finish = orig
            assert bridge.finished and cs.sink is None
            assert isinstance(cs.exception, StreamClosedError)
            await asyncio.sleep(0)  # (a turn: when abort's word to a sink still attached would come)
            assert len(calls) == 1 and not calls[0].get("from_tunnel")
            assert not errors
    run(body)


def test_abort_of_a_spliced_stream_resets_both(run):
    """The application aborts one stream of a splice: the splice ends and resets the other; the
    splice's own aborts (sinks detached first) do not come back to it."""
    async def body():
        async with tunnel() as (server, client, session):  # (an echo: nothing flows until written)
            a = await session.open_stream()
            b = await session.open_stream()
            sp = splice(a, b)
            a.abort()  # the splice hears of it a turn later
            await until(lambda: sp.done, "the splice was never told")
            assert a.sink is None and b.sink is None
            assert isinstance(a.exception, StreamClosedError) and isinstance(b.exception, StreamClosedError)
            assert not session.is_closed
            assert await ping_echo(session) == b"ok"
    run(body)


async def ping_echo(session: Any) -> bytes:
    p = await session.open_stream()
    p.write(b"ok")
    p.write_eof()
    try:
        return await asyncio.wait_for(p.read(), 10)
    finally:
        p.close()


def test_close_of_a_stream_with_a_sink_leaves_the_sink_alone(run):
    """A graceful ``close()`` is what a sink itself calls when it is done (a bridge finishing):
    it does not report a reset to the sink."""
    async def body():
        async def idle(stream):
            await stream.read()

        class Sink:
            def __init__(self) -> None:
                self.events: List[str] = []

            def tunnel_data(self, payload):
                self.events.append("data")

            def tunnel_eof(self):
                self.events.append("eof")

            def tunnel_reset(self, exc):
                self.events.append("reset")
                reset.set()

            def tunnel_writable(self):
                pass

            def flush_out(self):
                pass

        reset = asyncio.Event()
        async with tunnel(idle) as (server, client, session):
            s = await session.open_stream()
            sink = Sink()
            s.attach_sink(sink)
            s.close()
            await asyncio.sleep(0)
            assert sink.events == []
            s.abort()  # after close(), with the sink still attached: it is told, once
            await asyncio.wait_for(reset.wait(), 10)
            assert sink.events == ["reset"]
    run(body)


# ---------------------------------------------------------------- 5. aborts while the connection goes down

def test_a_sink_that_aborts_a_stream_of_a_closing_session_raises_nothing(run):
    """Two streams of one session spliced, and a third: when the session closes, the splice
    (told of the first stream's end) aborts the second before the session reached it. Nothing
    may escape ``close()``, and every stream ends."""
    async def body():
        async def idle(stream):
            await asyncio.sleep(3600)

        async with tunnel(idle) as (server, client, session):
            a = await session.open_stream()
            b = await session.open_stream()
            c = await session.open_stream()
            sp = splice(a, b)
            session.close(ft.FerroTunnelError("bye"))  # raised StreamStateError before
            assert sp.done
            assert session.closed_event.is_set()
            assert all(st.exception is not None for st in (a, b, c))
            assert isinstance(c.exception, ft.FerroTunnelError) and "bye" in str(c.exception)
    run(body)
