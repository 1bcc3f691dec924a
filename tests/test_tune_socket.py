"""tune_socket: the socket options every tunnel and forwarded connection gets (through the loop's
socket stand-in, which must keep its descriptor), and through the whole tunnel."""

from __future__ import annotations

import asyncio
import socket

import pytest

import ferrotunnel as ft
import ferrotunnel.aio.bridge as bridge_module
from ferrotunnel.aio.transport import is_loopback_peer, tune_socket


def _options(fd: int) -> tuple:
    s = socket.socket(fileno=fd)
    try:
        return (s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
                s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL))
    finally:
        s.detach()


class _Tuned(asyncio.Protocol):
    def __init__(self, seen: list) -> None:
        self.seen = seen

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport
        tune_socket(transport.get_extra_info("socket"))
        self.seen.append(_options(transport.get_extra_info("socket").fileno()))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # the descriptor still belongs to the transport


def test_tune_socket_through_the_loops_socket(run) -> None:
    async def body() -> None:
        seen: list = []
        server = await asyncio.get_running_loop().create_server(lambda: _Tuned(seen), "127.0.0.1", 0)
        host, port = server.sockets[0].getsockname()[:2]
        r, w = await asyncio.open_connection(host, port)
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        assert seen == [(True, True, 30, 10)]
        w.close()
        server.close()
        await server.wait_closed()

    run(body)


def test_tune_socket_ignores_a_closed_or_odd_socket() -> None:
    s = socket.socket()
    s.close()
    tune_socket(s)  # no error
    tune_socket(object())
    a, b = socket.socketpair()
    with a, b:
        tune_socket(a)  # AF_UNIX: no TCP options, no error, still open
        a.sendall(b"x")
        assert b.recv(1) == b"x"


def _fd_named(sockname: tuple, peername: tuple) -> int:
    """This process's descriptor of the TCP socket with these two addresses."""
    import os

    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if s.family == socket.AF_INET and s.getsockname() == sockname and s.getpeername() == peername:
                return fd
        except OSError:
            pass
        finally:
            s.detach()
    raise AssertionError(f"no socket {sockname} -> {peername}")


@pytest.mark.parametrize("remote", [False, True], ids=["loopback-service", "remote-service"])
def test_forwarded_and_visitor_sockets_are_tuned(run, monkeypatch, remote: bool) -> None:
    """Both per-stream sockets of a tunnel (the visitor's at the ingress, the client's local
    connection) carry keepalive with the tunnel's timings; a local connection to a service on
    loopback goes without (its probes would be answered by this host's kernel: they detect
    nothing), and ``remote`` makes the client take the loopback service for a remote one."""
    if remote:
        monkeypatch.setattr(bridge_module, "is_loopback_peer", lambda peer: False)

    async def body() -> None:
        at_backend: list = []

        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            at_backend.append((w.get_extra_info("peername"), w.get_extra_info("sockname")))
            w.write(await r.readexactly(3))
            await w.drain()
            await r.read()
            w.close()

        backend = await asyncio.start_server(echo, "127.0.0.1", 0)
        baddr = backend.sockets[0].getsockname()[:2]
        server = ft.TunnelServer(("127.0.0.1", 0), "tune-token-0123456789")
        async with server, ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="t") as ingress:
            host, port = server.address
            client = ft.TunnelClient(f"{host}:{port}", "tune-token-0123456789", tunnel_id="t",
                                     config=ft.ClientConfig(local_addr=baddr))
            task = asyncio.create_task(client.connect_and_run())
            await server.wait_for_session("t", timeout=10)
            r, w = await asyncio.open_connection(*ingress.address)
            w.write(b"abc")
            assert await r.readexactly(3) == b"abc"
            visitor = w.get_extra_info("sockname")
            at_ingress = _fd_named(w.get_extra_info("peername"), visitor)  # the ingress's accepted socket
            local_peer, local_name = at_backend[0]
            forwarded = _fd_named(local_peer, local_name)  # the client's connection to the backend
            assert _options(at_ingress) == (True, True, 30, 10)
            if remote:
                assert _options(forwarded) == (True, True, 30, 10)
            else:
                assert _options(forwarded)[:2] == (True, False)  # TCP_NODELAY (the loop's), no keepalive
            # the visitor's socket has them from the listening socket (it was accepted from it)
            assert [_options(s.fileno())[1:] for s in ingress._server.sockets] == [(True, 30, 10)]
            w.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        backend.close()

    run(body)


def test_tune_socket_on_an_ipv6_stand_in() -> None:
    """A stand-in with only ``fileno()`` (as uvloop's) of an IPv6 socket gets the options too."""
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:  # no IPv6 loopback here
        return
    with server, socket.create_connection(server.getsockname()[:2]) as c:
        conn, _ = server.accept()
        with conn:
            class StandIn:
                def fileno(self) -> int:
                    return conn.fileno()

            tune_socket(StandIn())
            assert _options(conn.fileno())[1:] == (True, 30, 10)
            c.sendall(b"x")
            assert conn.recv(1) == b"x"  # still open: the descriptor was not taken


def test_is_loopback_peer() -> None:
    for peer in [("127.0.0.1", 80), ("127.5.6.7", 1), ("::1", 22, 0, 0), ("::ffff:127.0.0.1", 8080, 0, 0)]:
        assert is_loopback_peer(peer), peer
    for peer in [("10.0.0.1", 80), ("192.168.1.127", 1), ("::2", 22, 0, 0), ("::ffff:10.0.0.1", 1, 0, 0),
                 ("1270.0.0.1", 1), None, (), "127.0.0.1", (b"127.0.0.1", 1)]:
        assert not is_loopback_peer(peer), peer
