"""Read sizes follow the traffic (aio/readsize.py): a tunnel connection's and a forwarded TCP
connection's reads start at 256 KiB; after a read that fills half the buffer the next are the
largest (``read_buffer_size`` / ``BRIDGE_READ_SIZE``, 1 MiB). A forwarded connection's nearly empty
reads halve the size (down to ``MIN_READ``); a tick of a tunnel connection's timer lets its last
read buffer go and brings its size back to 256 KiB."""

from __future__ import annotations

import asyncio

import pytest

import ferrotunnel as ft
from ferrotunnel.aio import bridge
from ferrotunnel.aio.connection import FIRST_READ, TunnelConnection
from ferrotunnel.aio.readsize import MIN_READ, adapt_read_size
from ferrotunnel.config import StreamConfig

from conftest import tunnel

KiB, MiB = 1024, 1024 * 1024


def test_adapt_read_size_jumps_up_halves_down_and_stays_in_bounds():
    size, seen = FIRST_READ, []
    for fill in (0.5, 0.2, 0.2, 1.0):  # half full: the maximum at once, which then holds
        size = adapt_read_size(size, int(size * fill), 1 * MiB)
        seen.append(size)
    assert seen == [1 * MiB] * 4
    assert adapt_read_size(FIRST_READ, FIRST_READ // 2 - 1, 1 * MiB) == FIRST_READ  # just under half
    for _ in range(8):  # nearly empty reads: halving down to MIN_READ
        size = adapt_read_size(size, 73, 1 * MiB)
    assert size == MIN_READ
    assert adapt_read_size(MIN_READ, MIN_READ // 4, 1 * MiB) == MIN_READ  # the middle: unchanged
    assert adapt_read_size(4096, 4096, 4096) == 4096  # a maximum below MIN_READ is kept
    assert adapt_read_size(4096, 1, 4096) == 4096
    # the sizes are shared int objects (an idle connection keeps one: no int of its own)
    top = 1 * MiB
    assert adapt_read_size(FIRST_READ, FIRST_READ, top) is top
    assert adapt_read_size(top, 1, top) is adapt_read_size(top, 1, 1 * MiB)


def test_defaults():
    assert StreamConfig().read_buffer_size == 1 * MiB and FIRST_READ == 256 * KiB
    assert bridge.BRIDGE_READ_SIZE == 1 * MiB and bridge.BRIDGE_FIRST_READ == 256 * KiB


class _Recording(TunnelConnection):
    """A connection still in its handshake phase: what it reads goes to ``handshake_data``."""

    def handshake_data(self, data):
        self.got.append(len(data))


@pytest.mark.parametrize("limit", [1 * MiB, 300 * KiB, 16 * KiB])
def test_a_tunnel_connection_reads_more_while_reads_come_back_full(limit):
    loop = asyncio.new_event_loop()
    try:
        conn = _Recording(loop, StreamConfig(read_buffer_size=limit))
        conn.got = []
        sizes = []

        def read(fill: float) -> None:
            buf = conn.get_buffer(-1)
            assert len(buf) >= conn.read_size  # the buffer handed out is (at least) the read size
            sizes.append(conn.read_size)
            n = max(1, int(conn.read_size * fill))
            buf[:n] = b"x" * n
            conn.buffer_updated(n)

        read(0.4)  # under half: unchanged
        for _ in range(5):
            read(1.0)
        for _ in range(8):  # small reads do not shrink it (the timer tick does)
            read(0.001)
        first = min(FIRST_READ, limit)
        assert sizes[:3] == [first, first, limit] and conn.read_size == limit
        assert all(s <= limit for s in sizes)
        assert conn.got[1:3] == [first, limit]  # one full read: the largest reads at once
    finally:
        loop.close()


def test_a_timer_tick_lets_the_read_buffer_go_and_caps_the_read_size(run):
    """Between reads a connection holds its last read buffer; a tick of its timer (heartbeat,
    timeout checks) drops it and brings the next read back to at most FIRST_READ, so a session
    that moved bulk data and then went quiet does not keep a 1 MiB buffer."""
    async def body():
        async with tunnel() as (server, client, session):
            s = await session.open_stream()
            for _ in range(8):
                s.write(b"z" * (512 * KiB))
                await s.drain()
                await s.readexactly(512 * KiB)
            s.write_eof()
            assert await s.read() == b""
            for conn in (session.connection, client.session.connection):
                assert conn._rbuf is not None  # the last read's buffer, kept until the next read
                conn._read_size = 1 * MiB  # as after full reads
                conn._on_timer()  # what the loop runs at the connection's next deadline
                assert conn._rbuf is None and conn.read_size == FIRST_READ
            s2 = await session.open_stream()  # the next read takes a fresh buffer
            s2.write(b"ping")
            s2.write_eof()
            assert await s2.read() == b"ping"
            assert len(client.session.connection._rbuf) <= FIRST_READ
    run(body, timeout=60)


def test_a_forwarded_connection_reads_up_to_bridge_read_size():
    """A bridge's reads (before its stream is attached, the bytes are kept for it) grow from
    BRIDGE_FIRST_READ to BRIDGE_READ_SIZE while they come back full, then shrink on small ones."""
    b = bridge.TcpBridge()
    sizes = []
    for fill in [1.0] * 4 + [0.0] * 6:
        buf = b.get_buffer(-1)
        room = len(buf)  # the header's room is in front of the view
        sizes.append(room + ft.frames.DATA_HEADER_SIZE)
        n = max(1, int(room * fill))
        buf[:n] = b"y" * n
        b.buffer_updated(n)
    assert sizes[:4] == [256 * KiB, 1 * MiB, 1 * MiB, 1 * MiB]
    assert sizes[-1] == MIN_READ


def test_an_idle_sweep_lets_a_forwarded_connections_unused_read_buffer_go():
    """A read that fills its buffer is followed by another try that may find nothing: the buffer
    taken for it (up to BRIDGE_READ_SIZE) goes at the next idle sweep, not at the next read."""
    b = bridge.TcpBridge()
    buf = b.get_buffer(-1)
    n = len(buf)
    buf[:n] = b"y" * n
    b.buffer_updated(n)  # a full read: the next is BRIDGE_READ_SIZE
    b.get_buffer(-1)  # the loop's next try, which finds nothing (no buffer_updated)
    assert len(b.read_buffer()) == bridge.BRIDGE_READ_SIZE
    assert b.idle_tick() == 0
    with pytest.raises(AssertionError):
        b.read_buffer()  # gone
    buf = b.get_buffer(-1)  # and a later read gets a fresh one
    buf[:3] = b"abc"
    b.buffer_updated(3)
