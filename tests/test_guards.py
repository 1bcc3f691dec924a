"""Guards for invariants a mutation could break without the rest of the suite noticing.

Each test names the mutation it catches (the test-suite audit of issue 10): flow-control
windows spent frame by frame and credit added to what is left, the pending-handshake cap at its
exact edge, the whole token compared, backoff starting over after a successful connection,
reading resumed when a paused reader catches up, the idle sweep's tick count, and stream
priorities seen end to end through a real tunnel.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time

import pytest

import ferrotunnel as ft
from conftest import tunnel
from ferrotunnel import frames as F
from ferrotunnel.aio import IdleSweeper, TcpBridge
from ferrotunnel.config import StreamConfig
from ferrotunnel.protocol import FLOW_PLUGIN_ID, FlowWindows
from ferrotunnel.protocol.flow import encode_credit
from ferrotunnel.protocol.streams import CoreStream
from test_core import pair, pump

KiB = 1024
MiB = 1024 * KiB


def _wire_frames(core):
    return F.FrameDecoder().feed(b"".join(bytes(x) for x in core.data_to_send(1 << 30, 1 << 30)))


# ---------------------------------------------------------------- flow control (sans-IO)


def test_receive_window_is_spent_by_every_frame():
    """Mutation: ``st.recv_avail -= n`` dropped from ``FlowWindows.arrived``. Each frame fits the
    window on its own; together they overrun it, and that must be caught."""
    windows = FlowWindows(StreamConfig(initial_window=1000, max_window=4000), enabled=True)
    st = CoreStream(2, ft.Protocol.TCP, ft.StreamPriority.NORMAL, False, 1000, 1000)
    assert windows.arrived(st, 600) and st.recv_avail == 400
    assert windows.arrived(st, 400) and st.recv_avail == 0
    assert not windows.arrived(st, 1)  # nothing left until credit is granted

    # the same through the session core: a peer ignoring its window is reset with PROTOCOL_ERROR
    client, server, rc, rs = pair(window=1000)
    rc.auto_consume = False  # the reader takes nothing: no credit goes back
    st = server.open_stream()
    pump(server, client)
    peer = client.streams[st.id]
    client.receive(F.encode(F.Data(stream_id=st.id, data=b"a" * 600)), 1.0)
    assert peer.recv_avail == 400 and st.id in client.streams and not rc.resets
    client.receive(F.encode(F.Data(stream_id=st.id, data=b"b" * 600)), 1.0)  # 1200 > 1000 granted
    assert st.id in rc.resets and st.id not in client.streams
    err, = [f for f in _wire_frames(client) if isinstance(f, F.Error)]
    assert err.stream_id == st.id and err.code == ft.ErrorCode.PROTOCOL_ERROR
    assert bytes(rc.data[st.id]) == b"a" * 600  # the overrunning bytes were not delivered


def test_credit_adds_to_what_is_left():
    """Mutation: ``send_credit += inc`` -> ``send_credit = inc`` in ``SessionCore.on_credit``. Credit
    that arrives while some is left must add to it, not replace it."""
    client, server, rc, rs = pair(window=1000)
    rc.auto_consume = False
    st = server.open_stream()
    server.send(st, b"x" * 300)
    pump(server, client)
    assert st.send_credit == 700
    # the peer grants 100 more (a flow-control update, as its core would send it)
    server.receive(F.encode(F.PluginData(FLOW_PLUGIN_ID, encode_credit(st.id, 100))), 2.0)
    assert st.send_credit == 800
    server.send(st, b"y" * 5000)
    sent = sum(len(f.data) for f in _wire_frames(server) if isinstance(f, F.Data))
    assert sent == 800 and st.send_credit == 0  # what was left plus the grant, not the grant alone
    # two updates in one frame add up too
    server.receive(F.encode(F.PluginData(FLOW_PLUGIN_ID, encode_credit(st.id, 50) + encode_credit(st.id, 70))), 3.0)
    assert sum(len(f.data) for f in _wire_frames(server) if isinstance(f, F.Data)) == 120


# ---------------------------------------------------------------- the server's limits and the token


def test_pending_handshake_cap_is_exact(run):
    """Mutation: ``>=`` -> ``>`` on ``max_pending_handshakes`` in ``TunnelServer.admit``. With a
    cap of 3, three silent connections wait in their handshake and the fourth is refused at once;
    when one of the three goes, a real client gets the slot."""
    async def body():
        cfg = ft.ServerConfig(max_pending_handshakes=3, handshake_timeout=30)
        async with ft.TunnelServer(("127.0.0.1", 0), "secret-token", config=cfg) as server:
            silent = []
            for _ in range(3):
                silent.append(await asyncio.open_connection(*server.address))
                while server.pending_handshakes < len(silent):
                    await asyncio.sleep(0.01)
            assert server.pending_handshakes == 3
            r4, w4 = await asyncio.open_connection(*server.address)
            try:
                got = await asyncio.wait_for(r4.read(), 3)  # refused: closed at once
            except ConnectionResetError:
                got = b""
            assert got == b"" and server.pending_handshakes == 3
            for r, _ in silent:  # the three are still waiting, not closed
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(r.read(1), 0.05)
            silent[0][1].close()
            while server.pending_handshakes > 2:
                await asyncio.sleep(0.01)
            host, port = server.address
            client = ft.TunnelClient(f"{host}:{port}", "secret-token", tunnel_id="gets-the-slot")
            await asyncio.wait_for(client.connect(), 5)
            assert server.sessions.get_by_tunnel_id("gets-the-slot") is not None
            await client.close()
            w4.close()
            for _, w in silent[1:]:
                w.close()
    run(body)


LONG_TOKEN = "".join(chr(0x21 + i % 94) for i in range(256))  # the longest token allowed


@pytest.mark.parametrize("wrong", [
    LONG_TOKEN[:-1] + ("!" if LONG_TOKEN[-1] != "!" else "#"),  # differs in the last byte only
    LONG_TOKEN[:-1],                                             # a prefix
    LONG_TOKEN[:32],                                             # a short prefix
    LONG_TOKEN[0],
])
def test_the_whole_token_is_compared(wrong):
    """Mutation: only a prefix of the token compared (``constant_time_eq`` or the server's use of it)."""
    assert ft.constant_time_eq(LONG_TOKEN, LONG_TOKEN) and ft.constant_time_eq(LONG_TOKEN.encode(), LONG_TOKEN)
    assert not ft.constant_time_eq(wrong, LONG_TOKEN) and not ft.constant_time_eq(LONG_TOKEN, wrong)
    assert not ft.constant_time_eq(wrong.encode(), LONG_TOKEN.encode())


def test_server_refuses_a_token_that_differs_only_at_the_end(run):
    async def body():
        cfg = ft.ServerConfig(auth_failure_threshold=100)  # about the comparison, not throttling
        async with ft.TunnelServer(("127.0.0.1", 0), LONG_TOKEN, config=cfg) as server:
            host, port = server.address
            short = LONG_TOKEN[:128]
            for wrong in (LONG_TOKEN[:-1] + "#", LONG_TOKEN[:-1], short):
                with pytest.raises(ft.AuthenticationError):
                    await ft.TunnelClient(f"{host}:{port}", wrong, tunnel_id="t").connect()
            assert server.handshake_failures["INVALID_TOKEN"] == 3 and len(server.sessions) == 0
        async with ft.TunnelServer(("127.0.0.1", 0), short, config=cfg) as server:
            host, port = server.address
            with pytest.raises(ft.AuthenticationError):  # the server's token is the prefix here
                await ft.TunnelClient(f"{host}:{port}", LONG_TOKEN, tunnel_id="t").connect()
            ok = ft.TunnelClient(f"{host}:{port}", short, tunnel_id="t")
            await ok.connect()
            await ok.close()
    run(body)


# ---------------------------------------------------------------- the client


def test_backoff_starts_over_after_each_successful_connection(run, caplog):
    """Mutation: ``backoff.reset()`` dropped after a successful connect in ``connect_and_run``.
    The server ends each session once it lasted ``stable_after``; every reconnect waits the base
    delay again."""
    async def body():
        backoff = ft.BackoffConfig(base=0.2, factor=4, jitter=0, max_delay=30, stable_after=0.1)
        cfg = ft.ClientConfig(backoff=backoff)
        async with ft.TunnelServer(("127.0.0.1", 0), "secret-token") as server:
            host, port = server.address
            client = ft.TunnelClient(f"{host}:{port}", "secret-token", tunnel_id="bouncy", config=cfg)
            connected: list = []
            task = asyncio.create_task(client.connect_and_run(on_connected=lambda s: connected.append(time.monotonic())))
            gaps = []
            try:
                for i in range(4):
                    while len(connected) <= i:
                        await asyncio.sleep(0.005)
                    s = await server.wait_for_session("bouncy", timeout=5)
                    await asyncio.sleep(0.15)  # (the session lasted: stable_after)
                    closed_at = time.monotonic()
                    s.close()
                    try:
                        async with asyncio.timeout(2):
                            while len(connected) <= i + 1:
                                await asyncio.sleep(0.005)
                    except TimeoutError:
                        pytest.fail(f"reconnect {i + 1} took over 2 s (gaps so far {gaps}): the backoff kept growing")
                    gaps.append(connected[i + 1] - closed_at)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            assert all(0.19 <= g < 0.7 for g in gaps), gaps  # base every time, not 0.2, 0.8, 3.2, ...
    caplog.set_level(logging.WARNING, logger="ferrotunnel.client")
    run(body, timeout=30)
    delays = re.findall(r"reconnecting in ([0-9.]+)s", caplog.text)
    assert delays[:4] == ["0.2"] * 4, delays


def test_reading_resumes_when_a_paused_reader_catches_up(run):
    """Mutation: ``TunnelConnection.consumed`` no longer calls ``_maybe_resume``. Without flow
    control (a Rust-style peer: nothing bounds what it sends but our reading), the client stops
    reading the tunnel while a slow stream holds more than ``stream_recv_buffer``; reading must
    resume as the stream is read, or the transfer stalls for good."""
    async def body():
        cc = ft.ClientConfig(flow_control=False, stream_recv_buffer=64 * KiB)
        data = bytes(range(256)) * (16 * KiB)  # 4 MiB
        paused_seen = []

        async def slow(stream):
            h = hashlib.sha256()
            n = 0
            while True:
                if stream.session.connection.read_paused:
                    paused_seen.append(n)
                chunk = await stream.read(16 * KiB)
                if not chunk:
                    break
                h.update(chunk)
                n += 1
                if n % 8 == 0:
                    await asyncio.sleep(0.001)
            stream.write(h.digest())
            stream.write_eof()

        async with tunnel(slow, client_config=cc) as (server, client, session):
            assert not session.flow_control
            s = await session.open_stream()
            s.write(data)
            s.write_eof()
            try:
                digest = await asyncio.wait_for(s.readexactly(32), 10)
            except TimeoutError:
                pytest.fail("transfer stalled: the paused tunnel never resumed")
            assert digest == hashlib.sha256(data).digest()
            assert paused_seen, "the client never paused reading: the test did not test anything"
    run(body)


# ---------------------------------------------------------------- the idle sweep


class _CountingBridge(TcpBridge):
    __slots__ = ("ticks", "closed_after")

    def __init__(self) -> None:
        super().__init__()
        self.ticks = 0
        self.closed_after = None

    def idle_tick(self) -> int:
        self.ticks += 1
        return super().idle_tick()

    def abort(self, *args, **kwargs) -> None:
        self.closed_after = self.ticks
        super().abort(*args, **kwargs)


def test_idle_sweep_closes_on_the_third_silent_sweep(run):
    """Mutation: the idle sweep's tick count (``IDLE_TICKS``, or ``>=`` in ``_sweep``). A sweep
    runs every half timeout; a bridge silent from the start survives the sweeps at 0.5 and 1
    timeout and is closed by the one at 1.5: counted in sweeps, so load cannot blur it."""
    async def body():
        timeout = 0.2
        sweeper = IdleSweeper(timeout)
        loop = asyncio.get_running_loop()
        silent = _CountingBridge()
        t0 = loop.time()
        sweeper.add(silent)
        while not silent.finished and silent.ticks < 10:
            await asyncio.sleep(0.01)
        elapsed = loop.time() - t0
        sweeper.close()
        assert silent.closed_after == 3, f"closed by sweep {silent.closed_after}, not the third"
        assert elapsed >= 1.5 * timeout - 0.01
        assert silent not in sweeper.bridges
    run(body)


def test_ingress_closes_a_silent_visitor_between_one_and_one_and_a_half_timeouts(run):
    """The same end to end: a silent visitor of a TCP ingress goes after 1 to 1.5 idle timeouts
    (1.5 here, as it arrived first), a chatty one on the same ingress stays."""
    async def body():
        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
            writer.close()

        backend = await asyncio.start_server(echo, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=backend.sockets[0].getsockname()[:2])
        timeout = 1.0
        async with tunnel(None, client_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0), idle_timeout=timeout) as ingress:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                quiet_r, quiet_w = await asyncio.open_connection(*ingress.address)
                chatty_r, chatty_w = await asyncio.open_connection(*ingress.address)

                async def chat():
                    while True:
                        chatty_w.write(b".")
                        assert await chatty_r.readexactly(1) == b"."
                        await asyncio.sleep(timeout / 6)

                chatter = asyncio.create_task(chat())
                try:
                    try:
                        assert await asyncio.wait_for(quiet_r.read(), 5) == b""
                    except ConnectionResetError:
                        pass  # an idle close may be an abort
                    closed = loop.time() - t0
                    # it arrived first: the sweeps run at 0.5, 1 and 1.5 timeouts after it came
                    assert 1.4 * timeout <= closed <= 1.85 * timeout, closed
                    await asyncio.sleep(2.5 * timeout - closed)
                    assert not chatter.done(), "the chatty visitor was closed too"
                finally:
                    chatter.cancel()
                    await asyncio.gather(chatter, return_exceptions=True)
                chatty_w.close()
                quiet_w.close()
        backend.close()
    run(body)


# ---------------------------------------------------------------- priorities end to end


def test_urgent_streams_overtake_queued_bulk_through_a_real_tunnel(run):
    """Mutation: all priorities on one level in the scheduler (only round-robin left). The server
    queues bulk on 64 LOW streams, more than the connection can take at once; then HIGH and
    CRITICAL streams send a few bytes. At the client, those arrive before any LOW byte that was
    still queued when they were sent (with one level they wait a round of 64 LOW frames), and
    CRITICAL before HIGH."""
    async def body():
        low_streams, per_stream = 64, 512 * KiB
        got_low = 0
        arrivals: list = []  # (priority, LOW bytes received by then)
        low_digests: dict = {}

        async def handler(stream):
            nonlocal got_low
            if stream.priority == ft.StreamPriority.LOW:
                h = hashlib.sha256()
                async for chunk in stream:
                    got_low += len(chunk)
                    h.update(chunk)
                low_digests[stream.stream_id] = h.digest()
            else:
                msg = await stream.readexactly(100)
                arrivals.append((stream.priority, got_low, msg))
                await stream.read()
            stream.write(b"ok")
            stream.write_eof()

        # the client's windows let the whole bulk into the server's scheduler at once
        cc = ft.ClientConfig(initial_window=per_stream, max_window=per_stream)
        sc = ft.ServerConfig(max_queued_output=1 << 30)
        async with tunnel(handler, server_config=sc, client_config=cc) as (server, client, session):
            assert session.flow_control
            bulk = bytes(range(256)) * (per_stream // 256)
            lows = [session.open_stream_nowait(ft.Protocol.TCP, ft.StreamPriority.LOW) for _ in range(low_streams)]
            for s in lows:  # no await in between: the client cannot read meanwhile
                s.write(bulk)
            high = session.open_stream_nowait(ft.Protocol.TCP, ft.StreamPriority.HIGH)
            high.write(b"H" * 100)
            critical = session.open_stream_nowait(ft.Protocol.TCP, ft.StreamPriority.CRITICAL)
            critical.write(b"C" * 100)
            handed_out = session.stats().bytes_out  # everything on its way before the urgent bytes
            queued_low = low_streams * per_stream - handed_out
            assert queued_low >= 8 * MiB, "the bulk did not queue: nothing to overtake"
            for s in (high, critical, *lows):
                s.write_eof()
            for s in (high, critical, *lows):
                assert await asyncio.wait_for(s.read(), 60) == b"ok"
            assert low_digests and all(d == hashlib.sha256(bulk).digest() for d in low_digests.values())
            assert len(low_digests) == low_streams
            (first, low_before_first, m1), (second, low_before_second, m2) = arrivals
            assert (first, second) == (ft.StreamPriority.CRITICAL, ft.StreamPriority.HIGH), arrivals
            assert m1 == b"C" * 100 and m2 == b"H" * 100
            # of the LOW bytes seen first, none was still queued when the urgent ones were sent (one
            # tunnel read of slack: handlers woken by the same read may run before the urgent one)
            slack = 2 * client.config.read_buffer_size
            for _, low_before, _ in arrivals:
                assert low_before <= handed_out + slack, (low_before, handed_out, queued_low)
    run(body, timeout=120)
