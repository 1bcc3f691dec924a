"""The tunnels extension against a client that misbehaves (issue 12 point 5, after a review):
a connection that ends while a Register is being claimed leaves nothing claimed; Registers
beyond ``max_tunnels_per_session`` are answered QuotaExceeded (the client stops, naming the
limit) instead of closing the connection; over-long ids are refused without being kept;
refusals are bounded per connection (``MAX_REGISTER_REFUSALS``); an alias's own multiplexer
names its tunnel; a server subclass whose own policy restricts ids refuses Registers; a server
that is shutting down answers them retryably. Real sockets on 127.0.0.1, both loops."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import ferrotunnel as ft
from ferrotunnel.aio.session import TunnelAlias
from ferrotunnel.client.tunnels import RegisterWaiters
from ferrotunnel.errors import HandshakeError, RetryableHandshakeError
from ferrotunnel.protocol.extensions import client_capabilities
from ferrotunnel.server.tunnels import MAX_REGISTER_REFUSALS

from conftest import free_port
from test_pools import get, served_by, until
from test_tunnels_one_connection import TOKEN, client, live_ids, tunnel, two_apps

async def bare(server: Any, tunnel_id: str = "web", addr: Any = ("127.0.0.1", 9)) -> Any:
    """A session that negotiated tunnels/1 and registers nothing by itself (the test sends)."""
    c = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=tunnel_id,
                        config=ft.ClientConfig(local_addr=addr, capabilities=("tunnels/1",)))
    session = await c.connect()
    session.connection.register_waiters = RegisterWaiters(session.connection.loop)
    return c, session


def register(session: Any, tunnel_id: str, caps: Any = ("tcp",)) -> "asyncio.Future[Any]":
    conn = session.connection
    fut = conn.register_waiters.expect(tunnel_id)
    conn.core.send_register(tunnel_id, ft.Protocol.TCP, tuple(caps))
    return fut


def test_a_connection_that_ends_during_a_register_leaves_nothing_claimed(run):
    async def body():
        lo = free_port()
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, tcp_port_range=(lo, lo + 3))
        async with server:
            for i in range(12):  # the end lands before, during and after the port is bound
                c, session = await bare(server, f"web{i}")
                register(session, f"leak{i}", client_capabilities(ft.ClientConfig(remote_port=0)))
                await asyncio.sleep(0.001 * (i % 4))
                session.connection.close()
                await c.close()
            await until(lambda: not list(server.registry.local_sessions()))
            assert not server.ports.ports  # every port on request was given back
    run(body, timeout=90)


def test_too_many_registers_are_answered_quota_exceeded_and_the_client_stops(run):
    async def body():
        async with two_apps() as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=ft.ServerConfig(max_tunnels_per_session=3))
            async with server:
                c = client(server, addr1, *[tunnel(f"t{i}", addr2) for i in range(6)])
                with pytest.raises(HandshakeError) as quota:
                    await asyncio.wait_for(c.connect_and_run(), 30)  # stops: not retried forever
                assert not isinstance(quota.value, RetryableHandshakeError)
                assert "max_tunnels_per_session" in str(quota.value)
                await until(lambda: not live_ids(server))
    run(body, timeout=60)


def test_over_long_ids_are_refused_and_refusals_are_bounded(run):
    async def body():
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        async with server:
            c, session = await bare(server)
            long_id = "x" * 60000
            with pytest.raises(HandshakeError, match="1..255 bytes"):
                await asyncio.wait_for(register(session, long_id), 15)
            # each refusal is answered, up to MAX_REGISTER_REFUSALS; the next ends the connection
            for i in range(MAX_REGISTER_REFUSALS - 1):
                with pytest.raises(HandshakeError):
                    await asyncio.wait_for(register(session, "web"), 15)  # its own id: refused
            assert not session.is_closed
            last = register(session, "web")
            with pytest.raises(Exception):
                await asyncio.wait_for(last, 15)
            await until(lambda: session.is_closed)
            await c.close()
    run(body, timeout=90)


def test_an_alias_multiplexer_opens_streams_on_its_own_tunnel(run):
    async def body():
        async with two_apps() as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
            async with server:
                c = client(server, addr1, tunnel("api", addr2))
                await c.connect()
                alias = next(s for s in server.sessions if isinstance(s, TunnelAlias))
                for opener in (alias, alias.multiplexer):
                    stream = await opener.open_stream()
                    stream.write(b"GET /m HTTP/1.1\r\nHost: api\r\n\r\n")
                    await stream.drain()
                    assert served_by(await asyncio.wait_for(stream.read(), 15)) == "two"
                await c.close()
    run(body, timeout=60)


class OwnPolicy(ft.TunnelServer):
    """A server whose own policy restricts tunnel ids (in authorize), not saying which ids a
    session may register."""

    async def authorize(self, conn: Any, req: Any) -> None:
        if req.tunnel_id != "web":
            conn.reject(ft.HandshakeStatus.INVALID_TOKEN, "only web")
            return
        await super().authorize(conn, req)


def test_a_subclass_restricting_ids_in_its_own_policy_refuses_registers(run):
    async def body():
        async with two_apps() as (addr1, addr2):
            server = OwnPolicy(("127.0.0.1", 0), TOKEN)
            async with server:
                c = client(server, addr1, tunnel("other", addr2))
                with pytest.raises(HandshakeError, match="its own policy"):
                    await c.connect()
                await until(lambda: not live_ids(server))
    run(body, timeout=60)


def test_a_server_that_stops_listening_answers_registers_retryably(run):
    async def body():
        async with two_apps() as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
            async with server:
                http = ft.HttpIngress(server, ("127.0.0.1", 0))
                await http.start()
                c, session = await bare(server, addr=addr1)
                server.stop_listening()  # (a cluster node leaving; the session carries on)
                with pytest.raises(RetryableHandshakeError, match="shutting down"):
                    await asyncio.wait_for(register(session, "api"), 15)
                assert served_by(await get(http.address, "web")) == "one"
                await c.close()
                await http.close()
    run(body, timeout=60)



def test_a_refused_port_gives_the_claimed_id_back(run):
    async def body():
        lo = free_port()
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, tcp_port_range=(lo, lo))
        async with server:
            c1, s1 = await bare(server, "one")
            assert await asyncio.wait_for(register(s1, "db1", client_capabilities(ft.ClientConfig(remote_port=lo))), 15)
            c2, s2 = await bare(server, "two")
            with pytest.raises(HandshakeError, match=str(lo)):  # the port is taken: refused after the claim
                await asyncio.wait_for(register(s2, "db2", client_capabilities(ft.ClientConfig(remote_port=lo))), 15)
            assert live_ids(server) == ["db1", "one", "two"]  # db2 was given back
            assert await asyncio.wait_for(register(s2, "db2"), 15) == ()  # and can be claimed without the port
            for c in (c1, c2):
                await c.close()
    run(body, timeout=60)


def test_registers_beyond_the_limit_waiting_are_only_counted_and_answered_in_order(run):
    async def body():
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=ft.ServerConfig(max_tunnels_per_session=3))
        async with server:
            c, session = await bare(server)
            futures = [register(session, f"t{i}") for i in range(20)]  # one flush: they arrive together
            answers = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 15)
            texts = [str(a) if isinstance(a, BaseException) else "ok" for a in answers]
            assert texts[:2] == ["ok", "ok"], texts  # the first ones in their turn (3 = web + 2)
            assert any("Registers waiting for an answer" in t for t in texts), texts  # the rest only counted
            assert all("max_tunnels_per_session" in t for t in texts[2:]), texts
            assert not session.is_closed
            await c.close()
    run(body, timeout=60)


def test_a_closed_connection_with_registered_tunnels_leaves_nothing_alive(run):
    import gc

    from ferrotunnel.server.connection import ServerConnection
    from ferrotunnel.server.tunnels import Registrations

    kinds = (ft.Session, ServerConnection, Registrations)

    async def body():
        async with two_apps() as (addr1, addr2):
            server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
            async with server:
                for _ in range(3):
                    c = client(server, addr1, tunnel("api", addr2), tunnel("docs", addr2))
                    session = await c.connect()
                    assert sorted(live_ids(server)) == ["api", "docs", "web"]
                    await c.close()
                    del c, session
                    await until(lambda: not list(server.sessions))
                await asyncio.sleep(0.2)
        return [type(obj).__name__ for obj in gc.get_objects() if type(obj) in kinds or isinstance(obj, TunnelAlias)]

    gc.collect()
    gc.disable()
    try:
        assert run(body, timeout=60) == []  # freed by reference counting alone: no cycle
    finally:
        gc.enable()
