"""Wire codec against the Rust reference vectors, PROTOCOL.md's worked examples and random input."""

from __future__ import annotations

import tracemalloc
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import both_codecs, frame_from_json, load_vectors
from ferrotunnel import frames as F

CASES = load_vectors()


def _feed_all(data: bytes, chunks: list[int] | None = None) -> list:
    dec = F.FrameDecoder()
    if chunks is None:
        return dec.feed(data)
    out, pos = [], 0
    for c in chunks:
        out += dec.feed(data[pos:pos + c])
        pos += c
    out += dec.feed(data[pos:])
    assert dec.buffered == 0
    return out


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference_vector(case):
    wire = bytes.fromhex(case["wire_hex"])
    if case["expect"] == "ok":
        want = frame_from_json(case["frame"])
        got = _feed_all(wire)
        assert got == [want]
        # byte by byte gives the same
        dec = F.FrameDecoder()
        one = [f for i in range(len(wire)) for f in dec.feed(wire[i:i + 1])]
        assert one == [want]
        if not case.get("decode_only"):
            assert F.encode(want) == wire
    elif case["expect"] == "incomplete":
        dec = F.FrameDecoder()
        assert dec.feed(wire) == []
        assert dec.buffered == len(wire)
    else:
        with pytest.raises(F.FrameError):
            F.FrameDecoder().feed(wire)


# PROTOCOL.md 1.3 and 2.8, byte for byte. Data frames as whole wire bytes; control frames as the
# bincode body (the 5-byte prefix is derived), except the handful quoted with their prefix.
WIRE = [
    (F.Data(stream_id=2, data=b"hi"), "00 00 00 08 01 00 00 00 02 00 68 69"),
    (F.Data(stream_id=42, data=b"abcd", end_of_stream=True), "00 00 00 0a 01 00 00 00 2a 01 61 62 63 64"),
    (F.Heartbeat(timestamp=1), "00 00 00 03 00 08 01"),
    (F.Heartbeat(timestamp=300), "00 00 00 05 00 08 FB 2C 01"),
    (F.Heartbeat(timestamp=1_770_000_000_000), "00 00 00 0B 00 08 FD 00 A4 38 1C 9C 01 00 00"),
    (F.CloseStream(stream_id=7, reason=F.CloseReason.ERROR, message="x"), "00 00 00 06 00 07 07 02 01 78"),
    (F.CloseStream(stream_id=2, reason=F.CloseReason.NORMAL), "00 00 00 04 00 07 02 00"),
    (F.OpenStream(stream_id=2, protocol=F.Protocol.HTTP), "00 00 00 07 00 04 02 00 00 00 00"),
    (F.HandshakeAck(session_id=uuid.UUID(int=0), status=F.HandshakeStatus.INVALID_TOKEN, version=0),
     "00 00 00 16 00 01 10" + " 00" * 16 + " 01 00 00"),
]
BODY = [
    (F.HeartbeatAck(timestamp=12345), "09 FB 39 30"),
    (F.CloseStream(stream_id=300), "07 FB 2C 01 00"),
    (F.CloseStream(stream_id=70_000), "07 FC 70 11 01 00 00"),
    (F.Handshake(token="secret", tunnel_id=None, capabilities=["basic", "tcp"]),
     "00 06 73 65 63 72 65 74 00 01 01 02 05 62 61 73 69 63 03 74 63 70"),
    (F.Handshake(token="tok", tunnel_id="app"), "00 03 74 6F 6B 01 03 61 70 70 01 01 00"),
    (F.HandshakeAck(session_id=uuid.UUID("00112233-4455-6677-8899-aabbccddeeff"), status=F.HandshakeStatus.SUCCESS,
                    version=1, server_capabilities=["basic"]),
     "01 10 00 11 22 33 44 55 66 77 88 99 AA BB CC DD EE FF 00 01 01 05 62 61 73 69 63"),
    (F.OpenStream(stream_id=4, protocol=F.Protocol.TCP), "04 04 04 00 00 00"),
    (F.OpenStream(stream_id=6, protocol=F.Protocol.WEB_SOCKET, headers=[("a", "b")], body_hint=1000,
                  priority=F.StreamPriority.CRITICAL), "04 06 02 01 01 61 01 62 01 FB E8 03 03"),
    (F.Error(stream_id=1, code=F.ErrorCode.PROTOCOL_ERROR, message="test error"),
     "0A 01 01 00 0A 74 65 73 74 20 65 72 72 6F 72"),
    (F.Register(service_name="web", protocol=F.Protocol.HTTP, metadata={"k": "v"}), "02 03 77 65 62 00 01 01 6B 01 76"),
    (F.RegisterAck(public_url="u", status=F.RegisterStatus.QUOTA_EXCEEDED), "03 01 75 03"),
    (F.StreamAck(stream_id=3, status=F.StreamStatus.BACKPRESSURE_APPLIED), "05 03 02"),
    (F.PluginData(plugin_id="p", data=b"\x01\x02\x03"), "0B 01 70 03 01 02 03"),
]
WORKED = WIRE + [(f, (len(bytes.fromhex(b.replace(" ", ""))) + 1).to_bytes(4, "big").hex() + "00" + b) for f, b in BODY]


def test_handshake_example_length():
    # PROTOCOL.md 2.8 g: the Rust client's handshake body is 22 bytes, wire starts 00 00 00 17 00
    assert F.encode(BODY[3][0])[:5] == bytes.fromhex("0000001700")


@pytest.mark.parametrize("frame,hexwire", WORKED, ids=[type(f).__name__ + str(i) for i, (f, _) in enumerate(WORKED)])
def test_worked_examples(frame, hexwire):
    wire = bytes.fromhex(hexwire.replace(" ", ""))
    assert F.encode(frame) == wire
    assert F.FrameDecoder().feed(wire) == [frame]


def test_enum_values_are_wire_indices():
    assert [m.name for m in F.StreamPriority] == ["NORMAL", "LOW", "HIGH", "CRITICAL"]
    assert F.ErrorCode.PROTOCOL_ERROR == 0 and F.ErrorCode.SERVICE_UNAVAILABLE == 6
    assert F.Protocol.TCP == 4 and F.Protocol.WEB_SOCKET == 2
    assert F.HandshakeStatus.TUNNEL_ID_TAKEN == 5
    assert F.StreamStatus.BACKPRESSURE_APPLIED == 2
    assert F.CloseReason.PROTOCOL_VIOLATION == 4


@pytest.mark.parametrize("enum_cls", [F.Protocol, F.StreamPriority, F.HandshakeStatus, F.RegisterStatus,
                                      F.StreamStatus, F.CloseReason, F.ErrorCode])
def test_every_enum_value_round_trips(enum_cls):
    for member in enum_cls:
        if enum_cls is F.Protocol:
            fr = F.OpenStream(stream_id=1, protocol=member)
        elif enum_cls is F.StreamPriority:
            fr = F.OpenStream(stream_id=1, protocol=F.Protocol.TCP, priority=member)
        elif enum_cls is F.HandshakeStatus:
            fr = F.HandshakeAck(session_id=uuid.uuid4(), status=member)
        elif enum_cls is F.RegisterStatus:
            fr = F.RegisterAck(public_url="x", status=member)
        elif enum_cls is F.StreamStatus:
            fr = F.StreamAck(stream_id=9, status=member)
        elif enum_cls is F.CloseReason:
            fr = F.CloseStream(stream_id=9, reason=member, message="m" if member == F.CloseReason.ERROR else None)
        else:
            fr = F.Error(stream_id=None, code=member, message="")
        got, = F.FrameDecoder().feed(F.encode(fr))
        assert got == fr
        value = getattr(got, {"Protocol": "protocol", "StreamPriority": "priority", "HandshakeStatus": "status",
                              "RegisterStatus": "status", "StreamStatus": "status", "CloseReason": "reason",
                              "ErrorCode": "code"}[enum_cls.__name__])
        assert type(value) is enum_cls and value is member


def test_payload_is_a_view_not_a_copy():
    wire = F.encode(F.Data(stream_id=5, data=b"z" * 1000))
    buf = bytearray(wire)
    fr, = F.FrameDecoder().feed(buf)
    assert isinstance(fr.data, memoryview)
    buf[-1] = ord("q")  # the payload views the caller's buffer
    assert bytes(fr.data[-1:]) == b"q"


def test_frames_survive_later_feeds_and_buffer_reuse():
    dec = F.FrameDecoder()
    w = F.encode(F.Data(stream_id=1, data=b"abcdef"))
    first = dec.feed(w[:7])
    assert first == []
    got = dec.feed(w[7:] + w[:3])  # completes one frame and starts another
    assert got == [F.Data(stream_id=1, data=b"abcdef")]
    got2 = dec.feed(w[3:])
    assert got2 == [F.Data(stream_id=1, data=b"abcdef")]
    assert bytes(got[0].data) == b"abcdef"  # still valid, never BufferError
    for _ in range(100):
        dec.feed(w[:5])
        dec.feed(w[5:])
    assert bytes(got[0].data) == b"abcdef"


def test_feed_raw_fast_path():
    wire = (F.encode(F.Data(stream_id=3, data=b"ab", end_of_stream=True)) + F.encode(F.Heartbeat(timestamp=9))
            + F.encode(F.Data(stream_id=4, data=b"c")))
    seen = []
    F.FrameDecoder().feed_raw(wire, lambda sid, flags, p: seen.append((sid, flags, bytes(p))), seen.append)
    assert seen == [(3, 1, b"ab"), F.Heartbeat(timestamp=9), (4, 0, b"c")]


@pytest.mark.parametrize("mod", both_codecs(), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_feed_raw_passes_a_split_data_frame_on_as_it_arrives(mod):
    """Every split of a data frame: its payload comes out in pieces as the bytes arrive, views of
    the caller's buffers (nothing buffered in the decoder), the frame's flags on the last piece
    only; frames around it and an empty data frame come out whole."""
    payload = bytes(range(256)) * 40
    wire = (F.encode(F.Heartbeat(timestamp=1)) + F.encode(F.Data(stream_id=5, data=payload, end_of_stream=True))
            + F.encode(F.Data(stream_id=7, data=b"")) + F.encode(F.Data(stream_id=9, data=b"xy")))
    start = len(F.encode(F.Heartbeat(timestamp=1)))
    for cut in list(range(start, start + 14)) + [start + 5000, len(wire) - 13, len(wire) - 12, len(wire) - 3]:
        for cut2 in (None, cut + 1, cut + 7, cut + 3000):
            cuts = [0, cut] + ([cut2] if cut2 else []) + [len(wire)]
            dec = mod.FrameDecoder()
            seen: list = []

            def on_data(sid, fl, p):
                assert isinstance(p, memoryview)
                seen.append((sid, fl, bytes(p), dec.pending_payload))

            for a, b in zip(cuts, cuts[1:]):
                dec.feed_raw(wire[a:b], on_data, seen.append)
                assert dec.buffered < F.DATA_HEADER_SIZE  # at most a header: payload is never held
            assert seen[0] == F.Heartbeat(timestamp=1)
            five = [x for x in seen[1:] if x[0] == 5]
            assert b"".join(x[2] for x in five) == payload, (cut, cut2)
            assert all(x[1] == F.FLAG_PARTIAL and x[3] > 0 for x in five[:-1]) and five[-1][1] == 1 and five[-1][3] == 0
            assert [x[:3] for x in seen if not isinstance(x, F.Heartbeat) and x[0] != 5] == [(7, 0, b""), (9, 0, b"xy")]


@pytest.mark.parametrize("mod", both_codecs(), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_feed_raw_checks_a_split_data_frame_header_before_passing_anything_on(mod):
    header = (F.MAX_FRAME_SIZE + 1).to_bytes(4, "big") + b"\x01" + (3).to_bytes(4, "big") + b"\x00"
    for cut in range(1, len(header)):
        dec = mod.FrameDecoder()
        seen: list = []
        with pytest.raises(F.FrameError, match="too large"):
            dec.feed_raw(header[:cut], lambda *a: seen.append(a), seen.append)
            dec.feed_raw(header[cut:] + b"payload", lambda *a: seen.append(a), seen.append)
        assert seen == []


def test_scan_frames_object_free():
    from array import array
    wire = F.encode(F.Data(stream_id=7, data=b"xyz")) + F.encode(F.Heartbeat(timestamp=1)) + b"\x00\x00"
    out = array("I", bytes(4 * F.SCAN_FIELDS * 4))
    n, used = F.scan_frames(wire, out)
    assert (n, used) == (2, len(wire) - 2)
    assert list(out[:5]) == [1, 7, 0, 10, 3]
    assert list(out[5:10]) == [0, 0, 0, 18, 2]
    assert F.decode_control(wire[18:20]) == F.Heartbeat(timestamp=1)
    with pytest.raises(F.FrameError):
        F.scan_frames(b"\x00\x00\x00\x00\x00", out)


def test_header_into_buffer():
    buf = bytearray(20)
    assert F.encode_data_header_into(buf, 3, 42, 4, True) == 13
    assert bytes(buf[3:13]) == F.encode(F.Data(stream_id=42, data=b"abcd", end_of_stream=True))[:10]
    assert F.encode_data_header(2, 2) == bytes.fromhex("00000008010000000200")
    with pytest.raises(F.FrameError):
        F.encode_data_header_into(buf, 15, 1, 1)


@pytest.mark.parametrize("wire,msg", [
    ("0000000000", "at least 1"),
    ("0100000100", "too large"),
    ("ffffffff00", "too large"),
    ("0000000102", "unknown frame type"),
    ("0000000501", "too short"),
    ("0000000100", "unexpected end"),
])
def test_bad_headers_raise_frame_error(wire, msg):
    with pytest.raises(F.FrameError, match=msg):
        F.FrameDecoder().feed(bytes.fromhex(wire))


@pytest.mark.parametrize("body,msg", [
    ("0c", "variant index 12"),
    ("08 fe", "marker"),
    ("ff", "marker"),
    ("07 fd 01 00 00 00 00 00 00 00 00", "marker"),        # u64 marker in a u32 field
    ("0b fd 00 00 00 00 00 00 00 10", "exceeds"),          # string length 2^60
    ("0b 05 61", "exceeds"),
    ("00 01 ff", "UTF-8"),
    ("06 01 00 02", "bool"),
    ("0a 02", "Option"),
    ("04 01 05", "Protocol"),
    ("07 01 05", "CloseReason"),
    ("01 11" + " 00" * 17, "16 bytes"),
    ("00 00 00 01 01 fd ff ff ff ff ff ff 00 00", "exceeds"),  # capability count huge
])
def test_malformed_control_raises_frame_error(body, msg):
    raw = bytes.fromhex(body.replace(" ", ""))
    with pytest.raises(F.FrameError, match=msg):
        F.FrameDecoder().feed((len(raw) + 1).to_bytes(4, "big") + b"\x00" + raw)


def test_oversize_header_fails_before_body():
    dec = F.FrameDecoder(max_frame_size=1024)
    with pytest.raises(F.FrameError, match="too large"):
        dec.feed(b"\x00\x00\x04\x01")  # 4 bytes: not yet
        dec.feed(b"\x01")


def test_encode_rejects_bad_frames():
    with pytest.raises(F.FrameError):
        F.encode(F.Heartbeat(timestamp=-1))
    with pytest.raises(F.FrameError):
        F.encode(F.Heartbeat(timestamp=2**64))
    with pytest.raises(F.FrameError):
        F.encode(F.StreamAck(stream_id=2**32, status=F.StreamStatus.ACCEPTED))
    with pytest.raises(F.FrameError):
        F.encode(F.OpenStream(stream_id=1, protocol=9))
    with pytest.raises(F.FrameError):
        F.encode(F.CloseStream(stream_id=1, reason=F.CloseReason.NORMAL, message="x"))
    with pytest.raises(F.FrameError):
        F.encode("not a frame")


def test_token_never_in_repr():
    assert "hunter2" not in repr(F.Handshake(token="hunter2"))


# ---------------------------------------------------------------- hypothesis

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
text = st.text(max_size=20)
_enum = st.sampled_from

frames_st = st.one_of(
    st.builds(F.Handshake, token=text, tunnel_id=st.none() | text, min_version=st.integers(0, 255),
              max_version=st.integers(0, 255), capabilities=st.lists(text, max_size=4)),
    st.builds(F.HandshakeAck, session_id=st.uuids(), status=_enum(list(F.HandshakeStatus)),
              version=st.integers(0, 255), server_capabilities=st.lists(text, max_size=4)),
    st.builds(F.Register, service_name=text, protocol=_enum(list(F.Protocol)),
              metadata=st.dictionaries(text, text, max_size=3)),
    st.builds(F.RegisterAck, public_url=text, status=_enum(list(F.RegisterStatus))),
    st.builds(F.OpenStream, stream_id=u32, protocol=_enum(list(F.Protocol)),
              headers=st.lists(st.tuples(text, text), max_size=3), body_hint=st.none() | u64,
              priority=_enum(list(F.StreamPriority))),
    st.builds(F.StreamAck, stream_id=u32, status=_enum(list(F.StreamStatus))),
    st.builds(F.Data, stream_id=u32, data=st.binary(max_size=300), end_of_stream=st.booleans()),
    st.builds(F.CloseStream, stream_id=u32, reason=_enum([r for r in F.CloseReason if r != F.CloseReason.ERROR])),
    st.builds(F.CloseStream, stream_id=u32, reason=st.just(F.CloseReason.ERROR), message=text),
    st.builds(F.Heartbeat, timestamp=u64),
    st.builds(F.HeartbeatAck, timestamp=u64),
    st.builds(F.Error, stream_id=st.none() | u32, code=_enum(list(F.ErrorCode)), message=text),
    st.builds(F.PluginData, plugin_id=text, data=st.binary(max_size=300)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(frames_st)
def test_random_frames_round_trip(frame):
    wire = F.encode(frame)
    assert F.FrameDecoder().feed(wire) == [frame]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames_st, min_size=1, max_size=8), st.data())
def test_random_splits_decode_the_same(frames, data):
    wire = b"".join(F.encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    chunks = [b - a for a, b in zip([0] + cuts, cuts)]
    assert _feed_all(wire, chunks) == frames == _feed_all(wire)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_garbage_only_raises_frame_error(blob):
    dec = F.FrameDecoder()
    try:
        dec.feed(blob)
    except F.FrameError:
        pass
    assert dec.buffered <= len(blob)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 11), st.binary(max_size=60))
def test_garbage_control_bodies_only_raise_frame_error(variant, body):
    try:
        F.decode_control(bytes([variant]) + body)
    except F.FrameError:
        pass


@pytest.mark.parametrize("body", [
    "0b fd 00 00 00 00 00 00 00 10",          # plugin_id claiming 2^60 bytes
    "00 fc 00 00 00 01",                      # token claiming 16 MiB
    "0b 00 fd ff ff ff ff ff ff ff 0f",       # data claiming ~2^60 bytes
    "02 00 00 fd ff ff ff ff ff ff 00 00",    # metadata count huge
])
def test_large_claims_allocate_nothing(body):
    raw = bytes.fromhex(body.replace(" ", ""))
    wire = (len(raw) + 1).to_bytes(4, "big") + b"\x00" + raw
    tracemalloc.start()
    try:
        with pytest.raises(F.FrameError):
            F.FrameDecoder().feed(wire)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # far below any claimed size


def test_partial_large_frame_buffers_only_what_arrived():
    dec = F.FrameDecoder()
    header = (F.MAX_FRAME_SIZE).to_bytes(4, "big") + b"\x01" + b"\x00\x00\x00\x01\x00"
    tracemalloc.start()
    try:
        dec.feed(header + b"x" * 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dec.buffered == 1010
    assert peak < 64 * 1024


def _outcome(fn, *args):
    try:
        r = fn(*args)
    except Exception as exc:  # the class is what must agree (messages may word things apart)
        return ("raised", type(exc).__name__)
    return ("ok", r.hex() if isinstance(r, (bytes, bytearray)) else r)


def test_twins_agree_on_odd_arguments():
    """The compiled codec and its twin give the same answer for arguments at the edges of what the
    encoders take: a bool stream id (an int to Python, not to a typed argument), a buffer that is
    not contiguous, a read-only header buffer, a scan output that is not whole 4-byte words."""
    import array

    mods = both_codecs()
    if len(mods) < 2:
        pytest.skip("compiled codec not built")
    cases = [
        ("encode", lambda m: m.encode(F.Data(True, b"x"))),
        ("encode", lambda m: m.encode(F.Data(1, memoryview(b"abcd")[::2]))),
        ("encode", lambda m: m.encode(F.Data(1, array.array("H", [1, 2])))),
        ("header", lambda m: m.encode_data_header(True, 3)),
        ("header into", lambda m: m.encode_data_header_into(bytearray(20), 0, True, 3)),
        ("header into", lambda m: m.encode_data_header_into(bytes(20), 0, 1, 3)),
        ("scan", lambda m: m.scan_frames(F.encode(F.Data(3, b"hi")) * 2, bytearray(4 * m.SCAN_FIELDS + 2))),
        ("scan", lambda m: m.scan_frames(F.encode(F.Data(3, b"hi")), bytes(4 * m.SCAN_FIELDS))),
    ]
    for name, case in cases:
        got = [_outcome(case, m) for m in mods]
        assert got[0] == got[1], (name, got)
