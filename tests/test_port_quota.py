"""Ports on request per source address (``ServerConfig.max_ports_per_address``): one address
cannot lease the whole ``tcp_port_range`` (through its handshakes, or the Registers of the tunnels
extension: up to 63 per connection), another address still can, the count goes back down when
sessions end (also when they end in the middle of a handshake or a Register), and any free port
of the range is found by random probes, not from a list of the whole range. Real servers on
127.0.0.1 (a second client address: 127.0.0.2), both loops."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, List, Optional, Tuple

import pytest

import ferrotunnel as ft
from ferrotunnel.client.tunnels import RegisterWaiters
from ferrotunnel.errors import HandshakeError, RetryableHandshakeError
from ferrotunnel.frames import RegisterStatus
from ferrotunnel.protocol.extensions import client_capabilities
from ferrotunnel.protocol.handshake import ClientHandshake
from ferrotunnel.server.ingress import PortUnavailable, TcpIngress

from conftest import free_port
from test_remote_ports import _bindable, _released, free_range

TOKEN = "port-quota-token-0123456789"
PORT_CAPS = tuple(client_capabilities(ft.ClientConfig(remote_port=0)))
WAIT = 20.0  # only to catch a hang


async def until(cond: Any, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


class Answers(RegisterWaiters):
    """The client's register waiters, also keeping each answer's status and text."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.seen: List[Tuple[str, RegisterStatus, str]] = []

    def answered(self, tunnel_id: str, status: RegisterStatus, text: str) -> None:
        self.seen.append((tunnel_id, status, text))
        super().answered(tunnel_id, status, text)


def _sock_from(source: str, server: Any) -> socket.socket:
    """A socket connected to ``server``'s tunnel port from ``source`` (a loopback address)."""
    s = socket.socket()
    s.bind((source, 0))
    s.setblocking(False)
    try:
        s.connect(server.address)
    except BlockingIOError:
        pass
    return s


async def _connected(s: socket.socket) -> socket.socket:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_writer(s.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, WAIT)
    finally:
        loop.remove_writer(s.fileno())
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    assert err == 0, err
    return s


async def session_from(server: Any, source: str, tunnel_id: str, remote_port: Optional[int] = 0) -> Any:
    """A session from ``source`` that negotiated tunnels/1 (and asked for a port in its handshake
    unless ``remote_port`` is None), registering nothing by itself (the test sends)."""
    c = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=tunnel_id,
                        config=ft.ClientConfig(local_addr=("127.0.0.1", 9), remote_port=remote_port,
                                               capabilities=("tunnels/1",)))
    session = await c.connect(sock=await _connected(_sock_from(source, server)))
    session.connection.register_waiters = Answers(session.connection.loop)
    return c, session


def register(session: Any, tunnel_id: str, caps: Any = PORT_CAPS) -> "asyncio.Future[Any]":
    conn = session.connection
    fut = conn.register_waiters.expect(tunnel_id)
    conn.core.send_register(tunnel_id, ft.Protocol.TCP, tuple(caps))
    return fut


def _port_of(urls: Tuple[str, ...]) -> int:
    (url,) = [u for u in urls if u.startswith("tcp://")]
    return int(url.rsplit(":", 1)[1])


def test_one_address_registers_at_most_max_ports_per_address(run):
    """The fix's main case: over the cap, a Register is answered QuotaExceeded naming the limit;
    another address still gets ports; the first session's end gives its ports back."""
    cap = 3

    async def body():
        lo, hi = free_range(2 * cap + 3)
        cfg = ft.ServerConfig(max_ports_per_address=cap)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg, tcp_port_range=(lo, hi)) as server:
            a, sa = await session_from(server, "127.0.0.1", "a0")  # its handshake's port: 1 of 3
            ports = [a.remote_port]
            for i in range(1, cap):
                ports.append(_port_of(await asyncio.wait_for(register(sa, f"a{i}"), WAIT)))
            assert server.ports.held(("127.0.0.1", 1)) == cap
            with pytest.raises(HandshakeError) as over:
                await asyncio.wait_for(register(sa, "a-over"), WAIT)
            assert not isinstance(over.value, RetryableHandshakeError)  # a quota: the client stops
            assert "max_ports_per_address=3" in str(over.value), over.value
            tid, status, text = sa.connection.register_waiters.seen[-1]
            assert (tid, status) == ("a-over", RegisterStatus.QUOTA_EXCEEDED) and "max_ports_per_address" in text
            # a Register without a port is no lease: still served
            assert await asyncio.wait_for(register(sa, "a-noport", ("tcp",)), WAIT) == ()
            assert not sa.is_closed and server.ports.held(("127.0.0.1", 1)) == cap
            assert "a-over" not in [s.tunnel_id for s in server.sessions]
            # an IPv4-mapped peer is the same address
            assert server.ports.held(("::ffff:127.0.0.1", 1, 0, 0)) == cap

            b, sb = await session_from(server, "127.0.0.2", "b0")  # another address: its own count
            more = [_port_of(await asyncio.wait_for(register(sb, f"b{i}"), WAIT)) for i in range(1, cap)]
            assert server.ports.held(("127.0.0.2", 1)) == cap and len({b.remote_port, *more, *ports}) == 2 * cap

            await a.close()  # its ports return, and so does its address's count
            await until(lambda: server.ports.held(("127.0.0.1", 1)) == 0)
            for port in ports:
                await _released(port)
            a2, sa2 = await session_from(server, "127.0.0.1", "a0")
            for i in range(1, cap):
                await asyncio.wait_for(register(sa2, f"again{i}"), WAIT)
            assert server.ports.held(("127.0.0.1", 1)) == cap
            await a2.close()
            await b.close()
            await until(lambda: not server.ports.ports and not server.ports.held(("127.0.0.2", 1)))

    run(body, timeout=90)


def test_handshakes_from_one_address_take_at_most_max_ports_per_address(run):
    """Many connections from one address, each asking for a port in its handshake: the one over
    the cap is refused RateLimited with the reason and a retry-after (the client retries: the
    quota frees up as the address's tunnels end), another address is served."""
    cap = 2

    async def body():
        lo, hi = free_range(cap + 4)
        cfg = ft.ServerConfig(max_ports_per_address=cap)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg, tcp_port_range=(lo, hi)) as server:
            clients = [(await session_from(server, "127.0.0.1", f"h{i}"))[0] for i in range(cap)]
            with pytest.raises(HandshakeError) as over:
                await session_from(server, "127.0.0.1", "h-over")
            assert isinstance(over.value, RetryableHandshakeError), over.value
            assert over.value.status is ft.HandshakeStatus.RATE_LIMITED and over.value.retry_after == 5.0
            assert "max_ports_per_address=2" in str(over.value), over.value
            no_port, _ = await session_from(server, "127.0.0.1", "h-noport", remote_port=None)  # asks for none
            other, _ = await session_from(server, "127.0.0.2", "h-other")
            assert server.ports.held(("127.0.0.1", 1)) == cap and server.ports.held(("127.0.0.2", 1)) == 1
            await clients[0].close()
            await until(lambda: server.ports.held(("127.0.0.1", 1)) == cap - 1)
            again, _ = await session_from(server, "127.0.0.1", "h-again")
            for c in clients[1:] + [again, no_port, other]:
                await c.close()
            await until(lambda: not server.ports.ports and not server.ports.held(("127.0.0.1", 1)))

    run(body, timeout=60)


def test_the_count_goes_down_when_handshakes_and_registers_end_half_way(run, monkeypatch):
    """Connections that end while their port is being bound (in the handshake or a Register)
    leave nothing counted: the address may lease up to the cap again afterwards."""
    cap = 2
    binding: List[Any] = []
    real_start = TcpIngress.start

    async def slow_start(self: Any) -> None:  # each bind of a port on request waits a while first
        binding.append(self)
        await asyncio.sleep(0.3)
        await real_start(self)

    async def body():
        lo, hi = free_range(cap + 4)
        cfg = ft.ServerConfig(max_ports_per_address=cap)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg, tcp_port_range=(lo, hi)) as server:
            monkeypatch.setattr(TcpIngress, "start", slow_start)
            for i in range(3):  # the end lands while the port is being bound, for sure
                hello = ClientHandshake(TOKEN, f"mid{i}", ft.ClientConfig(remote_port=0)).data_to_send()
                reader, writer = await asyncio.open_connection(*server.address)
                writer.write(hello)
                await until(lambda: len(binding) == 2 * i + 1 and server.ports.held(("127.0.0.1", 1)) == 1)
                writer.transport.abort()
                c, session = await session_from(server, "127.0.0.1", f"midweb{i}", remote_port=None)
                register(session, f"midleak{i}")
                await until(lambda: len(binding) == 2 * i + 2)
                session.connection.close()
                await c.close()
            await until(lambda: not list(server.registry.local_sessions()) and not server.ports.ports)
            await until(lambda: server.pending_handshakes == 0)
            assert server.ports.held(("127.0.0.1", 1)) == 0
            monkeypatch.undo()
            for i in range(12):  # the end lands before, during and after the port is bound
                hello = ClientHandshake(TOKEN, f"cut{i}", ft.ClientConfig(remote_port=0)).data_to_send()
                reader, writer = await asyncio.open_connection(*server.address)
                writer.write(hello)
                await asyncio.sleep(0.001 * (i % 4))
                writer.transport.abort()
                c, session = await session_from(server, "127.0.0.1", f"web{i}", remote_port=None)
                register(session, f"leak{i}")
                await asyncio.sleep(0.001 * (i % 4))
                session.connection.close()
                await c.close()
            await until(lambda: not list(server.registry.local_sessions()) and not server.ports.ports)
            await until(lambda: server.pending_handshakes == 0)
            assert server.ports.held(("127.0.0.1", 1)) == 0
            kept = [(await session_from(server, "127.0.0.1", f"after{i}"))[0] for i in range(cap)]
            assert server.ports.held(("127.0.0.1", 1)) == cap
            for c in kept:
                await c.close()

    run(body, timeout=90)


class Lookups(dict):
    """The leased ports' table, counting the lookups by port (``in``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lookups = 0

    def __contains__(self, key: Any) -> bool:
        self.lookups += 1
        return super().__contains__(key)


class _Asker:
    def __init__(self, tunnel_id: str) -> None:
        self.tunnel_id = self.id = tunnel_id
        self.peer_address = ("127.0.0.1", 1)


def test_any_port_is_found_by_random_probes_not_a_list_of_the_range(run):
    """A wide range: the lease looks at a bounded number of ports (the old code looked up every
    port of the range to build a list of the free ones); a nearly full range: the scan after
    the probes still finds its one free port; a port asked for by number is bound as before."""

    async def body():
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, tcp_port_range=(20000, 60999))
        async with server:
            table = server.ports.ingresses = Lookups()
            wide = _Asker("wide")
            port = await server.ports.lease(wide, 0)
            assert 20000 <= port <= 60999 and 0 < table.lookups <= 2 * server.ports.MAX_PROBES, table.lookups
            server.ports.release(wide)
        one = free_port()
        lo, hi = max(1024, one - 150), min(65535, one + 149)
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, tcp_port_range=(lo, hi))
        async with server:
            for p in range(lo, hi + 1):
                if p != one:
                    server.ports.ingresses[p] = None  # as if being bound by others
            asker = _Asker("full")
            assert await server.ports.lease(asker, 0) == one
            server.ports.release(asker)
            for p in range(lo, hi + 1):
                server.ports.ingresses.pop(p, None)
            specific = _Asker("specific")
            assert _bindable(one)
            assert await server.ports.lease(specific, one) == one  # by number: that port
            with pytest.raises(PortUnavailable, match=f"remote port {one} is taken"):
                await server.ports.lease(_Asker("again"), one)
            assert server.ports.held(("127.0.0.1", 1)) == 1  # a refused lease is not counted

    run(body, timeout=60)


def test_the_limit_is_a_positive_server_setting():
    assert ft.ServerConfig().max_ports_per_address == 64
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_ports_per_address"):
            ft.ServerConfig(max_ports_per_address=bad)
