"""An ingress's ``IdleSweeper`` keeps closing idle connections after the ingress closes.

Closing an ingress cuts none of its connections: they end with their streams. The sweeper
stopped its timer at the close, though, and only an ``add`` started it again, so those
connections were never closed for idleness. A pool member that leased a remote port and left
closes that port's ingress while the other members still carry visitors on it: these stayed
open, silent, for good."""

from __future__ import annotations

import asyncio

import ferrotunnel as ft
from conftest import echo_handler, free_port, tunnel
from ferrotunnel.aio import IdleSweeper, TcpBridge
import ferrotunnel.aio.sweeper as sweeper_mod

TOKEN = "secret-token-1234"


async def _gone(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closed the connection within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def _echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"ping")
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"


async def _still_echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    try:
        return await _echoes(reader, writer)
    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, RuntimeError):  # (uvloop: closed)
        return False


def test_a_closed_sweeper_still_sweeps_the_bridges_it_holds(run):
    async def body():
        timeout = 0.2
        sweeper = IdleSweeper(timeout)
        silent = TcpBridge()
        sweeper.add(silent)
        sweeper.close()
        async with asyncio.timeout(10 * timeout):
            while not silent.finished:
                await asyncio.sleep(0.02)
        assert silent not in sweeper.bridges and sweeper not in sweeper_mod._SWEEPING
        await asyncio.sleep(timeout)  # the last sweep found none: the timer stopped
        assert sweeper._handle is None

    run(body)


def test_a_closed_sweeper_with_no_bridges_stops_at_once(run):
    async def body():
        sweeper = IdleSweeper(60.0)
        bridge = TcpBridge()
        sweeper.add(bridge)
        bridge.abort()
        assert not sweeper.bridges
        sweeper.close()
        assert sweeper._handle is None

    run(body)


def test_connections_of_a_closed_ingress_still_close_when_idle(run):
    async def body():
        timeout = 0.5
        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()

        backend = await asyncio.start_server(echo, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=backend.sockets[0].getsockname()[:2])
        async with tunnel(None, client_config=cfg) as (server, client, session):
            ingress = ft.TcpIngress(server, ("127.0.0.1", 0), idle_timeout=timeout)
            async with ingress:
                r, w = await asyncio.open_connection(*ingress.address)
                assert await _echoes(r, w)
            # the ingress closed; its connection goes on (it ends with its stream) ...
            assert await _echoes(r, w)
            # ... and is closed after 1 to 1.5 idle timeouts of silence
            assert await _gone(r, 4 * timeout), "an idle connection of a closed ingress stayed open"
            w.close()
        backend.close()

    run(body)


def test_a_pool_member_leaving_its_leased_port_leaves_idle_visitors_to_the_sweeper(run):
    """The audit's case: member A leases the remote port, B joins the pool; visitors on the port
    are spread over both. A leaves (its ingress closes): the visitors B carries still go when idle."""
    async def body():
        port = free_port()
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, tcp_port_range=(port, port),
                                 config=ft.ServerConfig(ingress_idle_timeout=0.5))
        async with server:
            addr = "%s:%s" % server.address
            a = ft.TunnelClient(addr, TOKEN, tunnel_id="pooled", config=ft.ClientConfig(pool=True, remote_port=port))
            b = ft.TunnelClient(addr, TOKEN, tunnel_id="pooled", config=ft.ClientConfig(pool=True))
            ta = asyncio.create_task(a.connect_and_run(echo_handler))
            tb = asyncio.create_task(b.connect_and_run(echo_handler))
            try:
                async with asyncio.timeout(10):
                    while a.session is None:
                        await asyncio.sleep(0.02)
                    while b.session is None:
                        await asyncio.sleep(0.02)
                visitors = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
                for r, w in visitors:
                    assert await _echoes(r, w)
                ta.cancel()  # A leaves: the port is released and its ingress closed
                await asyncio.gather(ta, return_exceptions=True)
                carried = [(r, w) for r, w in visitors if await _still_echoes(r, w)]
                assert carried, "no visitor was carried by B: the test tests nothing"
                gone = await asyncio.gather(*(_gone(r, 3.0) for r, _ in carried))
                assert all(gone), f"visitors still open after 3 s idle (idle timeout 0.5 s): {gone}"
                for _, w in visitors:
                    w.close()
            finally:
                for t in (ta, tb):
                    t.cancel()
                await asyncio.gather(ta, tb, return_exceptions=True)

    run(body)
