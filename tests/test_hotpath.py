"""The per-frame fast paths of the flow windows do what the plain steps do: ``take`` is
``arrived`` then ``delivered``, and ``consumed`` (which skips ``grant`` while too little is owed)
returns and leaves what ``owed += n; grant()`` does (plain calls). (That the read path's shortcut
past its pause checks still pauses a flow-controlled peer that never reads is
test_hardening_edge's ``test_a_peer_that_never_reads_cannot_grow_our_replies[flow]``.)"""

from __future__ import annotations

import asyncio

from hypothesis import example, given, settings
from hypothesis import strategies as st

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.config import StreamConfig
from ferrotunnel.frames import Protocol, StreamPriority
from ferrotunnel.protocol.flow import FLOW_PLUGIN_ID, FlowWindows, decode_credit
from ferrotunnel.protocol.streams import CoreStream, StreamEvent

from conftest import tunnel
from test_core import pair, pump

TOKEN = "hotpath-token-123"
FIELDS = ("state", "recv_avail", "unread", "owed", "window", "discarding")


def mkstream(sid: int, window: int) -> CoreStream:
    return CoreStream(sid, Protocol.TCP, StreamPriority.NORMAL, True, send_credit=0, window=window)


def snapshot(fw: FlowWindows, streams: list) -> tuple:
    return (fw.total_unread, dict(fw.over_limit), sorted(s.id for s in fw.deferred),
            [tuple(getattr(s, f) for f in FIELDS) for s in streams])


def reference_consumed(fw: FlowWindows, s: CoreStream, n: int) -> int:
    """FlowWindows.consumed as it was written before the fast path: every step, always grant().
    (The count never goes below what the stream holds; the credit for all ``n`` is still owed.)"""
    held = min(n, s.unread)
    s.unread -= held
    fw.total_unread -= held
    if s.id in fw.over_limit and s.unread <= fw.stream_limit // 2:
        del fw.over_limit[s.id]
    if fw.enabled and s.receiving:
        s.owed += n
        return fw.grant(s)
    return 0


OPS = st.lists(st.tuples(st.sampled_from(["data", "data", "consume", "consume", "discard", "eof", "shut", "overrun"]),
                         st.integers(0, 2), st.integers(0, 40)), max_size=150)


@settings(max_examples=500, deadline=None, database=None)
@given(enabled=st.booleans(), ops=OPS)
# without flow control: over stream_recv_buffer (15 > 12), then read down to exactly half of it (6)
@example(enabled=False, ops=[("data", 0, 4)] * 3 + [("consume", 0, 3)] * 2 + [("consume", 0, 0)])
def test_the_fast_paths_match_the_plain_steps(enabled, ops):
    # small numbers, so that the thresholds (window / 2, stream_recv_buffer, the budget) are hit exactly
    conf = StreamConfig(initial_window=8, max_window=32, stream_recv_buffer=12, session_recv_budget=20)
    fast, plain = FlowWindows(conf, enabled), FlowWindows(conf, enabled)
    fs = [mkstream(2 * i + 1, 8) for i in range(3)]
    ps = [mkstream(2 * i + 1, 8) for i in range(3)]
    now = 0.0
    for op, i, k in ops:
        now += 0.25
        f, p = fs[i], ps[i]
        if op == "data" and f.receiving and not f.discarding:
            n = 1 + k % (f.recv_avail if enabled and f.recv_avail else 6)
            ok = plain.arrived(p, n)
            if ok:
                plain.delivered(p, n, now)
            assert fast.take(f, n, now) == ok
        elif op == "overrun" and enabled:
            n = f.recv_avail + 1 + k % 5
            assert not fast.take(f, n, now) and not plain.arrived(p, n)
        elif op == "consume" and f.unread:
            n = 1 + k % min(f.unread, 4)
            assert fast.consumed(f, n) == reference_consumed(plain, p, n)
        elif op == "consume" and f.discarding:  # a sink hands back bytes it had before the close
            n = 1 + k % 4
            assert fast.consumed(f, n) == reference_consumed(plain, p, n)
        elif op == "discard" and not f.discarding:
            for w, s in ((fast, f), (plain, p)):
                s.discarding = True
                w.drop_unread(s)
        elif op == "eof" and f.receiving:  # the peer's CloseStream: no more credit for this stream
            f.move(StreamEvent.RECV_EOF)
            p.move(StreamEvent.RECV_EOF)
        elif op == "shut" and not f.local_eof:  # our CloseStream: the peer may still send
            f.move(StreamEvent.SEND_EOF)
            p.move(StreamEvent.SEND_EOF)
        assert snapshot(fast, fs) == snapshot(plain, ps)


def test_the_core_data_path_cases():
    """SessionCore's per-frame path, case by case: delivered; empty (nothing delivered); beyond
    the window (the stream is reset, the peer told); on a closed stream (given back at once)."""
    client, server, rc, rs = pair(window=1000)
    rc.auto_consume = False
    st = server.open_stream()
    server.send(st, b"a" * 600)
    pump(server, client)
    peer = rc.opened[0]
    assert rc.data[st.id] == b"a" * 600 and peer.unread == 600 and peer.recv_avail == 400
    assert client.windows.total_unread == 600

    delivered = []
    rc.on_stream_data = lambda s, payload: delivered.append(bytes(payload))  # type: ignore[method-assign]
    client.receive(F.encode(F.Data(stream_id=st.id, data=b"")), 2.0)  # empty: nothing to deliver
    assert delivered == [] and st.id not in rc.resets and not client.has_output
    del rc.on_stream_data

    client.receive(F.encode(F.Data(stream_id=st.id, data=b"b" * 401)), 2.0)  # one byte past the window
    assert "flow-control window" in str(rc.resets[st.id]) and peer.recv_avail == 400  # nothing taken
    assert rc.data[st.id] == b"a" * 600
    told = [f for f in F.FrameDecoder().feed(b"".join(bytes(x) for x in client.data_to_send(1 << 20, 1 << 30)))]
    assert any(isinstance(f, F.Error) and f.stream_id == st.id for f in told)

    st2 = server.open_stream()
    server.send(st2, b"c" * 10)
    pump(server, client)
    peer2 = rc.opened[1]
    client.send(peer2, b"e" * 1500)  # past the server's window: 500 wait, so the stream stays open
    client.data_to_send(1 << 20, 1 << 30)
    client.close(peer2)  # our reader is gone: what still arrives is discarded and given back
    assert peer2.discarding and peer2.receiving
    client.receive(F.encode(F.Data(stream_id=st2.id, data=b"d" * 300)), 3.0)
    assert rc.data[st2.id] == b"c" * 10  # not delivered
    back = [f for f in F.FrameDecoder().feed(b"".join(bytes(x) for x in client.data_to_send(1 << 20, 1 << 30)))]
    credit = [decode_credit(f.data) for f in back if isinstance(f, F.PluginData) and f.plugin_id == FLOW_PLUGIN_ID]
    assert credit == [[(st2.id, 300)]]


def test_ping_pong_through_a_bridged_tunnel_flushes_each_sink_once_per_read(run):
    """Small ping-pongs and a bulk transfer through TcpIngress -> tunnel -> local echo server:
    every byte comes back in order, and after each read the list of sinks to flush is empty
    again on both ends (it is reused, cleared in place)."""
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def body():
        app = await asyncio.start_server(echo, "127.0.0.1", 0)
        cfg = ft.ClientConfig(local_addr=app.sockets[0].getsockname()[:2])
        async with tunnel(None, client_config=cfg) as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="t1") as ingress:
                r, w = await asyncio.open_connection(*ingress.address)
                ends = (session.connection, client.session.connection)
                sinks = [c.dirty_sinks for c in ends]
                for i in range(200):
                    msg = b"%d-" % i * 8
                    w.write(msg)
                    assert await asyncio.wait_for(r.readexactly(len(msg)), 5) == msg
                    if i:  # (a sink attached after its first data arrived is listed until the next read)
                        assert [c.dirty_sinks for c in ends] == [[], []]
                big = bytes(range(256)) * 4096  # 1 MiB: many frames and reads
                w.write(big)
                assert await asyncio.wait_for(r.readexactly(len(big)), 10) == big
                assert [c.dirty_sinks for c in ends] == [[], []]
                assert all(c.dirty_sinks is s for c, s in zip(ends, sinks))  # the same lists
                w.close()
        app.close()
    run(body)


class _RedeferringSink:
    """A user sink whose ``flush_out`` asks for another flush (``defer_flush``) while it is "not
    drained yet": each read of the tunnel may flush it only as often as it was deferred before."""

    def __init__(self, stream, limit: int) -> None:
        self.stream, self.flushes, self.limit = stream, 0, limit

    def tunnel_data(self, payload) -> None:
        self.stream.consumed(len(payload))
        self.stream.defer_flush(self)

    def tunnel_eof(self) -> None:
        pass

    def tunnel_reset(self, exc) -> None:
        pass

    def tunnel_writable(self) -> None:
        pass

    def flush_out(self) -> None:
        self.flushes += 1
        if self.flushes < self.limit:
            self.stream.defer_flush(self)


def test_a_sink_that_defers_again_in_flush_out_waits_for_the_next_read(run):
    sinks: list = []
    ready = asyncio.Event()

    async def handler(stream):
        sink = _RedeferringSink(stream, 1000)
        sinks.append(sink)
        stream.attach_sink(sink)
        ready.set()
        await asyncio.sleep(5)

    async def body():
        async with tunnel(handler) as (server, client, session):
            s = await session.open_stream()
            s.write(b"hello")
            await asyncio.wait_for(ready.wait(), 10)
            async with asyncio.timeout(10):
                while sinks[0].flushes == 0:
                    await asyncio.sleep(0.01)
            before = sinks[0].flushes
            s.write(b"x")
            await s.drain()
            await asyncio.sleep(0.2)
            # one read flushes what was deferred before it (at most a few), never until the limit
            assert sinks[0].flushes - before < 10, sinks[0].flushes - before
            s.abort()

    run(body)
