"""PROXY protocol v2 on the listeners: a trusted balancer's header names the real peer (used for
caps, sessions and logs; stripped from the stream), a header from anyone else closes the
connection, no header is fine, and a balancer's health check is never an authentication failure."""

from __future__ import annotations

import asyncio

import pytest

import ferrotunnel as ft
from ferrotunnel.protocol.proxyproto import encode_v2

from conftest import tunnel

TOKEN = "secret-token"
DEST = ("127.0.0.1", 7835)


async def _app(greeting: bytes = b""):
    """Echoes, after a greeting of its own (an app whose server speaks first) when given one."""

    async def handle(reader, writer):
        try:
            writer.write(greeting)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


async def _visit(addr, prefix: bytes, payload: bytes = b"payload\n"):
    r, w = await asyncio.open_connection(*addr)
    w.write(prefix + payload)
    try:
        got = await asyncio.wait_for(r.readexactly(len(payload)), 10)
    except (asyncio.IncompleteReadError, ConnectionError):
        got = b""
    return got, (r, w)


def _config(**kw):
    return ft.ServerConfig(trusted_proxies=("127.0.0.1/32",), proxy_header_timeout=0.5, **kw)


def test_a_trusted_header_is_stripped_and_its_address_counts(run):
    async def body():
        app, app_addr = await _app()
        cfg = _config(ingress_max_per_address=1)
        async with tunnel(None, server_config=cfg, client_config=ft.ClientConfig(local_addr=app_addr)) as (server, _c, _s):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ing:
                a = encode_v2(("203.0.113.7", 4444), DEST)
                got, keep1 = await _visit(ing.address, a)
                assert got == b"payload\n"  # the header never reached the app
                got, keep2 = await _visit(ing.address, a)  # the same visitor again: over its cap of 1
                assert got == b"" and server.ingress_gate.refused["per_address"] == 1
                got, keep3 = await _visit(ing.address, encode_v2(("198.51.100.1", 1), DEST))  # another visitor
                assert got == b"payload\n"
                got, keep4 = await _visit(ing.address, b"")  # the balancer itself, no header: fine too
                assert got == b"payload\n"
                for _, w in (keep1, keep2, keep3, keep4):
                    w.close()
        app.close()
    run(body)


def test_a_header_from_an_untrusted_address_closes_the_connection(run):
    async def body():
        app, app_addr = await _app()
        cfg = ft.ServerConfig(trusted_proxies=("10.0.0.0/8",), proxy_header_timeout=0.5)
        async with tunnel(None, server_config=cfg, client_config=ft.ClientConfig(local_addr=app_addr)) as (server, _c, _s):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ing:
                got, (r, w) = await _visit(ing.address, encode_v2(("203.0.113.7", 4444), DEST))
                assert got == b""
                w.close()
                assert ing.listener_exhaustion == {}
                assert ing._server.proxy_refused["untrusted"] == 1
                got, (r, w) = await _visit(ing.address, b"")  # the same address without a header: served
                assert got == b"payload\n"
                w.close()
        app.close()
    run(body)


def test_a_malformed_header_from_a_trusted_proxy_closes_the_connection(run):
    async def body():
        app, app_addr = await _app()
        async with tunnel(None, server_config=_config(), client_config=ft.ClientConfig(local_addr=app_addr)) as (server, _c, _s):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ing:
                bad = bytearray(encode_v2(("203.0.113.7", 4444), DEST))
                bad[12] = 0x31  # version 3
                got, (r, w) = await _visit(ing.address, bytes(bad))
                assert got == b""
                w.close()
                assert ing._server.proxy_refused["malformed"] == 1
        app.close()
    run(body)


def test_an_app_that_speaks_first_is_reached_without_a_header(run):
    async def body():
        app, app_addr = await _app(b"HELLO FROM THE APP\n")
        async with tunnel(None, server_config=_config(), client_config=ft.ClientConfig(local_addr=app_addr)) as (server, _c, _s):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ing:
                r, w = await asyncio.open_connection(*ing.address)
                assert await asyncio.wait_for(r.readline(), 10) == b"HELLO FROM THE APP\n"
                w.close()
        app.close()
    run(body)


def test_the_tunnel_port_takes_the_client_address_from_the_header(run):
    async def body():
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=_config(auth_failure_threshold=1))
        async with server:
            # health checks: a LOCAL header then a close, and a bare connect-and-close
            for prefix in (encode_v2(None, None, command="local"), b""):
                for _ in range(3):
                    r, w = await asyncio.open_connection(*server.address)
                    w.write(prefix)
                    await w.drain()
                    w.close()
                    await w.wait_closed()
            await asyncio.sleep(0.2)
            assert not server.handshake_failures and server.tls_failures == 0
            # a client through the balancer: the session knows the client's own address
            r, w = await asyncio.open_connection(*server.address)
            w.write(encode_v2(("192.0.2.10", 50000), DEST))
            w.write(ft.frames.encode(ft.frames.Handshake(token=TOKEN, tunnel_id="via-lb",
                                                         capabilities=["basic", "tcp"])))
            await w.drain()
            session = await server.wait_for_session("via-lb", timeout=10)
            assert session.peer_address == ("192.0.2.10", 50000)
            w.close()
    run(body)


def test_bad_trusted_proxies_are_refused():
    with pytest.raises(ValueError):
        ft.ServerConfig(trusted_proxies="10.0.0.0/8")  # one string, not a tuple
    with pytest.raises(ValueError, match="not-a-cidr"):
        ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=ft.ServerConfig(trusted_proxies=("not-a-cidr",)))


def test_connections_waiting_for_their_first_bytes_are_capped(run, monkeypatch):
    """Before a protocol exists (and with it every other cap), a connection waits for its first
    bytes to look for a header: how many may wait at once is capped, the rest closed at once."""
    import ferrotunnel.aio.listen as listen

    monkeypatch.setattr(listen, "MAX_AWAITING_HEADER", 5)

    async def body():
        app, app_addr = await _app()
        cfg = ft.ServerConfig(trusted_proxies=("127.0.0.1/32",), proxy_header_timeout=5.0)
        async with tunnel(None, server_config=cfg, client_config=ft.ClientConfig(local_addr=app_addr)) as (server, _c, _s):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ing:
                silent = [await asyncio.open_connection(*ing.address) for _ in range(5)]
                await asyncio.sleep(0.2)
                assert ing._server.awaiting_header == 5
                r, w = await asyncio.open_connection(*ing.address)  # the sixth: closed at once
                assert await asyncio.wait_for(r.read(), 5) == b""
                w.close()
                assert ing._server.proxy_refused["awaiting"] == 1
                for _, sw in silent:
                    sw.close()
                await asyncio.sleep(0.3)
                assert ing._server.awaiting_header == 0
                got, (r, w) = await _visit(ing.address, b"")  # room again
                assert got == b"payload\n"
                w.close()
        app.close()
    run(body)
