"""``session_send_limit``: a peer that stops reading its tunnel connection holds at most that much
of the server's memory in frames waiting for the transport, for all its streams together. Before,
each stream held up to ``stream_send_buffer`` plus a read of up to 1 MiB (a tunnel client that
took the handshake and stopped reading, with 24 visitors each sending 4 MiB, held 11 MiB; with the
ingress caps, 65536 visitors, tens of GB)."""

from __future__ import annotations

import asyncio
import socket

import pytest

import ferrotunnel as ft
from ferrotunnel import frames as F

from conftest import tunnel
from test_core import pair

KiB, MiB = 1024, 1024 * 1024
TOKEN = "send-limit-token-0123456"


def test_every_writer_waits_while_the_session_is_at_its_limit_and_goes_on_at_half():
    client, server, rc, rs = pair(flow=False, stream_send_buffer=64 * KiB, session_send_limit=256 * KiB)
    streams = [server.open_stream() for _ in range(8)]
    for st in streams[:4]:
        server.send(st, b"x" * (64 * KiB))  # each at its own buffer: 256 KiB and headers in all
    fresh = streams[5]
    assert server.queued(fresh) < 64 * KiB and not server.writable(fresh)  # held by the session limit alone
    woken = []
    rs.on_stream_writable = woken.append
    server.wait_writable(fresh)
    server.wait_writable(streams[6], below=64)  # (its OpenStream only: at once, whatever the session holds)
    assert woken == [streams[6]] and server.send_capped
    server.data_to_send(64 * KiB, 1 << 20)  # a quarter goes out: still over half the limit
    assert woken == [streams[6]]
    server.data_to_send(128 * KiB, 1 << 20)
    assert woken == [streams[6], fresh] and server.writable(fresh) and not server.send_capped


def test_the_limit_is_checked():
    with pytest.raises(ValueError, match="session_send_limit"):
        ft.ServerConfig(session_send_limit=64 * KiB)  # under stream_send_buffer
    with pytest.raises(ValueError, match="session_send_limit must be positive"):
        ft.ServerConfig(session_send_limit=0, stream_send_buffer=1)


async def _mute_client(server: ft.TunnelServer, tunnel_id: str) -> socket.socket:
    """A basic tunnel client that takes the handshake and then reads nothing (a small receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(s, server.address)
    await loop.sock_sendall(s, F.encode(F.Handshake(token=TOKEN, tunnel_id=tunnel_id, capabilities=["basic", "tcp"])))
    await server.wait_for_session(tunnel_id, timeout=10)
    return s


async def _senders(ingress: ft.TcpIngress, visitors: int, each: int, session) -> list:
    """``visitors`` connections to ``ingress``, each writing ``each`` bytes; their writers, once
    ``session`` has their streams and what it holds for them stopped growing (the same for 0.5 s)."""
    writers = []
    for _ in range(visitors):
        r, w = await asyncio.open_connection(*ingress.address)
        w.write(b"v" * each)
        writers.append(w)
    core = session.connection.core
    seen, same = None, 0
    async with asyncio.timeout(30):
        while same < 10:
            await asyncio.sleep(0.05)
            now = (len(core.streams), core.sched.pending_bytes, sum(st.pending_bytes for st in core.streams.values()))
            same = same + 1 if now == seen and now[0] == visitors else 0
            seen = now
    return writers


def test_a_peer_that_stops_reading_holds_at_most_the_session_limit(run):
    visitors, each, limit = 24, 4 * MiB, 1 * MiB

    async def body():
        cfg = ft.ServerConfig(session_send_limit=limit)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server, \
                ft.TcpIngress(server, ("127.0.0.1", 0), "mute") as ingress:
            mute = await _mute_client(server, "mute")
            session = await server.wait_for_session("mute", timeout=10)
            writers = await _senders(ingress, visitors, each, session)
            core = session.connection.core
            assert len(core.streams) == visitors
            held = core.sched.pending_bytes
            # the limit, and at most one MIN_CAPPED_READ (16 KiB) per writer past it
            assert limit // 2 < held <= limit + visitors * 17 * KiB, f"{held / MiB:.1f} MiB queued"
            # the peer reads again: every visitor's bytes go through (the writers were woken)
            loop = asyncio.get_running_loop()
            got, decoder = 0, F.FrameDecoder()
            async with asyncio.timeout(60):
                while got < visitors * each:
                    data = await loop.sock_recv(mute, 1 << 20)
                    assert data, "the server closed the session"
                    got += sum(len(f.data) for f in decoder.feed(data) if isinstance(f, F.Data))
            assert got == visitors * each
            for w in writers:
                w.close()
            mute.close()

    run(body, timeout=120)


def test_writers_held_by_the_limit_go_on_when_a_reset_drops_the_frames():
    """The frames holding the session at its limit can leave without ``data_to_send``: the peer
    resets their streams and they are dropped. The writers held only by the limit go on then
    (before, they waited for the next frame to go out: a heartbeat, up to 30 s later)."""
    client, server, rc, rs = pair(flow=False, stream_send_buffer=64 * KiB, session_send_limit=256 * KiB)
    streams = [server.open_stream() for _ in range(6)]
    server.data_to_send(1 << 20, 1 << 20)  # the OpenStreams leave
    for st in streams[:4]:
        server.send(st, b"x" * (64 * KiB))
    fresh = streams[5]
    woken = []
    rs.on_stream_writable = woken.append
    server.wait_writable(fresh)
    assert woken == [] and server.send_capped
    for st in streams[:3]:  # the peer resets three of the four
        server.receive(F.encode(F.Error(st.id, F.ErrorCode.INTERNAL_SERVER_ERROR, "gone")), 2.0)
    assert woken == [fresh] and not server.send_capped


def test_a_peer_that_grants_no_credit_holds_a_stream_buffer_per_stream(run):
    """The real client with flow control, whose handler holds each stream and reads nothing: it
    reads the connection, so frames leave, but its streams' credit runs out. What the server holds
    for credit is each stream's ``stream_send_buffer`` and at most one small read past it. Before,
    a visitor's connection was read up to 1 MiB at a time past it: 24 visitors made the server
    hold 30.5 MB for credit (1.27 MiB a stream)."""
    visitors, each, limit = 24, 4 * MiB, 1 * MiB
    reading = asyncio.Event()
    got = []

    async def hold(stream):
        await reading.wait()
        n = 0
        while data := await stream.read(1 << 20):
            n += len(data)
        got.append(n)
        stream.close()

    async def body():
        cfg = ft.ServerConfig(session_send_limit=limit)
        async with tunnel(hold, server_config=cfg, tunnel_id="nocredit", token=TOKEN) as (server, _, session), \
                ft.TcpIngress(server, ("127.0.0.1", 0), "nocredit") as ingress:
            writers = await _senders(ingress, visitors, each, session)
            core = session.connection.core
            assert core.flow
            assert len(core.streams) == visitors
            held, buffer = sum(st.pending_bytes for st in core.streams.values()), ft.ServerConfig().stream_send_buffer
            assert visitors * buffer // 2 < held <= visitors * (buffer + 17 * KiB), f"{held / MiB:.1f} MiB held"
            assert core.sched.pending_bytes <= limit
            reading.set()  # the handlers read: every visitor's bytes go through
            for w in writers:
                w.write_eof()
            async with asyncio.timeout(60):
                while len(got) < visitors:
                    await asyncio.sleep(0.05)
            assert got == [each] * visitors
            for w in writers:
                w.close()

    run(body, timeout=120)
