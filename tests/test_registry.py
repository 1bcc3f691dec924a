"""The registry seam: LocalRegistry's claims over real sessions, a TunnelServer with a
"remote-style" registry (every call really suspends, nothing is answered locally), the
SessionStore view, and the Session's nowait open and stats. Real sockets on 127.0.0.1, both loops."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import os
import time
import uuid
from typing import Any, Optional

import pytest

import ferrotunnel as ft
from conftest import echo_handler, tunnel
from ferrotunnel.aio.connection import TunnelConnection
from ferrotunnel.aio.session import Session
from ferrotunnel.server.registry import Claim, LocalRegistry, LocalRoute, resolve

TOKEN = "secret-token"


class RemoteStyleRegistry:
    """A registry as if it lived on the network: wraps a LocalRegistry, but every call that may
    cross the network suspends for real before answering, and ``lookup_local`` knows nothing,
    so ingresses must await ``lookup``. ``gate``, when set, holds a granted claim's answer."""

    local_only = False

    def __init__(self) -> None:
        self.inner = LocalRegistry()
        self.calls: collections.Counter = collections.Counter()
        self.gate: Optional[asyncio.Event] = None
        self.claimed: Optional[asyncio.Event] = None
        self._tasks: "set[asyncio.Task[None]]" = set()

    async def claim(self, tunnel_id: str, session: Session, stale: Any = None) -> Claim:
        self.calls["claim"] += 1
        await asyncio.sleep(0)
        claim = await self.inner.claim(tunnel_id, session, stale)
        if self.gate is not None:
            if self.claimed is not None:
                self.claimed.set()
            await self.gate.wait()
        return claim

    async def release(self, tunnel_id: str, session: Session) -> None:
        self.calls["release"] += 1
        await asyncio.sleep(0)
        await self.inner.release(tunnel_id, session)

    async def refresh(self, tunnel_id: str, session: Session) -> bool:
        self.calls["refresh"] += 1
        await asyncio.sleep(0)
        return await self.inner.refresh(tunnel_id, session)

    async def lookup(self, tunnel_id: str) -> Any:
        self.calls["lookup"] += 1
        await asyncio.sleep(0)
        return await self.inner.lookup(tunnel_id)

    def lookup_local(self, tunnel_id: str) -> Any:
        self.calls["lookup_local"] += 1
        return None

    def session_ended(self, session: Session) -> None:
        # the shared part goes in the background, over the "network"
        self.calls["session_ended"] += 1
        task = asyncio.get_running_loop().create_task(self.release(session.tunnel_id, session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def local_session(self, tunnel_id: str) -> Any:
        return self.inner.local_session(tunnel_id)

    def local_sessions(self) -> Any:
        return self.inner.local_sessions()


async def until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def read_all(stream: Any) -> bytes:
    out = bytearray()
    async for chunk in stream:
        out += chunk
    return bytes(out)


def handshaking_session(tunnel_id: str) -> Session:
    """A Session over a real TunnelConnection that never completed a handshake."""
    conn = TunnelConnection(asyncio.get_running_loop(), ft.StreamConfig())
    return Session(conn, uuid.uuid4(), tunnel_id, None, ())


@contextlib.asynccontextmanager
async def two_tunnels():
    """Two real, established server-side sessions (tunnel ids "a" and "b", distinct session ids)."""
    async with tunnel(tunnel_id="a") as (_, _, sa), tunnel(tunnel_id="b") as (_, _, sb):
        assert sa.established and sb.established and sa.id != sb.id
        yield sa, sb


# ---------------------------------------------------------------- LocalRegistry with real sessions

def test_claim_refresh_release(run):
    async def body():
        async with two_tunnels() as (sa, sb):
            reg = LocalRegistry()
            first = await reg.claim("x", sa)
            assert first == Claim(True, None)
            assert await reg.claim("x", sb) == Claim(False, None)  # a live holder keeps it
            assert reg.local_session("x") is sa and list(reg.local_sessions()) == [sa]
            assert reg.get(sa.id) is sa and reg.get(sb.id) is None
            assert await reg.refresh("x", sa) is True
            assert await reg.refresh("x", sb) is False and await reg.refresh("nope", sa) is False

            await reg.release("x", sb)  # not the holder: nothing happens
            assert reg.local_session("x") is sa and reg.lookup_local("x").session is sa
            await reg.release("x", sa)
            assert reg.local_session("x") is None and reg.lookup_local("x") is None and await reg.lookup("x") is None
            assert await reg.refresh("x", sa) is False and reg.get(sa.id) is None
            assert await reg.claim("x", sb) == Claim(True, None)  # free again
            assert reg.local_session("x") is sb and await reg.refresh("x", sb)
            await reg.release("x", sa)
            assert reg.local_session("x") is sb

            # a session that ended gives up its own tunnel id at once, without an await
            assert (await reg.claim("b", sb)).granted and reg.local_session("b") is sb
            reg.session_ended(sb)
            assert reg.local_session("b") is None and reg.lookup_local("b") is None
    run(body)


@pytest.mark.parametrize("kind", ["local", "remote-style"])
def test_concurrent_claims_grant_exactly_one(run, kind):
    async def body():
        async with two_tunnels() as (sa, sb):
            for i in range(20):
                reg: Any = LocalRegistry() if kind == "local" else RemoteStyleRegistry()
                order = (sa, sb) if i % 2 else (sb, sa)
                claims = await asyncio.gather(*(reg.claim("x", s) for s in order))
                assert [c.granted for c in claims] == [True, False]  # the first asker, only
                holder = reg.local_session("x") if kind == "local" else reg.inner.local_session("x")
                assert holder is order[0]
    run(body)


def test_closed_holder_is_replaced(run):
    async def body():
        async with tunnel(tunnel_id="c", client_config=ft.ClientConfig(
                backoff=ft.BackoffConfig(base=30.0))) as (_, _, sc), two_tunnels() as (sa, _):
            reg = LocalRegistry()
            assert (await reg.claim("x", sc)).granted
            sc.close()
            await asyncio.wait_for(sc.wait_closed(), 10)
            assert sc.is_closed and reg.lookup_local("x") is None  # closed: not routable
            claim = await reg.claim("x", sa)
            assert claim.granted and claim.replaced is sc
            assert reg.local_session("x") is sa and reg.get(sc.id) is None and list(reg.local_sessions()) == [sa]
    run(body)


def test_stale_predicate_replaces_a_live_holder(run):
    async def body():
        async with two_tunnels() as (sa, sb):
            reg = LocalRegistry()
            assert (await reg.claim("x", sa)).granted
            asked = []

            def not_stale(s):
                asked.append(s)
                return False

            assert await reg.claim("x", sb, not_stale) == Claim(False, None)
            assert asked == [sa]  # the predicate is asked about the holder
            claim = await reg.claim("x", sb, lambda s: s is sa)
            assert claim == Claim(True, sa) and claim.replaced is sa
            assert not sa.is_closed  # the registry does not close it: the caller does
            assert reg.local_session("x") is sb and reg.lookup_local("x").session is sb
            assert reg.get(sa.id) is None and list(reg.local_sessions()) == [sb]
            await reg.release("x", sa)  # the replaced one cannot release the new claim
            assert reg.local_session("x") is sb
    run(body)


def test_lookup_local_only_for_an_established_session(run):
    async def body():
        async with two_tunnels() as (sa, _):
            reg = LocalRegistry()
            pending = handshaking_session("h")
            assert (await reg.claim("h", pending)).granted and not pending.established
            assert reg.local_session("h") is pending
            assert reg.lookup_local("h") is None and await reg.lookup("h") is None
            assert resolve(reg, "h") is None
            assert (await reg.claim("a", sa)).granted
            route = reg.lookup_local("a")
            assert isinstance(route, LocalRoute) and route.session is sa and route.tunnel_id == "a"
            assert await reg.lookup("a") is not None and resolve(reg, "a").session is sa
            pending.connection.close()
            assert pending.is_closed and (await reg.claim("h", sa)).replaced is pending
    run(body)


def test_server_session_is_not_routable_until_established(run):
    """Through a real server: while the (awaited) claim has not answered, the session holds the
    tunnel id but is not established, and lookup_local finds nothing for it."""
    async def body():
        reg = RemoteStyleRegistry()
        reg.gate, reg.claimed = asyncio.Event(), asyncio.Event()
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, registry=reg) as server:
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="g")
            connecting = asyncio.create_task(client.connect(echo_handler))
            await asyncio.wait_for(reg.claimed.wait(), 10)
            held = reg.inner.local_session("g")
            assert held is not None and not held.established and not held.is_closed
            assert reg.inner.lookup_local("g") is None and await reg.inner.lookup("g") is None
            assert not connecting.done()  # the client waits for the policy's answer
            reg.gate.set()
            session = await asyncio.wait_for(connecting, 10)
            assert held.established and reg.inner.lookup_local("g").session is held
            assert server.sessions.get_by_tunnel_id("g") is held and held.id == session.id
            await client.close()
    run(body)


# ---------------------------------------------------------------- a server with the remote-style registry

def test_remote_style_registry_client_connects_and_tcp_ingress_routes(run):
    async def body():
        async def local_echo(reader, writer):
            data = await reader.read()
            writer.write(hashlib.sha256(data).digest() + data)
            await writer.drain()
            writer.write_eof()
            writer.close()

        local = await asyncio.start_server(local_echo, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=local.sockets[0].getsockname()[:2])
        reg = RemoteStyleRegistry()
        try:
            async with tunnel(None, client_config=cfg, server_kwargs={"registry": reg}) as (server, client, session):
                assert server.registry is reg and reg.calls["claim"] == 1
                assert reg.inner.local_session("t1") is session and session.established
                for tid in ("t1", None):  # by name through the awaited lookup; unnamed: first tcp session
                    async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id=tid) as ingress:
                        before = reg.calls["lookup"]
                        for size in (0, 1, 70_000, 1024 * 1024 + 3):
                            payload = os.urandom(size)
                            r, w = await asyncio.open_connection(*ingress.address)
                            w.write(payload)  # at once: possibly before the registry answered
                            w.write_eof()
                            got = await asyncio.wait_for(r.read(), 30)
                            assert got[:32] == hashlib.sha256(payload).digest() and got[32:] == payload
                            w.close()
                        assert reg.calls["lookup"] - before == (4 if tid else 0)
                        assert ingress.connections == 4
                async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="nope") as ingress:
                    r, w = await asyncio.open_connection(*ingress.address)
                    assert await asyncio.wait_for(r.read(), 10) == b""  # no route: closed
                    w.close()
                assert reg.calls["lookup"] == 5
        finally:
            local.close()
    run(body, timeout=90)


class GatedLookupRegistry(RemoteStyleRegistry):
    """``lookup`` answers only once ``open`` is set (a slow registry), and says when it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.asked = asyncio.Event()

    async def lookup(self, tunnel_id: str) -> Any:
        self.asked.set()
        await self.open.wait()
        return await super().lookup(tunnel_id)


@pytest.mark.parametrize("eof_early", [False, True], ids=["eof-after", "eof-during"])
def test_tcp_ingress_keeps_bytes_sent_during_an_awaited_lookup(run, eof_early):
    """Regression: what a visitor sent (and its EOF) while the registry had not answered yet was
    dropped (the bridge had no stream to write to); now it waits in the socket."""
    async def body():
        seen = []

        async def local_echo(reader, writer):
            data = await reader.read()
            seen.append(data)
            writer.write(b"echo:" + data)
            await writer.drain()
            writer.close()

        local = await asyncio.start_server(local_echo, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=local.sockets[0].getsockname()[:2])
        reg = GatedLookupRegistry()
        try:
            async with tunnel(None, client_config=cfg, server_kwargs={"registry": reg}) as (server, client, session):
                async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="t1") as ingress:
                    r, w = await asyncio.open_connection(*ingress.address)
                    await asyncio.wait_for(reg.asked.wait(), 10)
                    w.write(b"early bytes")  # while the registry has not answered yet
                    if eof_early:
                        w.write_eof()
                    await w.drain()
                    await asyncio.sleep(0.3)
                    reg.open.set()
                    await until(lambda: ingress.connections == 1)
                    if not eof_early:
                        w.write_eof()
                    got = await asyncio.wait_for(r.read(), 20)
                    w.close()
                    assert got == b"echo:early bytes" and seen == [b"early bytes"]
        finally:
            local.close()
    run(body)


def test_remote_style_registry_http_ingress_routes(run):
    async def body():
        async def local_http(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            body_ = b"hello " + head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body_) + body_)
            await writer.drain()
            writer.close()

        async def request(addr, raw):
            r, w = await asyncio.open_connection(*addr)
            w.write(raw)
            data = await asyncio.wait_for(r.read(), 20)
            w.close()
            return data

        local = await asyncio.start_server(local_http, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=local.sockets[0].getsockname()[:2])
        reg = RemoteStyleRegistry()
        try:
            async with tunnel(None, client_config=cfg, tunnel_id="web", server_kwargs={"registry": reg}) as (
                    server, client, session):
                async with ft.HttpIngress(server, ("127.0.0.1", 0)) as ing:
                    for i in range(5):
                        got = await request(ing.address, b"GET /p%d HTTP/1.1\r\nHost: Web.:8080\r\n\r\n" % i)
                        assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"hello /p%d" % i)
                    missing = await request(ing.address, b"GET / HTTP/1.1\r\nHost: other\r\n\r\n")
                    assert missing.startswith(b"HTTP/1.1 404")
                    assert reg.calls["lookup"] == 6 and reg.calls["lookup_local"] >= 6
        finally:
            local.close()
    run(body, timeout=60)


def test_http_ingress_routes_a_connection_once_during_an_awaited_lookup(run):
    """Regression: a request body arriving while the registry had not answered ran the routing
    again (a second lookup, a second stream and connection to the local service)."""
    async def body():
        accepted = []

        async def local_http(reader, writer):
            accepted.append(1)
            try:
                await reader.readuntil(b"\r\n\r\n")
                data = await reader.readexactly(4)
            except asyncio.IncompleteReadError:
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\n" + data)
            await writer.drain()
            writer.close()

        local = await asyncio.start_server(local_http, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=local.sockets[0].getsockname()[:2])
        reg = GatedLookupRegistry()
        try:
            async with tunnel(None, client_config=cfg, tunnel_id="web", server_kwargs={"registry": reg}) as (
                    server, client, session):
                async with ft.HttpIngress(server, ("127.0.0.1", 0)) as ing:
                    r, w = await asyncio.open_connection(*ing.address)
                    w.write(b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\n\r\n")
                    await w.drain()
                    await asyncio.wait_for(reg.asked.wait(), 10)
                    w.write(b"BODY")  # the body follows while the registry has not answered
                    await w.drain()
                    await asyncio.sleep(0.3)
                    reg.open.set()
                    got = await asyncio.wait_for(r.read(), 10)
                    w.close()
                    await asyncio.sleep(0.3)
                    assert got.endswith(b"\r\n\r\nBODY")
                    assert reg.calls["lookup"] == 1 and len(accepted) == 1
        finally:
            local.close()
    run(body)


def test_remote_style_registry_refuses_a_second_client_for_the_same_id(run):
    async def body():
        reg = RemoteStyleRegistry()
        async with tunnel(tunnel_id="dup", server_kwargs={"registry": reg}) as (server, client, session):
            second = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="dup")
            with pytest.raises(ft.RetryableHandshakeError) as ei:
                await second.connect(echo_handler)
            assert ei.value.status == ft.HandshakeStatus.TUNNEL_ID_TAKEN and "in use" in (ei.value.reason or "")
            assert reg.calls["claim"] == 2 and reg.inner.local_session("dup") is session and not session.is_closed
            assert len(server.sessions) == 1
            s = await session.open_stream()  # the first one still works
            s.write(b"still here")
            s.write_eof()
            assert await read_all(s) == b"still here"
    run(body)


@pytest.mark.parametrize("kind", ["local", "remote-style"])
def test_stale_session_is_replaced_through_the_server(run, kind):
    async def body():
        reg = LocalRegistry() if kind == "local" else RemoteStyleRegistry()
        inner = reg if kind == "local" else reg.inner
        sc = ft.ServerConfig(stale_session_after=0.3)
        cc = ft.ClientConfig(heartbeat_interval=3600)  # one heartbeat at once, then silence
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=sc, registry=reg) as server:
            addr = "%s:%d" % server.address
            first = ft.TunnelClient(addr, TOKEN, tunnel_id="st", config=cc)
            await first.connect(echo_handler)
            old = await server.wait_for_session("st", timeout=10)
            await until(lambda: old.silent_for(time.monotonic()) > 0.5)  # stale by now
            second = ft.TunnelClient(addr, TOKEN, tunnel_id="st", config=cc)
            await second.connect(echo_handler)
            await asyncio.wait_for(old.wait_closed(), 10)
            new = server.sessions.get_by_tunnel_id("st")
            assert new is not None and new is not old and new.established and inner.local_session("st") is new
            await until(lambda: list(server.sessions) == [new])
            await second.close()
            await first.close()
    run(body)


@pytest.mark.parametrize("closer", ["client", "server"])
def test_remote_style_registry_releases_after_the_session_ends(run, closer):
    async def body():
        reg = RemoteStyleRegistry()
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, registry=reg) as server:
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="rel")
            await client.connect(echo_handler)
            session = await server.wait_for_session("rel", timeout=10)
            assert reg.inner.local_session("rel") is session
            if closer == "client":
                await client.close()
            else:
                session.close()
            await asyncio.wait_for(session.wait_closed(), 10)
            await until(lambda: reg.inner.local_session("rel") is None, timeout=20)
            assert reg.calls["release"] >= 1 and len(server.sessions) == 0 and session not in server.sessions
            again = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="rel")
            await again.connect(echo_handler)  # the id can be taken again
            assert (await server.wait_for_session("rel", timeout=10)) is not session
            await again.close()
            await client.close()
    run(body)


# ---------------------------------------------------------------- SessionStore as a view

@pytest.mark.parametrize("kind", ["local", "remote-style"])
def test_session_store_view(run, kind):
    async def body():
        reg = None if kind == "local" else RemoteStyleRegistry()
        async with tunnel(tunnel_id="store", server_kwargs={"registry": reg}) as (server, client, session):
            store = server.sessions
            assert isinstance(store, ft.SessionStore)
            assert store.get(session.id) is session and store.get(uuid.uuid4()) is None
            assert store.get_by_tunnel_id("store") is session and store.get_by_tunnel_id("nope") is None
            assert store.find_with_capability("tcp") is session
            assert store.find_with_capability("ferrotunnel-py/1") is session
            assert store.find_with_capability("nope") is None
            assert len(store) == 1 and list(store) == [session]
            assert session in store and client.session not in store  # same id, but the client's object
            assert "store" not in store and None not in store

            second = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="other",
                                     config=ft.ClientConfig(capabilities=("special/1",)))
            await second.connect(echo_handler)
            other = await server.wait_for_session("other", timeout=10)
            assert len(store) == 2 and list(store) == [session, other]  # oldest first
            assert store.get(other.id) is other and store.get_by_tunnel_id("other") is other
            assert store.find_with_capability("tcp") is session  # the oldest that announced it
            assert store.find_with_capability("special/1") is other and other in store
            await second.close()
            await until(lambda: len(store) == 1, timeout=20)
            assert list(store) == [session] and other not in store and store.get(other.id) is None
            assert store.get_by_tunnel_id("other") is None and store.find_with_capability("special/1") is None
    run(body)


# ---------------------------------------------------------------- Session: nowait opens and stats

def test_open_stream_nowait_returns_a_usable_stream_at_once(run):
    async def body():
        async with tunnel(client_config=ft.ClientConfig(backoff=ft.BackoffConfig(base=30.0))) as (
                server, client, session):
            streams = [session.open_stream_nowait(ft.Protocol.TCP, ft.StreamPriority.HIGH) for _ in range(3)]
            ids = [s.stream_id for s in streams]
            assert all(i % 2 == 0 for i in ids) and len(set(ids)) == 3 and ids == sorted(ids)
            assert all(s.priority == ft.StreamPriority.HIGH for s in streams)
            for i, s in enumerate(streams):
                s.write(b"now %d" % i)
                s.write_eof()
            assert await asyncio.gather(*(read_all(s) for s in streams)) == [b"now 0", b"now 1", b"now 2"]

            cs = client.session.open_stream_nowait()  # client-opened: odd id, default TCP/NORMAL
            assert cs.stream_id % 2 == 1 and cs.priority == ft.StreamPriority.NORMAL
            cs.write(b"up")
            cs.write_eof()
            ss = await asyncio.wait_for(session.accept(), 10)
            assert await read_all(ss) == b"up"
            ss.write(b"down")
            ss.write_eof()
            assert await read_all(cs) == b"down"

            route = server.registry.lookup_local("t1")  # the route the ingresses use
            rs = route.open_stream_nowait(ft.Protocol.HTTP, ft.StreamPriority.LOW)
            rs.write(b"via route")
            rs.write_eof()
            assert await read_all(rs) == b"via route"

            session.close()
            with pytest.raises(ft.ConnectionLostError):
                session.open_stream_nowait()
    run(body)


def test_session_stats_count_both_ways(run):
    async def body():
        async with tunnel() as (server, client, session):
            cli = client.session
            before, cli_before = session.stats(), cli.stats()
            s = await session.open_stream()
            payload = os.urandom(300_000)
            s.write(payload)
            s.write_eof()
            assert await read_all(s) == payload
            mid = session.stats()
            assert mid.frames_out > before.frames_out and mid.bytes_out >= before.bytes_out + len(payload)
            assert mid.frames_in > before.frames_in and mid.bytes_in >= before.bytes_in + len(payload)
            c = cli.stats()
            assert c.frames_in > cli_before.frames_in and c.bytes_in >= cli_before.bytes_in + len(payload)
            assert c.frames_out > cli_before.frames_out and c.bytes_out >= cli_before.bytes_out + len(payload)
            # once quiet, what one end sent is what the other received, frame for frame
            await until(lambda: (session.stats().bytes_out, session.stats().frames_out,
                                 session.stats().bytes_in, session.stats().frames_in)
                        == (cli.stats().bytes_in, cli.stats().frames_in, cli.stats().bytes_out, cli.stats().frames_out))
            await until(lambda: session.stats().streams == 0 and cli.stats().streams == 0)
            totals = server.traffic_totals()
            st_ = session.stats()
            assert totals == (st_.frames_in, st_.bytes_in, st_.frames_out, st_.bytes_out)
    run(body)
