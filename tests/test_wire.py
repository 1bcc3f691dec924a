"""Wire conformance with a Rust peer's exact frames (PROTOCOL.md 3.2, 3.5, 4.2, 4.3), heartbeats,
dead-peer detection, session replacement and rate limits."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import ferrotunnel as ft
from conftest import echo_handler, read_frames, tunnel
from ferrotunnel import frames as F
from test_handshake import RUST_HANDSHAKE, TOKEN, hs

EXTENSION_TYPES = (F.PluginData, F.Error, F.StreamAck, F.Register, F.RegisterAck)


async def raw_client(server, handshake=RUST_HANDSHAKE):
    """A raw client that sends ``handshake`` (default: the Rust client's exact bytes); returns
    (reader, writer, decoder, HandshakeAck, the server's session or None) once the ack is in."""
    r, w = await asyncio.open_connection(*server.address)
    w.write(handshake)
    dec = F.FrameDecoder()
    ack = (await read_frames(r, 1, dec))[0]
    return r, w, dec, ack, server.sessions.get(ack.session_id)


def test_python_server_with_rust_client_frames(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), "secret") as server:
            r, w, dec, _, session = await raw_client(server)
            assert not session.flow_control
            s = await session.open_stream(ft.Protocol.TCP, priority=ft.StreamPriority.HIGH)
            opened, = await read_frames(r, 1, dec)
            # 4.2: all five fields, even id from 2, the priority we asked for
            assert F.encode(opened) == bytes.fromhex("00000007 00 04 02 04 00 00 02".replace(" ", ""))
            # Rust client sends data then CloseStream(Normal) (4.3)
            w.write(bytes.fromhex("0000000a 01 00000002 00 68656c6c".replace(" ", "")) + bytes.fromhex("0000000400070200"))
            assert await s.readexactly(4) == b"hell" and await s.read() == b""
            big = b"q" * 200_000
            s.write(big)
            s.write_eof()
            got = await read_frames(r, 5, dec)
            data = [f for f in got if isinstance(f, F.Data)]
            assert b"".join(f.data for f in data) == big
            assert all(0 < len(f.data) <= 65536 and not f.end_of_stream for f in data)
            assert F.encode(got[-1]) == bytes.fromhex("0000000400070200")  # CloseStream(2, Normal) after the data
            # a Heartbeat is acked; Data/CloseStream for unknown ids are tolerated silently
            w.write(bytes.fromhex("00000003000801") + F.encode(F.Data(stream_id=40, data=b"x"))
                    + F.encode(F.CloseStream(stream_id=42)))
            hb, = await read_frames(r, 1, dec)
            assert isinstance(hb, F.HeartbeatAck)
            # an abort toward a Rust peer can only be an end of stream
            s2 = await session.open_stream()
            await read_frames(r, 1, dec)
            s2.abort()
            end, = await read_frames(r, 1, dec)
            assert end == F.CloseStream(stream_id=4, reason=ft.CloseReason.NORMAL)
            await asyncio.sleep(0.1)
            w.write(bytes.fromhex("00000003000801"))
            rest = await read_frames(r, 1, dec)
            assert [type(f) for f in rest] == [F.HeartbeatAck]  # no server heartbeats, no extension frames
            w.close()
    run(body)


def test_python_client_with_rust_server_frames(run):
    async def body():
        seen = []
        done = asyncio.get_running_loop().create_future()

        async def rust_server(reader, writer):
            dec = F.FrameDecoder()
            hs_frame, = await read_frames(reader, 1, dec)
            assert isinstance(hs_frame, F.Handshake) and hs_frame.token == TOKEN
            assert hs_frame.capabilities[:2] == ["basic", "tcp"] and hs_frame.min_version == hs_frame.max_version == 1
            writer.write(F.encode(F.HandshakeAck(session_id=uuid.uuid4(), status=ft.HandshakeStatus.SUCCESS,
                                                 version=1, server_capabilities=["basic"])))
            hb, = await read_frames(reader, 1, dec)  # 3.5: first heartbeat right after the handshake
            assert isinstance(hb, F.Heartbeat)
            writer.write(bytes.fromhex("0000000700 04 02 04 00 00 00".replace(" ", ""))  # OpenStream(2, TCP)
                         + bytes.fromhex("0000000a0100000002006563686f")  # Data "echo"
                         + bytes.fromhex("0000000400070200")  # CloseStream
                         + bytes.fromhex("00000003000801"))  # a server Heartbeat: answered
            frames = await read_frames(reader, 3, dec)
            seen.extend(frames)
            done.set_result(None)
            await asyncio.sleep(3600)

        srv = await asyncio.start_server(rust_server, "127.0.0.1", 0)
        client = ft.TunnelClient("127.0.0.1:%d" % srv.sockets[0].getsockname()[1], TOKEN)
        task = asyncio.create_task(client.connect_and_run(echo_handler))
        await asyncio.wait_for(done, 5)
        assert F.HeartbeatAck in [type(f) for f in seen]
        stream_frames = [f for f in seen if not isinstance(f, (F.HeartbeatAck, F.Heartbeat))]
        assert stream_frames == [F.Data(stream_id=2, data=b"echo"), F.CloseStream(stream_id=2)]
        assert not any(isinstance(f, EXTENSION_TYPES) for f in seen)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        srv.close()
    run(body)


def test_heartbeat_rtt_measured_both_sides(run):
    async def body():
        sc = ft.ServerConfig(heartbeat_interval=0.05, session_timeout=2)
        cc = ft.ClientConfig(heartbeat_interval=0.05, session_timeout=2)
        async with tunnel(server_config=sc, client_config=cc) as (server, client, session):
            await asyncio.sleep(0.3)
            assert session.rtt is not None and 0 < session.rtt < 1
            assert client.session.rtt is not None and 0 < client.session.rtt < 1
            assert abs(session.last_seen - __import__("time").time()) < 1
    run(body)


def test_server_drops_silent_client(run):
    async def body():
        cfg = ft.ServerConfig(heartbeat_interval=0.1, session_timeout=0.4)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            # a Rust-like client that then goes silent
            r, w, dec, _, session = await raw_client(server, hs(tunnel_id="quiet", caps=("basic", "tcp")))
            assert session is server.sessions.get_by_tunnel_id("quiet")
            s = await session.open_stream()
            with pytest.raises(ft.TunnelTimeoutError):
                await asyncio.wait_for(s.read(), 3)
            assert server.sessions.get_by_tunnel_id("quiet") is None
            # the server closed the connection: EOF, after whole frames only, and nothing but the
            # OpenStream it sent (a Rust peer gets no Heartbeat and no Error frame on the way out)
            rest = await asyncio.wait_for(r.read(), 3)
            assert r.at_eof()
            assert dec.feed(rest) == [F.OpenStream(stream_id=s.stream_id, protocol=ft.Protocol.TCP)]
            assert dec.buffered == 0
    run(body)


def test_client_detects_dead_server_and_reconnects(run):
    async def body():
        conns = []

        async def mute(reader, writer):
            conns.append(writer)
            await reader.read(100)
            writer.write(F.encode(F.HandshakeAck(session_id=uuid.uuid4(), status=ft.HandshakeStatus.SUCCESS,
                                                 version=1, server_capabilities=["basic"])))
            await asyncio.sleep(3600)  # never acks a heartbeat, never says anything

        srv = await asyncio.start_server(mute, "127.0.0.1", 0)
        cfg = ft.ClientConfig(heartbeat_interval=0.1, session_timeout=0.4,
                              backoff=ft.BackoffConfig(base=0.01, max_delay=0.02))
        client = ft.TunnelClient("127.0.0.1:%d" % srv.sockets[0].getsockname()[1], TOKEN, config=cfg)
        sessions = []
        task = asyncio.create_task(client.connect_and_run(echo_handler, on_connected=sessions.append))
        while len(sessions) < 2:
            await asyncio.sleep(0.05)
        assert sessions[0].is_closed and isinstance(sessions[0].connection.close_exc, ft.TunnelTimeoutError)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        srv.close()
    run(body, timeout=20)


def test_stale_session_is_replaced(run):
    async def body():
        cfg = ft.ServerConfig(stale_session_after=0.2)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            r, w, _, _, old = await raw_client(server, hs(tunnel_id="app"))
            assert old is server.sessions.get_by_tunnel_id("app")
            r2, w2, _, ack, _ = await raw_client(server, hs(tunnel_id="app"))
            assert ack.status == ft.HandshakeStatus.TUNNEL_ID_TAKEN  # still fresh
            await asyncio.sleep(0.3)
            host, port = server.address
            client = ft.TunnelClient(f"{host}:{port}", TOKEN, tunnel_id="app")
            new = await client.connect(echo_handler)
            assert server.sessions.get_by_tunnel_id("app").id == new.id != old.id
            assert old.is_closed
            await client.close()
    run(body)


def test_error_frames_reset_stream_or_end_session(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            r, w, dec, _, session = await raw_client(
                server, hs(tunnel_id="e", caps=("basic", "tcp", "ferrotunnel-py/1")))
            s = await session.open_stream()
            w.write(F.encode(F.Error(stream_id=s.stream_id, code=ft.ErrorCode.STREAM_NOT_FOUND, message="gone")))
            with pytest.raises(ft.StreamResetError, match="gone"):
                await asyncio.wait_for(s.read(), 3)
            w.write(F.encode(F.Error(stream_id=None, code=ft.ErrorCode.INTERNAL_SERVER_ERROR, message="bye")))
            await asyncio.wait_for(session.wait_closed(), 3)
            assert "bye" in str(session.connection.close_exc)
    run(body)


def test_stream_open_rate_limit(run):
    async def body():
        cfg = ft.ServerConfig(rate_limits=ft.RateLimits(streams_per_second=1, burst=2))
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            r, w, dec, _, session = await raw_client(server, hs(tunnel_id="rl", caps=("basic", "ferrotunnel-py/1")))
            for sid in (1, 3, 5, 7):
                w.write(F.encode(F.OpenStream(stream_id=sid, protocol=ft.Protocol.TCP)))
            frames: list = []
            while sum(isinstance(f, F.Error) for f in frames) < 2:
                frames += await read_frames(r, 1, dec)
            assert [f.stream_id for f in frames if isinstance(f, F.Error)] == [5, 7]
            assert len(session.multiplexer) == 2
    run(body)


def test_flow_control_overrun_resets_the_stream(run):
    async def body():
        cfg = ft.ServerConfig(initial_window=1000, max_window=1000)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            r, w, dec, ack, _ = await raw_client(
                server, hs(tunnel_id="fc", caps=("basic", "ferrotunnel-py/1", "flow-control/1;window=65536")))
            assert "flow-control/1;window=1000" in ack.server_capabilities
            w.write(F.encode(F.OpenStream(stream_id=1, protocol=ft.Protocol.TCP)))
            w.write(F.encode(F.Data(stream_id=1, data=b"x" * 1001)))  # over the 1000-byte window
            frames: list = []
            while not any(isinstance(f, F.Error) for f in frames):
                frames += await read_frames(r, 1, dec)
            err = next(f for f in frames if isinstance(f, F.Error))
            assert err.stream_id == 1 and "window" in err.message
    run(body)


def test_small_write_is_the_exact_rust_data_frame(run):
    """A small write (sent at once by the fast path) is byte for byte PROTOCOL.md's Data frame."""
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), "secret") as server:
            r, w, dec, _, session = await raw_client(server)
            s = await session.open_stream()
            await read_frames(r, 1, dec)  # the OpenStream
            s.write(b"hi")
            raw = await asyncio.wait_for(r.readexactly(12), 5)
            assert raw == bytes.fromhex("00000008 01 00000002 00 6869".replace(" ", ""))
            w.close()
    run(body)
