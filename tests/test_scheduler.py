"""Priority scheduler: ordering, per-stream order, round-robin fairness, byte budget (both implementations)."""

from __future__ import annotations

import collections
import importlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferrotunnel import frames as F
from ferrotunnel.frames import StreamPriority as P


@pytest.fixture(params=["ferrotunnel._sched_py", "ferrotunnel._sched"])
def sched(request):
    try:
        return importlib.import_module(request.param).PriorityScheduler()
    except ImportError:
        pytest.skip("compiled scheduler not built")


def _frames(buffers):
    return F.FrameDecoder().feed(b"".join(bytes(b) for b in buffers))


def test_urgency_order_not_wire_value_order(sched):
    for prio, sid in ((P.LOW, 1), (P.NORMAL, 3), (P.HIGH, 5), (P.CRITICAL, 7)):
        sched.push_data(sid, prio, b"x")
    sched.push_control(F.encode(F.HeartbeatAck(timestamp=1)))
    got = _frames(sched.drain())
    assert isinstance(got[0], F.HeartbeatAck)
    assert [f.stream_id for f in got[1:]] == [7, 5, 3, 1]
    assert len(sched) == 0 and sched.pending_bytes == 0


def test_stream_order_kept_close_never_overtakes_data(sched):
    sched.push(9, P.LOW, F.encode(F.OpenStream(stream_id=9, protocol=F.Protocol.TCP, priority=P.LOW)))
    for i in range(5):
        sched.push_data(9, P.LOW, bytes([i]) * 10)
    sched.push(9, P.LOW, F.encode(F.CloseStream(stream_id=9)))
    sched.push_data(11, P.HIGH, b"hi")
    got = _frames(sched.drain())
    assert got[0] == F.Data(stream_id=11, data=b"hi")
    assert isinstance(got[1], F.OpenStream) and isinstance(got[-1], F.CloseStream)
    assert [bytes(f.data)[0] for f in got[2:-1]] == [0, 1, 2, 3, 4]


def test_round_robin_within_a_level(sched):
    for sid in (1, 3, 5):
        for _ in range(3):
            sched.push_data(sid, P.NORMAL, b"ab")
    got = _frames(sched.drain())
    assert [f.stream_id for f in got] == [1, 3, 5] * 3


def test_budget_bounds_what_sits_ahead_of_urgent_frames(sched):
    bulk = b"\0" * 65536
    for _ in range(64):
        sched.push_data(1, P.LOW, bulk)
    first = sched.drain(budget=256 * 1024)
    assert sum(len(b) for b in first) <= 256 * 1024 + 65546
    sched.push_data(3, P.HIGH, b"urgent")
    second = _frames(sched.drain(budget=256 * 1024))
    assert second[0] == F.Data(stream_id=3, data=b"urgent")


def test_small_frames_coalesce_large_payloads_pass_by_reference(sched):
    big = bytearray(b"B" * 100_000)
    for i in range(10):
        sched.push_data(1, P.NORMAL, b"s%d" % i)
    sched.push_data(1, P.NORMAL, big)
    out = sched.drain(budget=10**9)
    assert len(out) == 2 and out[1] is big
    joined = sched.drain()  # nothing left
    assert joined == []
    for i in range(3):
        sched.push_data(1, P.NORMAL, big)
    one = sched.drain(budget=10**9, coalesce=10**9)
    assert len(one) == 1 and len(one[0]) == 3 * (len(big) + 10)


def test_discard_and_accounting(sched):
    sched.push_data(1, P.NORMAL, b"abc")
    sched.push_data(3, P.NORMAL, b"defg")
    assert sched.stream_pending(1) == 13 and sched.pending_bytes == 27 and len(sched) == 2
    assert sched.discard(1) == 13
    assert sched.discard(1) == 0
    assert _frames(sched.drain()) == [F.Data(stream_id=3, data=b"defg")]
    sched.push_data(1, P.HIGH, b"again")  # a discarded id can be queued again
    assert _frames(sched.drain()) == [F.Data(stream_id=1, data=b"again")]
    assert not sched


def test_bad_input(sched):
    with pytest.raises(ValueError):
        sched.push_data(1, 7, b"x")
    with pytest.raises(ValueError):
        sched.push_data(-1, 0, b"x")


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(list(P)), st.integers(1, 50)), max_size=60),
       st.integers(1, 500))
def test_random_pushes_keep_per_stream_order_and_lose_nothing(ops, budget):
    for mod in ("ferrotunnel._sched_py", "ferrotunnel.scheduler"):
        s = importlib.import_module(mod).PriorityScheduler()
        prio_of, sent = {}, {}
        for seq, (sid, prio, n) in enumerate(ops):
            prio = prio_of.setdefault(sid, prio)
            s.push_data(sid, prio, seq.to_bytes(2, "big") * n)
            sent.setdefault(sid, []).append(seq)
        out = []
        while s:
            out += s.drain(budget=budget)
        got = {}
        for f in _frames(out):
            got.setdefault(f.stream_id, []).append(int.from_bytes(bytes(f.data[:2]), "big"))
        assert got == sent


def test_idle_streams_leave_no_state(sched):
    for sid in range(1, 200, 2):
        sched.push_data(sid, P.NORMAL, b"x")
    assert sched.queued_streams == 100
    while sched:
        sched.drain(budget=100)
    assert sched.queued_streams == 0


def test_drain_names_the_streams_whose_frames_left(sched):
    """``touched`` gets the stream id of each stream frame drained, in send order (control frames
    name none); without it nothing is recorded."""
    sched.push_data(1, P.NORMAL, b"a" * 100)
    sched.push_data(1, P.NORMAL, b"b" * 100)
    sched.push_data(3, P.NORMAL, b"c" * 100)
    sched.push(5, P.HIGH, F.encode(F.CloseStream(stream_id=5, reason=F.CloseReason.NORMAL)))
    sched.push_control(F.encode(F.HeartbeatAck(timestamp=1)))
    touched: list = []
    sched.drain(budget=100, touched=touched)  # the heartbeat, stream 5's close, then 1 (budget spent)
    assert touched == [5, 1]
    sched.drain(touched=touched)  # round-robin: 3, then 1 again
    assert touched == [5, 1, 3, 1]
    sched.push_data(7, P.LOW, b"d")
    with pytest.raises(TypeError):
        sched.drain(touched=collections.deque())  # a list or None, in both twins
    assert len(_frames(sched.drain())) == 1  # (no list given: fine)
