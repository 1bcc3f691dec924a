"""Codec, pool and scheduler micro-benchmarks: compiled and twin side by side in each group.

Run: python -m pytest bench/test_bench_codec.py --benchmark-group-by=group --benchmark-columns=median,ops
"""

from __future__ import annotations

from array import array

import pytest

from conftest import impl_module
from ferrotunnel import _model as M

IMPLS = ["c", "py"]
N_FRAMES = 1000


def codec(kind):
    return impl_module(kind, "ferrotunnel._frames", "ferrotunnel._frames_py")


def _stream(size: int, n: int) -> bytes:
    payload = b"x" * size
    one = (size + 6).to_bytes(4, "big") + b"\x01" + (5).to_bytes(4, "big") + b"\x00" + payload
    return one * n


@pytest.mark.parametrize("kind", IMPLS)
@pytest.mark.parametrize("size", [64, 1024, 16384, 65536])
def test_decode_data(benchmark, kind, size):
    mod = codec(kind)
    n = max(16, N_FRAMES * 64 // size)
    wire = _stream(size, n)
    benchmark.group = f"decode data {size} B x{n} (FrameDecoder.feed)"
    frames = benchmark(lambda: mod.FrameDecoder().feed(wire))
    assert len(frames) == n


@pytest.mark.parametrize("kind", IMPLS)
def test_copy_payloads_baseline_64k(benchmark, kind):
    """Baseline for the 64 KiB decode group: only copying the payloads out (what decode avoids)."""
    n = 16
    wire = _stream(65536, n)
    mv = memoryview(wire)
    benchmark.group = f"decode data 65536 B x{n} (FrameDecoder.feed)"
    if kind == "py":
        pytest.skip("one baseline is enough")
    benchmark(lambda: [bytes(mv[i * 65546 + 10:(i + 1) * 65546]) for i in range(n)])


@pytest.mark.parametrize("kind", IMPLS)
def test_decode_fast_path_feed_raw(benchmark, kind):
    mod = codec(kind)
    wire = _stream(64, N_FRAMES)
    count = [0]

    def on_data(sid, flags, payload):
        count[0] += 1

    benchmark.group = "decode 64 B x1000 fast path: feed_raw (callback, no frame object)"
    benchmark(lambda: mod.FrameDecoder().feed_raw(wire, on_data, None))


@pytest.mark.parametrize("kind", IMPLS)
def test_decode_fast_path_scan(benchmark, kind):
    mod = codec(kind)
    wire = _stream(64, N_FRAMES)
    out = array("I", bytes(4 * mod.SCAN_FIELDS * N_FRAMES))
    benchmark.group = "decode 64 B x1000 fast path: scan_frames (object-free)"
    n, used = benchmark(lambda: mod.scan_frames(wire, out))
    assert n == N_FRAMES and used == len(wire)


@pytest.mark.parametrize("kind", IMPLS)
@pytest.mark.parametrize("size", [64, 1024, 16384, 65536])
def test_encode_data(benchmark, kind, size):
    mod = codec(kind)
    frame = M.Data(stream_id=7, data=b"y" * size)
    benchmark.group = f"encode data {size} B"
    benchmark(mod.encode, frame)


@pytest.mark.parametrize("kind", IMPLS)
def test_encode_data_header_into(benchmark, kind):
    mod = codec(kind)
    buf = bytearray(64)
    benchmark.group = "encode data header into buffer"
    benchmark(mod.encode_data_header_into, buf, 0, 7, 1000, False)


CONTROL = [
    M.Heartbeat(timestamp=1_770_000_000_000),
    M.CloseStream(stream_id=70000),
    M.OpenStream(stream_id=6, protocol=M.Protocol.TCP, headers=[("host", "example.com")], priority=M.StreamPriority.HIGH),
    M.Handshake(token="secret", tunnel_id="app", capabilities=["basic", "tcp"]),
]


@pytest.mark.parametrize("kind", IMPLS)
def test_encode_control(benchmark, kind):
    mod = codec(kind)
    benchmark.group = "encode 4 control frames"
    benchmark(lambda: [mod.encode(f) for f in CONTROL])


@pytest.mark.parametrize("kind", IMPLS)
def test_decode_control(benchmark, kind):
    mod = codec(kind)
    wire = b"".join(mod.encode(f) for f in CONTROL) * 25
    benchmark.group = "decode 100 control frames"
    assert len(benchmark(lambda: mod.FrameDecoder().feed(wire))) == 100


@pytest.mark.parametrize("kind", IMPLS)
def test_pool_acquire_release(benchmark, kind):
    pool = impl_module(kind, "ferrotunnel._pool", "ferrotunnel._pool_py")
    acquire, release = pool.acquire_bytes, pool.release_bytes

    def cycle():
        for _ in range(100):
            release(acquire(4096))

    benchmark.group = "pool acquire+release x100"
    benchmark(cycle)


@pytest.mark.parametrize("kind", IMPLS)
def test_scheduler_push_drain(benchmark, kind):
    sched = impl_module(kind, "ferrotunnel._sched", "ferrotunnel._sched_py")
    payload = b"z" * 1024

    def run():
        s = sched.PriorityScheduler()
        for i in range(256):
            s.push_data((i % 16) * 2 + 1, i % 4, payload)
        while s:
            s.drain()

    benchmark.group = "scheduler push 256 x 1 KiB over 16 streams + drain"
    benchmark(run)
