"""Backoff, token helpers, lifecycle (close/shutdown), close semantics, idle timeout, churn."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

import ferrotunnel as ft
from conftest import tunnel


def test_backoff_sequence_jitter_and_cap():
    b = ft.Backoff(ft.BackoffConfig(jitter=0), rng=random.Random(1))
    assert [b.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    b = ft.Backoff(ft.BackoffConfig(), rng=random.Random(2))
    d = [b.next_delay() for _ in range(8)]
    assert 0.7 <= d[0] <= 1.3 and 1.4 <= d[1] <= 2.6 and 44.8 <= d[6] <= 60 and d[7] == 60
    b.reset()
    assert b.attempts == 0 and b.current_delay() == 1
    limited = ft.Backoff(ft.BackoffConfig(max_attempts=2))
    assert limited.next_delay() is not None and limited.next_delay() is not None and limited.next_delay() is None
    with pytest.raises(ValueError):
        ft.BackoffConfig(factor=0.5)


def test_token_helpers():
    assert ft.constant_time_eq("abc", "abc") and not ft.constant_time_eq("abc", "abd")
    assert not ft.constant_time_eq("abc", "abcd")
    assert len(ft.hash_token("t")) == 64
    ft.validate_token_format("printable token ~")
    for bad in ("", "x" * 257, "tab\there", "caf\u00e9"):
        with pytest.raises(ValueError):
            ft.validate_token_format(bad)
    with pytest.raises(ValueError) as ei:
        ft.TunnelServer(("127.0.0.1", 0), "bad\ntoken-value")
    assert "token-value" not in str(ei.value)


def test_configs_validate():
    with pytest.raises(ValueError):
        ft.ServerConfig(max_frame_size=10**9)
    with pytest.raises(ValueError):
        ft.ClientConfig(initial_window=10, max_window=5)
    with pytest.raises(ValueError):
        ft.ServerConfig(heartbeat_interval=0)
    assert ft.ServerConfig().max_streams_per_session == 10_000 and ft.ServerConfig().max_sessions == 1000


def test_server_close_ends_everything_within_a_second(run):
    async def body():
        async def hold(stream):
            await asyncio.sleep(3600)

        async with tunnel(hold) as (server, client, session):
            streams = [await session.open_stream() for _ in range(10)]
            t0 = time.monotonic()
            await server.close()
            assert time.monotonic() - t0 < 1.0
            for s in streams:
                with pytest.raises(ft.ConnectionLostError):
                    await asyncio.wait_for(s.read(), 2)
            assert session.is_closed
    run(body)


def test_shutdown_lets_streams_finish(run):
    async def body():
        async def slow_echo(stream):
            data = await stream.read()
            await asyncio.sleep(0.2)
            stream.write(data)
            stream.write_eof()

        async with tunnel(slow_echo) as (server, client, session):
            s = await session.open_stream()
            s.write(b"finish me")
            s.write_eof()

            async def reader():
                got = b""
                async for c in s:
                    got += c
                await s.aclose()
                return got

            rt = asyncio.create_task(reader())
            await server.shutdown(grace=5)
            assert await rt == b"finish me"
    run(body)


def test_close_discards_late_data_and_resets_our_peer(run):
    async def body():
        reset_seen = asyncio.get_running_loop().create_future()

        async def chatty(stream):
            try:
                while True:
                    stream.write(b"n" * 1000)
                    await stream.drain()
                    await asyncio.sleep(0.01)
            except ft.StreamResetError as exc:
                reset_seen.set_result(exc)

        async with tunnel(chatty) as (server, client, session):
            s = await session.open_stream()
            await s.read(10)
            await s.aclose()
            assert await s.read() == b""
            await asyncio.wait_for(reset_seen, 5)  # the sender was told to stop
            assert len(session.multiplexer) == 0
    run(body)


def test_concurrent_handlers(run):
    async def body():
        started = []
        release = asyncio.Event()

        async def handler(stream):
            started.append(stream.stream_id)
            await release.wait()
            stream.write(b"ok")

        async with tunnel(handler) as (server, client, session):
            streams = [await session.open_stream() for _ in range(5)]
            while len(started) < 5:  # all five run at once, not one after another
                await asyncio.sleep(0.01)
            release.set()
            for s in streams:
                assert await s.read() == b"ok"  # handler return closes gracefully
    run(body)


def test_ingress_idle_timeout(run):
    async def body():
        async def hold(stream):
            await asyncio.sleep(3600)

        async def local(reader, writer):
            await reader.read()

        srv = await asyncio.start_server(local, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=srv.sockets[0].getsockname()[:2])
        async with tunnel(None, client_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0), idle_timeout=0.2) as ingress:
                r, w = await asyncio.open_connection(*ingress.address)
                w.write(b"hi")
                t0 = time.monotonic()
                assert await asyncio.wait_for(r.read(), 5) == b""
                assert time.monotonic() - t0 >= 0.2
        srv.close()
    run(body)


def test_half_close_churn_keeps_both_ends_alive(run):
    """Connections opened, half-closed and closed in a bounded loop; see the uvloop EOF note."""
    async def body():
        async def local(reader, writer):
            data = await reader.read()
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            writer.close()

        srv = await asyncio.start_server(local, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=srv.sockets[0].getsockname()[:2])
        async with tunnel(None, client_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as ingress:
                deadline = time.monotonic() + 2.0
                count = 0

                async def one(i):
                    r, w = await asyncio.open_connection(*ingress.address)
                    w.write(b"%d" % i * 100)
                    w.write_eof()
                    data = await r.read()
                    w.close()
                    return data == b"%d" % i * 100

                while time.monotonic() < deadline and count < 2000:
                    results = await asyncio.gather(*(one(count + k) for k in range(20)))
                    assert all(results)
                    count += 20
                assert count >= 20 and not session.is_closed
                await asyncio.sleep(0.2)
                assert len(session.multiplexer) == 0
        srv.close()
    run(body, timeout=60)
