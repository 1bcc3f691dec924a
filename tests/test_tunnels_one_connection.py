"""Several tunnels on one connection (issue 12, point 5: the tunnels extension, ``tunnels/1``):
a ``TunnelClient(more_tunnels=...)`` registers further tunnel ids after its handshake with the
protocol's Register frames; the server claims each like a handshake's id and routes its streams
with an ``ft-tunnel`` header to the right local service. Real TunnelServer, HttpIngress and
TcpIngress on 127.0.0.1, both loops."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
from typing import Any, AsyncIterator, List, Tuple

import pytest

import ferrotunnel as ft
from ferrotunnel.aio.session import TunnelAlias
from ferrotunnel.client.tunnels import dispatching_handler, refusal_error
from ferrotunnel.errors import AuthenticationError, HandshakeError, RetryableHandshakeError
from ferrotunnel.frames import HandshakeStatus, RegisterStatus
from ferrotunnel.server.client_tokens import ClientTokens, PolicyServer
from ferrotunnel.server.public import PublicEndpoint

from test_pools import get, name_app, running, served_by, until

TOKEN = "tunnels-token"


@contextlib.asynccontextmanager
async def two_apps(first: str = "one", second: str = "two") -> AsyncIterator[Tuple[Any, Any]]:
    """Two HTTP apps answering their names (``test_pools.name_app``): their addresses; both
    closed at the end, whatever happened."""
    (a1, addr1), (a2, addr2) = await name_app(first), await name_app(second)
    try:
        yield addr1, addr2
    finally:
        a1.close()
        a2.close()


def connections(server: Any) -> List[Any]:
    """The distinct tunnel connections of the server's live sessions."""
    out: List[Any] = []
    for s in server.sessions:
        if not s.is_closed and s.connection not in out:
            out.append(s.connection)
    return out


def live_ids(server: Any) -> List[str]:
    return sorted(s.tunnel_id for s in server.sessions if s.established and not s.is_closed)


def client(server: Any, primary_addr: Any, *more: ft.Tunnel, tunnel_id: str = "web", **kw: Any) -> ft.TunnelClient:
    at = "%s:%d" % server.address
    return ft.TunnelClient(at, kw.pop("token", TOKEN), tunnel_id=tunnel_id, more_tunnels=more,
                           config=ft.ClientConfig(local_addr=primary_addr), **kw)


def tunnel(tunnel_id: str, addr: Any, **kw: Any) -> ft.Tunnel:
    return ft.Tunnel(tunnel_id, ft.ClientConfig(local_addr=addr, **kw))


def test_three_tunnels_share_one_connection_and_each_reaches_its_app(run):
    async def body():
        apps = [await name_app(n) for n in ("one", "two", "three")]
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        async with server:
            http = ft.HttpIngress(server, ("127.0.0.1", 0))
            await http.start()
            server.public_endpoints = (PublicEndpoint("http", "127.0.0.1", http.address[1]),)
            c = client(server, apps[0][1], tunnel("API", apps[1][1]), tunnel("docs", apps[2][1]))
            seen: List[Any] = []
            task = asyncio.create_task(c.connect_and_run(on_registered=lambda t, urls: seen.append((t.tunnel_id, urls))))
            try:
                # (the server counts a tunnel before its answer reaches the client)
                await until(lambda: live_ids(server) == ["api", "docs", "web"] and c.carries_more_tunnels)
                assert len(connections(server)) == 1  # one connection carries all three
                aliases = [s for s in server.sessions if isinstance(s, TunnelAlias)]
                assert sorted(a.tunnel_id for a in aliases) == ["api", "docs"]
                assert all(a.primary.tunnel_id == "web" for a in aliases)
                for host, name in (("web", "one"), ("api", "two"), ("docs", "three"), ("web", "one")):
                    assert served_by(await get(http.address, host, f"/{host}")) == name
                await until(lambda: len(seen) == 2)
                assert sorted(t for t, _ in seen) == ["API", "docs"]
                assert all(urls == (f"http://127.0.0.1:{http.address[1]}",) for _, urls in seen), seen
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            # the connection ended: every id it served is free again
            await until(lambda: not live_ids(server))
            for host in ("web", "api", "docs"):
                assert (await get(http.address, host)).startswith(b"HTTP/1.1 404")
            await http.close()
        for app, _ in apps:
            app.close()
    run(body, timeout=90)


def test_a_new_connection_registers_every_tunnel_again(run):
    async def body():
        async with two_apps() as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
            async with server:
                http = ft.HttpIngress(server, ("127.0.0.1", 0))
                await http.start()
                c = client(server, addr1, tunnel("api", addr2))
                async with running(c):
                    await until(lambda: live_ids(server) == ["api", "web"])
                    first = connections(server)[0]
                    first.close()  # the server drops the connection: the client connects again
                    await until(lambda: live_ids(server) == ["api", "web"] and connections(server)[0] is not first)
                    assert served_by(await get(http.address, "api")) == "two"
                    assert served_by(await get(http.address, "web")) == "one"
                await http.close()
    run(body, timeout=90)


def test_each_registered_tunnel_keeps_its_own_access_rules(run):
    async def body():
        async with two_apps("open", "guarded") as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
            async with server:
                http = ft.HttpIngress(server, ("127.0.0.1", 0))
                await http.start()
                guarded = ft.Tunnel("private", ft.ClientConfig(local_addr=addr2,
                                                               basic_auth="ann:s3cret"))
                c = client(server, addr1, guarded)
                async with running(c):
                    await until(lambda: live_ids(server) == ["private", "web"])
                    assert served_by(await get(http.address, "web")) == "open"  # no rules on the primary
                    assert (await get(http.address, "private")).startswith(b"HTTP/1.1 401")
                    r, w = await asyncio.open_connection(*http.address)
                    cred = base64.b64encode(b"ann:s3cret").decode()
                    w.write(f"GET /x HTTP/1.1\r\nHost: private\r\nAuthorization: Basic {cred}\r\n\r\n".encode())
                    answer = await asyncio.wait_for(r.read(), 15)
                    w.close()
                    assert served_by(answer) == "guarded"
                await http.close()
    run(body, timeout=90)


def test_a_registered_tunnel_gets_a_port_of_its_own_and_gives_it_back(run):
    async def body():
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        eaddr = echo.sockets[0].getsockname()[:2]
        (a1, addr1) = await name_app("web")
        from conftest import free_port
        lo = free_port()
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, tcp_port_range=(lo, lo))
        async with server:
            c = client(server, addr1, tunnel("db", eaddr, remote_port=0))
            urls: List[Any] = []
            async with running(c) as tasks:
                await until(lambda: live_ids(server) == ["db", "web"])
                r, w = await asyncio.open_connection("127.0.0.1", lo)
                w.write(b"ping")
                assert await asyncio.wait_for(r.readexactly(4), 15) == b"ping"
                w.close()
                conn = connections(server)[0]
                urls.extend(conn.registrations.aliases and server.public_urls("db", ("tcp",)))
                assert f"tcp://127.0.0.1:{lo}" in urls
                tasks[0].cancel()
                await until(lambda: not live_ids(server))
                await until(lambda: lo not in server.ports.ingresses)  # released with the session
        echo.close()
        a1.close()
    run(body, timeout=90)


async def _echo(reader: Any, writer: Any) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def test_refusals_say_which_tunnel_and_keep_their_retry_semantics(run):
    async def body():
        async with two_apps() as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, domain="example.test",
                                     config=ft.ServerConfig(max_tunnels_per_session=3))
            async with server:
                holder = client(server, addr2, tunnel_id="api")
                async with running(holder):
                    await until(lambda: live_ids(server) == ["api"])
                    # an id another client holds: retried like TunnelIdTaken, naming the tunnel
                    c = client(server, addr1, tunnel("api", addr2))
                    with pytest.raises(RetryableHandshakeError) as taken:
                        await c.connect()
                    assert taken.value.status == HandshakeStatus.TUNNEL_ID_TAKEN
                    assert "'api'" in str(taken.value) and getattr(taken.value, "tunnel_id") == "api"
                    # the connection that failed to register gave its own id back
                    await until(lambda: live_ids(server) == ["api"])
                # not a DNS label under the domain: not retried
                c = client(server, addr1, tunnel("no_underscores", addr2))
                with pytest.raises(HandshakeError) as bad:
                    await c.connect()
                assert not isinstance(bad.value, RetryableHandshakeError)
                assert "DNS label" in str(bad.value) and "'no_underscores'" in str(bad.value)
                # more than max_tunnels_per_session on one connection
                c = client(server, addr1, *[tunnel(f"t{i}", addr2) for i in range(3)])
                with pytest.raises(HandshakeError) as quota:
                    await c.connect()
                assert "max_tunnels_per_session" in str(quota.value) and "'t2'" in str(quota.value)
                assert not isinstance(quota.value, RetryableHandshakeError)
                await until(lambda: not live_ids(server))
    run(body, timeout=90)


def test_a_client_token_may_register_only_its_own_ids(run, tmp_path):
    async def body():
        async with two_apps() as (addr1, addr2):
            path = tmp_path / "tokens.toml"
            path.write_text('[[token]]\ntoken = "alice-token-0001"\ntunnels = ["alice-*"]\n')
            server = PolicyServer(("127.0.0.1", 0), None, client_tokens=ClientTokens(str(path)))
            async with server:
                ok = client(server, addr1, tunnel("alice-api", addr2), tunnel_id="alice-web", token="alice-token-0001")
                session = await ok.connect()
                assert sorted(s.tunnel_id for s in server.sessions) == ["alice-api", "alice-web"]
                session.close()
                await until(lambda: not list(server.sessions))
                bad = client(server, addr1, tunnel("bob-api", addr2), tunnel_id="alice-web", token="alice-token-0001")
                with pytest.raises(AuthenticationError) as refused:
                    await bad.connect()
                assert "tunnel id 'bob-api' is not allowed for this token" in str(refused.value)
                assert server.refused_ids == 1
                assert not server.throttled(("127.0.0.1", 1))  # not a failed login
    run(body, timeout=60)


def test_a_server_without_the_extension_leaves_the_other_tunnels_to_the_caller(run, monkeypatch):
    import ferrotunnel.protocol.handshake as hs

    real = hs.server_capabilities
    # a server that does not know the extension (a Rust one, an older one) never answers tunnels/1
    monkeypatch.setattr(hs, "server_capabilities", lambda config: [c for c in real(config) if c != "tunnels/1"])

    async def body():
        async with two_apps() as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
            async with server:
                c = client(server, addr1, tunnel("api", addr2))
                await c.connect()
                assert not c.carries_more_tunnels
                assert live_ids(server) == ["web"]  # nothing was registered
                c.carry_alone()
                assert c.more_tunnels == ()
                await c.close()
    run(body, timeout=60)


def test_a_stream_naming_a_tunnel_not_registered_is_aborted(run):
    async def body():
        got: List[str] = []

        async def primary(stream: Any) -> None:
            got.append("primary")

        async def api(stream: Any) -> None:
            got.append("api")

        class Stream:
            def __init__(self, headers: Any) -> None:
                self.headers, self.aborted = headers, False

            def abort(self) -> None:
                self.aborted = True

        handle = dispatching_handler(primary, {"api": api})
        for headers in ((), (("ft-tunnel", "api"),), (("ft-visitor", "1.2.3.4:5"), ("ft-tunnel", "api"))):
            await handle(Stream(headers))
        stranger = Stream((("ft-tunnel", "other"),))
        await handle(stranger)
        assert got == ["primary", "api", "api"] and stranger.aborted
    run(body)


def test_refusal_errors_map_each_status():
    taken = refusal_error("db", RegisterStatus.SERVICE_NAME_TAKEN, "tunnel id 'db' is in use; retry-after=0.5")
    assert isinstance(taken, RetryableHandshakeError) and taken.retry_after == 0.5
    full = refusal_error("db", RegisterStatus.QUOTA_EXCEEDED, "max_sessions; retry-after=5")
    assert isinstance(full, RetryableHandshakeError) and full.status == HandshakeStatus.RATE_LIMITED
    quota = refusal_error("db", RegisterStatus.QUOTA_EXCEEDED, "max_tunnels_per_session")
    assert type(quota) is HandshakeError
    token = refusal_error("db", RegisterStatus.INVALID_SERVICE_NAME, "tunnel id 'db' is not allowed for this token")
    assert isinstance(token, AuthenticationError)
    # the server's hint is bounded as on the handshake path: a 0 (or huge) one never makes the
    # client retry in a tight loop (or wait for ever)
    for said, bounded in (("retry-after=0", 0.05), ("retry-after=0.0001", 0.05), ("retry-after=86400", 5.0)):
        got = refusal_error("db", RegisterStatus.SERVICE_NAME_TAKEN, f"tunnel id 'db' is in use; {said}")
        assert got.retry_after == bounded, (said, got.retry_after)


def test_more_tunnels_without_extensions_are_refused_at_once():
    with pytest.raises(ValueError, match="extensions=True"):
        ft.TunnelClient("127.0.0.1:1", TOKEN, tunnel_id="web", config=ft.ClientConfig(extensions=False),
                        more_tunnels=[ft.Tunnel("api")])


def test_tunnel_ids_given_twice_are_refused_at_once():
    with pytest.raises(ValueError, match="given twice"):
        ft.TunnelClient("127.0.0.1:1", TOKEN, tunnel_id="web", more_tunnels=[ft.Tunnel("WEB")])
    with pytest.raises(ValueError, match="given twice"):
        ft.TunnelClient("127.0.0.1:1", TOKEN, tunnel_id="web", more_tunnels=[ft.Tunnel("a"), ft.Tunnel("A")])


def test_register_frames_are_ignored_unless_negotiated_and_bounded_when_they_are():
    from ferrotunnel.config import StreamConfig
    from ferrotunnel.frames import Protocol, Register, encode
    from ferrotunnel.protocol.core import SessionCore
    from ferrotunnel.protocol.extensions import negotiate

    class Rec:
        def __init__(self) -> None:
            self.registers: List[Any] = []

        def on_register(self, *args: Any) -> None:
            self.registers.append(args)

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    frame = encode(Register("api", Protocol.TCP, {"caps": "tcp\n" + "x" * 100 + "\npool/1"}))
    for caps, expected in (((), 0), (("tunnels/1",), 1)):
        rec = Rec()
        core = SessionCore(is_client=False, config=StreamConfig(), listener=rec, now=0.0,
                           negotiated=negotiate(StreamConfig(), caps))
        core.receive(frame, 0.0)
        assert len(rec.registers) == expected
    # the capabilities are kept as a handshake's: the over-long one is dropped
    assert rec.registers[0][2] == ("tcp", "pool/1")
    assert dataclasses.is_dataclass(ft.Tunnel)


def test_registering_an_id_the_connection_serves_already_is_refused_and_harms_nothing(run):
    async def body():
        async with two_apps() as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
            async with server:
                http = ft.HttpIngress(server, ("127.0.0.1", 0))
                await http.start()
                c = client(server, addr1, tunnel("api", addr2))
                session = await c.connect()
                conn = session.connection
                for again in ("api", "WEB"):  # a peer that registers again what it serves
                    fut = conn.register_waiters.expect(again)
                    conn.core.send_register(again, ft.Protocol.TCP, ("tcp",))
                    with pytest.raises(RetryableHandshakeError, match="served on this connection already"):
                        await asyncio.wait_for(fut, 15)
                assert not session.is_closed and live_ids(server) == ["api", "web"]
                assert served_by(await get(http.address, "api")) == "two"
                assert served_by(await get(http.address, "web")) == "one"
                await c.close()
                await http.close()
    run(body, timeout=60)
