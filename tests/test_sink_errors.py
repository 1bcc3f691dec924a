"""A ``StreamSink`` that raises (an application's bug) ends only the stream it serves: the sink is
let go, the stream is reset and what it held unread leaves the session's count; the session and
its other streams go on. Before, the exception left the tunnel connection's read callback and
the event loop closed the connection: every stream of the session was lost."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

import ferrotunnel as ft

from conftest import tunnel

EVENTS = ["tunnel_data", "flush_out", "tunnel_eof", "tunnel_reset", "tunnel_writable", "deliver_buffered"]


class Boom(RuntimeError):
    pass


class FaultySink:
    """Passes data on to a list; raises in the event named ``bad`` (once)."""

    def __init__(self, stream, bad: str) -> None:
        self.stream, self.bad, self.got = stream, bad, bytearray()
        self.calls = {e: 0 for e in EVENTS}

    def _event(self, name: str) -> None:
        self.calls[name] += 1
        if name == self.bad:
            raise Boom(f"sink bug in {name}")

    def tunnel_data(self, payload) -> None:
        self.got += payload
        self._event("tunnel_data")
        self.stream.defer_flush(self)
        self.stream.consumed(len(payload))

    def flush_out(self) -> None:
        self._event("flush_out")

    def tunnel_eof(self) -> None:
        self._event("tunnel_eof")

    def tunnel_reset(self, exc) -> None:
        self._event("tunnel_reset")

    def tunnel_writable(self) -> None:
        self._event("tunnel_writable")


async def until(cond, what: str, timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


async def echo_once(session, payload: bytes) -> bytes:
    vs = await session.open_stream()
    vs.write(payload)
    vs.write_eof()
    got = await asyncio.wait_for(vs.read(), 10)
    await vs.aclose()
    return got


@pytest.mark.parametrize("bad", EVENTS)
def test_a_sink_that_raises_ends_its_stream_only(run, bad, caplog):
    """Client side: two streams from the server; the one with the faulty sink is reset, the other
    is echoed to the end, and the session carries new streams after."""
    sinks = []

    async def handler(stream):
        first = await stream.readexactly(4)
        if first == b"good":  # an echo on a stream with no sink
            stream.write(first + await stream.read())
            stream.write_eof()
            return
        if bad == "deliver_buffered":
            await asyncio.sleep(0.2)  # the next bytes wait in the read buffer
        sink = FaultySink(stream, "tunnel_data" if bad == "deliver_buffered" else bad)
        sinks.append(sink)
        if bad == "deliver_buffered":
            with pytest.raises(Boom):
                stream.attach_sink(sink)  # the caller is told, and the stream ended
            assert stream.exception is not None
            return
        stream.attach_sink(sink)
        if bad == "tunnel_writable":  # a full send buffer: the wake-up comes with the peer's credit
            stream.write(b"w" * 1_000_000)
            stream.request_writable()
            assert sink.calls["tunnel_writable"] == 0
        await asyncio.sleep(30)  # the sink has the stream now

    async def body():
        async with tunnel(handler) as (server, client, session):
            ccore = client.session.connection.core
            bad_vs = await session.open_stream()
            good_vs = await session.open_stream()
            good_vs.write(b"good")
            bad_vs.write(b"sink")
            if bad == "deliver_buffered":
                bad_vs.write(b"payload")  # waits in the read buffer until the sink is attached
            elif bad != "tunnel_writable":
                await until(lambda: bool(sinks), "the sink is attached")
                bad_vs.write(b"payload")
            if bad == "tunnel_eof":
                bad_vs.write_eof()
            elif bad == "tunnel_reset":
                await until(lambda: sinks[0].calls["tunnel_data"] == 1, "the payload reached the sink")
                bad_vs.abort()
            # the faulty stream ends with a reset (or EOF) on our side
            async with asyncio.timeout(10):
                with pytest.raises((ft.StreamClosedError, ft.StreamResetError, asyncio.IncompleteReadError)):
                    while await bad_vs.read(65536):
                        pass
                    raise asyncio.IncompleteReadError(b"", None)
            # the other stream goes on, and so does the session
            good_vs.write(b" and more")
            good_vs.write_eof()
            assert await asyncio.wait_for(good_vs.read(), 10) == b"good and more"
            assert await echo_once(session, b"good after") == b"good after"
            assert not session.is_closed and client.session.connection.sink_errors == 1
            gc.collect()
            await until(lambda: ccore.total_unread == 0, "the unread count is back to 0")
            assert sinks[0].calls[sinks[0].bad] == 1  # a failed sink is not called again ...
            await until(lambda: sinks[0].calls["tunnel_reset"] == 1, "the sink is told of the reset")
            await asyncio.sleep(0.05)
            assert sinks[0].calls["tunnel_reset"] == 1  # ... but told of the reset, once

    with caplog.at_level(logging.WARNING, logger="ferrotunnel"):
        run(body)
    errors = [r for r in caplog.records if "raised in" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR and errors[0].exc_info is not None, [
        r.getMessage() for r in caplog.records]
    assert bad in errors[0].getMessage()
    assert not [r for r in caplog.records if "tunnel connection lost" in r.getMessage()]


def test_later_sink_errors_are_logged_without_a_traceback(run, caplog):
    async def handler(stream):
        await stream.readexactly(4)
        stream.attach_sink(FaultySink(stream, "tunnel_data"))
        await asyncio.sleep(30)

    async def body():
        async with tunnel(handler) as (server, client, session):
            for _ in range(3):
                vs = await session.open_stream()
                vs.write(b"sinkdata")
                async with asyncio.timeout(10):
                    with pytest.raises((ft.StreamClosedError, ft.StreamResetError)):
                        await vs.read()
            assert client.session.connection.sink_errors == 3 and not session.is_closed

    with caplog.at_level(logging.WARNING, logger="ferrotunnel"):
        run(body)
    errors = [r for r in caplog.records if "raised in" in r.getMessage()]
    assert [r.levelno for r in errors] == [logging.ERROR, logging.WARNING, logging.WARNING]
    assert errors[0].exc_info and not errors[1].exc_info and "sink bug in tunnel_data" in errors[1].getMessage()


def test_a_sink_that_failed_is_not_flushed_later_in_the_same_read(run, caplog):
    """Two Data frames in one tunnel read: the sink asks for a flush on the first and raises on
    the second; the flush it asked for is not made (it would call the failed sink again)."""
    from ferrotunnel import frames as F

    sinks = []

    async def handler(stream):
        await stream.readexactly(4)
        sink = FaultySink(stream, "none")
        sinks.append(sink)
        stream.attach_sink(sink)
        await asyncio.sleep(30)

    async def body():
        async with tunnel(handler) as (server, client, session):
            vs = await session.open_stream()
            vs.write(b"sink")
            await until(lambda: bool(sinks), "the sink is attached")
            sink = sinks[0]
            sink.bad = "tunnel_data"
            sink.calls["tunnel_data"] = 0

            def raise_on_second(name, event=sink._event):
                if name == "tunnel_data" and sink.calls["tunnel_data"] == 0:
                    sink.calls["tunnel_data"] += 1  # the first passes
                    return
                event(name)
            sink._event = raise_on_second
            conn = client.session.connection
            two = F.encode(F.Data(vs.stream_id, b"first")) + F.encode(F.Data(vs.stream_id, b"second"))
            conn.data_received_view(memoryview(two))  # one read, two frames
            assert sink.calls["tunnel_data"] == 2 and sink.calls["flush_out"] == 0
            assert conn.sink_errors == 1
            await until(lambda: sink.calls["tunnel_reset"] == 1, "the sink is told of the reset")
            assert sink.calls["flush_out"] == 0

    with caplog.at_level(logging.WARNING, logger="ferrotunnel"):
        run(body)


def test_a_forwarded_connection_ends_when_its_bridge_fails(run, monkeypatch):
    """The bridge of ``ft.forward`` is told of the reset: its local connection closes and
    ``forward(wait=True)`` returns (before, the connection stayed open and forward waited)."""
    from ferrotunnel.aio import bridge as bridge_mod

    real = bridge_mod.TcpBridge.tunnel_data

    def tunnel_data(self, payload):
        if bytes(payload).startswith(b"BOOM"):
            raise Boom("bridge bug")
        real(self, payload)

    monkeypatch.setattr(bridge_mod.TcpBridge, "tunnel_data", tunnel_data)

    async def body():
        local_done = asyncio.Event()
        got = bytearray()

        async def local(reader, writer):
            try:
                while data := await reader.read(1000):
                    got.extend(data)
            except ConnectionError:
                pass
            local_done.set()
            writer.close()

        backend = await asyncio.start_server(local, "127.0.0.1", 0)
        forwarded = asyncio.Event()

        async def handler(stream):
            await ft.forward(stream, backend.sockets[0].getsockname()[:2], wait=True)
            forwarded.set()

        async with tunnel(handler) as (server, client, session):
            vs = await session.open_stream()
            vs.write(b"hello ")
            async with asyncio.timeout(10):
                while bytes(got) != b"hello ":
                    await asyncio.sleep(0.01)
            vs.write(b"BOOM")
            async with asyncio.timeout(10):
                await local_done.wait()  # the local connection was closed
                await forwarded.wait()  # and forward() returned
            assert bytes(got) == b"hello "
            assert client.session.connection.sink_errors == 1
        backend.close()

    run(body)
