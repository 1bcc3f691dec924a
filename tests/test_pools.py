"""Tunnel pools (issue 12, point 9) in one process: LocalRegistry's pool claims over small
stand-in sessions (members join, streams spread round-robin, pool/solo mismatches refused with
their reasons, one member leaving keeps the others, the last one frees the id), and a real
TunnelServer with an HTTP ingress and two pool clients serving two apps (requests spread over
both, closing one leaves the other serving, a client that is not in the pool is refused). Real
sockets on 127.0.0.1, both loops."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, List, Optional

import pytest

import ferrotunnel as ft
from ferrotunnel.errors import ConnectionLostError, LimitExceededError
from ferrotunnel.frames import Protocol, StreamPriority
from ferrotunnel.server.registry import POOL_REFUSAL, SOLO_REFUSAL, Claim, LocalRegistry, LocalRoute, PoolRoute

TOKEN = "pool-token"


class StubSession:
    """What the registry and its routes read of a Session; ``open_stream_nowait`` records."""

    def __init__(self, tunnel_id: str = "web", name: str = "") -> None:
        self.id = uuid.uuid4()
        self.tunnel_id = tunnel_id
        self.name = name
        self.established = True
        self.capabilities: tuple = ()
        self.closed = False
        self.full = False
        self.silent = 0.0
        self.closed_with: Optional[BaseException] = None
        self.opened: List[Any] = []

    @property
    def is_closed(self) -> bool:
        return self.closed

    def silent_for(self, now: float) -> float:
        return self.silent

    def close(self, exc: Optional[BaseException] = None, *, tell_peer: bool = False) -> None:
        self.closed, self.closed_with = True, exc

    def open_stream_nowait(self, protocol: Any, priority: Any, headers: Any = (), peername: Any = None) -> Any:
        if self.closed:
            raise ConnectionLostError("closed")
        if self.full:
            raise LimitExceededError("max_streams_per_session")
        self.opened.append(headers)
        return self.name

    def __repr__(self) -> str:
        return f"<StubSession {self.name}>"


def opens(route: Any, n: int) -> List[str]:
    return [route.open_stream_nowait(Protocol.HTTP, StreamPriority.NORMAL) for _ in range(n)]


# ---------------------------------------------------------------- LocalRegistry with pool claims

def test_pool_members_join_and_streams_go_round_robin():
    reg = LocalRegistry()
    a, b, c = StubSession(name="a"), StubSession(name="b"), StubSession(name="c")
    assert reg.claim_nowait("web", a, pool=True) == Claim(True)
    assert reg.claim_nowait("web", b, pool=True) == Claim(True)  # joins: a stays
    assert reg.claim_nowait("web", c, pool=True) == Claim(True)
    assert reg.is_pool("web") and reg.members("web") == [a, b, c]
    assert list(reg.local_sessions()) == [a, b, c]
    route = reg.lookup_local("web")
    assert isinstance(route, PoolRoute) and route.tunnel_id == "web"
    assert opens(route, 6) == ["a", "b", "c", "a", "b", "c"]
    # a route looked up again (or cached by a visitor connection) keeps the turn
    assert opens(reg.lookup_local("web"), 2) == ["a", "b"]
    assert reg.local_session("web") is a


def test_the_spread_skips_members_not_established_closed_or_refusing():
    reg = LocalRegistry()
    a, b, c = StubSession(name="a"), StubSession(name="b"), StubSession(name="c")
    for s in (a, b, c):
        assert reg.claim_nowait("web", s, pool=True).granted
    b.established = False  # still handshaking: no stream for it yet
    route = reg.lookup_local("web")
    assert opens(route, 4) == ["a", "c", "a", "c"]
    b.established = True
    c.full = True  # at its stream limit: the next member takes the stream
    assert sorted(opens(route, 4)) == ["a", "a", "b", "b"]
    c.full = False
    a.closed = True  # closed, not yet forgotten by the registry
    assert sorted(opens(route, 4)) == ["b", "b", "c", "c"]
    b.closed = c.closed = True
    assert reg.lookup_local("web") is None  # nothing to route to
    with pytest.raises(ConnectionLostError):
        route.open_stream_nowait(Protocol.HTTP, StreamPriority.NORMAL)


def test_a_pool_member_leaving_keeps_the_others_and_the_last_frees_the_id():
    reg = LocalRegistry()
    a, b = StubSession(name="a"), StubSession(name="b")
    assert reg.claim_nowait("web", a, pool=True).granted and reg.claim_nowait("web", b, pool=True).granted
    route = reg.lookup_local("web")
    reg.session_ended(a)
    assert reg.members("web") == [b] and reg.get(a.id) is None and list(reg.local_sessions()) == [b]
    assert opens(route, 3) == ["b", "b", "b"]  # the cached route too
    assert opens(reg.lookup_local("web"), 1) == ["b"]
    assert reg.local_session("web") is b
    assert asyncio.run(reg.refresh("web", b)) and not asyncio.run(reg.refresh("web", a))
    asyncio.run(reg.release("web", b))
    assert reg.lookup_local("web") is None and reg.local_session("web") is None and not reg.is_pool("web")
    assert list(reg.local_sessions()) == []
    solo = StubSession(name="solo")
    assert reg.claim_nowait("web", solo) == Claim(True)  # free again: anyone may take it
    assert isinstance(reg.lookup_local("web"), LocalRoute)


def test_pool_and_solo_claims_refuse_each_other_with_the_reason():
    reg = LocalRegistry()
    a, b = StubSession(name="a"), StubSession(name="b")
    assert reg.claim_nowait("web", a, pool=True).granted
    refused = reg.claim_nowait("web", b, lambda s: False)
    assert refused == Claim(False, reason=POOL_REFUSAL) and "--pool" in refused.reason
    assert reg.members("web") == [a] and reg.get(b.id) is None
    assert not asyncio.run(reg.claim("web", b)).granted  # async spelling, no predicate: same answer
    solo, joiner = StubSession("api", "solo"), StubSession("api", "joiner")
    assert reg.claim_nowait("api", solo).granted
    refused = reg.claim_nowait("api", joiner, lambda s: False, pool=True)
    assert refused == Claim(False, reason=SOLO_REFUSAL) and "not in a pool" in refused.reason
    assert reg.members("api") == [solo] and not reg.is_pool("api")
    # a solo holder that is stale (or closed) is replaced by a pool claim, as by a solo one
    claim = reg.claim_nowait("api", joiner, lambda s: s is solo, pool=True)
    assert claim == Claim(True, solo) and reg.members("api") == [joiner] and reg.is_pool("api")
    # a pool whose members are all closed no longer holds the id
    a.closed = True
    claim = reg.claim_nowait("web", b)
    assert claim.granted and reg.members("web") == [b] and not reg.is_pool("web")


def test_a_reconnecting_member_replaces_one_stale_member():
    reg = LocalRegistry()
    a, b, a2 = StubSession(name="a"), StubSession(name="b"), StubSession(name="a2")
    assert reg.claim_nowait("web", a, pool=True).granted and reg.claim_nowait("web", b, pool=True).granted
    claim = reg.claim_nowait("web", a2, lambda s: s is a, pool=True)
    assert claim == Claim(True, a) and reg.members("web") == [b, a2] and reg.get(a.id) is None
    live = StubSession(name="c")
    assert reg.claim_nowait("web", live, lambda s: False, pool=True) == Claim(True)  # nobody stale: joins
    assert reg.members("web") == [b, a2, live]


def test_the_visitor_address_goes_to_the_member_that_asked_for_it():
    reg = LocalRegistry()
    plain, wants = StubSession(name="plain"), StubSession(name="wants")
    wants.capabilities = (ft.protocol.extensions.VISITOR_CAPABILITY,)
    for s in (plain, wants):
        assert reg.claim_nowait("web", s, pool=True).granted
    route = reg.lookup_local("web")
    for _ in range(2):
        route.open_stream_nowait(Protocol.TCP, StreamPriority.NORMAL, ("10.1.2.3", 4567))
    assert plain.opened == [()]
    assert wants.opened == [((ft.protocol.extensions.VISITOR_HEADER, "10.1.2.3:4567"),)]


def test_a_member_with_other_access_rules_cannot_join():
    from ferrotunnel.access import TunnelAccess
    from ferrotunnel.server.registry import ACCESS_REFUSAL

    reg = LocalRegistry()
    guarded = StubSession(name="guarded")
    guarded.capabilities = TunnelAccess.build("http", "user:secret", ["10.0.0.0/8"]).capabilities()
    assert reg.claim_nowait("web", guarded, pool=True).granted
    for other in (TunnelAccess.build("http"), TunnelAccess.build("http", "user:other", ["10.0.0.0/8"])):
        joiner = StubSession(name="open")
        joiner.capabilities = other.capabilities()
        assert reg.claim_nowait("web", joiner, pool=True) == Claim(False, reason=ACCESS_REFUSAL)
    plain = StubSession(name="plain")  # no rules at all: not the same rules either
    assert reg.claim_nowait("web", plain, pool=True) == Claim(False, reason=ACCESS_REFUSAL)
    same = StubSession(name="same")
    same.capabilities = TunnelAccess.build("http", "user:secret", ["10.0.0.0/8"]).capabilities()
    assert reg.claim_nowait("web", same, pool=True).granted
    assert reg.members("web") == [guarded, same]


# ---------------------------------------------------------------- a real server, two pool clients

async def name_app(name: str, gate: Optional[asyncio.Event] = None):
    """An HTTP/1.1 app answering every request with its name and path (``/slow``: once ``gate`` is set)."""

    async def handle(reader: Any, writer: Any) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode()
            if path == "/slow" and gate is not None:
                await gate.wait()
            body = f"{name} {path}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


async def get(addr: Any, host: str, path: str = "/") -> bytes:
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return await asyncio.wait_for(r.read(), 15)
    finally:
        w.close()


def served_by(answer: bytes) -> str:
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    return answer.rsplit(b"\r\n\r\n", 1)[1].split(b" ")[0].decode()


async def until(cond: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def established(server: Any, tunnel_id: str) -> List[Any]:
    return [s for s in server.sessions if s.tunnel_id == tunnel_id and s.established and not s.is_closed]


@contextlib.asynccontextmanager
async def running(*clients: Any):
    tasks = [asyncio.create_task(c.connect_and_run()) for c in clients]
    try:
        yield tasks
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_two_pool_clients_share_a_tunnel_and_one_leaving_keeps_the_other_serving(run):
    async def body():
        gate = asyncio.Event()
        (app1, addr1), (app2, addr2) = await name_app("one", gate), await name_app("two", gate)
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        async with server:
            http = ft.HttpIngress(server, ("127.0.0.1", 0))
            await http.start()
            at = "%s:%d" % server.address
            one = ft.TunnelClient(at, TOKEN, tunnel_id="web", config=ft.ClientConfig(pool=True, local_addr=addr1))
            two = ft.TunnelClient(at, TOKEN, tunnel_id="web", config=ft.ClientConfig(pool=True, local_addr=addr2))
            async with running(one) as first:
                await until(lambda: len(established(server, "web")) == 1)
                async with running(two):
                    await until(lambda: len(established(server, "web")) == 2)
                    names = [served_by(await get(http.address, "web", f"/{i}")) for i in range(6)]
                    assert names == ["one", "two"] * 3  # round-robin, in the order they joined
                    # a client that is not in the pool is refused, and told what to do
                    solo = ft.TunnelClient(at, TOKEN, tunnel_id="web", config=ft.ClientConfig(local_addr=addr1))
                    with pytest.raises(ft.HandshakeError) as refused:
                        await solo.connect()
                    assert "pass --pool to join it" in str(refused.value)
                    # one request in flight on each member; then "one" leaves
                    slow = [asyncio.create_task(get(http.address, "web", "/slow")) for _ in range(2)]
                    await until(lambda: _busy(server) == 2)
                    first[0].cancel()
                    await until(lambda: len(established(server, "web")) == 1)
                    gate.set()
                    done = await asyncio.gather(*slow, return_exceptions=True)
                    assert any(isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200") and a.endswith(b"two /slow")
                               for a in done), done  # the other member's stream was not interrupted
                    names = [served_by(await get(http.address, "web", f"/after{i}")) for i in range(4)]
                    assert names == ["two"] * 4
                await until(lambda: not established(server, "web"))
            # the last member left: the id is free, for a client not in a pool too
            assert (await get(http.address, "web")).startswith(b"HTTP/1.1 404")
            solo = ft.TunnelClient(at, TOKEN, tunnel_id="web", config=ft.ClientConfig(local_addr=addr1))
            async with running(solo):
                await until(lambda: len(established(server, "web")) == 1)
                assert served_by(await get(http.address, "web")) == "one"
                joiner = ft.TunnelClient(at, TOKEN, tunnel_id="web", config=ft.ClientConfig(pool=True, local_addr=addr2))
                with pytest.raises(ft.HandshakeError) as refused:
                    await joiner.connect()
                assert "not in a pool" in str(refused.value)
            await http.close()
        app1.close()
        app2.close()
    run(body, timeout=90)


def _busy(server: Any) -> int:
    """Members of "web" with a stream open."""
    return sum(1 for s in established(server, "web") if len(s.multiplexer))


async def name_tcp_app(name: str):
    """A TCP app that says its name and closes."""

    async def handle(reader: Any, writer: Any) -> None:
        writer.write(name.encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


async def tcp_name(addr: Any) -> str:
    r, w = await asyncio.open_connection(*addr)
    try:
        return (await asyncio.wait_for(r.read(), 15)).decode()
    finally:
        w.close()


def test_tcp_ingresses_spread_over_a_pool_named_or_not(run):
    async def body():
        (app1, addr1), (app2, addr2) = await name_tcp_app("one"), await name_tcp_app("two")
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        async with server, ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="db") as named, \
                ft.TcpIngress(server, ("127.0.0.1", 0)) as unnamed:
            at = "%s:%d" % server.address
            one = ft.TunnelClient(at, TOKEN, tunnel_id="db", config=ft.ClientConfig(pool=True, local_addr=addr1))
            two = ft.TunnelClient(at, TOKEN, tunnel_id="db", config=ft.ClientConfig(pool=True, local_addr=addr2))
            async with running(one):
                await until(lambda: len(established(server, "db")) == 1)
                async with running(two):
                    await until(lambda: len(established(server, "db")) == 2)
                    for ingress in (named, unnamed):
                        got = [await tcp_name(ingress.address) for _ in range(4)]
                        assert sorted(got) == ["one", "one", "two", "two"] and got[:2] == got[2:], got
                    assert server.sessions.find_with_capability("tcp") in established(server, "db")
        app1.close()
        app2.close()
    run(body, timeout=60)


def test_a_stale_pool_of_old_rules_is_replaced_by_a_member_with_new_ones():
    """A pool's only members are silent (stale) and a client with new rules (a changed password)
    connects: it is not refused for its rules; it replaces every stale member with the old ones."""
    from ferrotunnel.access import TunnelAccess

    reg = LocalRegistry()
    old = [StubSession(name=f"old{i}") for i in range(2)]
    for s in old:
        s.capabilities = TunnelAccess.build(None, "alice:old").capabilities()
        assert reg.claim_nowait("web", s, pool=True).granted
        s.silent = 99.0
    new = StubSession(name="new")
    new.capabilities = TunnelAccess.build(None, "alice:new").capabilities()
    stale = lambda s: s.silent > 60  # noqa: E731
    assert reg.claim_nowait("web", new, stale, pool=True).granted
    assert reg.members("web") == [new]
