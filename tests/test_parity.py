"""Compiled codec and twin: identical bytes and identical errors for the same inputs."""

from __future__ import annotations

import importlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load_vectors
from test_codec import frames_st

try:
    C = importlib.import_module("ferrotunnel._frames")
except ImportError:  # pragma: no cover - the twin-only install
    C = None
P = importlib.import_module("ferrotunnel._frames_py")

pytestmark = pytest.mark.skipif(C is None, reason="compiled codec not built")


def _outcome(mod, fn):
    try:
        return ("ok", fn(mod))
    except Exception as exc:  # noqa: BLE001 - comparing exactly what each raises
        return ("err", type(exc), str(exc))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(frames_st)
def test_same_bytes(frame):
    assert C.encode(frame) == P.encode(frame)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80), st.integers(0, 80))
def test_same_decode_outcome_on_garbage(blob, cut):
    def run(mod):
        d = mod.FrameDecoder()
        return d.feed(blob[:cut]) + d.feed(blob[cut:])
    assert _outcome(C, run) == _outcome(P, run)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 13), st.binary(max_size=40))
def test_same_control_outcome(variant, body):
    data = bytes([variant]) + body
    assert _outcome(C, lambda m: m.decode_control(data)) == _outcome(P, lambda m: m.decode_control(data))


@pytest.mark.parametrize("case", load_vectors(), ids=lambda c: c["name"])
def test_same_on_vectors(case):
    wire = bytes.fromhex(case["wire_hex"])
    assert _outcome(C, lambda m: m.FrameDecoder().feed(wire)) == _outcome(P, lambda m: m.FrameDecoder().feed(wire))


@pytest.mark.parametrize("frame", [
    ("Heartbeat", {"timestamp": -1}), ("Heartbeat", {"timestamp": 2**64}), ("Heartbeat", {"timestamp": True}),
    ("StreamAck", {"stream_id": 2**32, "status": 0}), ("OpenStream", {"stream_id": 1, "protocol": 7}),
    ("Handshake", {"token": b"bytes"}), ("Handshake", {"token": "t", "min_version": 256}),
    ("CloseStream", {"stream_id": 1, "reason": 0, "message": "x"}), ("PluginData", {"plugin_id": "p", "data": 5}),
    ("Data", {"stream_id": -1, "data": b""}), ("Data", {"stream_id": 1, "data": "str"}),
])
def test_same_encode_errors(frame):
    from ferrotunnel import _model
    name, kw = frame
    obj = getattr(_model, name)(**kw)
    a, b = _outcome(C, lambda m: m.encode(obj)), _outcome(P, lambda m: m.encode(obj))
    assert a == b and a[0] == "err"
