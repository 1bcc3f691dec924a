"""Without flow control (a Rust or basic peer) a stream whose reader stalls is reset after
``stalled_stream_timeout`` so the tunnel reads again. Each test failed before its fix:

* the timer was not moved forward when a stream went over ``stream_recv_buffer``: the reset came
  at the session's next tick (``session_timeout`` later), the other streams stalled all along;
* a session over ``session_recv_budget`` with no single stream over its buffer paused reading with
  nothing ever reset, and ended at ``session_timeout`` with all its streams.
"""

from __future__ import annotations

import asyncio
import time

import ferrotunnel as ft

KiB = 1024
TOKEN = "stalled-basic-token-01"


async def _flooding_client(handler_size: int, server: ft.TunnelServer):
    """A client without extensions whose handler answers ``flood`` with ``handler_size`` bytes
    (then keeps the stream open) and echoes anything else."""
    async def handler(stream):
        try:
            while d := await stream.read(65536):
                if d.startswith(b"flood"):
                    stream.write(b"x" * handler_size)
                    await stream.drain()
                else:
                    stream.write(d)
        except ft.FerroTunnelError:
            pass

    client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="st",
                             config=ft.ClientConfig(extensions=False))
    return client, asyncio.create_task(client.connect_and_run(handler))


async def _floods_then_echo(server: ft.TunnelServer, floods: int, size: int) -> tuple:
    """Open ``floods`` streams that are answered with ``size`` bytes nobody reads, then one echo:
    (seconds until the echo came back, the flooded streams, whether the session had closed)."""
    client, task = await _flooding_client(size, server)
    try:
        s = await server.wait_for_session("st", timeout=10)
        flooded = []
        for _ in range(floods):
            a = await s.open_stream()
            a.write(b"flood")
            flooded.append(a)
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        b = await s.open_stream()
        b.write(b"ping")
        assert await asyncio.wait_for(b.readexactly(4), 15) == b"ping"
        return time.monotonic() - t0, flooded, s.is_closed
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


def test_a_stream_over_its_buffer_is_reset_after_stalled_stream_timeout(run):
    async def body():
        cfg = ft.ServerConfig(flow_control=False, stream_recv_buffer=64 * KiB, stalled_stream_timeout=0.5,
                              session_timeout=30)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            took, flooded, closed = await _floods_then_echo(server, 1, 4096 * KiB)
            assert took < 5, f"the echo took {took:.1f}s: the stalled stream was not reset at its time"
            assert isinstance(flooded[0].exception, ft.StreamResetError) and not closed

    run(body, timeout=60)


def test_a_session_over_its_budget_resets_the_stream_holding_the_most(run):
    async def body():
        cfg = ft.ServerConfig(flow_control=False, stream_recv_buffer=200 * KiB, session_recv_budget=256 * KiB,
                              stalled_stream_timeout=0.5, session_timeout=30)
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg) as server:
            took, flooded, closed = await _floods_then_echo(server, 3, 150 * KiB)
            assert took < 5, f"the echo took {took:.1f}s: nothing was reset while over the budget"
            reset = [f for f in flooded if isinstance(f.exception, ft.StreamResetError)]
            assert len(reset) == 1 and not closed, [f.exception for f in flooded]  # one was enough

    run(body, timeout=60)


def test_the_budget_resets_no_open_stream_when_ended_streams_hold_the_excess():
    """Bytes of streams that already ended (their readers are slow) count in what the session
    holds, but resetting an open stream frees none of them: no open stream is reset then (before,
    one was every ``stalled_stream_timeout``, whatever little it held)."""
    from test_core import pair, pump

    client, server, rc, rs = pair(flow=False, window=4096, stream_recv_buffer=128 * KiB,
                                  session_recv_budget=64 * KiB, stalled_stream_timeout=0.5)
    rc.auto_consume = False
    done = server.open_stream()
    server.send(done, b"a" * (100 * KiB))
    server.send_eof(done)
    live = server.open_stream()
    server.send(live, b"b" * (10 * KiB))
    pump(server, client)
    ended = next(st for st in rc.opened if st.id == done.id)
    client.send_eof(ended)  # both halves ended: it leaves the session, its 100 KiB unread stays counted
    assert ended.id not in client.streams and client.windows.total_unread == 110 * KiB
    client.tick(1.0)
    client.tick(3.0)
    assert rc.resets == {}, rc.resets
