"""The node splice's rule for what it queues on the other stream (cluster/splice.py): views of the
tunnel's read buffer while the other stream keeps up, and while it is backed up only when the
payloads of one read fill at least half of the buffers they lie in; copies otherwise. Order,
end-of-stream and credit are checked with it.

Most tests use recording doubles of the stream interface the splice uses; one "read" is a run of
``tunnel_data`` calls followed by the ``flush_out`` the connection makes after each read. The last
ones splice two streams of real sessions (the cluster suites run it between real nodes too).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, List

import pytest
from conftest import tunnel

from ferrotunnel.aio.bridge import OWN_THRESHOLD
from ferrotunnel.cluster import splice as splice_mod
from ferrotunnel.cluster.splice import Splice
from ferrotunnel.errors import StreamClosedError

KiB = 1024


class Stream:
    """Records what the splice does to it; ``backed_up`` is what ``can_write`` answers."""

    def __init__(self, sid: int) -> None:
        self.stream_id = sid
        self.backed_up = False
        self.queued: List[Any] = []  # what write_queued got, in order (views or bytes)
        self.log: List[str] = []
        self.consumed_total = 0
        self.deferred: List[Any] = []
        self.sink: Any = None
        self.fail_writes = False

    # the source side
    def attach_sink(self, sink: Any, hold: bool = False, deliver: bool = True) -> None:
        self.sink = sink

    def deliver_buffered(self) -> None:
        pass

    def detach_sink(self) -> None:
        self.sink = None

    def consumed(self, n: int) -> None:
        self.consumed_total += n

    def defer_flush(self, sink: Any) -> None:
        self.deferred.append(sink)

    # the destination side
    def can_write(self) -> bool:
        return not self.backed_up

    def write_queued(self, data: Any, owned: bool = False) -> None:
        if self.fail_writes:
            raise StreamClosedError("closed")
        self.queued.append(data)
        self.log.append("data")

    def request_writable(self) -> None:
        # as the session core's wait_writable: at once when there is room, else on a later drain
        self.log.append("wait")
        if not self.backed_up and self.sink is not None:
            self.sink.tunnel_writable()

    def flush(self) -> None:
        self.log.append("flush")

    def write_eof(self) -> None:
        self.log.append("eof")

    def close(self) -> None:
        self.log.append("close")

    def abort(self) -> None:
        self.log.append("abort")


def joined():
    a, b = Stream(1), Stream(2)
    s = Splice(a, b)
    s.start()
    return a, b, s


def read(src: Stream, buf: bytearray, sizes: List[int]) -> List[memoryview]:
    """One read of ``src``: payloads of ``sizes`` bytes cut from ``buf`` in turn, then the flush."""
    view = memoryview(buf)
    out, pos = [], 0
    for n in sizes:
        p = view[pos:pos + n]
        out.append(p)
        src.sink.tunnel_data(p)
        pos += n
    for sink in src.deferred:
        sink.flush_out()
    src.deferred.clear()
    return out


def is_view_of(x: Any, buf: bytearray) -> bool:
    return isinstance(x, memoryview) and x.obj is buf


def test_views_while_the_other_stream_keeps_up():
    a, b, _ = joined()
    buf = bytearray(1024 * KiB)
    read(a, buf, [256 * KiB, 256 * KiB])
    assert [is_view_of(x, buf) for x in b.queued] == [True, True]
    assert a.consumed_total == 512 * KiB  # credit goes back at once
    assert b.log == ["data", "data", "flush"]


def test_backed_up_bulk_read_passes_views_not_copies():
    """A read whose payloads (one stream's) fill the buffer: nothing is copied, order kept."""
    a, b, _ = joined()
    b.backed_up = True
    buf = bytearray(1024 * KiB)
    for i in range(4):
        buf[i * 256 * KiB:(i + 1) * 256 * KiB] = bytes([i + 1]) * (256 * KiB)
    read(a, buf, [256 * KiB] * 4)
    assert len(b.queued) == 4 and all(is_view_of(x, buf) for x in b.queued)
    assert [bytes(x[:1]) for x in b.queued] == [b"\x01", b"\x02", b"\x03", b"\x04"]
    assert b.log[-1] == "flush" and b.log.count("data") == 4
    assert a.consumed_total == 0  # credit waits for dst to drain
    assert a.sink.owed == 1024 * KiB


def test_backed_up_small_share_of_a_big_buffer_is_copied():
    """Payloads filling less than half of their buffer are copied: a slow stream's small frames
    must not keep big read buffers alive."""
    a, b, _ = joined()
    b.backed_up = True
    buf = bytearray(1024 * KiB)
    buf[:64 * KiB] = b"x" * (64 * KiB)
    read(a, buf, [32 * KiB, 32 * KiB])
    assert len(b.queued) == 2
    assert all(isinstance(x, bytes) for x in b.queued)
    assert b"".join(b.queued) == b"x" * (64 * KiB)
    assert a.sink.owed == 64 * KiB


def test_half_of_the_buffer_is_enough_for_views():
    a, b, _ = joined()
    b.backed_up = True
    buf = bytearray(1024 * KiB)
    read(a, buf, [256 * KiB, 256 * KiB])
    assert all(is_view_of(x, buf) for x in b.queued)
    a2, b2, _ = joined()
    b2.backed_up = True
    buf2 = bytearray(1024 * KiB)
    read(a2, buf2, [256 * KiB, 256 * KiB - 1])
    assert all(isinstance(x, bytes) for x in b2.queued)


def test_small_payload_after_a_held_one_keeps_its_place():
    a, b, _ = joined()
    b.backed_up = True
    buf = bytearray(64 * KiB)
    buf[:] = bytes(range(256)) * 256
    small = OWN_THRESHOLD // 4
    read(a, buf, [48 * KiB, small, 64 * KiB - 48 * KiB - small])
    assert b"".join(bytes(x) for x in b.queued) == bytes(buf)
    assert b.log.index("flush") == len(b.log) - 1


def test_small_backed_up_payload_first_is_copied_at_once():
    a, b, _ = joined()
    b.backed_up = True
    buf = bytearray(64 * KiB)
    read(a, buf, [OWN_THRESHOLD - 1])
    assert len(b.queued) == 1 and isinstance(b.queued[0], bytes)


def holding(payloads: int = 2):
    """a and b joined, b backed up, and ``payloads`` payloads of 256 KiB (one read) held, the
    read not yet flushed."""
    a, b, s = joined()
    b.backed_up = True
    view = memoryview(bytearray(payloads * 256 * KiB))
    for i in range(payloads):
        a.sink.tunnel_data(view[i * 256 * KiB:(i + 1) * 256 * KiB])
    return a, b, s


def test_end_of_stream_after_held_payloads_comes_after_them():
    a, b, _ = holding()
    a.sink.tunnel_eof()  # the CloseStream frame in the same read
    assert [e for e in b.log if e in ("data", "eof")] == ["data", "data", "eof"]
    for sink in a.deferred:
        sink.flush_out()
    assert b.log.count("data") == 2  # not queued twice


def test_failed_write_of_held_payloads_resets_both_streams():
    a, b, s = joined()
    b.backed_up = True
    buf = bytearray(256 * KiB)
    b.fail_writes = True
    read(a, buf, [256 * KiB])
    assert s.done
    assert "abort" in a.log and "abort" in b.log
    assert "flush" not in b.log


def test_credit_returns_when_the_other_stream_drains():
    a, b, _ = joined()
    b.backed_up = True
    buf = bytearray(1024 * KiB)
    read(a, buf, [512 * KiB, 512 * KiB])
    assert a.consumed_total == 0
    b.backed_up = False
    b.sink.tunnel_writable()  # b's sink is the other half: it hands a's credit back
    assert a.consumed_total == 1024 * KiB


@pytest.mark.parametrize("backed_up", [False, True])
def test_bytes_arrive_intact_whatever_the_choice(backed_up):
    a, b, _ = joined()
    b.backed_up = backed_up
    buf = bytearray(range(256)) * 4096  # 1 MiB
    sizes = [300 * KiB, 5, 200 * KiB, OWN_THRESHOLD, 1024 * KiB - 500 * KiB - 5 - OWN_THRESHOLD]
    read(a, buf, sizes)
    assert b"".join(bytes(x) for x in b.queued) == bytes(buf)


def test_credit_for_held_bytes_waits_until_they_are_queued():
    """The other stream may drain during the pass that flushes a read (another stream's flush on
    its connection): the held bytes' credit goes back only once they are queued on it."""
    a, b, _ = holding()
    b.backed_up = False
    b.sink.tunnel_writable()  # b drained before a's flush_out
    assert a.consumed_total == 0 and b.queued == []
    for sink in a.deferred:
        sink.flush_out()
    assert len(b.queued) == 2
    assert a.consumed_total == 512 * KiB  # room on b: credit once the bytes are queued


def test_reset_in_the_same_read_drops_held_payloads():
    a, b, s = holding(1)
    a.sink.tunnel_reset(ConnectionResetError("reset by peer"))
    for sink in a.deferred:
        sink.flush_out()
    assert s.done and b.queued == []
    assert "abort" in b.log and "flush" not in b.log


REAL_TOTAL = 8 * 1024 * KiB


def _pattern(n: int) -> bytes:
    out = bytearray(n)
    for i in range(0, n, 4096):
        out[i:i + 4096] = (hashlib.sha256(i.to_bytes(8, "big")).digest() * 128)[:min(4096, n - i)]
    return bytes(out)


def _producer(data: bytes, chunk: int):
    """A client handler that writes ``data`` in ``chunk``-byte writes, half-closes, then drains."""
    async def producer(stream):
        for i in range(0, len(data), chunk):
            stream.write(data[i:i + chunk])
            await stream.drain()
        stream.write_eof()
        async for _ in stream:
            pass
    return producer


def _consumer(got: dict, pause: float):
    """A client handler that reads everything into ``got["data"]`` (sleeping ``pause`` after each
    piece: a slow reader), then half-closes."""
    async def consumer(stream):
        parts = []
        async for piece in stream:
            parts.append(piece)
            if pause:
                await asyncio.sleep(pause)
        got["data"] = b"".join(parts)
        stream.write_eof()
    return consumer


@pytest.mark.parametrize("chunk", [17 * KiB, 300 * KiB])
def test_real_sessions_with_a_slow_reader_get_every_byte_in_order(run, monkeypatch, chunk):
    """Two tunnels; a stream of each (server side) spliced together; the first client writes
    8 MiB, the second reads it slowly, so the splice holds payloads (the path is counted)."""
    data = _pattern(REAL_TOTAL)
    got: dict = {}
    held_reads = []
    write_held = splice_mod._Half._write_held

    def counting(self):
        if self.held is not None:
            held_reads.append(self.held_bytes)
        return write_held(self)

    monkeypatch.setattr(splice_mod._Half, "_write_held", counting)

    producer, consumer = _producer(data, chunk), _consumer(got, pause=0.002)

    async def body():
        async with tunnel(producer, tunnel_id="p") as (_, _c1, session1):
            async with tunnel(consumer, tunnel_id="c") as (_, _c2, session2):
                joined = splice_mod.splice(session1.open_stream_nowait(), session2.open_stream_nowait())
                while not ("data" in got and joined.done):
                    await asyncio.sleep(0.01)

    run(body, timeout=120)
    assert len(got["data"]) == REAL_TOTAL
    assert got["data"] == data
    assert held_reads, "the slow reader never backed the splice up: the held path did not run"


def test_real_sessions_early_bytes_filling_the_other_side_do_not_stall(run, monkeypatch):
    """A stream that has a whole window of bytes waiting when the splice starts (a node-link
    stream whose first bytes came before the owning node found the client's session). Handing
    them over fills the other stream's send buffer, which drains at once; that wake-up must
    reach the other stream's sink, or the credit for those bytes is never returned and the
    sender stalls for good (seen as a cross-node bulk transfer stuck after its first window).
    A 32 KiB window arrives as one frame in one read (one payload), and a 32 KiB send buffer on
    the other side makes that payload fill it: none of its credit is returned before the wake."""
    import ferrotunnel as ft
    from ferrotunnel.aio.stream import VirtualStream

    window = 32 * KiB
    total = 2 * 1024 * KiB
    data = _pattern(total)
    fed: dict = {}
    got: dict = {}
    feed_data = VirtualStream.feed_data

    def counting(self, payload):
        fed.setdefault(id(self), []).append(len(payload))
        return feed_data(self, payload)

    monkeypatch.setattr(VirtualStream, "feed_data", counting)

    # all at once: the spliced stream buffers its first window of it
    producer, consumer = _producer(data, len(data)), _consumer(got, pause=0.0)

    async def body():
        async with tunnel(producer, tunnel_id="p", server_config=ft.ServerConfig(initial_window=window)) as (
                _, _c1, session1):
            async with tunnel(consumer, tunnel_id="c", server_config=ft.ServerConfig(stream_send_buffer=window)) as (
                    _, _c2, session2):
                early = session1.open_stream_nowait()
                for _ in range(2000):  # until the producer's first window waits in the stream
                    if sum(fed.get(id(early), ())) >= window:
                        break
                    await asyncio.sleep(0.005)
                # one payload: a frame cut by a read boundary would come in pieces, and the credit
                # of a first piece of half the window or more would go back without the wake-up
                assert fed.get(id(early)) == [window], "the first window did not arrive as one payload"
                joined = splice_mod.splice(early, session2.open_stream_nowait())
                while not ("data" in got and joined.done):
                    await asyncio.sleep(0.01)

    run(body, timeout=60)
    assert got["data"] == data


def test_a_finished_splice_gives_back_the_credit_it_still_owed(run):
    """Both ends finish while the other stream is still backed up (a slow reader): the credit the
    splice held back for bytes it passed on must still reach the session's accounting when the
    splice ends, or every such splice leaves its bytes counted as unread on the session for good
    (a node link would hit ``session_recv_budget`` after some dozens of bulk transfers)."""
    total = 3_000_000
    data = _pattern(total)
    got: dict = {}
    owed_at_end: List[int] = []
    release = Splice._release

    def recording(self):
        owed_at_end.append(sum(h.owed for h in self.halves))
        return release(self)

    async def slow_reader(stream):  # done sending at once; then reads slowly
        stream.write_eof()
        parts = []
        async for piece in stream:
            parts.append(piece)
            await asyncio.sleep(0.005)
        got["data"] = b"".join(parts)

    async def body():
        async with tunnel(_producer(data, 256 * KiB), tunnel_id="p") as (_, _c1, session1):
            async with tunnel(slow_reader, tunnel_id="c") as (_, _c2, session2):
                core1, core2 = session1.connection.core, session2.connection.core
                for _ in range(2):
                    got.clear()
                    joined = splice_mod.splice(session1.open_stream_nowait(), session2.open_stream_nowait())
                    while not ("data" in got and joined.done) or core1.streams or core2.streams:
                        await asyncio.sleep(0.01)
                    assert got["data"] == data
                    assert core1.windows.total_unread == 0 and core2.windows.total_unread == 0, (
                        core1.windows.total_unread, core2.windows.total_unread)

    Splice._release = recording  # type: ignore[method-assign]
    try:
        run(body, timeout=120)
    finally:
        Splice._release = release  # type: ignore[method-assign]
    assert any(owed_at_end), "no splice ended with credit owed: the case was not reached"
