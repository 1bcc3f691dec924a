"""Server and client over real sockets on 127.0.0.1, on uvloop and asyncio."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import pytest

import ferrotunnel as ft
from conftest import echo_handler, free_port, tunnel
from ferrotunnel.pool import pool_stats


def test_echo_server_opened_stream(run):
    async def body():
        async with tunnel() as (server, client, session):
            s = await session.open_stream(ft.Protocol.TCP, priority=ft.StreamPriority.HIGH)
            assert s.stream_id % 2 == 0 and s.priority == ft.StreamPriority.HIGH
            s.write(b"ping")
            await s.drain()
            assert await s.readexactly(4) == b"ping"
            s.write_eof()
            assert await s.read(10) == b""
            await s.aclose()
            assert session.flow_control and client.session.flow_control
    run(body)


def test_client_opened_stream(run):
    async def body():
        async with tunnel() as (server, client, session):
            cs = await client.session.open_stream(ft.Protocol.TCP)
            assert cs.stream_id % 2 == 1
            cs.write(b"from client")
            cs.write_eof()
            ss = await session.accept()
            assert ss.stream_id == cs.stream_id
            data = b""
            while True:  # everything the client wrote, then its half-close as b""
                chunk = await ss.read(100)
                if not chunk:
                    break
                data += chunk
            assert data == b"from client"
            ss.write(b"reply")
            ss.write_eof()
            assert await cs.readexactly(5) == b"reply"
            assert await cs.read() == b""
    run(body)


def test_multi_megabyte_both_ways_with_half_close(run):
    async def body():
        async with tunnel() as (server, client, session):
            data = os.urandom(8 * 1024 * 1024)
            s = await session.open_stream()

            async def writer():
                for i in range(0, len(data), 100_000):
                    s.write(data[i:i + 100_000])
                    await s.drain()
                s.write_eof()

            wt = asyncio.create_task(writer())
            got = bytearray()
            async for chunk in s:
                got += chunk
            await wt
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    run(body, timeout=120)


def test_thousand_concurrent_streams_sha256(run):
    async def body():
        async with tunnel() as (server, client, session):
            rng = random.Random(7)

            async def one(i):
                size = rng.choice([0, 1, 100, 5000, 70_000, 200_000])
                payload = rng.randbytes(size)
                s = await session.open_stream()
                s.write(payload)
                s.write_eof()
                got = bytearray()
                async for chunk in s:
                    got += chunk
                await s.aclose()
                return hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

            results = await asyncio.gather(*(one(i) for i in range(1000)))
            assert all(results)
            await asyncio.sleep(0.1)
            assert len(session.multiplexer) == 0  # every slot freed
    run(body, timeout=180)


def test_reset_surfaces_on_peer(run):
    async def body():
        got = asyncio.get_running_loop().create_future()

        async def handler(stream):
            try:
                await stream.read(10)
                await stream.read(10)
            except ft.StreamResetError as exc:
                got.set_result(exc)

        async with tunnel(handler) as (server, client, session):
            s = await session.open_stream()
            s.write(b"x")
            await asyncio.sleep(0.05)
            s.abort()
            exc = await asyncio.wait_for(got, 5)
            assert "reset" in str(exc)
            with pytest.raises(ft.StreamClosedError):
                s.write(b"more")
    run(body)


def test_write_after_close_raises_and_read_after_eof_is_empty(run):
    async def body():
        async with tunnel() as (server, client, session):
            s = await session.open_stream()
            s.write_eof()
            with pytest.raises(ft.StreamClosedError):
                s.write(b"late")
            assert await s.read() == b""  # the echo handler half-closes after our EOF
            s.close()
            with pytest.raises(ft.StreamClosedError):
                s.write(b"late")
    run(body)


def test_lost_connection_errors_every_stream(run):
    async def body():
        async def silent(stream):
            await asyncio.sleep(3600)

        async with tunnel(silent) as (server, client, session):
            streams = [await session.open_stream() for _ in range(5)]
            await asyncio.sleep(0.05)
            client.session.connection.transport.abort()
            for s in streams:
                with pytest.raises(ft.ConnectionLostError):
                    await asyncio.wait_for(s.read(10), 5)
    run(body)


def test_never_reading_stream_does_not_stall_others(run):
    async def body():
        stuck_started = asyncio.Event()

        async def handler(stream):
            first = await stream.readexactly(1)
            if first == b"S":  # the stuck stream: never read again
                stuck_started.set()
                await asyncio.sleep(3600)
            else:
                stream.write(first)
                await echo_handler(stream)

        cfg = ft.ClientConfig(initial_window=64 * 1024, max_window=256 * 1024)
        async with tunnel(handler, client_config=cfg) as (server, client, session):
            stuck = await session.open_stream()
            stuck.write(b"S")
            await stuck_started.wait()
            blob = os.urandom(1024 * 1024)

            async def fill():
                for i in range(0, 4 * 1024 * 1024, 65536):
                    stuck.write(blob[: 65536])
                    await stuck.drain()

            filler = asyncio.create_task(fill())
            await asyncio.sleep(0.2)
            assert not filler.done()  # blocked by the stuck reader's window, not by the tunnel
            other = await session.open_stream()
            other.write(b"E" + blob)
            other.write_eof()
            got = bytearray()
            async for chunk in other:
                got += chunk
            assert bytes(got) == b"E" + blob
            # the stuck stream holds at most its window on the receiving side
            client_core = client.session.connection.core
            assert client_core.total_unread <= cfg.max_window
            filler.cancel()
    run(body, timeout=60)


def test_high_priority_round_trip_while_low_streams_saturate(run):
    async def body():
        async def handler(stream):
            if stream.priority == ft.StreamPriority.LOW:
                async for _ in stream:  # sink
                    pass
                stream.write_eof()
            else:
                await echo_handler(stream)

        async with tunnel(handler) as (server, client, session):
            blob = os.urandom(256 * 1024)
            stop = asyncio.Event()

            async def bulk():
                s = await session.open_stream(ft.Protocol.TCP, priority=ft.StreamPriority.LOW)
                while not stop.is_set():
                    s.write(blob)
                    await s.drain()
                s.write_eof()

            bulks = [asyncio.create_task(bulk()) for _ in range(4)]
            await asyncio.sleep(0.3)
            hi = await session.open_stream(ft.Protocol.TCP, priority=ft.StreamPriority.HIGH)
            for _ in range(20):
                hi.write(b"p" * 64)
                assert await hi.readexactly(64) == b"p" * 64
            assert not any(b.done() for b in bulks)  # the bulk flood was on all along
            stop.set()
            await asyncio.gather(*bulks)
    run(body, timeout=60)


def test_tcp_ingress_both_ways_with_half_close(run):
    async def body():
        # a local echo service behind the client
        async def local_echo(reader, writer):
            data = await reader.read()
            writer.write(hashlib.sha256(data).digest() + data)
            await writer.drain()
            writer.write_eof()
            writer.close()

        local = await asyncio.start_server(local_echo, "127.0.0.1", 0)
        local_addr = local.sockets[0].getsockname()[:2]
        cfg = ft.ClientConfig(local_addr=local_addr)
        async with tunnel(None, client_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="t1") as ingress:
                payload = os.urandom(3 * 1024 * 1024 + 17)
                r, w = await asyncio.open_connection(*ingress.address)
                w.write(payload)
                await w.drain()
                w.write_eof()
                got = await r.read()
                assert got[:32] == hashlib.sha256(payload).digest() and got[32:] == payload
                w.close()
        local.close()
    run(body, timeout=60)


def test_tcp_ingress_without_session_closes_at_once(run):
    async def body():
        server = ft.TunnelServer(("127.0.0.1", 0), "secret-token")
        async with server, ft.TcpIngress(server, ("127.0.0.1", 0)) as ingress:
            r, w = await asyncio.open_connection(*ingress.address)
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
    run(body)


def test_reconnect_after_server_restart(run):
    async def body():
        port = free_port()
        cfg = ft.ClientConfig(backoff=ft.BackoffConfig(base=0.05, max_delay=0.2))
        server = ft.TunnelServer(("127.0.0.1", port), "secret-token")
        await server.start()
        client = ft.TunnelClient(f"127.0.0.1:{port}", "secret-token", config=cfg)
        connected = []
        task = asyncio.create_task(client.connect_and_run(echo_handler, on_connected=connected.append))
        try:
            first = await server.wait_for_session(client.tunnel_id, timeout=5)
            await server.close()
            server2 = ft.TunnelServer(("127.0.0.1", port), "secret-token")
            async with server2:
                second = await server2.wait_for_session(client.tunnel_id, timeout=10)
                while len(connected) < 2:
                    await asyncio.sleep(0.01)
                assert second.id != first.id and connected[1].id == second.id
                s = await second.open_stream()
                s.write(b"again")
                s.write_eof()
                assert await s.read() == b"again"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    run(body, timeout=60)


def test_idle_stream_holds_no_buffer_and_pool_is_used(run):
    async def body():
        from ferrotunnel.pool import acquire_bytes
        while pool_stats()[0]:  # start from an empty pool on this thread
            acquire_bytes()
        # 64 KiB read buffers: within the pool's default capacity limit, so they are retained
        sc, cc = ft.ServerConfig(read_buffer_size=65536), ft.ClientConfig(read_buffer_size=65536)
        async with tunnel(server_config=sc, client_config=cc) as (server, client, session):
            s = await session.open_stream()
            for _ in range(50):
                s.write(b"z" * 30000)
                await s.drain()
                await s.readexactly(30000)
            # each end reads into a pooled buffer; an idle stream keeps none of its own
            assert len(session.connection._rbuf) == 65536
            assert s._rbuf is None and s._rsize == 0
            assert session.connection.core.sched.queued_streams == 0
            s.write_eof()
            await s.read()
        await asyncio.sleep(0.1)
        count, capacity = pool_stats()
        assert count >= 2 and capacity >= 2 * 65536  # both ends gave their read buffers back
    run(body)


def test_stream_limit(run):
    async def body():
        cfg = ft.ServerConfig(max_streams_per_session=3)

        async def handler(stream):
            await asyncio.sleep(3600)

        async with tunnel(handler, server_config=cfg) as (server, client, session):
            streams = [await session.open_stream() for _ in range(3)]
            with pytest.raises(ft.LimitExceededError):
                await session.open_stream()
            streams[0].abort()
            await session.open_stream()  # the slot was freed at once
    run(body)


def test_client_refuses_streams_to_server_without_extension(run):
    async def body():
        # a server that answers like the Rust one: caps ["basic"] only
        async def fake(reader, writer):
            await reader.read(100)
            import uuid as _uuid
            writer.write(ft.frames.encode(ft.frames.HandshakeAck(
                session_id=_uuid.uuid4(), status=ft.HandshakeStatus.SUCCESS, version=1, server_capabilities=["basic"])))
            await writer.drain()
            await asyncio.sleep(3600)

        srv = await asyncio.start_server(fake, "127.0.0.1", 0)
        host, port = srv.sockets[0].getsockname()[:2]
        client = ft.TunnelClient(f"{host}:{port}", "secret-token")
        session = await client.connect(echo_handler)
        with pytest.raises(ft.PeerUnsupportedError):
            await session.open_stream()
        await client.close()
        srv.close()
    run(body)


def test_without_flow_control_reading_pauses_and_memory_stays_bounded(run):
    async def body():
        stuck = asyncio.Event()

        async def never_reads(stream):
            stuck.set()
            await asyncio.sleep(3600)

        cc = ft.ClientConfig(flow_control=False, stream_recv_buffer=256 * 1024, heartbeat_interval=0.1,
                             session_timeout=1.5, stalled_stream_timeout=60)
        async with tunnel(never_reads, client_config=cc) as (server, client, session):
            assert not session.flow_control
            s = await session.open_stream()
            await stuck.wait()
            blob = b"m" * 65536

            async def flood():
                for _ in range(200):  # 12.5 MiB, far beyond what the client may buffer
                    s.write(blob)
                    await s.drain()

            task = asyncio.create_task(flood())
            await asyncio.sleep(1.0)
            conn = client.session.connection
            core = conn.core
            assert conn.read_paused
            assert core.total_unread <= 256 * 1024 + cc.read_buffer_size + 65546
            assert not task.done() and not session.is_closed and not client.session.is_closed
            # a pause that outlasts session_timeout (the reader never comes back) ends the session
            for _ in range(100):
                if core.closed:
                    break
                await asyncio.sleep(0.05)
            assert core.closed and "paused for" in str(core.close_exc)
            task.cancel()
    run(body, timeout=30)


def test_bytes_per_second_rate_limit(run):
    async def body():
        rate = 2 * 1024 * 1024
        sc = ft.ServerConfig(rate_limits=ft.RateLimits(bytes_per_second=rate, burst=0.25))
        async with tunnel(server_config=sc) as (server, client, session):
            cs = await client.session.open_stream()
            ss_task = asyncio.create_task(session.accept())
            payload = b"r" * (3 * 1024 * 1024)
            t0 = asyncio.get_running_loop().time()
            cs.write(payload)
            cs.write_eof()
            ss = await ss_task
            got = 0
            async for chunk in ss:
                got += len(chunk)
            elapsed = asyncio.get_running_loop().time() - t0
            assert got == len(payload)
            assert elapsed >= (len(payload) - rate * 0.25) / rate * 0.8  # cannot beat the configured rate
    run(body, timeout=30)


def test_session_store_lookups(run):
    async def body():
        async with tunnel(tunnel_id="store") as (server, client, session):
            store = server.sessions
            assert store.get(session.id) is session and store.get_by_tunnel_id("store") is session
            assert store.find_with_capability("tcp") is session and store.find_with_capability("nope") is None
            assert len(store) == 1 and list(store) == [session] and session in store
    run(body)


def test_small_writes_never_overtake_queued_data(run):
    """Small writes may leave as one frame at once (the fast path), but only when nothing is
    queued: behind a big queued write, on the same stream or another, they wait their turn."""
    async def body():
        async with tunnel() as (server, client, session):
            a = await session.open_stream()
            b = await session.open_stream(priority=ft.StreamPriority.LOW)
            expect_a, expect_b = bytearray(), bytearray()
            for i in range(20):
                big = os.urandom(random.choice([100_000, 700_000]))
                a.write(big)          # queued beyond what the transport takes at once
                small = b"a%03d" % i
                a.write(small)        # must come after ``big``
                b.write(b"b%03d" % i)  # another stream: its own order only
                expect_a += big + small
                expect_b += b"b%03d" % i
            a.write_eof()
            b.write_eof()

            async def collect(s):
                out = bytearray()
                while chunk := await s.read(1 << 20):
                    out += chunk
                return out

            got_a, got_b = await asyncio.gather(collect(a), collect(b))
            assert got_a == expect_a and got_b == expect_b
    run(body, timeout=60)


def test_ping_pong_small_messages_through_ingress(run):
    """Many small request/response rounds (the fast path each way) arrive intact and in order."""
    async def body():
        async def local_echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()

        local = await asyncio.start_server(local_echo, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=local.sockets[0].getsockname()[:2])
        async with tunnel(None, client_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ingress:
                r, w = await asyncio.open_connection(*ingress.address)
                for i in range(500):
                    msg = os.urandom(random.choice([1, 64, 1500, 16383]))
                    w.write(msg)
                    assert await r.readexactly(len(msg)) == msg
                frames_before = session.connection.core.sched.drained_frames
                w.write(b"z" * 100)
                assert await r.readexactly(100) == b"z" * 100
                assert session.connection.core.sched.drained_frames == frames_before + 1  # counted, once
                w.close()
        local.close()
    run(body, timeout=60)


def test_finished_connections_give_back_their_read_buffers_at_once(run):
    """A forwarded connection that ends lets go of its last, unfilled read buffer at once, not at
    the next garbage collection: with the collector off, 60 finished connections through the
    ingress (two bridges each) leave traced memory close to where it was."""
    import gc
    import tracemalloc

    async def body():
        async def local_echo(reader, writer):
            writer.write(await reader.read())
            await writer.drain()
            writer.close()

        local = await asyncio.start_server(local_echo, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=local.sockets[0].getsockname()[:2])
        async with tunnel(None, client_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ingress:
                async def one():
                    r, w = await asyncio.open_connection(*ingress.address)
                    w.write(b"x" * 1000)
                    w.write_eof()
                    assert await r.read() == b"x" * 1000
                    w.close()
                    await w.wait_closed()

                for _ in range(5):
                    await one()
                await asyncio.sleep(0.1)
                gc.collect()
                gc.disable()
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    for _ in range(60):
                        await one()
                    await asyncio.sleep(0.2)
                    grown = tracemalloc.get_traced_memory()[0] - base
                finally:
                    tracemalloc.stop()
                    gc.enable()
                assert grown < 4 * 1024 * 1024, f"{grown} bytes still held by 60 finished connections"
        local.close()
    run(body, timeout=60)
