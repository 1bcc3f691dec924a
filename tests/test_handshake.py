"""Handshake over real sockets: every status, timeouts, throttling, and the token kept secret."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

import ferrotunnel as ft
from conftest import echo_handler, read_frames, tunnel
from ferrotunnel import frames as F

TOKEN = "secret-token"
# PROTOCOL.md 2.8 g: the Rust client's handshake with token "secret", no tunnel id
RUST_HANDSHAKE = bytes.fromhex("0000001700 00 06736563726574 00 01 01 02 056261736963 03746370".replace(" ", ""))
REJECT_INVALID_TOKEN = bytes.fromhex("00000016000110" + "00" * 16 + "010000")


async def raw_handshake(server, hs_bytes):
    r, w = await asyncio.open_connection(*server.address)
    w.write(hs_bytes)
    await w.drain()
    return r, w


def hs(token=TOKEN, tunnel_id=None, lo=1, hi=1, caps=("basic", "tcp")):
    return F.encode(F.Handshake(token=token, tunnel_id=tunnel_id, min_version=lo, max_version=hi, capabilities=list(caps)))


def test_rust_client_handshake_and_heartbeat(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), "secret") as server:
            r, w = await raw_handshake(server, RUST_HANDSHAKE + bytes.fromhex("00000003000801"))  # pipelined
            ack, hb = await read_frames(r, 2)
            assert ack.status == ft.HandshakeStatus.SUCCESS and ack.version == 1
            assert "basic" in ack.server_capabilities
            assert isinstance(hb, F.HeartbeatAck) and hb.timestamp > 1_700_000_000_000  # server's own clock
            session = server.sessions.get_by_tunnel_id(str(ack.session_id))  # no tunnel id: the session uuid
            assert session is not None and session.capabilities == ("basic", "tcp")
            w.close()
    run(body)


@pytest.mark.parametrize("wire,status", [
    (hs(token="wrong-token"), ft.HandshakeStatus.INVALID_TOKEN),
    (hs(token="bad\ntoken"), ft.HandshakeStatus.INVALID_TOKEN),
    (hs(token=""), ft.HandshakeStatus.INVALID_TOKEN),
    (hs(token="x" * 300), ft.HandshakeStatus.INVALID_TOKEN),
    (hs(lo=2, hi=3), ft.HandshakeStatus.VERSION_MISMATCH),
    (hs(lo=1, hi=0), ft.HandshakeStatus.VERSION_MISMATCH),
    (hs(lo=0, hi=0), ft.HandshakeStatus.VERSION_MISMATCH),
])
def test_rejections(run, wire, status):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            r, w = await raw_handshake(server, wire)
            frames = await read_frames(r, 2)
            assert len(frames) == 1 and frames[0].status == status
            assert frames[0].session_id == uuid.UUID(int=0) and frames[0].version == 0
            assert await r.read() == b""  # then closed
            if status == ft.HandshakeStatus.INVALID_TOKEN and wire == hs(token="wrong-token"):
                w2r, w2 = await raw_handshake(server, hs(token="wrong-token"))
                assert await w2r.read() == REJECT_INVALID_TOKEN  # byte-exact rejection
                w2.close()
            assert len(server.sessions) == 0
            w.close()
    run(body)


def test_wide_version_range_negotiates_1(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            r, w = await raw_handshake(server, hs(lo=0, hi=5))
            ack, = await read_frames(r, 1)
            assert ack.status == ft.HandshakeStatus.SUCCESS and ack.version == 1
            w.close()
    run(body)


def test_tunnel_id_taken(run):
    async def body():
        async with tunnel(tunnel_id="dup") as (server, client, session):
            r, w = await raw_handshake(server, hs(tunnel_id="dup"))
            ack, = await read_frames(r, 1)
            assert ack.status == ft.HandshakeStatus.TUNNEL_ID_TAKEN and ack.session_id != uuid.UUID(int=0)
            assert await r.read() == b""
            assert server.sessions.get_by_tunnel_id("dup") is session
            w.close()
    run(body)


def test_first_frame_not_handshake_closes_silently(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            r, w = await raw_handshake(server, F.encode(F.Heartbeat(timestamp=1)))
            assert await asyncio.wait_for(r.read(), 5) == b""
            r, w = await raw_handshake(server, b"\xff\xff\xff\xff\x00garbage")
            assert await asyncio.wait_for(r.read(), 5) == b""
    run(body)


def test_handshake_timeout_frees_the_slot(run):
    async def body():
        cfg = ft.ServerConfig(handshake_timeout=0.3, max_pending_handshakes=2)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            silent = [await asyncio.open_connection(*server.address) for _ in range(2)]
            await asyncio.sleep(0.05)
            r3, w3 = await asyncio.open_connection(*server.address)  # over the pending limit: closed at once
            assert await asyncio.wait_for(r3.read(), 2) == b""
            for r, w in silent:  # closed at the handshake timeout
                assert await asyncio.wait_for(r.read(), 3) == b""
            assert server.pending_handshakes == 0
            r, w = await raw_handshake(server, hs())
            ack, = await read_frames(r, 1)
            assert ack.status == ft.HandshakeStatus.SUCCESS
            w.close()
    run(body)


def test_failed_handshakes_throttle_the_address(run):
    async def body():
        cfg = ft.ServerConfig(auth_failure_threshold=3, auth_failure_window=60)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            for _ in range(3):
                r, w = await raw_handshake(server, hs(token="wrong-token"))
                ack, = await read_frames(r, 1)
                assert ack.status == ft.HandshakeStatus.INVALID_TOKEN
            r, w = await raw_handshake(server, hs())  # even the right token now waits
            ack, = await read_frames(r, 1)
            assert ack.status == ft.HandshakeStatus.RATE_LIMITED
    run(body)


def test_max_sessions(run):
    async def body():
        cfg = ft.ServerConfig(max_sessions=1)
        async with tunnel(server_config=cfg) as (server, client, session):
            r, w = await raw_handshake(server, hs(tunnel_id="second"))
            ack, = await read_frames(r, 1)
            assert ack.status == ft.HandshakeStatus.RATE_LIMITED
    run(body)


def test_client_wrong_token_is_fatal(run, caplog):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            host, port = server.address
            client = ft.TunnelClient(f"{host}:{port}", "not-the-token-123")
            with pytest.raises(ft.AuthenticationError):
                await client.connect_and_run(echo_handler)
            assert "not-the-token-123" not in repr(client) and TOKEN not in repr(server)
    caplog.set_level(logging.DEBUG, logger="ferrotunnel")
    run(body)
    assert "not-the-token-123" not in caplog.text and TOKEN not in caplog.text


def test_client_version_mismatch_is_fatal(run):
    async def body():
        async def fake(reader, writer):
            await reader.read(100)
            writer.write(F.encode(F.HandshakeAck(session_id=uuid.UUID(int=0), status=ft.HandshakeStatus.VERSION_MISMATCH,
                                                 version=0)))
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(fake, "127.0.0.1", 0)
        client = ft.TunnelClient("127.0.0.1:%d" % srv.sockets[0].getsockname()[1], TOKEN)
        with pytest.raises(ft.HandshakeError) as ei:
            await client.connect_and_run(echo_handler)
        assert not isinstance(ei.value, ft.RetryableHandshakeError)
        srv.close()
    run(body)


def test_client_retries_closed_before_ack_and_tunnel_id_taken(run):
    async def body():
        attempts = []

        async def flaky(reader, writer):
            attempts.append(1)
            await reader.read(100)
            if len(attempts) == 1:
                writer.close()  # closed before any HandshakeAck
                return
            if len(attempts) == 2:
                writer.write(F.encode(F.HandshakeAck(session_id=uuid.uuid4(),
                                                     status=ft.HandshakeStatus.TUNNEL_ID_TAKEN, version=0)))
                await writer.drain()
                writer.close()
                return
            writer.write(F.encode(F.HandshakeAck(session_id=uuid.uuid4(), status=ft.HandshakeStatus.SUCCESS,
                                                 version=1, server_capabilities=["basic"])))
            await writer.drain()
            await asyncio.sleep(3600)

        srv = await asyncio.start_server(flaky, "127.0.0.1", 0)
        cfg = ft.ClientConfig(backoff=ft.BackoffConfig(base=0.02, max_delay=0.05))
        client = ft.TunnelClient("127.0.0.1:%d" % srv.sockets[0].getsockname()[1], TOKEN, config=cfg)
        connected = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(client.connect_and_run(echo_handler, on_connected=connected.set_result))
        session = await asyncio.wait_for(connected, 5)
        assert len(attempts) == 3 and session.tunnel_id == client.tunnel_id
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        srv.close()
    run(body)


def test_max_attempts_gives_up(run):
    async def body():
        from conftest import free_port
        cfg = ft.ClientConfig(backoff=ft.BackoffConfig(base=0.01, max_delay=0.02, max_attempts=3))
        client = ft.TunnelClient(f"127.0.0.1:{free_port()}", TOKEN, config=cfg)
        with pytest.raises(ft.FerroTunnelError, match=r"giving up after 3 retries \(4 attempts\)"):
            await client.connect_and_run(echo_handler)
    run(body)
