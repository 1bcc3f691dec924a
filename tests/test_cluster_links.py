"""Node links: the HMAC preamble, a stream carried to the node that owns the tunnel and joined
to the client's session, byte-exact both ways with backpressure, and one hop only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import hashlib
import os

import pytest

import ferrotunnel as ft
from ferrotunnel.cluster.links import LinkAuthError, LinkPool, LinkServer
from ferrotunnel.server.registry import LocalRoute

TOKEN = "cluster-link-token"
SECRET = "cluster-secret-for-tests"


async def _echo_app():
    async def handle(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


class _Recording(LocalRoute):
    """A local route that remembers who each stream was for."""

    seen: list = []

    def open_stream_nowait(self, protocol, priority, visitor=None, host=None):
        self.seen.append((visitor, host))
        return super().open_stream_nowait(protocol, priority, visitor, host)


def test_a_stream_over_a_link_reaches_the_owning_nodes_client_byte_exact(run):
    async def body():
        app, app_addr = await _echo_app()
        owner = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        async with owner:
            client = ft.TunnelClient("%s:%d" % owner.address, TOKEN, tunnel_id="web",
                                     config=ft.ClientConfig(local_addr=app_addr))
            task = asyncio.create_task(client.connect_and_run())
            await owner.wait_for_session("web", timeout=10)

            def local_route(tid):
                r = owner.registry.lookup_local(tid)
                return _Recording(r.session) if r is not None else None

            links = LinkServer("node-a", SECRET, ("127.0.0.1", 0), local_route)
            await links.start()
            pool = LinkPool("node-b", SECRET)
            try:
                route = await pool.route("node-a", links.address, "web")
                assert route is not None and route.tunnel_id == "web"
                blob = os.urandom(8 * 1024 * 1024)
                streams = [route.open_stream_nowait(ft.Protocol.TCP, ft.StreamPriority.NORMAL,
                                                    visitor=("203.0.113.9", 4000 + i), host="web.example")
                           for i in range(4)]

                async def one(s):
                    async def send():
                        for i in range(0, len(blob), 65536):
                            s.write(blob[i:i + 65536])
                            await s.drain()
                        s.write_eof()
                    sender = asyncio.create_task(send())
                    h = hashlib.sha256()
                    n = 0
                    while data := await s.read(1 << 18):
                        h.update(data)
                        n += len(data)
                    await sender
                    return n, h.hexdigest()

                results = await asyncio.wait_for(asyncio.gather(*(one(s) for s in streams)), 60)
                assert results == [(len(blob), hashlib.sha256(blob).hexdigest())] * 4
                assert sorted(_Recording.seen) == [(("203.0.113.9", 4000 + i), "web.example") for i in range(4)]
                assert links.streams["joined"] == 4
                # a second route reuses the same link: one connection per node pair
                again = await pool.route("node-a", links.address, "web")
                assert again.link is route.link and len(pool.links()) == 1
            finally:
                _Recording.seen = []
                await pool.close()
                await links.close()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        app.close()
    run(body, timeout=120)


def _has_ipv6_loopback() -> bool:
    import socket
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def _link_to_nowhere(host: str):
    """A link server (node-a) with no local session at all, and a pool (node-b) holding its route
    for tunnel "elsewhere": (links, pool, route)."""
    links = LinkServer("node-a", SECRET, (host, 0), lambda tid: None)
    await links.start()
    pool = LinkPool("node-b", SECRET)
    try:
        yield links, pool, await pool.route("node-a", links.address, "elsewhere")
    finally:
        await pool.close()
        await links.close()


async def _refused_over(route) -> None:
    """A stream carried over the link is refused there (no session for its tunnel)."""
    s = route.open_stream_nowait(ft.Protocol.TCP, ft.StreamPriority.NORMAL)
    s.write(b"hello")
    with pytest.raises(ft.FerroTunnelError):
        await asyncio.wait_for(s.read(), 10)


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not _has_ipv6_loopback(), reason="no IPv6 loopback"))])
def test_a_link_stream_for_a_tunnel_not_here_is_reset_never_forwarded_again(run, host):
    """Also: a node reached at an IPv6 address gets its link (the link's client is given the
    address as a tuple, never as "HOST:PORT" text an IPv6 host cannot be written in)."""
    async def body():
        async with _link_to_nowhere(host) as (links, pool, route):
            assert links.address[0] == host
            assert route is not None and pool.failures == 0 and list(pool.links()) == ["node-a"]
            await _refused_over(route)
            assert links.streams["no_session"] == 1
    run(body, timeout=30)


@pytest.mark.parametrize("which", ["dialler", "acceptor"])
def test_a_node_without_the_secret_gets_no_link(run, which):
    async def body():
        links = LinkServer("node-a", SECRET if which == "dialler" else "another-secret", ("127.0.0.1", 0),
                           lambda tid: None)
        await links.start()
        pool = LinkPool("node-b", "another-secret" if which == "dialler" else SECRET)
        try:
            with pytest.raises(LinkAuthError):
                await pool.link("node-a", links.address)
            assert await pool.route("node-a", links.address, "x") is None and pool.failures == 1
            assert not links.tunnel.sessions.get_by_tunnel_id("x")
            assert not list(links.tunnel.sessions)
        finally:
            await pool.close()
            await links.close()
    run(body, timeout=30)


def test_connections_in_their_preamble_are_capped(run, monkeypatch):
    """Connections to a node's link port that never authenticate hold a descriptor each until
    PREAMBLE_TIMEOUT: past MAX_LINK_PREAMBLES of them a new one is closed at once, and a real
    node still links once they are gone."""
    from ferrotunnel.cluster import links as links_mod

    monkeypatch.setattr(links_mod, "MAX_LINK_PREAMBLES", 3, raising=False)
    monkeypatch.setattr(links_mod, "MAX_LINK_PREAMBLES_PER_ADDRESS", 2, raising=False)

    async def body():
        links = LinkServer("node-a", SECRET, ("127.0.0.1", 0), lambda tid: None)
        await links.start()
        pool = LinkPool("node-b", SECRET)
        silent = []
        try:
            async def silent_from(source):  # silent: it takes a preamble slot
                r, w = await asyncio.open_connection(*links.address, local_addr=(source, 0))
                silent.append(w)
                assert len(await r.readexactly(1)) == 1  # the node's hello: accepted, in its preamble

            async def refused_from(source):
                r, w = await asyncio.open_connection(*links.address, local_addr=(source, 0))
                assert await asyncio.wait_for(r.read(), 10) == b""  # closed at once, no hello
                w.close()

            for _ in range(2):
                await silent_from("127.0.0.2")
            await refused_from("127.0.0.2")  # its address's share is taken
            await silent_from("127.0.0.3")  # another address still gets in, up to the total
            await refused_from("127.0.0.4")  # the total is taken
            assert links._refusals.counts["link_preambles"] >= 1
            for w in silent:
                w.close()
            for _ in range(500):  # their slots come back as the node sees them go
                if not links._handshakes:
                    break
                await asyncio.sleep(0.01)
            assert await pool.route("node-a", links.address, "x") is not None
        finally:
            await pool.close()
            await links.close()
    run(body, timeout=60)


def test_the_dialler_checks_which_node_it_reached(run):
    async def body():
        links = LinkServer("node-c", SECRET, ("127.0.0.1", 0), lambda tid: None)
        await links.start()
        pool = LinkPool("node-b", SECRET)
        try:
            with pytest.raises(LinkAuthError, match="expected node 'node-a', reached node 'node-c'"):
                await pool.link("node-a", links.address)
        finally:
            await pool.close()
            await links.close()
    run(body, timeout=30)


def test_the_secret_never_crosses_the_wire():
    """What a link sends before the tunnel protocol: ids, nonces and MACs; the handshake token is
    derived per link. None of it contains the secret."""
    from ferrotunnel.cluster.access_records import labelled_mac as _mac
    from ferrotunnel.cluster.links import _hello, link_token

    a, b = os.urandom(32), os.urandom(32)
    secret = SECRET.encode()
    wire = _hello(b"node-a", a) + _hello(b"node-b", b) + _mac(secret, b"dial", a, b, b"node-a", b"node-b") \
        + _mac(secret, b"accept", a, b, b"node-a", b"node-b") + link_token(secret, a, b).encode()
    assert secret not in wire and secret.hex().encode() not in wire
    assert link_token(secret, a, b) != link_token(secret, b, a) != link_token(b"other", a, b)


def test_link_streams_for_a_tunnel_not_here_cost_one_line(run, caplog):
    """Each of them was an INFO line (a visitor on another node causes one at will): now one per
    LOG_RATE_INTERVAL, counted."""
    caplog.set_level(logging.INFO, logger="ferrotunnel.cluster")

    async def body():
        async with _link_to_nowhere("127.0.0.1") as (links, pool, route):
            for _ in range(20):
                await _refused_over(route)
            assert links.streams["no_session"] == 20
    run(body, timeout=30)
    said = [r.getMessage() for r in caplog.records if "no local session" in r.getMessage()]
    assert len(said) == 1, said
