"""Bytes a session counts as delivered and unread (``total_unread``) must leave the count when they
leave the process: with ``session_recv_limit`` a count that only grows ends in streams reset for
no reason. Each test failed before its fix (leaks found by an audit of every consumer):

* a ``VirtualStream`` collected without ``close()`` kept its unread bytes counted, and a stream
  still open kept its slot after the peer's end;
* a splice whose destination was closed by its owner kept the payload it could not pass on;
* the HTTP ingress's 502 answer (a reset before any response byte reached a slow visitor) kept
  the credit owed for the bytes it held;
* a close while a bridge still owed credit subtracted those bytes twice (the count went below 0).
"""

from __future__ import annotations

import asyncio
import gc
import socket

import pytest

import ferrotunnel as ft
from ferrotunnel.cluster.splice import splice

from conftest import tunnel

N = 10_000


async def until(cond, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            gc.collect()
            await asyncio.sleep(0.01)


def core_of(session):
    return session.connection.core


@pytest.mark.parametrize("then", ["eof", "more", "reset", "nothing"])
def test_a_stream_collected_unclosed_leaves_no_count_and_no_slot(run, then):
    async def body():
        go = asyncio.Event()

        async def handler(stream):
            stream.write(b"x" * N)
            await stream.drain()
            await go.wait()  # the server side lets its stream go meanwhile
            if then == "eof":
                stream.write_eof()
            elif then == "more":
                stream.write(b"y" * 10)
            elif then == "reset":
                stream.abort()
                return
            await asyncio.sleep(30)

        async with tunnel(handler) as (server, client, session):
            core = core_of(session)
            for _ in range(3):
                vs = await session.open_stream()
                vs.write(b"hi")
                await until(lambda: core.total_unread == N, "the bytes arrive unread")
                del vs  # nobody read or closed it
                gc.collect()
                go.set()
                await until(lambda: core.total_unread == 0 and not core.streams, "the count and the slot go")
                go.clear()

    run(body)


def test_a_stream_let_go_with_nothing_unread_frees_its_slot_when_the_peer_ends(run):
    """Nothing unread, nothing lost: the stream is left alone (what it wrote still goes) until the
    peer ends its side; then it is closed as close() would, rather than holding its slot for good."""
    async def body():
        async def handler(stream):
            assert await stream.readexactly(2) == b"hi"
            stream.write_eof()  # and waits for our end, which nobody will send
            await asyncio.sleep(30)

        async with tunnel(handler) as (server, client, session):
            core = core_of(session)
            for _ in range(3):
                vs = await session.open_stream()
                vs.write(b"hi")
                del vs
                gc.collect()
                await until(lambda: not core.streams, "the slot is freed")

    run(body)


def test_a_splice_whose_destination_closed_leaves_no_count(run):
    async def body():
        legs = {}
        second = asyncio.Event()

        async def handler(stream):
            if dict(stream.headers).get("role") == "a":
                stream.write(b"1" * 1000)
                await second.wait()
                stream.write(b"2" * 1000)  # reaches the splice after its destination closed
                await asyncio.sleep(30)
            else:
                async for _ in stream:
                    pass

        async with tunnel(handler) as (server, client, session):
            core = core_of(session)
            for _ in range(3):
                a = session.open_stream_nowait(headers=[("role", "a")])
                b = session.open_stream_nowait(headers=[("role", "b")])
                legs["s"] = splice(a, b)
                await until(lambda: core.sched.pending_bytes == 0 and core.total_unread == 0, "the first bytes pass")
                b.close()  # the owner closes one leg (a sink is not told of close())
                second.set()
                await until(lambda: a.is_closing(), "the splice ends")
                await until(lambda: core.total_unread == 0, "the refused payload leaves the count")
                second.clear()
                a.abort()
                del a, b
                legs.clear()

    run(body)


def test_a_502_for_a_slow_visitor_gives_back_what_it_held(run):
    async def body():
        answer = asyncio.Event()

        async def app(stream):
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.read(4096)
            await answer.wait()
            stream.write(b"HTTP/1.1 200 OK\r\n")  # a few response bytes, then a reset
            stream.abort()

        async with tunnel(app, tunnel_id="t2") as (server, client, session):
            core = core_of(session)
            async with ft.HttpIngress(server, ("127.0.0.1", 0)) as ing:
                for _ in range(3):
                    reader, writer = await asyncio.open_connection(*ing.address)
                    writer.write(b"GET / HTTP/1.1\r\nHost: t2\r\n\r\n")
                    await until(lambda: any(getattr(b, "stream", None) for b in ing.sweeper.bridges),
                                "the request reaches the tunnel")
                    bridge = next(b for b in ing.sweeper.bridges if getattr(b, "stream", None))
                    bridge.pause_writing()  # a visitor that does not read: what arrives is held
                    # the answer and the reset must arrive in one read of the tunnel (as they do
                    # when a network coalesces them): reading waits until both are sent
                    session.connection.transport.pause_reading()
                    answer.set()
                    ccore = client.session.connection.core
                    await until(lambda: not ccore.streams and not ccore.sched, "the client sent both")
                    await asyncio.sleep(0.05)
                    session.connection.transport.resume_reading()
                    got = await asyncio.wait_for(reader.read(), 10)
                    assert got.startswith(b"HTTP/1.1 502 ")
                    writer.close()
                    await until(lambda: core.total_unread == 0, "the held bytes leave the count")
                    answer.clear()

    run(body)


def test_a_close_while_a_bridge_owes_credit_counts_the_bytes_once(run):
    async def body():
        conns = []

        async def local(r, w):
            conns.append((r, w))

        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ls.bind(("127.0.0.1", 0))
        app = await asyncio.start_server(local, sock=ls)
        addr = app.sockets[0].getsockname()[:2]
        held, bridges = [], []

        async def handler(stream):
            held.append(stream)
            bridge = ft.aio.bridge.TcpBridge()
            bridges.append(bridge)
            await asyncio.get_running_loop().create_connection(lambda: bridge, *addr)
            bridge.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            bridge.attach(stream)

        async with tunnel(handler) as (server, client, session):
            vs = await session.open_stream()
            vs.write(b"y" * 3_000_000)  # the local service does not read: the bridge holds some
            core = client.session.connection.core
            await until(lambda: core.total_unread > 0, "the bridge owes credit")
            held[0].close()  # the owner closes the bridged stream (its sink is not told)
            bridge, (r, w) = bridges[0], conns[0]
            async with asyncio.timeout(10):  # the local service reads what the bridge holds
                while bridge._owed or bridge.transport.get_write_buffer_size():
                    await asyncio.wait_for(r.read(1 << 20), 5)
            assert core.total_unread == 0  # (before: minus what the bridge owed)
            bridge.abort()  # (a sink is not told of close(): it ends when told, or at the TCP side's end)
            w.close()
            await until(lambda: bridge.finished, "the bridge ends")
        app.close()

    run(body)


# ---------------------------------------------------------------- found in review of the fixes above

def test_credit_a_sink_owed_still_goes_back_after_a_close(run):
    """A close() drops what the stream holds from the count; a sink that owed bytes then gives
    them back: the count stays, and the peer still gets that credit (without it a peer that
    writes before it reads waited for good, and so did our reply still waiting for its credit)."""
    size = 1 << 20

    class OwingSink:  # output backed up: gives credit back later, as a bridge does
        def __init__(self):
            self.owed = 0

        def tunnel_data(self, p): self.owed += len(p)
        def flush_out(self): pass
        def tunnel_eof(self): pass
        def tunnel_reset(self, exc): pass
        def tunnel_writable(self): pass

    async def body():
        async def handler(vs):  # client side
            sink = OwingSink()
            vs.attach_sink(sink, hold=True)
            vs.write(b"c" * size)  # most of it waits for the peer's credit: the stream stays open
            await until(lambda: sink.owed >= 256 * 1024, "the peer fills our window")
            vs.close()
            await asyncio.sleep(0.05)
            vs.consumed(sink.owed)  # the sink's output drained
            await asyncio.sleep(30)

        async with tunnel(handler) as (server, client, session):
            vs = await session.open_stream()
            vs.write(b"s" * size)
            await asyncio.wait_for(vs.drain(), 10)
            got = 0
            async with asyncio.timeout(10):
                async for chunk in vs:
                    got += len(chunk)
            assert got == size
            assert client.session.connection.core.total_unread == 0

    run(body)


def test_a_stream_let_go_after_write_eof_still_delivers_what_it_wrote(run):
    """Nothing unread, its end queued behind its data: the peer's end must not cut it."""
    size = 2 << 20  # more than the first window: most of it waits for credit

    async def body():
        result = asyncio.get_running_loop().create_future()

        async def handler(stream):  # reads a little, half-closes, reads the rest
            got = len(await stream.read(1000))
            stream.write_eof()
            await asyncio.sleep(0.2)
            try:
                async for chunk in stream:
                    got += len(chunk)
                result.set_result(got)
            except Exception as exc:
                result.set_result(repr(exc))

        async with tunnel(handler) as (server, client, session):
            vs = await session.open_stream()
            vs.write(b"u" * size)
            vs.write_eof()
            del vs  # no close()
            gc.collect()
            assert await asyncio.wait_for(result, 10) == size
            await until(lambda: not core_of(session).streams, "the stream ends")

    run(body)


def test_a_stream_collected_in_another_thread_is_still_forgotten(run):
    """A collection can run in any thread (a cycle freed by a worker's allocation): the session
    is told through the loop's thread-safe call (a debug loop refuses a plain call_soon there)."""
    async def body():
        asyncio.get_running_loop().set_debug(True)

        async def handler(stream):
            stream.write(b"x" * N)
            await stream.drain()
            await asyncio.sleep(30)

        async with tunnel(handler) as (server, client, session):
            core = core_of(session)
            vs = await session.open_stream()
            vs.write(b"hi")
            await until(lambda: core.total_unread == N, "the bytes arrive unread")
            cycle = [vs]
            cycle.append(cycle)
            del vs, cycle
            gc.disable()
            try:
                await asyncio.get_running_loop().run_in_executor(None, gc.collect)
            finally:
                gc.enable()
            await until(lambda: core.total_unread == 0 and not core.streams, "the count and the slot go")

    run(body)
