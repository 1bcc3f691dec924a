"""Ports on request (issue 12, point 4): server ``tcp_port_range`` / ``--tcp-port-range``, client
``remote_port`` / ``--remote-port``; the ``remote-port/1`` extension in the handshake's capabilities;
a port of its own per session, released when the session ends; refusals with the reason."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time

import pytest

import ferrotunnel as ft
from ferrotunnel.protocol.extensions import client_capabilities
from ferrotunnel.protocol.handshake import ClientHandshake, ServerHandshake
from ferrotunnel.protocol.remoteport import parse_remote_port, remote_port_capability
from ferrotunnel.server.ingress import parse_port_range

from conftest import echo_handler, free_port
from test_cli import TOKEN, Proc, helper
from test_public_urls import _server, cleanup  # noqa: F401 (cleanup is a fixture)

TOK = "remote-ports-token"


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def free_range(n: int) -> tuple:
    """``n`` consecutive ports that are free now, below the ephemeral range."""
    for _ in range(200):
        lo = random.randrange(12000, 30000)
        if all(_bindable(p) for p in range(lo, lo + n)):
            return lo, lo + n - 1
    raise RuntimeError("no free port range")


# ---------------------------------------------------------------- sans-IO: capability, range, config


def test_capability_is_bounded():
    assert parse_remote_port([remote_port_capability(0)]) == 0
    assert parse_remote_port(["basic", "remote-port/1=65535"]) == 65535
    for bad in ("remote-port/1=65536", "remote-port/1=-1", "remote-port/1=", "remote-port/1=000001",
                "remote-port/1=８０", "remote-port/1=1e3", "remote-port/1= 80", "remote-port/2=80"):
        assert parse_remote_port([bad]) is None, bad
    with pytest.raises(ValueError):
        remote_port_capability(70000)


def test_only_a_client_that_asks_announces_it():
    assert not any(c.startswith("remote-port") for c in client_capabilities(ft.ClientConfig()))
    assert "remote-port/1=0" in client_capabilities(ft.ClientConfig(remote_port=0))
    assert "remote-port/1=20001" in ClientHandshake(TOK, "x", ft.ClientConfig(remote_port=20001)).capabilities
    for bad in (-1, 65536, "80", True):
        with pytest.raises(ValueError):
            ft.ClientConfig(remote_port=bad)
    with pytest.raises(ValueError, match="extensions"):
        ft.ClientConfig(remote_port=0, extensions=False)


def test_port_ranges():
    assert parse_port_range("20000-20100") == (20000, 20100)
    assert parse_port_range(" 5 ") == (5, 5)
    for bad in ("0-5", "5-4", "a-b", "70000", "1-70000", "-", "", "1-2-3"):
        with pytest.raises(ValueError):
            parse_port_range(bad)
    with pytest.raises(ValueError):
        ft.TunnelServer(("127.0.0.1", 0), TOK, tcp_port_range=(10, 5))


def test_a_server_without_the_extension_is_a_clear_error():
    """A Rust server (or an older one) accepts without the port: the client stops and says so."""
    client = ClientHandshake(TOK, "db", ft.ClientConfig(remote_port=0))
    server = ServerHandshake(ft.ServerConfig())
    server.receive_data(client.data_to_send())
    assert parse_remote_port(server.request.capabilities) == 0
    with pytest.raises(ft.HandshakeError, match="does not give ports on request") as info:
        client.receive_data(server.accept())
    assert not isinstance(info.value, ft.RetryableHandshakeError)
    # with the port in the ack, the client has it
    client = ClientHandshake(TOK, "db", ft.ClientConfig(remote_port=0))
    server = ServerHandshake(ft.ServerConfig())
    server.receive_data(client.data_to_send())
    client.receive_data(server.accept(None, [remote_port_capability(20005)]))
    assert client.result.negotiated.get("remote_port") == 20005


# ---------------------------------------------------------------- in process


async def _start(server, tunnel_id, config, handler=echo_handler):
    host, port = server.address
    seen = []
    client = ft.TunnelClient(f"{host}:{port}", TOK, tunnel_id=tunnel_id, config=config)
    task = asyncio.create_task(client.connect_and_run(handler, on_public_urls=seen.append))
    for _ in range(500):
        if seen or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        await task  # raises what ended it
    return client, task, seen


async def _stop(task):
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _released(port, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not _bindable(port):
        assert time.monotonic() < deadline, f"port {port} still bound"
        await asyncio.sleep(0.02)


async def _echo_through(port, data):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    got = await reader.read(-1)
    writer.close()
    return got


def test_any_port_of_the_range_reaches_the_app_and_is_released(run):
    async def body():
        lo, hi = free_range(4)
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, tcp_port_range=(lo, hi)) as server:
            client, task, seen = await _start(server, "DB", ft.ClientConfig(remote_port=0))
            port = client.remote_port
            assert lo <= port <= hi
            assert seen == [(f"tcp://127.0.0.1:{port}",)] and client.public_urls == seen[0]
            data = os.urandom(300_000)
            assert await _echo_through(port, data) == data  # byte-exact through the tunnel
            assert server.ports.ports == {server.sessions.get_by_tunnel_id("db"): port}
            await _stop(task)
            await _released(port)
            assert server.ports.ports == {} and server.ports.ingresses == {}
            assert client.remote_port is None

    run(body)


def test_a_specific_free_port_and_its_reuse_after_release(run):
    async def body():
        lo, hi = free_range(3)
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, tcp_port_range=(lo, hi)) as server:
            for tid in ("first", "second"):  # the same port, again, once the first session left
                client, task, seen = await _start(server, tid, ft.ClientConfig(remote_port=lo + 1))
                assert client.remote_port == lo + 1 and seen == [(f"tcp://127.0.0.1:{lo + 1}",)]
                assert await _echo_through(lo + 1, b"x" * 1000) == b"x" * 1000
                await _stop(task)
                await _released(lo + 1)

    run(body)


def test_a_replaced_session_gives_its_port_to_the_new_one(run):
    """A client that reconnects while the server still holds its old (stale) session gets the
    same port at once: the replaced session's port is released before the new one is bound."""
    async def body():
        lo, hi = free_range(2)
        cfg = ft.ServerConfig(stale_session_after=0.2)
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, config=cfg, tcp_port_range=(lo, hi)) as server:
            slow = ft.BackoffConfig(base=30.0)  # the old client must not come back during the test
            old, task, _ = await _start(server, "db", ft.ClientConfig(remote_port=lo, backoff=slow))
            first = server.sessions.get_by_tunnel_id("db")
            await asyncio.sleep(0.4)  # no heartbeat for a while: the old session counts as stale
            new, task2, seen = await _start(server, "db", ft.ClientConfig(remote_port=lo))
            assert new.remote_port == lo and seen == [(f"tcp://127.0.0.1:{lo}",)]
            second = server.sessions.get_by_tunnel_id("db")
            assert second is not first and server.ports.ports == {second: lo}
            await _stop(task)
            assert await _echo_through(lo, b"new") == b"new"
            await _stop(task2)
            await _released(lo)

    run(body)


def test_ports_are_released_when_the_server_closes(run):
    async def body():
        lo, hi = free_range(2)
        server = ft.TunnelServer(("127.0.0.1", 0), TOK, tcp_port_range=(lo, hi), tcp_port_host="127.0.0.1",
                                 tcp_port_public_host="tunnel.example.test")
        await server.start()
        client, task, seen = await _start(server, "db", ft.ClientConfig(remote_port=hi))
        assert seen == [(f"tcp://tunnel.example.test:{hi}",)]
        await server.close()
        assert _bindable(hi)
        await _stop(task)

    run(body)


async def _refused(server, tunnel_id, port):
    t0 = time.monotonic()
    with pytest.raises(ft.HandshakeError) as info:
        await _start(server, tunnel_id, ft.ClientConfig(remote_port=port))
    assert time.monotonic() - t0 < 2  # at once: not retried
    assert not isinstance(info.value, ft.RetryableHandshakeError)
    assert server.sessions.get_by_tunnel_id(tunnel_id) is None  # the id is not left claimed
    return str(info.value)


def test_refusals_say_why(run):
    async def body():
        lo, hi = free_range(3)
        async with ft.TunnelServer(("127.0.0.1", 0), TOK) as server:
            assert "gives no ports on request" in await _refused(server, "a", 0)
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, tcp_port_range=(lo, hi)) as server:
            assert f"remote port {hi + 1} is outside this server's range {lo}-{hi}" in await _refused(server, "a", hi + 1)
            holder, task, _ = await _start(server, "holder", ft.ClientConfig(remote_port=lo))
            assert f"remote port {lo} is taken by another tunnel" in await _refused(server, "b", lo)
            with socket.socket() as other:  # another process's socket on the port
                other.bind(("127.0.0.1", hi))
                other.listen()
                assert f"remote port {hi} is taken" in await _refused(server, "c", hi)
                # any free port skips both
                client, task2, _ = await _start(server, "d", ft.ClientConfig(remote_port=0))
                assert client.remote_port == lo + 1
                assert f"no free port in this server's range {lo}-{hi}" in await _refused(server, "e", 0)
            assert holder.remote_port == lo  # the holder was not disturbed
            assert await _echo_through(lo, b"still here") == b"still here"
            await _stop(task)
            await _stop(task2)

    run(body)


def test_rust_style_client_still_connects(run):
    async def body():
        lo, hi = free_range(2)
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, tcp_port_range=(lo, hi)) as server:
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ing:
                client, task, seen = await _start(server, "rust", ft.ClientConfig(extensions=False))
                while client.session is None:
                    await asyncio.sleep(0.01)
                session = server.sessions.get_by_tunnel_id("rust")
                assert not any(c.startswith("remote-port") for c in session.capabilities)
                assert server.ports.ports == {} and client.remote_port is None and seen == []
                assert await _echo_through(ing.address[1], b"ping") == b"ping"
                await _stop(task)

    run(body)


# ---------------------------------------------------------------- the command line


def _client(cleanup, tport, local_port, *flags, env=None):
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{local_port}",
               "--tunnel-id", "db", *flags, env={"FERROTUNNEL_TOKEN": TOKEN, **(env or {})})
    cleanup.append(cli)
    return cli


def _echo(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_cli_port_from_the_range_and_its_release(cleanup):
    lo, hi = free_range(4)
    app = free_port()
    cleanup.append(helper("echo", app))
    srv, tport = _server(cleanup, env={"FERROTUNNEL_TCP_PORT_RANGE": f"{lo}-{hi}"})
    assert f"TCP ports on request on 127.0.0.1:{lo}-{hi}" in srv.wait_for("TCP ports on request")
    cli = _client(cleanup, tport, app, env={"FERROTUNNEL_REMOTE_PORT": "0"})
    cli.wait_until(lambda: b"Forwarding" in cli.out and cli.out.endswith(b"\n"), what="a Forwarding line")
    (line,) = [x for x in cli.out.decode().splitlines() if x.startswith("Forwarding")]
    url, _, local = line[len("Forwarding "):].partition(" -> ")
    assert url.startswith("tcp://127.0.0.1:") and local == f"127.0.0.1:{app}", line
    port = int(url.rsplit(":", 1)[1])
    assert lo <= port <= hi
    data = os.urandom(200_000)
    assert _echo(port, data) == data
    assert cli.finish() == 0
    deadline = time.monotonic() + 5
    while not _bindable(port):
        assert time.monotonic() < deadline, "the port was not released"
        time.sleep(0.05)
    srv.wait_until(lambda: b"released" in srv.err, what="the release in the log")
    assert srv.finish() == 0
    assert TOKEN.encode() not in cli.out + cli.err + srv.out + srv.err


@pytest.mark.parametrize("case", ["outside", "taken", "no range"])
def test_cli_client_exits_1_with_the_reason(cleanup, case):
    lo, hi = free_range(2)
    srv, tport = _server(cleanup, *(() if case == "no range" else ("--tcp-port-range", f"{lo}-{hi}")))
    holder = None
    if case == "taken":
        holder = socket.socket()
        holder.bind(("127.0.0.1", lo))
        holder.listen()
    want = {"outside": f"remote port {hi + 5} is outside this server's range {lo}-{hi}",
            "taken": f"remote port {lo} is taken",
            "no range": "this server gives no ports on request"}[case]
    cli = _client(cleanup, tport, free_port(), "--remote-port", hi + 5 if case == "outside" else lo)
    t0 = time.monotonic()
    cli.p.wait(timeout=10)
    assert cli.finish() == 1 and time.monotonic() - t0 < 5
    err = cli.err.decode()
    last = err.strip().splitlines()[-1]
    assert last.startswith("ferrotunnel: ") and want in last, err
    assert "retry" not in err
    if holder is not None:
        holder.close()
    assert srv.finish() == 0


def test_cli_bad_flags_are_usage_errors():
    p = Proc("client", "--server", "127.0.0.1:1", "--token", TOKEN, "--remote-port", "70000")
    p.p.wait(timeout=15)
    assert p.finish() == 2 and b"--remote-port must be a port in 0..65535" in p.err
    p = Proc("server", "--bind", f"127.0.0.1:{free_port()}", "--token", TOKEN, "--tcp-port-range", "9-3")
    p.p.wait(timeout=15)
    assert p.finish() == 2 and b"--tcp-port-range" in p.err
