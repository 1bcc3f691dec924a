"""Decoder limits, exact to the byte, on each implementation by itself (not only compiled-vs-twin
parity, so an off-by-one made in both fails here): ``max_frame_size``, ``max_control_frame`` and the
decode caps of control bodies (MAX_STRING, MAX_HEADERS, MAX_HEADER_BYTES, MAX_METADATA,
MAX_CAPABILITIES_WIRE); and the bounded cost of the worst control frames."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
import uuid

import pytest

from conftest import frame_from_json, load_vectors
from ferrotunnel import _model
from ferrotunnel import frames as F
from ferrotunnel.config import StreamConfig

MAX_CONTROL = StreamConfig().max_control_frame  # what the session core passes (256 KiB)
KiB, MiB = 1024, 1024 * 1024


# ---------------------------------------------------------------- building frames by hand


def varint(n: int) -> bytes:
    if n <= 250:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfb" + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return b"\xfc" + n.to_bytes(4, "little")
    return b"\xfd" + n.to_bytes(8, "little")


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return varint(len(raw)) + raw


def control(body: bytes) -> bytes:
    return (len(body) + 1).to_bytes(4, "big") + b"\x00" + body


def data_frame(payload_len: int, sid: int = 1) -> bytes:
    return (payload_len + 6).to_bytes(4, "big") + b"\x01" + sid.to_bytes(4, "big") + b"\x00" + b"d" * payload_len


def header(length: int, ftype: int = 0) -> bytes:
    return length.to_bytes(4, "big") + bytes([ftype])


def plugin_frame(length: int) -> bytes:
    """A PluginData control frame whose length prefix is exactly ``length`` (>= 4)."""
    rest = length - 1 - 3  # type byte; variant, empty plugin_id, data length (1..5 bytes)
    for w in (1, 3, 5, 9):
        n = rest - (w - 1)
        if len(varint(n)) == w:
            wire = control(b"\x0b\x00" + varint(n) + b"p" * n)
            assert int.from_bytes(wire[:4], "big") == length
            return wire
    raise AssertionError(length)


def open_stream(headers: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    hs = b"".join(s(k) + s(v) for k, v in headers)
    return b"\x04\x01\x00" + varint(len(headers) if count is None else count) + hs + b"\x00\x00"


def handshake(caps: list[bytes], count: int | None = None) -> bytes:
    return b"\x00" + s("tok") + b"\x00\x01\x01" + varint(len(caps) if count is None else count) + b"".join(map(s, caps))


def handshake_ack(caps: list[bytes], count: int | None = None) -> bytes:
    return b"\x01\x10" + bytes(16) + b"\x00\x01" + varint(len(caps) if count is None else count) + b"".join(map(s, caps))


def register(entries: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    es = b"".join(s(k) + s(v) for k, v in entries)
    return b"\x02" + s("svc") + b"\x00" + varint(len(entries) if count is None else count) + es


def decoded(codec, wire: bytes, how: str = "feed", **kw) -> list:
    """Decode ``wire`` with a fresh decoder: in one call, through feed_raw, or byte by byte."""
    dec = codec.FrameDecoder(**kw)
    out: list = []
    if how == "feed":
        out = dec.feed(wire)
    elif how == "feed_raw":
        dec.feed_raw(wire, lambda sid, fl, p: out.append(("data", sid, fl, bytes(p))), out.append)
    else:
        for i in range(len(wire)):
            out += dec.feed(wire[i:i + 1])
    assert dec.buffered == 0
    return out


HOW = ["feed", "feed_raw", "bytewise"]


# ---------------------------------------------------------------- names and defaults


def test_caps_are_named_and_exported():
    caps = {"MAX_STRING": 64 * KiB, "MAX_HEADERS": 256, "MAX_HEADER_BYTES": 64 * KiB, "MAX_METADATA": 256,
            "MAX_CAPABILITIES_WIRE": 256}
    for name, value in caps.items():
        assert getattr(_model, name) == getattr(F, name) == value
        assert name in F.__all__
    assert MAX_CONTROL == 256 * KiB


def test_constructor_forms(codec):
    d = codec.FrameDecoder()
    assert (d.max_frame_size, d.max_control_frame) == (F.MAX_FRAME_SIZE, None)
    d = codec.FrameDecoder(1000)  # the one-argument form keeps working
    assert (d.max_frame_size, d.max_control_frame) == (1000, None)
    d = codec.FrameDecoder(F.MAX_FRAME_SIZE, MAX_CONTROL)  # what SessionCore passes
    assert (d.max_frame_size, d.max_control_frame) == (F.MAX_FRAME_SIZE, MAX_CONTROL)
    d = codec.FrameDecoder(max_frame_size=1000, max_control_frame=10 * MiB)  # above max_frame_size: allowed
    assert d.max_control_frame == 10 * MiB
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_control_frame"):
            codec.FrameDecoder(max_control_frame=bad)


def test_reference_vectors_pass_every_cap(codec):
    for case in load_vectors():
        if case["expect"] != "ok":
            continue
        wire = bytes.fromhex(case["wire_hex"])
        want = frame_from_json(case["frame"])
        assert codec.FrameDecoder(F.MAX_FRAME_SIZE, MAX_CONTROL).feed(wire) == [want], case["name"]
        if wire[4] == 0:
            assert codec.decode_control(wire[5:]) == want


# ---------------------------------------------------------------- max_frame_size


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("limit", [6, 7, 1000])
def test_max_frame_size_exact(codec, limit, how):
    assert len(decoded(codec, data_frame(limit - 6), how, max_frame_size=limit)) == 1  # exactly: accepted
    assert len(decoded(codec, plugin_frame(limit), how, max_frame_size=limit)) == 1
    for wire in (data_frame(limit - 5), header(limit + 1, 0) + b"\x0b"):  # one byte more: refused
        dec = codec.FrameDecoder(limit)
        with pytest.raises(F.FrameError, match=rf"too large: {limit + 1} bytes \(max {limit}\)"):
            dec.feed(wire[:5])  # from the header alone


def test_max_frame_size_default_exact(codec):
    assert F.MAX_FRAME_SIZE == 16 * MiB
    wire = data_frame(F.MAX_FRAME_SIZE - 6)
    fr, = codec.FrameDecoder().feed(wire)
    assert len(fr.data) == F.MAX_DATA_PAYLOAD
    seen = []
    codec.FrameDecoder(F.MAX_FRAME_SIZE, MAX_CONTROL).feed_raw(wire, lambda sid, fl, p: seen.append(len(p)), seen.append)
    assert seen == [F.MAX_DATA_PAYLOAD]  # data frames are not bound by max_control_frame
    del wire, fr
    for ftype in (0, 1):
        with pytest.raises(F.FrameError, match=rf"too large: {F.MAX_FRAME_SIZE + 1} bytes"):
            codec.FrameDecoder().feed(header(F.MAX_FRAME_SIZE + 1, ftype))


# ---------------------------------------------------------------- max_control_frame


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("limit", [4, 5, 300, 1000])
def test_max_control_frame_exact(codec, limit, how):
    # exactly the limit: accepted; data frames larger than it still pass (max_frame_size bounds them)
    assert len(decoded(codec, plugin_frame(limit), how, max_frame_size=4000, max_control_frame=limit)) == 1
    assert len(decoded(codec, data_frame(2000), how, max_frame_size=4000, max_control_frame=limit)) == 1
    assert len(decoded(codec, plugin_frame(limit) + data_frame(limit + 6), how, max_frame_size=4000,
                       max_control_frame=limit)) == 2


def _refuses_from_header(codec, limit: int, prefix: bytes, over: bytes, split: str, **kw) -> None:
    """``prefix`` (whole frames) then the header of a control frame one byte over ``limit`` and
    part of its body: FrameError once its 5 header bytes are in, with none of its body buffered."""
    dec = codec.FrameDecoder(**kw)
    msg = rf"control frame too large: {limit + 1} bytes exceeds max_control_frame \({limit}\)"
    got: list = []
    hb = codec.decode_control(prefix[5:]) if prefix else None
    with pytest.raises(F.FrameError, match=msg):
        if split == "one call":
            got += dec.feed(prefix + over)
        elif split == "header only":
            got += dec.feed(prefix + over[:5])
        elif split == "feed_raw":
            dec.feed_raw(prefix + over, lambda *a: got.append(a), got.append)
        elif split == "4+1":  # the partial-frame path: the header completes in the decoder's buffer
            got += dec.feed(prefix + over[:4])
            assert dec.buffered == 4
            got += dec.feed(over[4:])
        elif split == "bytewise":
            wire = prefix + over
            for i in range(len(wire)):
                got += dec.feed(wire[i:i + 1])
                assert dec.buffered <= 4 or i < len(prefix)  # never a byte of the refused body
        elif split == "partial then header":  # a frame split across calls, then the big header
            got += dec.feed(prefix[:3])
            got += dec.feed(prefix[3:] + over[:2])
            got += dec.feed(over[2:])
    # frames before the refused one: delivered, unless they came in the very call that raised
    assert got == ([] if split in ("one call", "header only") or not prefix else [hb])


SPLITS = ["one call", "header only", "feed_raw", "4+1", "bytewise", "partial then header"]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("limit", [4, 300, MAX_CONTROL])
def test_max_control_frame_one_over_refused_from_header(codec, limit, split):
    over = header(limit + 1) + b"\x0b\x00"  # only two body bytes ever sent
    prefix = F.encode(F.Heartbeat(timestamp=7))
    _refuses_from_header(codec, limit, prefix, over, split, max_frame_size=F.MAX_FRAME_SIZE, max_control_frame=limit)
    if split != "partial then header":
        _refuses_from_header(codec, limit, b"", over, split, max_frame_size=F.MAX_FRAME_SIZE, max_control_frame=limit)


def test_max_control_frame_default_exact(codec):
    wire = plugin_frame(MAX_CONTROL)
    fr, = codec.FrameDecoder(F.MAX_FRAME_SIZE, MAX_CONTROL).feed(wire)
    assert len(fr.data) == MAX_CONTROL - 8  # type, variant, empty plugin_id, 5-byte data length
    dec = codec.FrameDecoder(F.MAX_FRAME_SIZE, MAX_CONTROL)
    assert dec.feed(wire[:-1]) == [] and dec.feed(wire[-1:]) == [fr]


def test_max_control_frame_above_max_frame_size(codec):
    # the smaller limit speaks: max_frame_size, with its own message
    dec = codec.FrameDecoder(1000, 5000)
    assert len(dec.feed(plugin_frame(1000))) == 1
    with pytest.raises(F.FrameError, match=r"frame too large: 1001 bytes \(max 1000\)"):
        dec.feed(header(1001))
    # without max_control_frame, a control frame up to max_frame_size passes
    assert len(codec.FrameDecoder(1000).feed(plugin_frame(1000))) == 1


# ---------------------------------------------------------------- decode caps


def both_ways(codec, body: bytes) -> object:
    """decode_control and the session decoder agree; returns the frame."""
    fr = codec.decode_control(body)
    assert codec.FrameDecoder(F.MAX_FRAME_SIZE, MAX_CONTROL).feed(control(body)) == [fr]
    return fr


def refused(codec, body: bytes, match: str) -> None:
    with pytest.raises(F.FrameError, match=match):
        codec.decode_control(body)
    with pytest.raises(F.FrameError, match=match):
        codec.FrameDecoder(F.MAX_FRAME_SIZE, MAX_CONTROL).feed(control(body))


def _strings(value) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _strings(v)]
    return []


N = F.MAX_STRING
# every String field of every variant, with the bytes before and after it
STRING_FIELDS = {
    "token": (b"\x00", b"\x00\x01\x01\x00"),
    "tunnel_id": (b"\x00\x00\x01", b"\x01\x01\x00"),
    "capability": (b"\x00\x00\x00\x01\x01\x01", b""),
    "server capability": (b"\x01\x10" + bytes(16) + b"\x00\x01\x01", b""),
    "service_name": (b"\x02", b"\x00\x00"),
    "metadata key": (b"\x02\x00\x00\x01", b"\x00"),
    "metadata value": (b"\x02\x00\x00\x01\x00", b""),
    "public_url": (b"\x03", b"\x00"),
    "header name": (b"\x04\x01\x00\x01", b"\x00\x00\x00"),
    "header value": (b"\x04\x01\x00\x01\x00", b"\x00\x00"),
    "close message": (b"\x07\x01\x02", b""),
    "message": (b"\x0a\x00\x00", b""),
    "plugin_id": (b"\x0b", b"\x00"),
}


@pytest.mark.parametrize("field", list(STRING_FIELDS))
def test_max_string_exact(codec, field):
    pre, post = STRING_FIELDS[field]
    for text in ("a" * N, "é" * (N // 2), "€" * (N // 3) + "a"):  # bytes, not characters
        assert len(text.encode()) == N
        fr = both_ways(codec, pre + s(text) + post)
        assert text in _strings(dataclasses.astuple(fr))
    for text in ("a" * (N + 1), "é" * (N // 2) + "a"):
        refused(codec, pre + s(text) + post, rf"{field} length {N + 1} exceeds MAX_STRING \({N}\)")
    # the cap is checked before the bytes left: a claim alone is refused by name
    refused(codec, pre + varint(N + 1), rf"{field} length {N + 1} exceeds MAX_STRING")
    refused(codec, pre + varint(2**64 - 1), rf"{field} length {2**64 - 1} exceeds MAX_STRING")


def test_max_headers_exact(codec):
    fr = both_ways(codec, open_stream([(b"", b"")] * F.MAX_HEADERS))
    assert fr.headers == [("", "")] * 256
    over = F.MAX_HEADERS + 1
    refused(codec, open_stream([(b"", b"")] * over), rf"headers count {over} exceeds MAX_HEADERS \(256\)")
    refused(codec, open_stream([], count=over), r"headers count 257 exceeds MAX_HEADERS")  # before the bytes left


@pytest.mark.parametrize("layout", ["even", "name tips", "value tips", "256 headers"])
def test_max_header_bytes_exact(codec, layout):
    B = F.MAX_HEADER_BYTES
    q, r = B // 8, B // 512
    at, over = {  # name + value bytes: exactly B, then B + 1 (the last name or value one longer)
        "even": ([(b"n" * q, b"v" * q)] * 4, [(b"n" * q, b"v" * q)] * 3 + [(b"n" * q, b"v" * (q + 1))]),
        # (the name is refused before its value is read: the message counts the name only)
        "name tips": ([(b"", b"v" * (B - 1)), (b"n", b"")], [(b"", b"v" * (B - 1)), (b"nn", b"v")]),
        "value tips": ([(b"n" * (B - 1), b""), (b"", b"v")], [(b"n" * (B - 1), b""), (b"", b"vv")]),
        "256 headers": ([(b"n" * r, b"v" * r)] * 256, [(b"n" * r, b"v" * r)] * 255 + [(b"n" * (r + 1), b"v" * r)]),
    }[layout]
    fr = both_ways(codec, open_stream(at))
    assert sum(len(k) + len(v) for k, v in fr.headers) == B
    refused(codec, open_stream(over), rf"header bytes {B + 1} exceed MAX_HEADER_BYTES \({B}\)")


def test_max_metadata_exact(codec):
    keys = [str(i).encode() for i in range(F.MAX_METADATA + 1)]
    fr = both_ways(codec, register([(k, b"v") for k in keys[:-1]]))
    assert len(fr.metadata) == 256
    refused(codec, register([(k, b"v") for k in keys]), r"metadata count 257 exceeds MAX_METADATA \(256\)")
    refused(codec, register([(b"k", b"v")] * 257), r"metadata count 257 exceeds MAX_METADATA")  # wire entries count
    refused(codec, register([], count=257), r"metadata count 257 exceeds MAX_METADATA")


@pytest.mark.parametrize("build,field,what", [(handshake, "capabilities", "capability"),
                                              (handshake_ack, "server_capabilities", "server capability")])
def test_max_capabilities_wire_exact(codec, build, field, what):
    caps = [f"c{i}".encode() for i in range(F.MAX_CAPABILITIES_WIRE + 1)]
    fr = both_ways(codec, build(caps[:-1]))
    assert len(getattr(fr, field)) == 256
    refused(codec, build(caps), rf"{what} count 257 exceeds MAX_CAPABILITIES_WIRE \(256\)")
    refused(codec, build([], count=257), rf"{what} count 257 exceeds MAX_CAPABILITIES_WIRE")


def test_real_peers_fit():
    rust_hs = F.Handshake(token="t" * 256, tunnel_id="x" * 255, capabilities=["basic", "tcp"])
    assert F.decode_control(F.encode(rust_hs)[5:]) == rust_hs
    ack = F.HandshakeAck(session_id=uuid.uuid4(), status=F.HandshakeStatus.SUCCESS, version=1,
                         server_capabilities=["basic"] + [f"ext{i}/1" for i in range(31)])
    assert F.decode_control(F.encode(ack)[5:]) == ack


# ---------------------------------------------------------------- the cost of the worst control frames


_PAIRS = [bytes([a, b]) for a in range(0x21, 0x7F) for b in range(0x21, 0x7F)]  # 8836 distinct 2-char strings
_TRIOS = [p + bytes([c]) for p in _PAIRS[:1000] for c in range(0x21, 0x7F)]  # 94,000 distinct 3-char keys


def _fill(elements: list[bytes], n: int) -> bytes:
    """``n`` elements of equal size, cycling through ``elements``."""
    unit = b"".join(elements)
    per = len(elements[0])
    return (unit * (n * per // len(unit) + 1))[: n * per]


def _worst(kind: str, limit: int) -> bytes:
    """Control bodies whose frame length is at most ``limit``: the most objects and bytes per wire
    byte that each variant allows (refused by the caps), and the largest frames the caps accept."""
    room = limit - 1 - 32  # the type byte, and room for the fields around the bulk
    if kind == "OpenStream, empty headers":
        body = b"\x04\x01\x00" + varint(room // 2) + b"\x00\x00" * (room // 2) + b"\x00\x00"
    elif kind == "OpenStream, 2-char header names":
        body = b"\x04\x01\x00" + varint(room // 4) + _fill([s(p) + b"\x00" for p in _PAIRS], room // 4) + b"\x00\x00"
    elif kind in ("Handshake, 2-char capabilities", "HandshakeAck, 2-char capabilities"):
        build = handshake if kind.startswith("Handshake,") else handshake_ack
        body = build([], count=room // 3) + _fill([s(p) for p in _PAIRS], room // 3)
    elif kind == "Register, distinct keys":
        body = register([], count=room // 5) + _fill([s(k) + b"\x00" for k in _TRIOS], room // 5)
    elif kind == "Error, long message":
        body = b"\x0a\x00\x00" + s(b"m" * room)
    # accepted: every cap reached at once, or the frame filled with one field
    elif kind == "OpenStream at MAX_HEADERS and MAX_HEADER_BYTES":
        body = open_stream([(b"n" * 128, b"v" * 128)] * F.MAX_HEADERS)
    elif kind == "Handshake, MAX_CAPABILITIES_WIRE long capabilities":
        body = handshake([b"c" * min(F.MAX_STRING, room // F.MAX_CAPABILITIES_WIRE - 3)] * F.MAX_CAPABILITIES_WIRE)
    elif kind == "Register, MAX_METADATA long entries":
        n = min(F.MAX_STRING - 3, room // F.MAX_METADATA // 2 - 6)
        body = register([(b"%03d" % i + b"k" * n, b"v" * n) for i in range(F.MAX_METADATA)])
    elif kind == "Error, MAX_STRING message":
        body = b"\x0a\x00\x00" + s(b"m" * min(F.MAX_STRING, room))
    elif kind == "PluginData, full":
        body = b"\x0b\x00" + s(b"p" * room)
    else:
        raise AssertionError(kind)
    assert len(body) + 1 <= limit, kind
    return body


WORST = ["OpenStream, empty headers", "OpenStream, 2-char header names", "Handshake, 2-char capabilities",
         "HandshakeAck, 2-char capabilities", "Register, distinct keys", "Error, long message",
         "OpenStream at MAX_HEADERS and MAX_HEADER_BYTES", "Handshake, MAX_CAPABILITIES_WIRE long capabilities",
         "Register, MAX_METADATA long entries", "Error, MAX_STRING message", "PluginData, full"]
PEAK_BOUND = 2 * MiB
TIME_BOUND = 0.025  # seconds; the measured worst is well under 1 ms compiled, ~1 ms on the twin


def _cost(fn) -> tuple[int, float]:
    """(peak bytes traced, best wall time of 3) of ``fn()``, FrameError accepted."""
    def once() -> None:
        try:
            fn()
        except F.FrameError:
            pass
    tracemalloc.start()
    try:
        once()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t0)
    return peak, best


@pytest.mark.parametrize("kind", WORST)
def test_worst_control_body_costs_little(codec, kind):
    """decode_control (as the handshake and the decoder call it) on the worst bodies that fit in
    max_control_frame: under 2 MiB traced and 25 ms. Before the caps: tens of MB, tens of ms."""
    body = _worst(kind, MAX_CONTROL)
    peak, took = _cost(lambda: codec.decode_control(body))
    assert peak < PEAK_BOUND, f"{kind}: peak {peak / MiB:.1f} MiB"
    assert took < TIME_BOUND, f"{kind}: {took * 1e3:.1f} ms"


@pytest.mark.parametrize("size", [MAX_CONTROL, F.MAX_FRAME_SIZE], ids=["256KiB", "16MiB"])
@pytest.mark.parametrize("kind", WORST)
def test_worst_control_frame_costs_little_in_the_session_decoder(codec, kind, size):
    """The whole frame through the decoder as the session core builds it: up to max_control_frame,
    bounded by the caps; a 16 MiB one refused from its header."""
    wire = control(_worst(kind, size))
    peak, took = _cost(lambda: codec.FrameDecoder(F.MAX_FRAME_SIZE, MAX_CONTROL).feed(wire))
    assert peak < PEAK_BOUND, f"{kind}: peak {peak / MiB:.1f} MiB"
    assert took < TIME_BOUND, f"{kind}: {took * 1e3:.1f} ms"
