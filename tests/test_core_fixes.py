"""Fixes in the sans-IO core, handshake and stream config (each test failed before its fix):
a reset after a half-close, peer text in exceptions, malformed handshake values, window bounds,
and a stream slot kept by an OpenStream that could not be encoded."""

from __future__ import annotations

import uuid
from typing import Any, List

import pytest

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.config import StreamConfig
from ferrotunnel.protocol import (EXT_CAPABILITY, ClientHandshake, ServerHandshake, SessionCore, flow_capability,
                                  parse_flow_capability)
from ferrotunnel.protocol.flow import MAX_WINDOW
from ferrotunnel.protocol.handshake import MAX_REASON_LEN, retry_after_hint

RUST_CLIENT = ("basic", "tcp")
EXT_CLIENT = ("basic", "tcp", EXT_CAPABILITY)


class Recorder:
    def __init__(self) -> None:
        self.opened: List[Any] = []
        self.eof: set = set()
        self.resets: dict = {}
        self.errors: List[Exception] = []

    def on_stream_opened(self, st): self.opened.append(st)
    def on_stream_data(self, st, payload): pass
    def on_stream_eof(self, st): self.eof.add(st.id)
    def on_stream_reset(self, st, exc): self.resets[st.id] = exc
    def on_stream_writable(self, st): pass
    def on_session_error(self, exc): self.errors.append(exc)
    def on_output(self): pass


def server_core(peer=EXT_CLIENT, **cfg):
    rec = Recorder()
    return SessionCore(is_client=False, config=StreamConfig(**cfg), listener=rec, now=0.0,
                       peer_capabilities=peer), rec


def sent(core) -> list:
    return F.FrameDecoder().feed(b"".join(bytes(b) for b in core.data_to_send(1 << 20, 1 << 30)))


# ---------------------------------------------------------------- 1: reset after a half-close

def test_reset_after_half_close_still_ends_the_stream_for_a_rust_peer():
    core, _ = server_core(RUST_CLIENT)
    st = core.open_stream()
    assert [type(f) for f in sent(core)] == [F.OpenStream]
    core.send(st, b"x" * 100)
    core.send_eof(st)  # CloseStream queued behind the data, not sent yet
    core.reset(st, "local service failed")
    # a Rust peer has no stream reset and no stream timeout: without this EOF it waits forever
    assert sent(core) == [F.CloseStream(st.id, F.CloseReason.NORMAL)]
    assert st.id not in core.streams


def test_reset_after_the_eof_left_sends_nothing_more_to_a_rust_peer():
    core, _ = server_core(RUST_CLIENT)
    st = core.open_stream()
    core.send(st, b"x" * 100)
    core.send_eof(st)
    assert [type(f) for f in sent(core)] == [F.OpenStream, F.Data, F.CloseStream]
    core.reset(st)
    assert sent(core) == []  # its EOF already went: no second one


def test_reset_after_half_close_is_a_reset_for_a_peer_of_this_package():
    config = StreamConfig()
    rs, rc = Recorder(), Recorder()
    server = SessionCore(is_client=False, config=config, listener=rs, now=0.0, peer_capabilities=EXT_CLIENT)
    client = SessionCore(is_client=True, config=config, listener=rc, now=0.0, peer_capabilities=("basic", EXT_CAPABILITY))
    st = server.open_stream()
    client.receive(b"".join(bytes(b) for b in server.data_to_send(1 << 20, 1 << 30)), 0.0)
    server.send(st, b"x" * 100)
    server.send_eof(st)
    server.reset(st, "local service failed")
    frames = sent(server)
    assert [type(f) for f in frames] == [F.Error]  # the reset alone: no EOF that would read as a clean end
    client.receive(F.encode(frames[0]), 0.0)
    assert st.id in rc.resets and st.id not in rc.eof and st.id not in client.streams


# ---------------------------------------------------------------- 2: peer text in exceptions

EVIL = "bye\nERROR ferrotunnel.server accepted, token=hunter2\x1b[2J\u202e" + "y" * 65000


def _clean(text: str) -> bool:
    return all(0x20 <= ord(c) < 0x7F for c in text) and len(text) < 3000


def test_peer_error_message_is_escaped_and_bounded_in_the_session_error():
    core, rec = server_core()
    core.receive(F.encode(F.Error(None, F.ErrorCode.PROTOCOL_ERROR, EVIL)), 1.0)
    (exc,) = rec.errors
    assert isinstance(exc, ft.FerroTunnelError)
    assert _clean(str(exc)) and "bye?ERROR ferrotunnel.server" in str(exc)


def test_peer_error_message_is_escaped_and_bounded_in_a_stream_reset():
    core, rec = server_core()
    st = core.open_stream()
    core.receive(F.encode(F.Error(st.id, F.ErrorCode.PROTOCOL_ERROR, EVIL)), 1.0)
    exc = rec.resets[st.id]
    assert isinstance(exc, ft.StreamResetError) and _clean(str(exc)) and "PROTOCOL_ERROR: bye?" in str(exc)


# ---------------------------------------------------------------- 3: malformed handshake values

def _client_reads(ack: bytes, config=ft.ClientConfig()) -> ClientHandshake:
    hs = ClientHandshake("tok", "app", config)
    hs.data_to_send()
    hs.receive_data(ack)
    return hs


@pytest.mark.parametrize("reason", ["retry-after=", "handover pending retry-after=", "retry-after= ;"])
def test_retry_after_without_a_value_is_no_hint(reason):
    assert retry_after_hint(reason) is None
    ack = F.encode(F.HandshakeAck(uuid.uuid4(), F.HandshakeStatus.TUNNEL_ID_TAKEN, 0, ["reason=" + reason]))
    with pytest.raises(ft.RetryableHandshakeError) as info:
        _client_reads(ack)
    assert info.value.retry_after is None


def test_reason_cut_at_its_limit_just_after_retry_after_is_a_refusal():
    server = ServerHandshake(ft.ServerConfig())
    server.receive_data(ClientHandshake("tok", "app", ft.ClientConfig()).data_to_send())
    reason = "h" * (MAX_REASON_LEN - len("retry-after=")) + "retry-after=5"  # cut to end at "="
    with pytest.raises(ft.RetryableHandshakeError) as info:
        _client_reads(server.reject(F.HandshakeStatus.TUNNEL_ID_TAKEN, reason))
    assert info.value.reason.endswith("retry-after=") and info.value.retry_after is None


def test_flow_window_of_thousands_of_digits_is_not_a_window():
    huge = "flow-control/1;window=" + "1" * 5000
    assert parse_flow_capability([huge]) is None  # (int() of it raised ValueError: int-string limit)
    assert parse_flow_capability([flow_capability(MAX_WINDOW)]) == MAX_WINDOW
    assert parse_flow_capability([flow_capability(MAX_WINDOW + 1)]) is None
    ack = F.encode(F.HandshakeAck(uuid.uuid4(), F.HandshakeStatus.SUCCESS, 1, ["basic", EXT_CAPABILITY, huge]))
    hs = _client_reads(ack)
    assert hs.result is not None and hs.result.negotiated.flow_window is None and hs.result.negotiated.peer_is_ext


def test_client_negotiates_on_the_capabilities_a_server_would_keep():
    # the server reads a client's capabilities through keep_capabilities; the client now reads the
    # server's the same way (too long: dropped; beyond the 32 kept: ignored)
    long_one = "flow-control/1;window=" + "0" * 50 + "4096"  # 76 bytes
    hs = _client_reads(F.encode(F.HandshakeAck(uuid.uuid4(), F.HandshakeStatus.SUCCESS, 1, ["basic", long_one])))
    assert hs.result is not None and hs.result.negotiated.flow_window is None
    caps = ["basic"] + [f"x-{i}" for i in range(40)] + [EXT_CAPABILITY]
    hs = _client_reads(F.encode(F.HandshakeAck(uuid.uuid4(), F.HandshakeStatus.SUCCESS, 1, caps)))
    assert hs.result is not None and not hs.result.negotiated.peer_is_ext
    # what a server of this package answers is kept whole
    server = ServerHandshake(ft.ServerConfig())
    server.receive_data(ClientHandshake("tok", "app", ft.ClientConfig()).data_to_send())
    hs = _client_reads(server.accept(extra_capabilities=["remote-port/1=40000", "access/1", "pool/1"]))
    assert hs.result is not None and hs.result.negotiated.values.keys() >= {"ferrotunnel", "flow", "frames", "drain"}


# ---------------------------------------------------------------- 4: window bounds

@pytest.mark.parametrize("cfg, field", [
    (dict(initial_window=MAX_WINDOW + 1, max_window=1 << 32), "initial_window"),
    (dict(max_window=MAX_WINDOW + 1), "max_window"),
])
def test_windows_above_the_protocol_bound_are_refused(cfg, field):
    with pytest.raises(ValueError, match=rf"{field}.*{MAX_WINDOW}"):
        StreamConfig(**cfg)
    with pytest.raises(ValueError, match=field):
        ft.ClientConfig(**cfg)


def test_the_largest_window_allowed_is_one_a_peer_accepts():
    config = StreamConfig(initial_window=MAX_WINDOW, max_window=MAX_WINDOW, session_recv_limit=MAX_WINDOW)
    assert parse_flow_capability([flow_capability(config.initial_window)]) == MAX_WINDOW


# ---------------------------------------------------------------- 5: OpenStream that cannot be encoded

@pytest.mark.parametrize("headers", [[("a", 1)], [("a", "b", "c")], [("\ud800", "x")]])
def test_open_stream_with_bad_headers_takes_no_slot(headers):
    core, _ = server_core(max_streams_per_session=1)
    with pytest.raises(ft.FrameError):
        core.open_stream(headers=headers)
    assert not core.streams and not core.has_output
    st = core.open_stream(headers=[("ok", "yes")])  # the one slot is free
    assert core.streams == {st.id: st}
