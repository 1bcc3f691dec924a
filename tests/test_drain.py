"""The drain extension, in one process on real sockets: a server that is leaving (``shutdown(grace,
handover=True)``) tells the clients that negotiated ``drain/1`` to move; such a client opens a new
session through the same address (here a small balancer that sends new connections to the first
server that accepts) while its old session finishes the streams in flight, then closes the old
one, and the leaving server returns as soon as that happened. A client without extensions (as a
Rust client) is not told, and an idle one does not hold the server back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any, List, Optional, Tuple

import ferrotunnel as ft
from ferrotunnel.frames import PluginData
from ferrotunnel.protocol.extensions import DRAIN_CAPABILITY, DRAIN_PLUGIN_ID

TOKEN = "drain-token"
BLOCK = hashlib.sha256(b"drain").digest() * 2048  # 64 KiB of a known pattern


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class Balancer:
    """New connections go to the first backend that accepts (a leaving server has closed its port)."""

    def __init__(self, backends: List[Tuple[str, int]]) -> None:
        self.backends = backends
        self.server: Optional[asyncio.base_events.Server] = None
        self.tasks: "set[asyncio.Task[Any]]" = set()

    async def start(self) -> Tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for addr in self.backends:
            try:
                br, bw = await asyncio.open_connection(*addr)
            except OSError:
                continue
            for t in (asyncio.ensure_future(_pipe(r, bw)), asyncio.ensure_future(_pipe(br, w))):
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
            return
        w.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self.tasks):
            t.cancel()


class App:
    """The client's stream handler: "DOWN n" sends n bytes of BLOCK; "WHO" names the session."""

    def __init__(self) -> None:
        self.served: List[Tuple[str, Any]] = []

    async def __call__(self, stream: Any) -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await stream.read(64)
            if not chunk:
                return
            line += chunk
        cmd, _, arg = line.strip().partition(b" ")
        self.served.append((cmd.decode(), stream.session.id))
        if cmd == b"WHO":
            stream.write(str(stream.session.id).encode())
        elif cmd == b"DOWN":
            left = int(arg)
            while left:
                part = BLOCK[:min(left, len(BLOCK))]
                stream.write(part)
                await stream.drain()
                left -= len(part)
        stream.write_eof()


async def _ask(addr: Tuple[str, int], line: bytes) -> bytes:
    r, w = await asyncio.open_connection(*addr)
    w.write(line)
    data = await asyncio.wait_for(r.read(), 20)
    w.close()
    return data


async def _download(addr: Tuple[str, int], n: int, started: asyncio.Event, pace: float) -> Tuple[int, str]:
    """Read n bytes slowly (so the download is still in flight when the server drains)."""
    r, w = await asyncio.open_connection(*addr)
    w.write(b"DOWN %d\n" % n)
    h, got = hashlib.sha256(), 0
    while True:
        data = await asyncio.wait_for(r.read(65536), 20)
        if not data:
            break
        h.update(data)
        got += len(data)
        started.set()
        await asyncio.sleep(pace)
    w.close()
    return got, h.hexdigest()


def _expected(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


@contextlib.asynccontextmanager
async def _two_servers():
    a = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
    b = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
    await a.start()
    await b.start()
    ing_a, ing_b = ft.TcpIngress(a, ("127.0.0.1", 0), tunnel_id="web"), ft.TcpIngress(b, ("127.0.0.1", 0),
                                                                                      tunnel_id="web")
    await ing_a.start()
    await ing_b.start()
    lb = Balancer([a.address, b.address])
    front = await lb.start()
    try:
        yield a, b, ing_a, ing_b, front
    finally:
        lb.close()
        for x in (ing_a, ing_b, a, b):
            await x.close()


def test_a_leaving_server_hands_its_client_over_and_the_download_in_flight_completes(run):
    size = 24 * 1024 * 1024

    async def body():
        async with _two_servers() as (a, b, ing_a, ing_b, front):
            app = App()
            client = ft.TunnelClient("%s:%d" % front, TOKEN, tunnel_id="web")
            task = asyncio.create_task(client.connect_and_run(app))
            try:
                old = await a.wait_for_session("web", timeout=10)
                assert DRAIN_CAPABILITY in old.capabilities  # the client announced it
                started = asyncio.Event()
                down = asyncio.create_task(_download(ing_a.address, size, started, 0.004))
                await asyncio.wait_for(started.wait(), 10)

                t0 = time.monotonic()
                shutdown = asyncio.create_task(a.shutdown(60, handover=True))
                new = await b.wait_for_session("web", timeout=10)  # the client moved at once
                moved = time.monotonic() - t0
                assert new.id != old.id
                assert not down.done(), "the download finished before the drain: make it slower"
                # a visitor arriving now (on the server that stays) is served by the new session
                who = await _ask(ing_b.address, b"WHO\n")
                assert who == str(new.id).encode()
                assert not old.is_closed  # the old session still carries the download

                got, digest = await asyncio.wait_for(down, 60)
                assert (got, digest) == (size, _expected(size))  # byte-exact, nothing lost
                await asyncio.wait_for(shutdown, 10)  # returns once the client closed the old session
                left = time.monotonic() - t0
                assert old.is_closed and not new.is_closed
                assert [c for c, s in app.served] == ["DOWN", "WHO"]
                assert app.served[0][1] == old.id and app.served[1][1] == new.id
                assert left < 30, left  # long before the 60 s grace
                print(f"client moved after {moved * 1000:.0f} ms; server left {left:.2f} s after the drain began")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(body, timeout=120)


def test_a_client_without_extensions_is_not_told_and_an_idle_one_does_not_hold_the_exit(run):
    async def body():
        async with _two_servers() as (a, b, ing_a, ing_b, front):
            client = ft.TunnelClient("%s:%d" % front, TOKEN, tunnel_id="web",
                                     config=ft.ClientConfig(extensions=False))
            task = asyncio.create_task(client.connect_and_run(App()))
            try:
                old = await a.wait_for_session("web", timeout=10)
                assert list(old.capabilities) == ["basic", "tcp"]  # what a Rust client announces
                assert not old.send_drain()
                t0 = time.monotonic()
                await asyncio.wait_for(a.shutdown(60, handover=True), 10)
                assert time.monotonic() - t0 < 5  # no streams: nothing to wait for
                assert old.is_closed
                # cut off at the exit, it reconnects (with backoff) through the balancer
                new = await b.wait_for_session("web", timeout=20)
                assert (await _ask(ing_b.address, b"WHO\n")) == str(new.id).encode()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(body, timeout=60)


def test_without_handover_nobody_is_told(run):
    async def body():
        async with _two_servers() as (a, b, ing_a, ing_b, front):
            client = ft.TunnelClient("%s:%d" % front, TOKEN, tunnel_id="web")
            task = asyncio.create_task(client.connect_and_run(App()))
            try:
                old = await a.wait_for_session("web", timeout=10)
                await asyncio.sleep(0.2)
                assert not old.connection.core.peer_draining
                client_session = client.session
                assert client_session is not None and not client_session.draining.is_set()
                await a.shutdown(5)  # a single server stopping: no hand-over
                assert not client_session.draining.is_set()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(body, timeout=60)


@contextlib.asynccontextmanager
async def _direct_session():
    """A client connected straight to server a (no balancer): (a, its ingress, client session,
    server-side session)."""
    async with _two_servers() as (a, b, ing_a, ing_b, front):
        client = ft.TunnelClient("%s:%d" % a.address, TOKEN, tunnel_id="web")
        session = await client.connect(App())
        try:
            yield a, ing_a, session, await a.wait_for_session("web", timeout=10)
        finally:
            await client.close()


def test_a_drain_notice_from_a_client_is_ignored_by_the_server(run):
    async def body():
        async with _direct_session() as (a, ing_a, session, server_side):
            assert not session.send_drain()  # a client has nothing to drain
            core = session.connection.core
            core._control(PluginData(DRAIN_PLUGIN_ID, b""))  # sent anyway, as a hostile client could
            await asyncio.sleep(0.2)
            assert not server_side.connection.core.peer_draining and not server_side.is_closed
            assert (await _ask(ing_a.address, b"WHO\n")) == str(session.id).encode()

    run(body, timeout=60)


def test_the_notice_reaches_the_client_session(run):
    async def body():
        async with _direct_session() as (a, ing_a, session, server_side):
            assert "drain" in server_side.connection.core.negotiated
            assert server_side.send_drain()
            await asyncio.wait_for(session.draining.wait(), 10)
            assert session.connection.core.peer_draining and not session.is_closed

    run(body, timeout=60)


def test_a_session_closed_with_tell_peer_tells_the_client_why(run):
    async def body():
        async with _direct_session() as (a, ing_a, session, server_side):
            why = "tunnel id web is held by node b; this session is closed so that one owner remains"
            server_side.close(ft.ConnectionLostError(why), tell_peer=True)
            await asyncio.wait_for(session.wait_closed(), 10)
            said = str(session.connection.close_exc)
            assert "SERVICE_UNAVAILABLE" in said and why in said, said

    run(body, timeout=60)
