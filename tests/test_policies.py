"""The sans-IO policies of the protocol layer, by plain calls (no event loop): stream states,
flow windows and credit, keepalive, rate limits and the extension table."""

from __future__ import annotations

import struct
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferrotunnel as ft
from ferrotunnel.config import RateLimits, ServerConfig, StreamConfig
from ferrotunnel.frames import Protocol, StreamPriority
from ferrotunnel.protocol import extensions as ext
from ferrotunnel.protocol.flow import FlowWindows, decode_credit, encode_credit
from ferrotunnel.protocol.keepalive import MAX_OUTSTANDING, Keepalive
from ferrotunnel.protocol.ratelimit import RatePolicy, TokenBucket
from ferrotunnel.protocol.streams import CoreStream, StreamEvent, StreamState, StreamStateError, transition

S, E = StreamState, StreamEvent


def mkstream(sid: int = 1, window: int = 100) -> CoreStream:
    return CoreStream(sid, Protocol.TCP, StreamPriority.NORMAL, True, send_credit=0, window=window)


# ---------------------------------------------------------------- stream states

#: The whole table, written out here (not read from the module): every allowed pair and its result.
ALLOWED = {
    (S.OPEN, E.SEND_EOF): S.HALF_CLOSED_LOCAL,
    (S.OPEN, E.RECV_EOF): S.HALF_CLOSED_REMOTE,
    (S.OPEN, E.SEND_RESET): S.CLOSED,
    (S.OPEN, E.RECV_RESET): S.CLOSED,
    (S.OPEN, E.CONNECTION_LOST): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, E.RECV_EOF): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, E.ABANDON): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, E.SEND_RESET): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, E.RECV_RESET): S.CLOSED,
    (S.HALF_CLOSED_LOCAL, E.CONNECTION_LOST): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, E.SEND_EOF): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, E.SEND_RESET): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, E.RECV_RESET): S.CLOSED,
    (S.HALF_CLOSED_REMOTE, E.CONNECTION_LOST): S.CLOSED,
}
ALL_PAIRS = [(s, e) for s in StreamState for e in StreamEvent]


def test_enums_are_what_the_table_covers():
    assert len(StreamState) == 4 and len(StreamEvent) == 6
    assert len(ALLOWED) == 14 and len(ALL_PAIRS) - len(ALLOWED) == 10


@pytest.mark.parametrize("state,event", sorted(ALLOWED), ids=lambda v: v.name)
def test_allowed_transition(state, event):
    assert transition(state, event) is ALLOWED[(state, event)]


@pytest.mark.parametrize("state,event", [p for p in ALL_PAIRS if p not in ALLOWED], ids=lambda v: v.name)
def test_disallowed_transition_raises(state, event):
    with pytest.raises(StreamStateError) as ei:
        transition(state, event)
    assert event.name in str(ei.value) and state.name in str(ei.value)
    assert isinstance(ei.value, ft.FerroTunnelError)


def test_closed_accepts_nothing():
    for event in StreamEvent:
        with pytest.raises(StreamStateError):
            transition(S.CLOSED, event)


def test_core_stream_move_and_flags():
    st_ = mkstream(window=50)
    assert st_.state is S.OPEN and st_.recv_avail == 50 and st_.window == 50
    assert (st_.done, st_.receiving, st_.local_eof) == (False, True, False)
    assert st_.move(E.SEND_EOF) is S.HALF_CLOSED_LOCAL and st_.state is S.HALF_CLOSED_LOCAL
    assert (st_.done, st_.receiving, st_.local_eof) == (False, True, True)
    with pytest.raises(StreamStateError):
        st_.move(E.SEND_EOF)
    assert st_.state is S.HALF_CLOSED_LOCAL  # a refused event leaves the state alone
    assert st_.move(E.ABANDON) is S.CLOSED
    assert (st_.done, st_.receiving, st_.local_eof) == (True, False, True)
    with pytest.raises(StreamStateError):
        st_.move(E.CONNECTION_LOST)

    remote = mkstream()
    assert remote.move(E.RECV_EOF) is S.HALF_CLOSED_REMOTE
    assert (remote.done, remote.receiving, remote.local_eof) == (False, False, False)
    with pytest.raises(StreamStateError):
        remote.move(E.ABANDON)
    assert remote.move(E.SEND_EOF) is S.CLOSED and remote.done

    for event in (E.SEND_RESET, E.RECV_RESET, E.CONNECTION_LOST):
        s2 = mkstream()
        assert s2.move(event) is S.CLOSED
        assert (s2.done, s2.receiving, s2.local_eof) == (True, False, True)


# ---------------------------------------------------------------- flow windows

def cfg(**kw) -> StreamConfig:
    base = dict(initial_window=100, max_window=350, session_recv_budget=10_000, stream_recv_buffer=200)
    base.update(kw)
    return StreamConfig(**base)


def fill(fw: FlowWindows, s: CoreStream, n: int) -> None:
    assert fw.arrived(s, n)
    fw.delivered(s, n)


def test_arrived_refuses_overrun_only_when_enabled():
    fw = FlowWindows(cfg(), enabled=True)
    s = mkstream()
    assert not fw.arrived(s, 101) and s.recv_avail == 100  # refused: nothing taken
    assert fw.arrived(s, 60) and s.recv_avail == 40
    assert fw.arrived(s, 40) and s.recv_avail == 0
    assert not fw.arrived(s, 1)
    assert fw.arrived(s, 0) and s.recv_avail == 0

    off = FlowWindows(cfg(), enabled=False)
    s = mkstream()
    for _ in range(3):
        assert off.arrived(s, 10 ** 9)
    assert s.recv_avail == 100  # not tracked without flow control


def test_delivered_and_consumed_bookkeeping():
    for enabled in (True, False):
        fw = FlowWindows(cfg(), enabled)
        a, b = mkstream(1), mkstream(3)
        fill(fw, a, 30)
        fill(fw, b, 20)
        assert (a.unread, b.unread, fw.total_unread) == (30, 20, 50)
        fw.consumed(a, 10)
        assert (a.unread, b.unread, fw.total_unread) == (20, 20, 40)
        fw.consumed(b, 20)
        fw.consumed(a, 20)
        assert (a.unread, b.unread, fw.total_unread) == (0, 0, 0)


def test_grant_threshold_increment_and_window_growth():
    fw = FlowWindows(cfg(), enabled=True)  # window 100, max 350
    s = mkstream()
    fill(fw, s, 100)
    assert fw.consumed(s, 49) == 0 and s.owed == 49 and s.recv_avail == 0  # below window / 2: nothing
    # at window / 2, while 50 bytes are still unread: exactly what is owed, no growth
    assert fw.consumed(s, 1) == 50
    assert (s.owed, s.recv_avail, s.window) == (0, 50, 100)
    # the reader caught up (unread == 0): the window doubles, the growth is granted too
    assert fw.consumed(s, 50) == 50 + 100
    assert (s.window, s.recv_avail, s.unread) == (200, 200, 0)
    fill(fw, s, 200)
    assert fw.consumed(s, 200) == 200 + 150  # doubling capped at max_window
    assert (s.window, s.recv_avail) == (350, 350)
    fill(fw, s, 350)
    assert fw.consumed(s, 350) == 350 and s.window == 350  # at max_window: the increment is what is owed


def test_window_does_not_grow_while_reader_lags():
    fw = FlowWindows(cfg(), enabled=True)
    lagging, keeping_up = mkstream(1), mkstream(3)
    for _ in range(5):
        fill(fw, lagging, lagging.recv_avail)
        assert fw.consumed(lagging, lagging.unread - 1) == 99  # always one byte behind
        assert lagging.window == 100  # so the window never grows
    windows = []
    for _ in range(4):
        fill(fw, keeping_up, keeping_up.recv_avail)
        fw.consumed(keeping_up, keeping_up.unread)
        windows.append(keeping_up.window)
    assert windows == [200, 350, 350, 350]


def test_session_budget_binds_credit_not_reading_and_spares_readers_that_keep_up():
    fw = FlowWindows(cfg(session_recv_budget=120), enabled=True)  # initial window 100, max 350
    grown, slow = mkstream(1, window=350), mkstream(3)
    grown.recv_avail = 350
    fill(fw, grown, 300)
    fill(fw, slow, 100)
    assert fw.total_unread == 400 and not fw.blocked  # with flow control the budget never stops reading
    # over budget: a stream holding more than its initial window gets nothing back (deferred) ...
    assert fw.consumed(grown, 200) == 0 and grown in fw.deferred and grown.owed == 200
    # ... one holding less is topped up to its initial window, without growth
    assert fw.consumed(slow, 60) == 60 and slow.recv_avail == 60 and slow.window == 100
    assert slow not in fw.deferred
    assert fw.undeferred() == []  # 140 unread: not under budget // 2
    assert fw.consumed(grown, 100) == 300  # under the budget again: all it was owed
    assert fw.total_unread == 40 and grown not in fw.deferred


def test_without_flow_control_a_full_stream_blocks_reading_until_half_drained():
    fw = FlowWindows(cfg(stream_recv_buffer=200), enabled=False)
    s, other = mkstream(1), mkstream(3)
    fill(fw, s, 200)
    assert not fw.blocked and not fw.over_limit  # exactly the buffer: still reading
    fill(fw, s, 1)
    assert fw.blocked and set(fw.over_limit) == {1}
    fill(fw, other, 50)
    assert fw.consumed(other, 50) == 0 and fw.blocked  # another stream draining changes nothing
    assert fw.consumed(s, 100) == 0 and s.unread == 101 and fw.blocked  # above half: still blocked
    assert fw.consumed(s, 1) == 0 and s.unread == 100  # at half: cleared
    assert not fw.blocked and not fw.over_limit
    assert s.owed == 0 and s.recv_avail == 100  # no credit bookkeeping without flow control


def test_without_flow_control_the_session_budget_blocks_too():
    fw = FlowWindows(cfg(stream_recv_buffer=200, session_recv_budget=300), enabled=False)
    streams = [mkstream(i) for i in (1, 3, 5, 7)]
    for s in streams[:3]:
        fill(fw, s, 100)
    assert not fw.blocked and fw.total_unread == 300
    fill(fw, streams[3], 1)
    assert fw.blocked and not fw.over_limit  # no stream is over its buffer, the session is
    fw.consumed(streams[0], 1)
    assert not fw.blocked


def test_discarded_bytes_are_given_back_at_once():
    fw = FlowWindows(cfg(session_recv_budget=120), enabled=True)
    busy, other, gone = mkstream(1), mkstream(3), mkstream(5)
    fill(fw, busy, 100)
    fill(fw, other, 30)
    assert fw.total_unread > fw.budget  # the session is over budget
    gone.discarding = True
    assert fw.arrived(gone, 10)
    assert fw.discarded(gone, 10) == 10  # below window / 2 and over budget, given back at once
    assert (gone.recv_avail, gone.window, gone.owed, gone.unread) == (100, 100, 0, 0)
    assert gone not in fw.deferred and fw.total_unread == 130  # never counted as unread
    assert fw.arrived(gone, 100) and fw.discarded(gone, 100) == 100 and gone.window == 100  # never grows

    off = FlowWindows(cfg(), enabled=False)
    s = mkstream()
    s.discarding = True
    assert off.arrived(s, 10) and off.discarded(s, 10) == 0


def test_no_credit_once_the_peer_finished_sending():
    fw = FlowWindows(cfg(), enabled=True)
    s = mkstream()
    fill(fw, s, 100)
    s.move(E.RECV_EOF)  # the peer's CloseStream: it sends nothing more
    assert fw.consumed(s, 100) == 0 and s.owed == 0 and s.unread == 0 and fw.total_unread == 0


def test_drop_unread_and_removed():
    fw = FlowWindows(cfg(stream_recv_buffer=200), enabled=False)
    s = mkstream(1)
    fill(fw, s, 300)
    assert fw.blocked
    fw.drop_unread(s)
    assert s.unread == 0 and fw.total_unread == 0 and not fw.blocked
    fw.drop_unread(s)  # twice is harmless
    assert fw.total_unread == 0

    # removed: a discarding stream's unread bytes go; a stream the application may still read keeps them
    fw = FlowWindows(cfg(session_recv_budget=120), enabled=True)
    keep, drop = mkstream(1), mkstream(3)
    fill(fw, keep, 100)
    fill(fw, drop, 100)
    assert fw.consumed(keep, 50) == 50 and keep not in fw.deferred  # over budget, but under its initial window
    drop.discarding = True
    fw.removed(drop)
    assert drop.unread == 0 and fw.total_unread == keep.unread == 50
    keep.move(E.RECV_RESET)
    fw.removed(keep)
    assert keep not in fw.deferred and fw.total_unread == keep.unread == 50
    assert fw.consumed(keep, 50) == 0  # the application reads what was left after the stream ended
    assert fw.total_unread == 0

    fw = FlowWindows(cfg(stream_recv_buffer=10), enabled=False)
    s = mkstream(1)
    fill(fw, s, 20)
    fw.removed(s)
    assert not fw.over_limit and fw.total_unread == 20  # not blocked by a stream that ended
    fw.deferred.add(s)
    fw.clear()
    assert not fw.deferred and not fw.over_limit


# hypothesis: a correct sender and a reader against the windows, with data and credit in flight

OPS = st.lists(st.tuples(st.sampled_from(["send", "arrive", "credit", "consume", "overrun"]),
                         st.integers(0, 2), st.integers(1, 10_000)), max_size=150)


@settings(max_examples=300, deadline=None, database=None)
@given(ops=OPS, budget=st.sampled_from([50, 150, 400, 10_000]), initial=st.sampled_from([1, 2, 64, 100]))
def test_flow_invariants(ops, budget, initial):
    conf = StreamConfig(initial_window=initial, max_window=4 * initial + 3, session_recv_budget=budget,
                        stream_recv_buffer=1000)
    fw = FlowWindows(conf, enabled=True)
    streams = [mkstream(2 * i + 1, initial) for i in range(3)]
    credit = [initial] * 3                     # the sender's view of what it may send
    data_flight = [deque() for _ in range(3)]  # chunks sent, not arrived
    credit_flight = [deque() for _ in range(3)]  # increments granted, not yet at the sender
    granted = [initial] * 3                    # initial window + every increment granted
    arrived = [0] * 3

    def give(s, inc):
        assert inc >= 0
        if inc:
            i = streams.index(s)
            granted[i] += inc
            credit_flight[i].append(inc)

    def consume(i, n):  # as SessionCore.consumed does it
        give(streams[i], fw.consumed(streams[i], n))
        if fw.deferred:
            for other in fw.undeferred():
                give(other, fw.grant(other))

    def check():
        for i, s in enumerate(streams):
            assert s.recv_avail >= 0
            flying = sum(data_flight[i])
            assert flying <= granted[i] - arrived[i] == s.recv_avail  # in flight never beyond the grant
            assert credit[i] + flying + sum(credit_flight[i]) == s.recv_avail
            assert s.recv_avail + s.unread + s.owed == s.window <= conf.max_window
        assert fw.total_unread == sum(s.unread for s in streams)
        assert all(s.owed >= s.window // 2 for s in fw.deferred)

    for op, i, k in ops:
        s = streams[i]
        if op == "send" and credit[i]:
            n = 1 + (k - 1) % credit[i]
            credit[i] -= n
            data_flight[i].append(n)
        elif op == "arrive" and data_flight[i]:
            n = data_flight[i].popleft()
            assert fw.arrived(s, n), "a sender within its credit was refused"
            arrived[i] += n
            fw.delivered(s, n)
        elif op == "credit" and credit_flight[i]:
            credit[i] += credit_flight[i].popleft()
        elif op == "consume" and s.unread:
            consume(i, 1 + (k - 1) % s.unread)
        elif op == "overrun" and not data_flight[i]:
            before = s.recv_avail
            assert not fw.arrived(s, before + 1 + k % 7)  # a sender beyond its credit is refused
            assert s.recv_avail == before
        check()

    # liveness: everything delivered and read, nothing stays held back, every sender can send again
    for i in range(3):
        while data_flight[i]:
            n = data_flight[i].popleft()
            assert fw.arrived(streams[i], n)
            arrived[i] += n
            fw.delivered(streams[i], n)
    for i in range(3):
        if streams[i].unread:
            consume(i, streams[i].unread)
    for i in range(3):
        while credit_flight[i]:
            credit[i] += credit_flight[i].popleft()
    check()
    assert fw.total_unread == 0 and not fw.deferred
    for i, s in enumerate(streams):
        assert credit[i] == s.recv_avail and 2 * s.recv_avail >= s.window > 0


@settings(max_examples=200, deadline=None, database=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(0, 500)), max_size=100))
def test_without_flow_control_invariants(ops):
    conf = StreamConfig(stream_recv_buffer=300, session_recv_budget=700)
    fw = FlowWindows(conf, enabled=False)
    streams = [mkstream(2 * i + 1) for i in range(3)]
    for deliver, i, n in ops:
        s = streams[i]
        if deliver:
            assert fw.arrived(s, n)
            fw.delivered(s, n)
        elif s.unread:
            assert fw.consumed(s, 1 + n % s.unread) == 0
        assert fw.total_unread == sum(x.unread for x in streams)
        for x in streams:
            if x.unread > conf.stream_recv_buffer:
                assert x.id in fw.over_limit
            if x.id in fw.over_limit:
                assert x.unread > conf.stream_recv_buffer // 2
        assert fw.blocked == (bool(fw.over_limit) or fw.total_unread > conf.session_recv_budget)


# ---------------------------------------------------------------- credit frames

def test_encode_decode_credit():
    assert encode_credit(7, 1000) == struct.pack(">II", 7, 1000)
    assert encode_credit(1, 2 ** 40) == struct.pack(">II", 1, 0xFFFFFFFF)  # clamped to u32
    pairs = [(1, 5), (2 ** 32 - 1, 2 ** 32 - 1), (0, 0)]
    raw = b"".join(encode_credit(s, i) for s, i in pairs)
    assert decode_credit(raw) == pairs
    assert decode_credit(memoryview(raw)) == pairs and decode_credit(bytearray(raw)) == pairs
    assert decode_credit(b"") == []
    for n in (1, 7, 9, 12, 15):
        assert decode_credit(raw[:n] if n <= len(raw) else raw + b"x" * (n - len(raw))) is None


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1)), max_size=20),
       st.binary(max_size=40))
def test_credit_round_trip(pairs, junk):
    raw = b"".join(encode_credit(s, i) for s, i in pairs)
    assert decode_credit(raw) == pairs
    if len(junk) % 8:
        assert decode_credit(raw + junk) is None


# ---------------------------------------------------------------- keepalive

def test_first_tick_sends_at_once_for_a_sender_only():
    ka = Keepalive(10.0, 30.0, True, now=100.0)
    assert ka.tick(100.0) == (True, 110.0)  # deadline: the next heartbeat, before the timeout
    assert ka.tick(105.0) == (False, 110.0)
    assert ka.tick(110.0) == (True, 120.0)  # one interval later
    assert list(ka.sent) == [100.0, 110.0]

    quiet = Keepalive(10.0, 30.0, False, now=100.0)
    for t in (100.0, 110.0, 120.0, 129.0):
        assert quiet.tick(t) == (False, 130.0)  # never sends; the deadline is the timeout
    assert not quiet.sent


def test_deadline_is_the_earlier_of_timeout_and_next_heartbeat():
    ka = Keepalive(10.0, 15.0, True, now=0.0)
    assert ka.tick(0.0) == (True, 10.0)
    ka.seen(0.0)
    assert ka.tick(9.0) == (False, 10.0)
    assert ka.tick(10.0) == (True, 15.0)  # last_seen + timeout (15) < next heartbeat (20)
    ka.seen(12.0)
    assert ka.tick(13.0) == (False, 20.0)  # 12 + 15 = 27 > 20
    long = Keepalive(100.0, 30.0, True, now=0.0)
    assert long.tick(0.0) == (True, 30.0)


def test_tick_raises_after_timeout_of_silence():
    ka = Keepalive(10.0, 30.0, False, now=0.0)
    ka.tick(30.0)  # exactly the timeout: not yet
    with pytest.raises(ft.TunnelTimeoutError) as ei:
        ka.tick(30.5)
    assert isinstance(ei.value, TimeoutError) and "30" in str(ei.value)
    ka.seen(30.5)
    assert ka.tick(31.0) == (False, 60.5)  # a frame arrived: alive again
    sender = Keepalive(10.0, 30.0, True, now=0.0)
    for t in range(0, 31, 10):
        sender.tick(float(t))
    with pytest.raises(ft.TunnelTimeoutError):
        sender.tick(31.0)  # heartbeats that are never answered do not keep it alive


def test_time_paused_is_not_silence():
    ka = Keepalive(10.0, 30.0, False, now=0.0)
    ka.reading_paused(10.0)
    assert ka.paused
    ka.reading_paused(20.0)  # already paused: the first moment counts
    ka.tick(39.0)  # 39 s since the peer's last frame, 29 of them ours: no timeout
    assert ka.silent_for(39.0) == 0.0
    ka.reading_resumed(39.0)
    assert not ka.paused and ka.last_seen == 29.0  # the 29 s pause moved last_seen on
    assert ka.silent_for(40.0) == 11.0
    assert ka.tick(59.0) == (False, 59.0)
    with pytest.raises(ft.TunnelTimeoutError):
        ka.tick(59.5)  # 10 s before the pause + 20.5 s after it
    ka.reading_resumed(2000.0)  # not paused: nothing changes
    assert ka.last_seen == 29.0


def test_a_pause_longer_than_the_timeout_ends_the_session():
    """Our own pause is not the peer's silence, but a pause that outlasts session_timeout means a
    reader (or the peer, for our replies) stopped for good: the session ends."""
    ka = Keepalive(10.0, 30.0, False, now=0.0)
    ka.reading_paused(100.0)
    send, deadline = ka.tick(100.0)
    assert 130.0 <= deadline < 131.0  # due when the pause could have lasted too long, not earlier
    ka.tick(130.0)  # exactly the timeout: still alive
    with pytest.raises(ft.TunnelTimeoutError, match="paused for 30.5s"):
        ka.tick(130.5)


@pytest.mark.parametrize("sends", [True, False])
def test_tick_while_paused_asks_to_be_called_in_the_future(sends):
    """Regression: a pause made tick() return a deadline in the past, and the adapter's timer
    (call_later(deadline - now)) spun on it for the whole pause."""
    ka = Keepalive(1.0, 5.0, sends, now=0.0)
    ka.tick(0.0)
    ka.reading_paused(1.0)
    for now in (2.0, 5.0, 6.0):
        send, deadline = ka.tick(now)
        assert deadline > now
    ka.reading_resumed(6.0)  # 1 s of silence before the pause, none since
    assert ka.silent_for(6.0) == 1.0
    ka.tick(10.0)
    with pytest.raises(ft.TunnelTimeoutError):
        ka.tick(10.5)


def test_acked_measures_rtt_from_oldest_outstanding():
    ka = Keepalive(10.0, 100.0, True, now=0.0)
    assert ka.rtt is None
    ka.acked(1.0)  # an ack for nothing we remember
    assert ka.rtt is None
    ka.tick(0.0)
    ka.tick(10.0)
    ka.acked(12.0)
    assert ka.rtt == 12.0  # from the heartbeat sent at 0
    ka.acked(15.0)
    assert ka.rtt == 5.0  # then from the one sent at 10
    ka.acked(20.0)
    assert ka.rtt == 5.0 and not ka.sent


def test_at_most_max_outstanding_heartbeats_remembered():
    ka = Keepalive(1.0, 1000.0, True, now=0.0)
    for t in range(20):
        assert ka.tick(float(t))[0]
    assert len(ka.sent) == MAX_OUTSTANDING == 8
    assert list(ka.sent) == [float(t) for t in range(12, 20)]
    ka.acked(25.0)
    assert ka.rtt == 13.0  # the oldest remembered one (sent at 12)


def test_silent_for():
    ka = Keepalive(10.0, 30.0, True, now=0.0)
    ka.seen(5.0)
    assert ka.silent_for(8.0) == 3.0
    ka.reading_paused(9.0)
    assert ka.silent_for(50.0) == 0.0
    ka.reading_resumed(50.0)
    assert ka.silent_for(51.0) == 5.0  # 4 s before the pause, 1 s after


# ---------------------------------------------------------------- rate limits

def test_token_bucket_burst_refill_and_wait():
    b = TokenBucket(10.0, 2.0, now=0.0)
    assert b.cap == 20.0 and b.level == 20.0
    assert b.take(20, 0.0) == 0.0  # the whole burst at once
    assert b.take(1, 0.0) == pytest.approx(0.1)  # one token short: 1 / rate
    b = TokenBucket(10.0, 2.0, now=0.0)
    assert b.take(25, 0.0) == pytest.approx(0.5)  # 5 short
    b = TokenBucket(10.0, 2.0, now=0.0)
    b.take(20, 0.0)
    assert b.take(5, 0.5) == 0.0  # 0.5 s refilled 5
    assert b.take(1, 0.5) == pytest.approx(0.1)
    b = TokenBucket(10.0, 2.0, now=0.0)
    b.take(20, 0.0)
    assert b.take(20, 1000.0) == 0.0  # refilled, but never beyond the burst
    assert b.take(1, 1000.0) > 0
    tiny = TokenBucket(0.1, 2.0, now=0.0)
    assert tiny.cap == 1.0  # at least one token
    assert tiny.take(1, 0.0) == 0.0 and tiny.take(1, 0.0) == pytest.approx(10.0)


def test_rate_policy_without_limits_allows_everything():
    p = RatePolicy(RateLimits(), now=0.0)
    assert p.opens is None and p.bytes is None
    assert all(p.allow_open(0.0) for _ in range(100_000))
    for _ in range(100):
        p.received(10 ** 9, 0.0)
    assert p.throttle_until == 0.0


def test_rate_policy_opens_refused_beyond_burst():
    p = RatePolicy(RateLimits(streams_per_second=5, burst=2), now=0.0)
    assert p.bytes is None
    assert all(p.allow_open(0.0) for _ in range(10))
    assert not p.allow_open(0.0)
    p.received(10 ** 9, 0.0)
    assert p.throttle_until == 0.0  # only opens are limited
    fresh = RatePolicy(RateLimits(streams_per_second=5, burst=2), now=0.0)
    assert all(fresh.allow_open(0.0) for _ in range(10))
    assert fresh.allow_open(0.2)  # 0.2 s at 5/s refilled one


def test_rate_policy_bytes_throttle():
    p = RatePolicy(RateLimits(bytes_per_second=1000, burst=1), now=0.0)
    assert p.opens is None and all(p.allow_open(0.0) for _ in range(1000))
    p.received(1000, 0.0)
    assert p.throttle_until == 0.0  # within the burst
    p.received(500, 0.0)
    assert p.throttle_until == pytest.approx(0.5)
    p.received(100, 1.0)  # 1 s refilled 1000 of the 500 owed: fine again
    assert p.throttle_until == pytest.approx(0.5)


def test_refused_opens_do_not_count_against_the_rate():
    """Regression: a refused open used to take a token too, so refusals piled up debt (after one
    refusal a peer opening at exactly the rate was refused for ever)."""
    p = RatePolicy(RateLimits(streams_per_second=10, burst=1), now=0.0)
    assert all(p.allow_open(0.0) for _ in range(10))
    assert not p.allow_open(0.0)
    assert p.allow_open(0.1)  # one token refilled since
    flooded = RatePolicy(RateLimits(streams_per_second=10, burst=1), now=0.0)
    for _ in range(1000):
        flooded.allow_open(0.0)
    assert flooded.allow_open(10.0)  # ten seconds of quiet refill the whole burst


# ---------------------------------------------------------------- extensions

ON = StreamConfig(initial_window=1000)
OFF = StreamConfig(flow_control=False)


def test_capabilities_exact():
    assert ext.client_capabilities(ON) == ["basic", "tcp", "ferrotunnel-py/1", "flow-control/1;window=1000",
                                           "frames/1=16777216", "reject-reason/1", "drain/1", "public-urls/1"]
    assert ext.client_capabilities(OFF) == ["basic", "tcp", "ferrotunnel-py/1", "frames/1=16777216", "reject-reason/1",
                                            "drain/1", "public-urls/1"]
    assert ext.client_capabilities(OFF, ("x/1",)) == ["basic", "tcp", "ferrotunnel-py/1", "frames/1=16777216",
                                                      "reject-reason/1", "drain/1", "public-urls/1", "x/1"]
    assert ext.server_capabilities(ON) == ["basic", "ferrotunnel-py/1", "flow-control/1;window=1000", "frames/1=16777216",
                                           "drain/1", "public-urls/1", "visitor-addr/1", "tunnels/1"]
    assert ext.server_capabilities(OFF) == ["basic", "ferrotunnel-py/1", "frames/1=16777216", "drain/1", "public-urls/1",
                                            "visitor-addr/1", "tunnels/1"]
    assert ext.client_capabilities(ft.ClientConfig()) == ["basic", "tcp", "ferrotunnel-py/1", "flow-control/1;window=262144",
                                                         "frames/1=16777216", "reject-reason/1", "drain/1", "public-urls/1"]


def test_negotiate_with_a_rust_peer_gives_nothing():
    for config in (ServerConfig(), ON, OFF):
        for peer in (["basic", "tcp"], ["basic"], []):
            n = ext.negotiate(config, peer)
            assert n.values == {} and not n.peer_is_ext and n.flow_window is None
            assert ext.plugin_handlers(n) == {}


def test_negotiate_server_side():
    server = ServerConfig(initial_window=5000)
    n = ext.negotiate(server, ext.client_capabilities(StreamConfig(initial_window=1234)))
    assert n.values == {"ferrotunnel": True, "flow": 1234, "frames": 16777216, "reject_reason": True, "drain": True,
                        "public_urls": True}  # the client's window
    assert n.peer_is_ext and n.flow_window == 1234 and "reject_reason" in n
    n = ext.negotiate(server, ext.client_capabilities(OFF))
    assert n.values == {"ferrotunnel": True, "frames": 16777216, "reject_reason": True, "drain": True, "public_urls": True}
    n = ext.negotiate(ServerConfig(flow_control=False), ext.client_capabilities(ON))
    assert n.values == {"ferrotunnel": True, "frames": 16777216, "reject_reason": True, "drain": True,
                        "public_urls": True}  # our side switched it off


def test_negotiate_client_side():
    client = ft.ClientConfig(initial_window=1234)
    n = ext.negotiate(client, ext.server_capabilities(ServerConfig(initial_window=5000)))
    assert n.values == {"ferrotunnel": True, "flow": 5000, "frames": 16777216, "drain": True, "public_urls": True,
                        "tunnels": True}  # servers never announce reject-reason
    n = ext.negotiate(client, ext.server_capabilities(ServerConfig(flow_control=False)))
    assert n.values == {"ferrotunnel": True, "frames": 16777216, "drain": True, "public_urls": True, "tunnels": True}


def test_negotiate_refuses_bad_flow_windows():
    for cap in ("flow-control/1;window=0", "flow-control/1;window=-5", "flow-control/1;window=abc",
                "flow-control/1;window=2147483648", "flow-control/1", "flow-control/1;window="):
        assert ext.negotiate(ON, ["basic", cap]).flow_window is None
    assert ext.negotiate(ON, ["flow-control/1;window=2147483647"]).flow_window == 2 ** 31 - 1


def test_plugin_handlers_follow_negotiation():
    on = ext.negotiate(ON, ext.client_capabilities(ON))
    assert ext.plugin_handlers(on) == {"ft.flow/1": "on_credit", "ft.drain/1": "on_drain",
                                        "ft.urls/1": "on_public_urls"}
    off = ext.negotiate(ON, ext.client_capabilities(OFF))
    assert ext.plugin_handlers(off) == {"ft.drain/1": "on_drain", "ft.urls/1": "on_public_urls"}
    assert ext.plugin_handlers(ext.negotiate(ON, ["basic", "tcp"])) == {}  # a Rust peer: none


def test_keep_capabilities_bounds():
    ok64 = "a" * 64
    assert ext.keep_capabilities([ok64, "b" * 65, "c"]) == (ok64, "c")
    assert ext.keep_capabilities(["é" * 32, "é" * 33]) == ("é" * 32,)  # bytes, not characters
    many = [f"cap{i}" for i in range(40)]
    assert ext.keep_capabilities(many) == tuple(many[:32])
    mixed = ["x" * 100] * 10 + many  # long ones do not take slots
    assert ext.keep_capabilities(mixed) == tuple(many[:32])
    assert ext.keep_capabilities([]) == ()


def test_extension_table_is_the_single_source(monkeypatch):
    fake = ext.Extension("fake", client=lambda c: "fake/1", server=lambda c: "fake/1;srv",
                         agree=lambda c, peer: "yes" if "fake/1" in peer else None,
                         plugin_id="ft.fake/1", handler="on_fake")
    monkeypatch.setattr(ext, "EXTENSIONS", ext.EXTENSIONS + (fake,))
    assert ext.client_capabilities(ON, ("extra",))[-2:] == ["fake/1", "extra"]
    assert ext.server_capabilities(ON)[-1] == "fake/1;srv"
    n = ext.negotiate(ON, ext.client_capabilities(ON))
    assert n.get("fake") == "yes" and n.flow_window == 1000
    assert ext.plugin_handlers(n) == {"ft.flow/1": "on_credit", "ft.drain/1": "on_drain", "ft.urls/1": "on_public_urls",
                                      "ft.fake/1": "on_fake"}
    assert "fake" not in ext.negotiate(ON, ["basic", "tcp"])

    # the sans-IO handshake of both sides picks it up too, through the same functions
    client = ft.ClientHandshake("secret-token", "t", ft.ClientConfig())
    assert "fake/1" in client.capabilities
    server = ft.ServerHandshake(ServerConfig())
    server.receive_data(client.data_to_send())
    assert server.request is not None and "fake/1" in server.request.capabilities
    client.receive_data(server.accept())
    assert server.negotiated.get("fake") == "yes"
    assert client.result is not None and "fake/1;srv" in client.result.server_capabilities
    assert client.result.negotiated.get("fake") is None  # the server announced "fake/1;srv", not "fake/1"

    monkeypatch.undo()
    assert "fake/1" not in ext.client_capabilities(ON)
