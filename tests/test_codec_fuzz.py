"""Decoder fuzz that reaches body decoding: valid frames of all 12 variants (and the data fast
path), bodies mutated behind a valid 5-byte header, the stream split at random points, fed to the
compiled codec and the twin. They must agree, raise nothing but FrameError, and most examples must
get as far as ``decode_control`` (the random-garbage tests of test_codec.py rarely do)."""

from __future__ import annotations

import importlib
import re
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_codec import frames_st
from test_codec_limits import varint
from ferrotunnel import frames as F

try:
    C = importlib.import_module("ferrotunnel._frames")
except ImportError:  # pragma: no cover - the twin-only install
    C = None
P = importlib.import_module("ferrotunnel._frames_py")
MODS = [m for m in (C, P) if m is not None]

pytestmark = pytest.mark.skipif(C is None, reason="compiled codec not built")

EXAMPLES = 1500

# Data (variant 6) as the Rust decoder accepts it inside a control frame; the encoder never sends it
control_data_st = st.builds(
    lambda sid, payload, eos: b"\x06" + varint(sid) + varint(len(payload)) + payload + bytes([eos]),
    st.integers(0, 2**32 - 1), st.binary(max_size=40), st.booleans())
# any frame as (type byte, body): all 12 control variants and the data fast path
wire_st = st.one_of(frames_st.map(F.encode).map(lambda w: (w[4], w[5:])), control_data_st.map(lambda b: (0, b)))
control_st = wire_st.filter(lambda tb: tb[0] == 0)


def frame_wire(ftype: int, body: bytes) -> bytes:
    return (len(body) + 1).to_bytes(4, "big") + bytes([ftype]) + body


@st.composite
def mutated(draw, frame=wire_st):
    """One frame with its body mutated; the 5-byte header stays valid (its length follows the body)."""
    ftype, body = draw(frame)
    body = bytearray(body)
    changed = False
    for _ in range(draw(st.integers(0, 4))):
        if body and (ftype == 0 or len(body) > 5):
            at = draw(st.integers(0, len(body) - 1))
            new = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xC3, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF])
                       | st.integers(0, 255))
            changed |= body[at] != new
            body[at] = new
    if ftype == 0 and draw(st.integers(0, 4)) == 0:  # a shorter or a longer body, now and then
        if body and draw(st.booleans()):
            del body[draw(st.integers(0, len(body) - 1)):]
        else:
            body += draw(st.binary(min_size=1, max_size=8))
        changed = True
    return frame_wire(ftype, bytes(body)), changed


def _norm(item):
    if isinstance(item, F.Data):
        return ("data", item.stream_id, bytes(item.data), bool(item.end_of_stream))
    return item


def run(mod, chunks: list[bytes], raw: bool, **kw):
    """Feed ``chunks`` to a fresh decoder: (frames in order, error message or None, bytes buffered)."""
    dec = mod.FrameDecoder(**kw)
    got: list = []
    pieces: list = []

    def on_data(sid, fl, p):  # a frame split across calls comes in pieces: joined here again
        pieces.append(bytes(p))
        if not dec.pending_payload:
            got.append(("data", sid, b"".join(pieces), bool(fl & 1)))
            pieces.clear()

    try:
        for chunk in chunks:
            if raw:
                dec.feed_raw(chunk, on_data, lambda fr: got.append(_norm(fr)))
            else:
                got += [_norm(f) for f in dec.feed(chunk)]
    except F.FrameError as exc:
        return got, str(exc), None
    except Exception as exc:  # noqa: BLE001 - anything but FrameError is the bug this test hunts
        pytest.fail(f"{mod.__name__} raised {type(exc).__name__}: {exc!r}")
    return got, None, dec.buffered


def loosely(msg):
    return None if msg is None else re.sub(r"\d+", "#", msg)


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(wire)]
    return [wire[a:b] for a, b in zip(edges, edges[1:])]


class Entered:
    """Counts calls of each module's ``decode_control`` (the decoders look it up at call time)."""

    def __init__(self) -> None:
        self.calls = Counter()
        self._orig = {m: m.decode_control for m in MODS}

    def __enter__(self):
        for m, orig in self._orig.items():
            def counted(body, _orig=orig, _m=m):
                self.calls[_m] += 1
                return _orig(body)
            m.decode_control = counted
        return self

    def __exit__(self, *exc):
        for m, orig in self._orig.items():
            m.decode_control = orig


def test_fuzz_mutated_bodies_split_both_implementations():
    stats = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(mutated(control_st), st.lists(mutated(), max_size=4), st.booleans(), st.data())
    def one(first, rest, raw, data):
        items = [first, *rest]
        wire = b"".join(w for w, _ in items)
        chunks = split(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
        stats["examples"] += 1
        before = dict(entered.calls)
        outcomes = [run(m, chunks, raw) for m in MODS]
        # the first frame is a control frame with a valid header: each decoder must enter decode_control
        if all(entered.calls[m] > before.get(m, 0) for m in MODS):
            stats["reached body decoding"] += 1
        (cf, cerr, cbuf), (pf, perr, pbuf) = outcomes
        assert cf == pf
        assert loosely(cerr) == loosely(perr)
        assert cbuf == pbuf
        if cerr is not None:
            stats["FrameError"] += 1
        if not any(changed for _, changed in items):  # nothing mutated: the frames come back
            want = [_norm(f) for f in F.FrameDecoder().feed(wire)]
            assert cerr is None and cf == want and len(cf) == len(items)
        if items[0][1] and cerr is None:
            stats["mutated first frame decoded"] += 1

    with Entered() as entered:
        one()
    n = stats["examples"]
    print(f"fuzz: {dict(stats)}")  # shown with -s
    assert n >= EXAMPLES * 0.9
    assert stats["reached body decoding"] >= 0.9 * n, stats
    # the mutations matter: many examples end in FrameError, and many mutated bodies still decode
    assert stats["FrameError"] >= 0.2 * n, stats
    assert stats["mutated first frame decoded"] >= 0.05 * n, stats


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(wire_st, min_size=1, max_size=5), st.data())
def test_fuzz_max_control_frame_against_an_oracle(frames, data):
    """Valid frames, a control limit near their lengths, random splits: every frame before the first
    control frame over the limit comes out, then FrameError naming the limit, in both implementations."""
    wires = [frame_wire(t, b) for t, b in frames]
    lengths = [len(w) - 4 for w in wires]
    controls = [n for (t, _), n in zip(frames, lengths) if t == 0] or [4]
    limit = max(1, data.draw(st.sampled_from(controls)) + data.draw(st.integers(-1, 1)))
    wire = b"".join(wires)
    chunks = split(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    first_over = next((i for i, ((t, _), n) in enumerate(zip(frames, lengths)) if t == 0 and n > limit), None)
    for mod in MODS:
        got, err, _ = run(mod, chunks, True, max_frame_size=F.MAX_FRAME_SIZE, max_control_frame=limit)
        if first_over is None:
            assert err is None and len(got) == len(frames)
        else:
            assert err == (f"control frame too large: {lengths[first_over]} bytes exceeds "
                           f"max_control_frame ({limit})")
            assert len(got) == first_over
