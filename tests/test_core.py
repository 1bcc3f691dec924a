"""The sans-IO session core driven with plain calls: no sockets, no event loop, time passed in."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.config import StreamConfig
from ferrotunnel.protocol import EXT_CAPABILITY, FLOW_PLUGIN_ID, SessionCore, flow_capability, parse_flow_capability


class Recorder:
    def __init__(self) -> None:
        self.opened: List[Any] = []
        self.data: Dict[int, bytearray] = {}
        self.eof: set = set()
        self.resets: Dict[int, Exception] = {}
        self.errors: List[Exception] = []
        self.core: Any = None
        self.auto_consume = True

    def on_stream_opened(self, st):
        self.opened.append(st)

    def on_stream_data(self, st, payload):
        self.data.setdefault(st.id, bytearray()).extend(payload)
        if self.auto_consume:
            self.core.consumed(st, len(payload))

    def on_stream_eof(self, st):
        self.eof.add(st.id)

    def on_stream_reset(self, st, exc):
        self.resets[st.id] = exc

    def on_stream_writable(self, st):
        pass

    def on_session_error(self, exc):
        self.errors.append(exc)

    def on_output(self):
        pass


def caps(ext=True, window=None):
    c = ["basic", "tcp"]
    if ext:
        c.append(EXT_CAPABILITY)
    if window:
        c.append(flow_capability(window))
    return c


def pair(flow=True, window=4096, ext=True, **cfg):
    config = StreamConfig(initial_window=window, max_window=window * 4, **cfg)
    rc, rs = Recorder(), Recorder()
    client = SessionCore(is_client=True, config=config, listener=rc, now=0.0,
                         peer_capabilities=caps(ext, window if flow else None))
    server = SessionCore(is_client=False, config=config, listener=rs, now=0.0,
                         peer_capabilities=caps(ext, window if flow else None))
    rc.core, rs.core = client, server
    return client, server, rc, rs


def pump(a, b, rounds=50):
    """Move bytes both ways until quiet; returns the frames each side sent."""
    sent_a, sent_b = [], []
    for _ in range(rounds):
        moved = False
        for src, dst, log in ((a, b, sent_a), (b, a, sent_b)):
            while src.has_output:
                wire = b"".join(bytes(x) for x in src.data_to_send(1 << 20, 1 << 30))
                log += [f for f in F.FrameDecoder().feed(wire)]
                dst.receive(wire, 1.0)
                moved = True
        if not moved:
            break
    return sent_a, sent_b


def test_open_data_eof_round_trip():
    client, server, rc, rs = pair()
    st = server.open_stream(ft.Protocol.TCP, ft.StreamPriority.HIGH)
    server.send(st, b"hello")
    server.send_eof(st)
    pump(server, client)
    peer = rc.opened[0]
    assert peer.id == 2 and peer.priority == ft.StreamPriority.HIGH and peer.protocol == ft.Protocol.TCP
    assert rc.data[2] == b"hello" and 2 in rc.eof
    client.send(peer, b"bye")
    client.send_eof(peer)
    pump(client, server)
    assert rs.data[2] == b"bye" and 2 in rs.eof
    assert not client.streams and not server.streams  # both CloseStreams exchanged: slots freed


def test_flow_control_caps_in_flight_and_credit_resumes():
    client, server, rc, rs = pair(window=1000)
    rc.auto_consume = False
    st = server.open_stream()
    server.send(st, b"x" * 5000)
    sent, _ = pump(server, client)
    assert sum(len(f.data) for f in sent if isinstance(f, F.Data)) == 1000  # only the window went out
    peer = rc.opened[0]
    client.consumed(peer, 1000)  # the reader takes it: credit flows back in PluginData
    _, back = pump(server, client)
    updates = [f for f in back if isinstance(f, F.PluginData)]
    assert updates and updates[0].plugin_id == FLOW_PLUGIN_ID
    assert len(rc.data[st.id]) > 1000


def test_window_grows_while_reader_keeps_up():
    client, server, rc, rs = pair(window=1000)
    st = server.open_stream()
    server.send(st, b"y" * 20000)
    pump(server, client)
    peer = client.streams[st.id]
    assert len(rc.data[st.id]) == 20000 and peer.window == 4000  # doubled up to max_window


def test_no_extension_frames_to_a_rust_peer():
    client, server, rc, rs = pair(flow=False, ext=False)
    st = server.open_stream()
    server.send(st, b"z" * 300_000)
    server.reset(st)
    server.tick(30.0)  # a server heartbeats only peers of this package
    sent, back = pump(server, client)
    assert not any(isinstance(f, (F.PluginData, F.Error, F.Heartbeat)) for f in sent)
    assert isinstance(sent[-1], F.CloseStream)  # a reset is only an end of stream for a Rust peer
    with pytest.raises(ft.PeerUnsupportedError):
        client.open_stream()


def test_unknown_ids_and_reset_reply_only_to_our_peers():
    client, server, rc, rs = pair()
    client.receive(F.encode(F.Data(stream_id=8, data=b"?")) + F.encode(F.CloseStream(stream_id=10)), 1.0)
    out = F.FrameDecoder().feed(b"".join(bytes(x) for x in client.data_to_send(1 << 20, 1 << 30)))
    assert [type(f) for f in out] == [F.Error] and out[0].stream_id == 8
    client.receive(F.encode(F.Data(stream_id=8, data=b"?")), 1.0)  # told once only
    assert not client.has_output


def test_peer_stream_limit_and_parity():
    client, server, rc, rs = pair(max_streams_per_session=2)
    for sid in (1, 3, 5, 4):
        server.receive(F.encode(F.OpenStream(stream_id=sid, protocol=ft.Protocol.TCP)), 1.0)
    assert sorted(server.streams) == [1, 3]
    refused = F.FrameDecoder().feed(b"".join(bytes(x) for x in server.data_to_send(1 << 20, 1 << 30)))
    assert sorted(f.stream_id for f in refused if isinstance(f, F.Error)) == [4, 5]


def test_heartbeats_rtt_and_dead_peer():
    client, server, rc, rs = pair()
    client.tick(10.0)
    hb = F.FrameDecoder().feed(b"".join(bytes(x) for x in client.data_to_send(1 << 20, 1 << 30)))
    assert isinstance(hb[0], F.Heartbeat)
    server.receive(F.encode(hb[0]), 10.0)
    ack = b"".join(bytes(x) for x in server.data_to_send(1 << 20, 1 << 30))
    client.receive(ack, 10.25)
    assert client.rtt == pytest.approx(0.25)
    with pytest.raises(ft.TunnelTimeoutError):
        client.tick(10.25 + 91)
    # time spent with reading paused by our own backpressure does not count
    timeout = server.config.session_timeout
    assert server.last_seen == 10.0
    server.reading_paused(20.0)
    pause = timeout - 5  # 85 s paused: 95 s since the peer's last frame, but 85 of them were ours
    assert server.tick(20.0 + pause) > 20.0 + pause  # paused: no timeout, look again later
    server.reading_resumed(20.0 + pause)  # the peer is taken as last heard at 10 + 85
    assert server.last_seen == 10.0 + pause
    assert server.tick(150.0) <= 10.0 + pause + timeout  # 45 s of its own silence: alive
    with pytest.raises(ft.TunnelTimeoutError):
        server.tick(10.0 + pause + timeout + 1)  # its own silence past session_timeout: dead after all


def test_parse_flow_capability():
    assert parse_flow_capability(["basic", "flow-control/1;window=123"]) == 123
    assert parse_flow_capability(["flow-control/1;window=2147483647"]) == 2**31 - 1
    assert parse_flow_capability(["basic", "tcp"]) is None
    # each malformed announcement on its own (in one list, one refusal could hide the other)
    for bad in ("0", "x", "", "-1", "+5", "1.5", "2147483648", "99999999999999999999"):
        assert parse_flow_capability([f"flow-control/1;window={bad}"]) is None, bad
    assert parse_flow_capability(["flow-control/2;window=5"]) is None
    assert parse_flow_capability(["flow-control/1;windows=5"]) is None


class TunnelModel(RuleBasedStateMachine):
    """Random open / data / half-close / reset / unknown-id sequences against a simple model."""

    @initialize(flow=st.booleans(), ext=st.booleans())
    def setup(self, flow, ext):
        self.client, self.server, self.rc, self.rs = pair(flow=flow and ext, window=700, ext=ext)
        self.ext = ext
        self.sent: Dict[Any, bytearray] = {}  # (side, sid) -> bytes written
        self.eof_sent: set = set()
        self.reset: set = set()
        self.streams: list = []  # (opener side, sid)

    def _core(self, side):
        return self.server if side == "s" else self.client

    def _rec(self, side):
        return self.rs if side == "s" else self.rc

    @rule(side=st.sampled_from(["s", "c"]))
    def open(self, side):
        if side == "c" and not self.ext:
            return
        st_ = self._core(side).open_stream()
        self.streams.append((side, st_.id))

    def _local(self, side, sid):
        core = self._core(side)
        return core.streams.get(sid)

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), writer=st.sampled_from(["s", "c"]), n=st.integers(1, 3000))
    def write(self, data, writer, n):
        _, sid = data.draw(st.sampled_from(self.streams))
        local = self._local(writer, sid)
        if local is None or local.write_shut or sid in self.reset:
            return
        payload = bytes([len(self.sent.get((writer, sid), b"")) % 251]) * n
        self._core(writer).send(local, payload)
        self.sent.setdefault((writer, sid), bytearray()).extend(payload)

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), writer=st.sampled_from(["s", "c"]))
    def half_close(self, data, writer):
        _, sid = data.draw(st.sampled_from(self.streams))
        local = self._local(writer, sid)
        if local is None or sid in self.reset:
            return
        self._core(writer).send_eof(local)
        self.eof_sent.add((writer, sid))

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), side=st.sampled_from(["s", "c"]))
    def reset_stream(self, data, side):
        _, sid = data.draw(st.sampled_from(self.streams))
        local = self._local(side, sid)
        if local is None or sid in self.reset:
            return
        if not self.ext and local.local_eof:
            return  # toward a Rust peer a reset after EOF says nothing: not modelled
        self._core(side).reset(local)
        self.reset.add(sid)

    @rule(sid=st.integers(100_000, 100_050), side=st.sampled_from(["s", "c"]))  # ids nobody opens here
    def unknown_id(self, sid, side):
        if sid in self._core(side).streams or any(s == sid for _, s in self.streams):
            return
        self._core(side).receive(F.encode(F.Data(stream_id=sid, data=b"junk")) + F.encode(F.CloseStream(stream_id=sid)), 1.0)

    @rule()
    def deliver(self):
        pump(self.client, self.server)

    @invariant()
    def delivered_is_prefix_of_sent(self):
        for (writer, sid), data in self.sent.items():
            got = (self.rc if writer == "s" else self.rs).data.get(sid, b"")
            assert bytes(data).startswith(bytes(got))

    @invariant()
    def credit_out_is_the_credit_of_live_streams(self):
        # what session_recv_limit counts against: the peer's credit on the streams still open
        for core in (getattr(self, "client", None), getattr(self, "server", None)):
            if core is not None:
                assert core.windows.credit_out == sum(st.recv_avail for st in core.streams.values())

    def teardown(self):
        if not hasattr(self, "client"):
            return
        pump(self.client, self.server, rounds=500)
        for (writer, sid), data in self.sent.items():
            reader = self.rc if writer == "s" else self.rs
            if sid not in self.reset:
                assert bytes(reader.data.get(sid, b"")) == bytes(data)
        for writer, sid in self.eof_sent:
            reader = self.rc if writer == "s" else self.rs
            if sid not in self.reset:
                assert sid in reader.eof
        for _, sid in self.streams:
            if sid in self.reset and self.ext:
                # both ends forgot it: the slot is free
                assert sid not in self.client.streams and sid not in self.server.streams


TunnelModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_core_state_machine = TunnelModel.TestCase


def test_send_now_only_when_nothing_is_queued():
    """The small-write fast path: a frame may go out directly only when no frame of any stream is
    queued and the stream's own queue is empty; credit and the sent counters are kept as if it had
    been queued and drained."""
    client, server, rc, rs = pair(window=1000)
    a = server.open_stream()
    assert not server.send_now(a, 10)  # the OpenStream frame is still queued
    pump(server, client)
    sched = server.sched
    frames, nbytes, credit = sched.drained_frames, sched.drained_bytes, a.send_credit
    assert server.send_now(a, 10)
    assert (sched.drained_frames, sched.drained_bytes, a.send_credit) == (frames + 1, nbytes + 20, credit - 10)
    assert not server.send_now(a, 0) and not server.send_now(a, server.config.max_chunk + 1)
    assert not server.send_now(a, a.send_credit + 1)  # beyond the credit: queue and wait for it
    b = server.open_stream()  # another stream's frame waiting in the scheduler blocks it too
    assert not server.send_now(a, 10)
    pump(server, client)
    rc.auto_consume = False  # the reader stops: no more credit comes back
    server.send(a, b"x" * 5000)  # more than the credit: the rest stays in a's own queue
    pump(server, client)
    assert a.pending is not None and not server.send_now(a, 1)  # never ahead of a's queued bytes
    server.send_eof(b)
    assert not server.send_now(b, 1)  # closed for writing: ``send`` raises, the fast path declines


def test_send_now_frame_is_what_the_queue_would_send():
    """A frame written by the fast path is byte for byte the one ``send`` + ``data_to_send`` makes."""
    client, server, rc, rs = pair(flow=False, ext=False)
    st = server.open_stream()
    pump(server, client)
    server.send(st, b"hi")
    queued = b"".join(bytes(x) for x in server.data_to_send(1 << 20, 1 << 30))
    assert server.send_now(st, 2)
    assert queued == F.encode_data_header(st.id, 2) + b"hi" == bytes.fromhex("00000008 01 00000002 00 6869".replace(" ", ""))


def test_a_reset_drops_queued_data_at_once():
    """Data still queued on a stream that is reset (by us or by the peer) is let go right away: an
    ended stream can outlive its reset for a while (the application keeps its handle), and its
    queue must not pin buffers meanwhile."""
    client, server, rc, rs = pair(window=1000)
    rc.auto_consume = False
    ours = server.open_stream()
    server.send(ours, b"x" * 50_000)  # beyond the credit: most of it stays queued
    pump(server, client)
    assert server.queued(ours) > 40_000
    server.reset(ours)
    assert server.queued(ours) == 0 and ours.pending is None
    theirs = server.open_stream()
    server.send(theirs, b"y" * 50_000)
    pump(server, client)
    client.reset(client.streams[theirs.id])
    pump(client, server)
    assert theirs.done and server.queued(theirs) == 0 and theirs.pending is None


class CountingPending:
    """Wraps a scheduler, counting ``stream_pending`` lookups (what waking writers costs)."""

    def __init__(self, sched: Any) -> None:
        self.sched, self.lookups = sched, 0

    def stream_pending(self, sid: int) -> int:
        self.lookups += 1
        return self.sched.stream_pending(sid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sched, name)

    def __bool__(self) -> bool:
        return bool(self.sched)


def test_waking_writers_costs_the_frames_sent_not_the_streams_waiting():
    """1,000 streams wait for room; each drain looks at the streams whose frames left, wakes each
    writer once its queue is under the mark, and no other."""
    client, server, rc, rs = pair(window=1 << 20)
    woken: List[int] = []
    rc.on_stream_writable = lambda st: woken.append(st.id)  # type: ignore[method-assign]
    streams = [client.open_stream(F.Protocol.TCP, F.StreamPriority.NORMAL) for _ in range(1000)]
    client.data_to_send(1 << 30, 1 << 30)  # the OpenStreams go
    for st in streams:
        client.send(st, b"x" * 3000)
        if st is streams[0]:
            client.send(st, b"y" * 3000)  # two frames: the first to leave is not all of it
        client.wait_writable(st, below=1)  # wake me when all of it has left
    assert woken == []
    counting = CountingPending(client.sched)
    client.sched = counting  # type: ignore[assignment]
    out = client.data_to_send(10 * 3009, 1 << 30)  # ten frames' worth
    frames = F.FrameDecoder().feed(b"".join(bytes(b) for b in out))
    assert [f.stream_id for f in frames] == [st.id for st in streams[:10]]
    assert woken == [st.id for st in streams[1:10]]  # the first stream still has a frame queued
    assert counting.lookups <= len(frames), counting.lookups  # not one per waiting stream
    client.data_to_send(1 << 30, 1 << 30)
    assert woken == [st.id for st in streams[1:]] + [streams[0].id]  # (its second frame left last)
