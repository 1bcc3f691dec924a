"""Defences of the public edge (hardening issue): per-address handshake caps, the pre-auth byte
bound, client-opened streams refused or bounded, rapid reset, credit overflow, cut visitors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

import pytest

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.config import StreamConfig
from ferrotunnel.protocol import SessionCore
from ferrotunnel.protocol.flow import FLOW_PLUGIN_ID, flow_capability

from conftest import echo_handler, tunnel
from test_core import caps, pair, pump

TOKEN = "edge-token-123"


async def _open_from(host: str, addr) -> tuple:
    return await asyncio.open_connection(*addr, local_addr=(host, 0))


def test_one_address_cannot_take_the_handshake_pool(run, caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel")

    async def body():
        cfg = ft.ServerConfig(max_pending_per_address=8, handshake_timeout=5.0)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            silent = [await _open_from("127.0.0.1", server.address) for _ in range(8)]
            extra = [await _open_from("127.0.0.1", server.address) for _ in range(20)]
            for r, _ in extra:  # over the cap: closed at once
                assert await asyncio.wait_for(r.read(), 5) == b""
            # another address still gets in while the first holds its whole share
            r2, w2 = await _open_from("127.0.0.2", server.address)
            w2.write(F.encode(F.Handshake(token=TOKEN, tunnel_id="honest2", capabilities=["basic"])))
            ack = F.FrameDecoder().feed(await asyncio.wait_for(r2.read(65536), 5))[0]
            assert ack.status == F.HandshakeStatus.SUCCESS
            assert server.refused_connections["max_pending_per_address"] == 20
            assert server.pending_handshakes == 8
            for _, w in silent + extra + [(r2, w2)]:
                w.close()
    run(body)
    refusals = [r for r in caplog.records if "refusing connections from" in r.getMessage()]
    assert len(refusals) == 1  # 20 refusals, one line (per address and reason per interval)


def test_pending_handshakes_hold_a_bounded_number_of_bytes(run):
    async def body():
        cfg = ft.ServerConfig(max_preauth_bytes=100_000, handshake_timeout=5.0)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            conns = []
            for i in range(5):  # each sends most of a 60,000-byte Handshake and stops
                r, w = await _open_from(f"127.0.0.{i + 1}", server.address)
                w.write(struct.pack(">I", 60_000) + b"\x00\x00" + b"\x00" * 50_000)
                await w.drain()
                conns.append((r, w))
                await asyncio.sleep(0.2)
            assert server.preauth_bytes <= 100_000 + 60_000
            assert server.refused_connections["max_preauth_bytes"] >= 1
            for _, w in conns:
                w.close()
    run(body)


def test_client_opened_streams_refused_when_not_accepted(run):
    async def body():
        cfg = ft.ServerConfig(accept_client_streams=False)
        async with tunnel(echo_handler, server_config=cfg) as (server, client, session):
            stream = await client.session.open_stream()
            stream.write(b"hello")
            with pytest.raises(ft.StreamResetError):
                await asyncio.wait_for(stream.read(), 5)
            assert len(session.multiplexer) == 0
    run(body)


def test_accept_queue_is_bounded_and_skips_reset_streams(run):
    async def body():
        cfg = ft.ServerConfig(max_accept_queue=16)
        async with tunnel(echo_handler, server_config=cfg) as (server, client, session):
            streams = [client.session.open_stream_nowait() for _ in range(40)]
            for s in streams:
                s.write(b"x")
            refused = 0
            for s in streams[16:]:
                with pytest.raises(ft.StreamResetError):
                    await asyncio.wait_for(s.read(), 5)
                refused += 1
            assert refused == 24
            for s in streams[:8]:  # reset by the peer before anyone accepted them
                s.abort()
            await asyncio.sleep(0.2)
            got = [await asyncio.wait_for(session.accept(), 5) for _ in range(8)]
            assert sorted(g.stream_id for g in got) == sorted(s.stream_id for s in streams[8:16])
    run(body)


def test_rapid_reset_ends_the_session(run):
    async def body():
        cfg = ft.ServerConfig(max_peer_resets_per_second=50)
        async with tunnel(echo_handler, server_config=cfg) as (server, client, session):
            for _ in range(200):
                s = client.session.open_stream_nowait()
                s.write(b"x")
                s.abort()
            await asyncio.wait_for(session.wait_closed(), 5)
            assert isinstance(session.connection.close_exc, ft.LimitExceededError)
            assert "max_peer_resets_per_second" in str(session.connection.close_exc)
    run(body)


def test_resets_below_the_rate_keep_the_session_and_above_it_end_it():
    for limit, ends in ((1000, False), (10, True)):
        client, server, rc, rs = pair(max_peer_resets_per_second=limit)
        streams = [client.open_stream() for _ in range(100)]
        pump(client, server)  # the server knows them
        for st in streams:
            client.reset(st)
        pump(client, server)
        assert bool(rs.errors) == ends
        if ends:
            assert isinstance(rs.errors[0], ft.LimitExceededError)


def test_credit_past_2_31_resets_that_stream_only():
    client, server, rc, rs = pair()
    a, b = client.open_stream(), client.open_stream()
    pump(client, server)
    huge = F.encode(F.PluginData(plugin_id=FLOW_PLUGIN_ID, data=struct.pack(">II", a.id, 0x7FFFFFFF)))
    client.receive(huge, 1.0)
    assert a.done and not b.done and a.id in rc.resets
    # unknown stream and malformed updates: ignored and counted, the session lives on
    client.receive(F.encode(F.PluginData(plugin_id=FLOW_PLUGIN_ID, data=struct.pack(">II", 999, 5))), 1.0)
    client.receive(F.encode(F.PluginData(plugin_id=FLOW_PLUGIN_ID, data=b"\x00\x01\x02")), 1.0)
    assert client.unknown_credit == 1 and client.malformed_credit == 1 and not client.closed
    client.send(b, b"still fine")
    pump(client, server)


def test_a_cut_tcp_visitor_sees_a_reset_not_an_end(run):
    async def body():
        async def slow_big(reader, writer):
            writer.write(b"z" * 200_000)  # part of a download
            await writer.drain()
            await asyncio.sleep(30)

        app = await asyncio.start_server(slow_big, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=app.sockets[0].getsockname()[:2])
        async with tunnel(None, client_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="t1") as ingress:
                r, w = await asyncio.open_connection(*ingress.address)
                got = await asyncio.wait_for(r.readexactly(100_000), 5)
                assert got
                client.session.connection.transport.abort()  # the tunnel client dies mid-download
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    while True:
                        chunk = await asyncio.wait_for(r.read(65536), 5)
                        if not chunk:
                            raise AssertionError("a cut download ended like a complete one")
                w.close()
        app.close()
    run(body)


def test_tls_on_one_end_only_is_named_from_the_first_bytes():
    from ferrotunnel.protocol import ClientHandshake, ServerHandshake

    hello = bytes.fromhex("16030100f5010000f10303")  # the start of a TLS ClientHello
    with pytest.raises(ft.FrameError, match="client speaks TLS but this server is plaintext.*--tls-cert"):
        ServerHandshake(ft.ServerConfig()).receive_data(hello)
    alert = bytes.fromhex("15030300020246")  # a TLS alert where a HandshakeAck was expected
    with pytest.raises(ft.HandshakeError, match="server answered with TLS: connect with --tls"):
        ClientHandshake(TOKEN).receive_data(alert)


def test_plaintext_client_at_a_tls_server_is_named_in_the_log(run, caplog, tmp_path):
    from ferrotunnel import tls

    paths = tls.generate_certs(tmp_path, names=["localhost"], ips=["127.0.0.1"])
    ctx = tls.server_context(paths["server.pem"], paths["server.key"])
    caplog.set_level(logging.INFO, logger="ferrotunnel")

    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, tls=ctx) as server:
            r, w = await asyncio.open_connection(*server.address)
            w.write(F.encode(F.Handshake(token=TOKEN, tunnel_id="p", capabilities=["basic"])))
            await asyncio.wait_for(r.read(), 5)
            w.close()
    run(body)
    assert any("the client speaks plaintext: it needs --tls" in r.getMessage() for r in caplog.records)


def test_ingress_connection_caps_per_address_and_total(run, caplog):
    caplog.set_level(logging.WARNING, logger="ferrotunnel")

    async def body():
        async def hold(reader, writer):
            await reader.read()
            writer.close()

        app = await asyncio.start_server(hold, "127.0.0.1", 0)
        ccfg = ft.ClientConfig(local_addr=app.sockets[0].getsockname()[:2])
        scfg = ft.ServerConfig(ingress_max_per_address=5, ingress_max_connections=8)
        async with tunnel(None, client_config=ccfg, server_config=scfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="t1") as ingress:
                held = [await _open_from("127.0.0.1", ingress.address) for _ in range(5)]
                await asyncio.sleep(0.2)
                r, w = await _open_from("127.0.0.1", ingress.address)  # the 6th from one address
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    if not await asyncio.wait_for(r.read(), 5):
                        raise asyncio.IncompleteReadError(b"", None)
                w.close()
                others = [await _open_from("127.0.0.2", ingress.address) for _ in range(3)]
                await asyncio.sleep(0.2)
                assert server.ingress_gate.open == 8 and len(session.multiplexer) == 8
                r9, w9 = await _open_from("127.0.0.3", ingress.address)  # over the total
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    if not await asyncio.wait_for(r9.read(), 5):
                        raise asyncio.IncompleteReadError(b"", None)
                assert server.ingress_gate.refused == {"per_address": 1, "total": 1}
                for _, wr in held + others:
                    wr.close()
                await asyncio.sleep(0.3)
                assert server.ingress_gate.open == 0  # every slot given back
        app.close()
    run(body)
    assert sum("refusing connections from" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("flow", [False, True], ids=["no-flow", "flow"])
def test_a_peer_that_never_reads_cannot_grow_our_replies(run, flow):
    """Heartbeats flooded by a peer that reads nothing: replies queue up to max_queued_output,
    then the server stops reading it, and ends the session after session_timeout. With a peer
    that announces flow control the read path skips its pause checks in the common case, and
    must still pause here."""
    cap = 64 * 1024
    peer_caps = ["basic", "ferrotunnel-py/1"] + ([flow_capability(256 * 1024)] if flow else [])

    async def body():
        cfg = ft.ServerConfig(max_queued_output=cap, session_timeout=2.0, heartbeat_interval=0.5)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            import socket

            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(server.address)
            sock.setblocking(False)
            r, w = await asyncio.open_connection(sock=sock)
            w.write(F.encode(F.Handshake(token=TOKEN, tunnel_id="deaf", capabilities=peer_caps)))
            await r.readexactly(4)  # the ack has begun: from now on nothing is read
            session = await server.wait_for_session("deaf", timeout=5)
            assert session.connection.core.flow == flow  # with flow: the fast path's case
            beat = F.encode(F.Heartbeat(timestamp=1)) * 10_000
            sent = 0
            with contextlib.suppress(TimeoutError):
                while sent < 4000 * len(beat):  # the server stops reading long before this
                    w.write(beat)
                    await asyncio.wait_for(w.drain(), 1.0)
                    sent += len(beat)
            sched = session.connection.core.sched
            assert sched.control_bytes <= cap + 256 * 1024  # the cap plus one read's replies
            assert session.connection.read_paused
            await asyncio.wait_for(session.wait_closed(), 10)
            assert isinstance(session.connection.close_exc, ft.LimitExceededError)
            assert "max_queued_output" in str(session.connection.close_exc)
            w.transport.abort()
    run(body, timeout=60)


def test_stalled_visitors_do_not_freeze_the_tunnel(run):
    """50 visitors stop reading mid-download; another visitor on the same tunnel still completes
    its downloads, and what the server holds for the stalled ones stays within their windows."""
    size = 16 * 1024 * 1024
    window, max_window = 64 * 1024, 256 * 1024
    piece = b"d" * 65536

    async def body():
        async def download(reader, writer):
            try:
                for _ in range(size // len(piece)):
                    writer.write(piece)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()

        app = await asyncio.start_server(download, "127.0.0.1", 0)
        ccfg = ft.ClientConfig(local_addr=app.sockets[0].getsockname()[:2], initial_window=window,
                               max_window=max_window, session_recv_budget=2 * 1024 * 1024)
        scfg = ft.ServerConfig(initial_window=window, max_window=max_window, session_recv_budget=2 * 1024 * 1024)
        async with tunnel(None, client_config=ccfg, server_config=scfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="t1") as ingress:
                import socket

                stalled = []
                for _ in range(50):
                    sock = socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
                    sock.connect(ingress.address)
                    sock.setblocking(False)
                    r, w = await asyncio.open_connection(sock=sock, limit=16384)
                    await r.readexactly(50_000)  # then it stops reading
                    stalled.append((r, w))
                await asyncio.sleep(0.5)
                for _ in range(3):
                    r, w = await asyncio.open_connection(*ingress.address)
                    got = 0
                    async with asyncio.timeout(30):
                        while chunk := await r.read(1 << 18):
                            got += len(chunk)
                    assert got == size
                    w.close()
                core = session.connection.core
                assert core.total_unread <= 50 * max_window + window
                assert not session.connection.read_paused and not session.is_closed
                for _, w in stalled:
                    w.transport.abort()
        app.close()
    run(body, timeout=120)


def test_refusals_are_counted_in_the_metrics(run):
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from ferrotunnel.cli.metrics import MetricsServer

    async def body():
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        server.refused_connections["max_pending_per_address"] += 3
        server.ingress_gate.refused["per_address"] += 2
        text = generate_latest(MetricsServer(server, ("127.0.0.1", 0)).registry).decode()
        assert 'ferrotunnel_refused_connections_total{limit="max_pending_per_address",listener="tunnel"} 3.0' in text
        assert 'ferrotunnel_refused_connections_total{limit="per_address",listener="ingress"} 2.0' in text
    run(body)


def test_a_big_control_frame_after_the_handshake_is_refused_from_its_length(run):
    async def body():
        cfg = ft.ServerConfig(max_control_frame=4096)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            r, w = await asyncio.open_connection(*server.address)
            w.write(F.encode(F.Handshake(token=TOKEN, tunnel_id="big", capabilities=["basic", "ferrotunnel-py/1"])))
            session = await server.wait_for_session("big", timeout=5)
            # an OpenStream claiming 1 MiB: refused from its 5-byte header, nothing of the body read
            w.write(struct.pack(">IB", 1 << 20, 0) + b"\x04\x01")
            await asyncio.wait_for(session.wait_closed(), 5)
            assert isinstance(session.connection.close_exc, ft.FrameError)
            assert "max_control_frame" in str(session.connection.close_exc)
            w.close()
    run(body)


def test_a_non_ascii_digit_window_is_no_window():
    from ferrotunnel.protocol import parse_flow_capability

    assert parse_flow_capability(["flow-control/1;window=\u00b2"]) is None
    assert parse_flow_capability(["flow-control/1;window=\u0663"]) is None  # ARABIC-INDIC DIGIT THREE
