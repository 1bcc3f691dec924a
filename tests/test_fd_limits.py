"""File descriptors that run out: the headroom rule (ingress and tunnel port keep reserves) on
every event loop, and accept() failing with EMFILE on the selector loop (accepting pauses, one
line per interval, nothing spins, waiting visitors are served once descriptors come back)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ferrotunnel as ft
from ferrotunnel.aio.listen import ConnectionGate, FdHeadroom, Listener, listen

from conftest import free_port, tunnel

TOKEN = "fd-limit-token-0"
PROCS = str(Path(__file__).with_name("procs.py"))
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL_") or k in (
    "FERROTUNNEL_NO_EXTENSIONS", "FERROTUNNEL_REQUIRE_EXTENSIONS")}


class _FakeSocket:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


class _FakeTransport:
    def __init__(self, fd: int) -> None:
        self.sock = _FakeSocket(fd)

    def get_extra_info(self, name: str):
        return self.sock if name == "socket" else None


def test_headroom_refuses_from_the_reserve_on():
    h = FdHeadroom(256, limit=1024)
    assert h.ceiling == 768
    assert not h.exhausted(_FakeTransport(767))
    assert h.exhausted(_FakeTransport(768))
    assert "768 of 1024" in h.why(_FakeTransport(768))
    assert not FdHeadroom(0, limit=1024).exhausted(_FakeTransport(1023))
    gate = ConnectionGate(10, 100, "test", 256)
    gate.headroom = FdHeadroom(256, limit=300)
    assert gate.enter("a", _FakeTransport(10))
    assert not gate.enter("a", _FakeTransport(44))
    assert gate.refused["fd_reserve"] == 1 and gate.open == 1  # a refusal takes no slot
    gate.leave("a")
    assert gate.open == 0


def test_reserves_are_validated():
    with pytest.raises(ValueError, match="ingress_fd_reserve"):
        ft.ServerConfig(ingress_fd_reserve=-1)
    with pytest.raises(ValueError, match="tunnel_fd_reserve"):
        ft.ServerConfig(tunnel_fd_reserve=-1)


def _all_but_one() -> int:
    """A reserve that leaves only descriptor 0 below the ceiling: every new connection is over it."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1


def test_tunnel_port_refuses_a_client_inside_its_reserve(run):
    async def body():
        cfg = ft.ServerConfig(tunnel_fd_reserve=_all_but_one())
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="x",
                                     config=ft.ClientConfig(handshake_timeout=3))
            with pytest.raises((ft.FerroTunnelError, OSError)):
                await client.connect()
            assert server.refused_connections["tunnel_fd_reserve"] >= 1
            assert server.pending_handshakes == 0 and not list(server.sessions)
    run(body, timeout=30)


def test_ingress_refuses_a_visitor_inside_its_reserve(run):
    async def body():
        cfg = ft.ServerConfig(ingress_fd_reserve=_all_but_one())
        async with tunnel(server_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ingress:
                r, w = await asyncio.open_connection(*ingress.address)
                w.write(b"hello")
                assert await asyncio.wait_for(r.read(), 5) == b""  # closed at once, nothing forwarded
                w.close()
                assert server.ingress_gate.refused["fd_reserve"] == 1
                assert server.ingress_gate.open == 0
    run(body, timeout=30)


def test_listener_serve_forever_ends_when_closed(run):
    async def body():
        listener = await listen(asyncio.Protocol, "127.0.0.1", 0, "test")
        assert isinstance(listener, Listener) and listener.sockets
        waiter = asyncio.create_task(listener.serve_forever())
        await asyncio.sleep(0.05)
        listener.close()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, 5)
        await listener.wait_closed()
    run(body, timeout=10)


def test_listener_bind_error_names_the_address(run):
    async def body():
        taken = await listen(asyncio.Protocol, "127.0.0.1", 0, "test")
        port = taken.sockets[0].getsockname()[1]
        try:
            with pytest.raises(OSError, match="address already in use") as info:
                await listen(asyncio.Protocol, "127.0.0.1", port, "test")
            assert str(port) in str(info.value)
        finally:
            taken.close()
            await taken.wait_closed()
    run(body, timeout=10)


class _Lines:
    """A subprocess's stdout lines and stderr, read without blocking."""

    def __init__(self, p: subprocess.Popen) -> None:
        self.p = p
        self.out = b""
        self.err = b""

    def wait_for(self, text: str, timeout: float = 20.0, stream: str = "out") -> str:
        """Read until a whole line with ``text`` is in stdout (``stream="err"``: stderr); returns
        the line from ``text`` on."""
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        sel.register(self.p.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        def whole_line() -> bool:  # the text, and the end of its line (it may come in two reads)
            data = getattr(self, stream)
            at = data.rfind(text.encode())
            return at >= 0 and b"\n" in data[at:]

        while not whole_line():
            left = deadline - time.monotonic()
            if left <= 0 or (self.p.poll() is not None and not sel.select(0)):
                raise AssertionError(f"{text!r} not seen; stdout={self.out[-2000:]!r} stderr={self.err[-3000:]!r}")
            for key, _ in sel.select(min(left, 0.2)):
                chunk = os.read(key.fd, 65536)
                if key.fileobj is self.p.stdout:
                    self.out += chunk
                else:
                    self.err += chunk
        data = getattr(self, stream)
        return data[data.rindex(text.encode()):].split(b"\n", 1)[0].decode()


def test_emfile_on_accept_pauses_logs_once_and_serves_the_waiting_visitors():
    """The selector event loop, where ferrotunnel accepts for itself: with every descriptor taken,
    visitors wait in the backlog, accepting pauses (no spin: a handful of pauses, not thousands
    of attempts), one line is logged, and once descriptors come back the waiting visitors are
    served through the tunnel."""
    p = subprocess.Popen([sys.executable, PROCS, "emfile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV)
    io = _Lines(p)
    visitors = []
    try:
        port = int(io.wait_for("ready").split()[1])
        p.stdin.write(b"fill\n")
        p.stdin.flush()
        assert int(io.wait_for("full").split()[1]) > 100
        for i in range(5):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"visitor %d\n" % i)
            visitors.append(s)
        time.sleep(2.0)  # several pauses' worth with every descriptor still taken
        p.stdin.write(b"stats\n")
        p.stdin.flush()
        stats = json.loads(io.wait_for('{"ingress"'))
        pauses = stats["ingress"].get("EMFILE", 0)
        assert 1 <= pauses <= 20, stats  # a spinning accept loop would count thousands
        p.stdin.write(b"free\n")
        p.stdin.flush()
        io.wait_for("freed")
        for i, s in enumerate(visitors):
            want = b"visitor %d\n" % i
            got = b""
            s.settimeout(10)
            while len(got) < len(want):
                chunk = s.recv(64)
                assert chunk, f"visitor {i} was closed instead of served: {io.err[-2000:]!r}"
                got += chunk
            assert got == want
        p.stdin.write(b"quit\n")
        p.stdin.flush()
        p.wait(15)
        io.err += p.stderr.read()
        lines = [ln for ln in io.err.decode().splitlines() if "cannot accept connections" in ln]
        assert len(lines) == 1, io.err.decode()[-3000:]
        assert "EMFILE" in lines[0] and "TCP ingress" in lines[0]
        assert "Traceback" not in io.err.decode()
    finally:
        for s in visitors:
            s.close()
        if p.poll() is None:
            p.kill()
            p.wait()


def _limit_fds(n: int):
    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    return pre


def _echo_round(port: int, msg: bytes, keep: list) -> bool:
    """A visitor sends ``msg``: True if it comes back, False if the connection is closed or reset."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    keep.append(s)
    got = b""
    try:
        s.sendall(msg)
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                return False
            got += chunk
    except ConnectionResetError:  # refused connections are aborted
        return False
    return got == msg


def test_cli_server_keeps_the_tunnel_port_when_visitors_take_every_descriptor():
    """The CLI server (uvloop) with RLIMIT_NOFILE 300: visitors beyond the ingress reserve (256)
    are closed at once, with one log line, and a second tunnel client still connects."""
    tunnel_port, ingress_port, echo_port = free_port(), free_port(), free_port()
    env = {**ENV, "FERROTUNNEL_TOKEN": TOKEN}
    cli = [sys.executable, "-m", "ferrotunnel"]
    procs = []
    visitors: list = []

    def start(args, **kw) -> _Lines:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, **kw)
        procs.append(p)
        return _Lines(p)

    try:
        start([sys.executable, PROCS, "echo", str(echo_port)]).wait_for("ready")
        server = start(cli + ["server", "--bind", f"127.0.0.1:{tunnel_port}", "--tcp-bind", f"127.0.0.1:{ingress_port}=web"],
                       preexec_fn=_limit_fds(300))
        server.wait_for("TCP ingress listening", stream="err")
        client_args = ["client", "--server", f"127.0.0.1:{tunnel_port}", "--local-addr", f"127.0.0.1:{echo_port}"]
        start(cli + client_args + ["--tunnel-id", "web"]).wait_for("connected to", stream="err")
        results = [_echo_round(ingress_port, b"v%03d" % i, visitors) for i in range(320)]
        served, refused = results.count(True), results.count(False)
        assert served >= 10 and refused >= 50, (served, refused)
        assert all(results[:served]) and not any(results[served:])  # served until the reserve, then refused
        # every descriptor the ingress may have is taken: the tunnel port still takes a client
        start(cli + client_args + ["--tunnel-id", "other"]).wait_for("connected to", stream="err")
        for s in visitors:
            s.close()
        visitors.clear()
        deadline = time.monotonic() + 10
        while not _echo_round(ingress_port, b"back", visitors):  # the closes reach the server
            assert time.monotonic() < deadline, "the ingress never served again"
            time.sleep(0.1)
        server.p.terminate()
        server.p.wait(15)
        err = (server.err + server.p.stderr.read()).decode()
        fd_lines = [ln for ln in err.splitlines() if "fd_reserve" in ln]
        assert len(fd_lines) == 1, err[-3000:]
        assert "file descriptor" in fd_lines[0]
    finally:
        for s in visitors:
            s.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_accept_pauses_are_in_the_metrics(run):
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from ferrotunnel.cli.metrics import MetricsServer

    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            server._server.exhaustion["EMFILE"] += 2  # what a pause counts (see the emfile test)
            text = generate_latest(MetricsServer(server, ("127.0.0.1", 0)).registry).decode()
            assert 'ferrotunnel_accept_paused_total{errno="EMFILE",listener="tunnel"} 2.0' in text
            assert server.listener_exhaustion == {"EMFILE": 2}
    run(body)
