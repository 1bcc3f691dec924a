"""Hardening under faults and load: limits at their edges, bad input, kills and restarts, soak.

Bounded loops on loopback only; time limits are generous hang guards, the figures live in bench/.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

import ferrotunnel as ft
from conftest import echo_handler, free_port, read_frames, tunnel
from ferrotunnel import frames as F
from test_handshake import TOKEN, hs

PROCS = str(Path(__file__).with_name("procs.py"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_ten_thousand_streams_on_one_session(run):
    async def body():
        opened = 0

        async def hold(stream):
            nonlocal opened
            opened += 1
            await stream.read(1)
            await stream.read(1)  # held open until the opener closes

        async with tunnel(hold) as (server, client, session):
            gc.collect()
            base = rss_kib()
            streams = []
            for i in range(10_000):
                s = await session.open_stream()
                s.write(b"!")
                streams.append(s)
                if i % 500 == 499:
                    await asyncio.sleep(0)
            while opened < 10_000:
                await asyncio.sleep(0.05)
            gc.collect()
            per_stream = (rss_kib() - base) / 10_000
            assert len(session.multiplexer) == 10_000 == len(client.session.multiplexer)
            assert per_stream <= 10, f"{per_stream:.1f} KiB per stream for both ends"
            with pytest.raises(ft.LimitExceededError, match="max_streams_per_session"):
                await session.open_stream()
            for s in streams:
                s.close()
            while len(session.multiplexer) or len(client.session.multiplexer):
                await asyncio.sleep(0.05)
    run(body, timeout=300)


def test_open_close_cycles_return_memory(run):
    async def body():
        async def quick(stream):
            await stream.read(1)

        cfg = ft.ServerConfig(max_streams_per_session=200)
        async with tunnel(quick, server_config=cfg) as (server, client, session):
            async def cycle():
                s = await session.open_stream()
                s.write(b"x")
                s.write_eof()
                await s.read()

            for _ in range(20):  # warm up allocator pools before the baseline
                await asyncio.gather(*(cycle() for _ in range(100)))
            gc.collect()
            base = rss_kib()
            for _ in range(1000):  # 100,000 cycles
                await asyncio.gather(*(cycle() for _ in range(100)))
            gc.collect()
            await asyncio.sleep(0.2)
            assert len(session.multiplexer) == 0
            assert rss_kib() - base < 20 * 1024
            held = [await session.open_stream() for _ in range(200)]
            with pytest.raises(ft.LimitExceededError):
                await session.open_stream()
            for s in held:
                s.abort()
    run(body, timeout=600)


def test_silent_connections_do_not_block_a_real_client(run):
    async def body():
        cfg = ft.ServerConfig(handshake_timeout=1.0)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            # from four other addresses, 50 each: under the per-address cap, so they all wait
            silent = [await asyncio.open_connection(*server.address, local_addr=(f"127.0.0.{2 + i % 4}", 0))
                      for i in range(200)]
            host, port = server.address
            t0 = time.monotonic()
            client = ft.TunnelClient(f"{host}:{port}", TOKEN, tunnel_id="real")
            await client.connect(echo_handler)
            assert time.monotonic() - t0 < 0.9  # before the silent ones time out
            closed = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in silent))
            assert closed == [b""] * 200 and server.pending_handshakes == 0
            assert server.sessions.get_by_tunnel_id("real") is not None
            await client.close()
    run(body, timeout=60)


BAD_INPUTS = {
    "zero_length": bytes.fromhex("0000000000"),
    "4gib_length": bytes.fromhex("ffffffff00"),
    "string_2_60": (10).to_bytes(4, "big") + bytes.fromhex("00 00 fd 00000000 00000010".replace(" ", "")),
    "unknown_type": bytes.fromhex("0000000107"),
    "unknown_variant": bytes.fromhex("00000002000c"),
    "heartbeat_first": F.encode(F.Heartbeat(timestamp=1)),
}


@pytest.mark.parametrize("after_handshake", [False, True])
def test_malformed_frames_leave_server_up_with_bounded_memory(run, after_handshake):
    async def body():
        cfg = ft.ServerConfig(auth_failure_threshold=100)  # this test is about memory, not throttling
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            tracemalloc.start()
            try:
                for name, bad in BAD_INPUTS.items():
                    if after_handshake and name == "heartbeat_first":
                        continue
                    r, w = await asyncio.open_connection(*server.address)
                    if after_handshake:
                        w.write(hs(tunnel_id=f"bad-{name}"))
                        ack, = await read_frames(r, 1)
                        assert ack.status == ft.HandshakeStatus.SUCCESS  # the bad frame hits a live session
                    w.write(bad + b"\x00" * 100)
                    await w.drain()
                    rest = await asyncio.wait_for(r.read(), 5)
                    assert r.at_eof(), name  # closed by the server
                    # Before the handshake garbage gets no ack; after it, this Rust-style peer is
                    # sent nothing it does not speak (an Error frame is an extension): it just ends.
                    assert rest == b"", (name, rest)
                    w.close()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 4 * 1024 * 1024, peak
            assert len(server.sessions) == 0
            host, port = server.address
            ok = ft.TunnelClient(f"{host}:{port}", TOKEN, tunnel_id="ok")
            await ok.connect(echo_handler)  # still serving
            await ok.close()
    run(body)


def test_frame_over_max_frame_size_closes_the_connection(run):
    async def body():
        cfg = ft.ServerConfig(max_frame_size=1024)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            r, w = await asyncio.open_connection(*server.address)
            w.write(hs(tunnel_id="big"))
            await read_frames(r, 1)
            w.write((1025).to_bytes(4, "big") + b"\x01")  # refused on the header, before any body
            await asyncio.wait_for(r.read(), 5)
            assert server.sessions.get_by_tunnel_id("big") is None
    run(body)


def _spawn(*args):
    p = subprocess.Popen([sys.executable, PROCS, *map(str, args)], stdout=subprocess.PIPE, text=True)
    return p


def test_killed_client_is_served_again_quickly(run):
    async def body():
        echo_port = free_port()
        echo = _spawn("echo", echo_port)
        echo.stdout.readline()
        server = ft.TunnelServer(("127.0.0.1", 0), "proc-token")
        try:
            async with server:
                port = server.address[1]
                c1 = _spawn("client", port, echo_port, "killme")
                first = await server.wait_for_session("killme", timeout=10)
                c1.send_signal(signal.SIGKILL)
                c1.wait()
                t0 = time.monotonic()
                c2 = _spawn("client", port, echo_port, "killme")
                try:
                    while True:
                        s = server.sessions.get_by_tunnel_id("killme")
                        if s is not None and s.id != first.id:
                            break
                        await asyncio.sleep(0.05)
                    assert time.monotonic() - t0 < 5
                    st = await s.open_stream()
                    st.write(b"alive")
                    st.write_eof()
                    assert await st.read() == b"alive"
                finally:
                    c2.kill()
        finally:
            echo.kill()
    run(body, timeout=60)


def test_killed_server_gets_its_clients_back(run):
    async def body():
        port, ingress = free_port(), free_port()
        srv = _spawn("server", port, ingress)
        srv.stdout.readline()
        backend = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=backend.sockets[0].getsockname()[:2], heartbeat_interval=0.5,
                              session_timeout=3, backoff=ft.BackoffConfig(base=0.2, max_delay=2.0))
        clients = [ft.TunnelClient(f"127.0.0.1:{port}", "proc-token", tunnel_id=f"c{i}", config=cfg) for i in range(3)]
        sessions: list = []
        tasks = [asyncio.create_task(c.connect_and_run(on_connected=sessions.append)) for c in clients]
        try:
            while len(sessions) < 3:
                await asyncio.sleep(0.05)
            srv.send_signal(signal.SIGKILL)
            srv.wait()
            srv = _spawn("server", port, ingress)
            srv.stdout.readline()
            t0 = time.monotonic()
            while len(sessions) < 6:
                await asyncio.sleep(0.05)
            assert time.monotonic() - t0 < 15
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            srv.kill()
            backend.close()
    run(body, timeout=90)


def test_64_streams_move_1_gib_byte_exact(run):
    async def body():
        total = 1 << 30
        per = total // 64

        async def handler(stream):  # hashes what arrives, answers with the digest
            h = hashlib.sha256()
            async for chunk in stream:
                h.update(chunk)
                if random.random() < 0.01:
                    await asyncio.sleep(0.001)
            stream.write(h.digest())
            stream.write_eof()

        async with tunnel(handler) as (server, client, session):
            async def one(i):
                rng = random.Random(i)
                s = await session.open_stream()
                h = hashlib.sha256()
                sent = 0
                while sent < per:
                    n = min(rng.choice([1, 100, 4096, 65536, 200_000, 1 << 20]), per - sent)
                    chunk = rng.randbytes(n)
                    h.update(chunk)
                    s.write(chunk)
                    await s.drain()
                    sent += n
                    if rng.random() < 0.01:
                        await asyncio.sleep(0.001)
                s.write_eof()
                digest = await s.readexactly(32)
                return digest == h.digest()

            assert all(await asyncio.gather(*(one(i) for i in range(64))))
    run(body, timeout=600)


def _tunnel_processes(tunnel_id):
    """An echo service, a tunnel server with a TCP ingress and a client, each its own process."""
    port, ingress, echo_port = free_port(), free_port(), free_port()
    echo = _spawn("echo", echo_port)
    echo.stdout.readline()
    srv = _spawn("server", port, ingress)
    srv.stdout.readline()
    cli = _spawn("client", port, echo_port, tunnel_id)
    assert cli.stdout.readline().startswith("connected")
    return echo, srv, cli, ingress


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _rst_close(writer) -> None:
    """Close a client socket with RST (SO_LINGER 0), as a crashed or impatient visitor does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _wait_fds(procs, want=None, settle=0.5, deadline=15.0):
    """Fd counts of ``procs`` once traffic has ended: with ``want``, poll until every process is
    back to it (or the deadline passes); without, until the counts hold still for ``settle`` s."""
    end = time.monotonic() + deadline
    last, since = None, time.monotonic()
    while True:
        now = {p.pid: _fds(p.pid) for p in procs}
        if want is not None and all(now[pid] <= want[pid] for pid in want):
            return now
        if want is None:
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= settle:
                return now
        if time.monotonic() > end:
            return now
        time.sleep(0.05)


def test_churn_with_half_close_between_processes():
    """Server and client as separate uvloop processes; churn through the ingress, a third of the
    visitors leaving abruptly; both survive, and every abrupt end is carried through the tunnel:
    afterwards no process (server, client, the service behind it) holds a socket of it."""
    echo, srv, cli, ingress = _tunnel_processes("churn")
    procs = (srv, cli, echo)
    try:

        async def churn(seconds, abrupt=True):
            deadline = time.monotonic() + seconds
            done = 0

            async def one(i):
                r, w = await asyncio.open_connection("127.0.0.1", ingress)
                msg = b"%d|" % i * 50
                w.write(msg)
                if not abrupt or i % 3:
                    w.write_eof()
                    data = await r.read()
                    assert data == msg
                    w.close()
                elif i % 6 == 0:  # gone at once, maybe before the tunnel stream is even open: RST
                    await asyncio.sleep(0)
                    _rst_close(w)
                else:  # mid-stream: the echo has started coming back, then RST
                    got = await asyncio.wait_for(r.read(10), 10)
                    assert got and msg.startswith(got)
                    _rst_close(w)

            while time.monotonic() < deadline:
                async with asyncio.timeout(30):  # pytest-timeout's signal cannot interrupt uvloop.run
                    await asyncio.gather(*(one(done + k) for k in range(25)))
                done += 25
            return done

        import uvloop
        uvloop.run(churn(0.3, abrupt=False))  # every process has served a stream once
        idle = _wait_fds(procs)
        assert uvloop.run(churn(4)) > 100
        after = _wait_fds(procs, want=idle)
        assert all(after[pid] <= idle[pid] for pid in idle), f"sockets left behind: idle {idle}, after {after}"
        assert srv.poll() is None and cli.poll() is None  # neither process aborted
        assert uvloop.run(churn(0.1, abrupt=False)) >= 25  # and the tunnel still serves
    finally:
        for p in (cli, srv, echo):
            p.kill()


SOAK_SECONDS = float(os.environ.get("FERROTUNNEL_SOAK_SECONDS", "20"))


@pytest.mark.timeout(SOAK_SECONDS + 90)
def test_soak_flat_memory_and_fds():
    """Steady traffic for FERROTUNNEL_SOAK_SECONDS through a server and a client, each its own
    process. Fds and RSS are read from /proc with no traffic: idle before the soak (after a
    warm-up with the same mix, so buffer pools and allocator arenas have their working size)
    against idle after it, once the last connections have been carried to their end. A leak
    shows there; a count taken while connections are still closing shows only how many were in
    flight at that instant (which is what an in-flight maximum compared)."""
    seconds = SOAK_SECONDS
    echo, srv, cli, ingress = _tunnel_processes("soak")
    procs = (srv, cli)
    try:

        async def traffic(until):
            async def one(i):
                r, w = await asyncio.open_connection("127.0.0.1", ingress)
                payload = random.randbytes(random.choice([10, 1000, 100_000]))
                w.write(payload)
                w.write_eof()
                assert await r.read() == payload
                w.close()
                await w.wait_closed()

            i = 0
            while time.monotonic() < until:
                # a hang guard of our own: pytest-timeout's signal cannot interrupt uvloop.run
                async with asyncio.timeout(30):
                    await asyncio.gather(*(one(i + k) for k in range(10)))
                i += 10
            return i

        import uvloop
        uvloop.run(traffic(time.monotonic() + min(5.0, seconds / 4)))  # warm-up
        fds_before = _wait_fds(procs)
        rss_before = {p.pid: _rss(p.pid) for p in procs}
        count = uvloop.run(traffic(time.monotonic() + seconds))
        assert count > 100
        fds_after = _wait_fds(procs, want=fds_before)
        rss_after = {p.pid: _rss(p.pid) for p in procs}
        figures = {name: {"fds": (fds_before[p.pid], fds_after[p.pid]),
                          "rss_kib": (rss_before[p.pid], rss_after[p.pid])}
                   for name, p in (("server", srv), ("client", cli))}
        print(f"soak: {count} connections in {seconds:g} s, idle before/after: {figures}")
        for p in procs:
            assert fds_after[p.pid] <= fds_before[p.pid], f"file descriptors leak over {count} connections: {figures}"
            growth = rss_after[p.pid] - rss_before[p.pid]
            assert growth < 4 * 1024, f"memory grows: {growth} KiB over {count} connections: {figures}"
        assert srv.poll() is None and cli.poll() is None
    finally:
        for p in (cli, srv, echo):
            p.kill()
