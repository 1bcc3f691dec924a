"""The sans-IO handshake: both sides driven against each other in memory, no event loop."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings, strategies as hst

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.protocol import ClientHandshake, HandshakeRequest, ServerHandshake, SessionCore

from conftest import load_vectors

TOKEN = "sans-io-token"


class Recorder:
    def __init__(self) -> None:
        self.opened: list = []
        self.data: dict = {}

    def on_stream_opened(self, st):
        self.opened.append(st.id)

    def on_stream_data(self, st, payload):
        self.data.setdefault(st.id, bytearray()).extend(payload)

    def on_stream_eof(self, st): pass
    def on_stream_reset(self, st, exc): pass
    def on_stream_writable(self, st): pass
    def on_session_error(self, exc): raise exc
    def on_output(self): pass


def _split(data: bytes, cuts):
    out, at = [], 0
    for c in sorted(cuts):
        out.append(data[at:c])
        at = c
    return out + [data[at:]]


def test_client_and_server_in_memory():
    client = ClientHandshake(TOKEN, "web", ft.ClientConfig())
    server = ServerHandshake(ft.ServerConfig())
    hello = client.data_to_send()
    assert client.data_to_send() == b""  # once
    for i in range(len(hello)):  # byte by byte: nothing until the whole frame is in
        assert server.request is None
        server.receive_data(hello[i:i + 1])
    req = server.request
    assert isinstance(req, HandshakeRequest)
    assert req.token == TOKEN and req.tunnel_id == "web" and req.version_ok
    assert TOKEN not in repr(req) and TOKEN not in repr(client)
    assert req.capabilities[:3] == ("basic", "tcp", "ferrotunnel-py/1")
    sid = uuid.uuid4()
    ack = server.accept(sid)
    assert server.negotiated is not None and server.negotiated.flow_window == ft.ClientConfig().initial_window
    with pytest.raises(RuntimeError):
        server.accept()  # answered once
    client.receive_data(ack)
    res = client.result
    assert res is not None and res.session_id == sid and res.version == 1
    assert res.negotiated.peer_is_ext and res.negotiated.flow_window == ft.ServerConfig().initial_window
    assert "basic" in res.server_capabilities


def test_pipelined_frames_reach_the_core_built_from_the_handshake():
    client = ClientHandshake(TOKEN, "p", ft.ClientConfig())
    server = ServerHandshake(ft.ServerConfig())
    pipelined = F.encode(F.OpenStream(stream_id=1, protocol=F.Protocol.TCP)) + F.encode(F.Data(stream_id=1, data=b"early"))
    wire = client.data_to_send() + pipelined
    server.receive_data(wire[:len(wire) - 3])
    server.receive_data(wire[len(wire) - 3:])  # more after the request: it is leftover too
    assert server.request is not None and server.leftover == pipelined
    server.accept()
    rec = Recorder()
    core = SessionCore(is_client=False, config=ft.ServerConfig(), negotiated=server.negotiated, listener=rec, now=0.0)
    core.receive(server.leftover, 0.0)
    assert rec.opened == [1] and bytes(rec.data[1]) == b"early"


def test_rust_client_handshake_vectors():
    cases = [c for c in load_vectors() if "Handshake" in c.get("frame", {}) and c["expect"] == "ok"]
    assert len(cases) >= 2
    for case in cases:
        hs = case["frame"]["Handshake"]
        server = ServerHandshake(ft.ServerConfig())
        server.receive_data(bytes.fromhex(case["wire_hex"]))
        req = server.request
        assert req is not None and server.leftover == b""
        assert (req.token, req.tunnel_id, req.min_version, req.max_version, list(req.capabilities)) == (
            hs["token"], hs["tunnel_id"], hs["min_version"], hs["max_version"], hs["capabilities"])
        # a Rust client announced no extension: the ack is v1 only and no reason travels
        assert server.reject(F.HandshakeStatus.INVALID_TOKEN, "wrong token") == F.encode(
            F.HandshakeAck(uuid.UUID(int=0), F.HandshakeStatus.INVALID_TOKEN, 0, []))


def test_rust_handshake_ack_vectors():
    for case in load_vectors():
        ack = case.get("frame", {}).get("HandshakeAck") if case["expect"] == "ok" else None
        if ack is None:
            continue
        client = ClientHandshake(TOKEN)
        if ack["status"] == "Success":
            client.receive_data(bytes.fromhex(case["wire_hex"]))
            assert client.result is not None and str(client.result.session_id) == ack["session_id"]
        else:
            with pytest.raises(ft.HandshakeError) as info:
                client.receive_data(bytes.fromhex(case["wire_hex"]))
            assert info.value.status.name.replace("_", "").lower() == ack["status"].lower()


def test_sixteen_mib_open_stream_first_is_refused_from_six_bytes():
    frame_head = F.encode(F.OpenStream(stream_id=1, protocol=F.Protocol.TCP))[:6]
    huge = (16 * 1024 * 1024).to_bytes(4, "big") + frame_head[4:]  # claims 16 MiB, OpenStream variant
    for limit in (64 * 1024, 16 * 1024 * 1024):  # refused by variant even where the length would pass
        server = ServerHandshake(ft.ServerConfig(max_handshake_frame=limit))
        with pytest.raises(ft.FrameError):
            for i in range(6):
                server.receive_data(huge[i:i + 1] + (b"" if i < 5 else b"\0" * 1000))
                assert server.buffered <= 6
        assert server.buffered <= 6 and server.request is None


@pytest.mark.parametrize("first,why", [
    ("00000000", "length 0"),
    ("00010001", "at most"),                      # 65537 > max_handshake_frame
    ("0000000801", "data frame"),
    ("000000030008", "Heartbeat"),
    ("0000000300ff", "control variant 255"),
])
def test_wrong_first_frames_fail_as_their_bytes_arrive(first, why):
    server = ServerHandshake(ft.ServerConfig())
    with pytest.raises(ft.FrameError, match=why):
        server.receive_data(bytes.fromhex(first))


def test_client_refuses_a_big_or_wrong_first_frame_from_the_server():
    with pytest.raises(ft.HandshakeError, match="max_handshake_frame"):
        ClientHandshake(TOKEN).receive_data(bytes.fromhex("00ffffff00"))
    with pytest.raises(ft.HandshakeError, match="not a HandshakeAck"):
        ClientHandshake(TOKEN).receive_data(F.encode(F.Heartbeat(timestamp=1)))


def test_reject_reason_travels_only_to_peers_that_asked():
    client = ClientHandshake(TOKEN, "r")
    server = ServerHandshake(ft.ServerConfig())
    server.receive_data(client.data_to_send())
    with pytest.raises(ft.AuthenticationError, match="wrong token\x00?") as info:
        client.receive_data(server.reject(F.HandshakeStatus.INVALID_TOKEN, "wrong token"))
    assert info.value.status == F.HandshakeStatus.INVALID_TOKEN and info.value.reason == "wrong token"
    # control characters in a reason never reach the client raw
    client = ClientHandshake(TOKEN, "r")
    server = ServerHandshake(ft.ServerConfig())
    server.receive_data(client.data_to_send())
    with pytest.raises(ft.RetryableHandshakeError) as info:
        client.receive_data(server.reject(F.HandshakeStatus.TUNNEL_ID_TAKEN, "id \x1b[31m taken\n"))
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(hst.lists(hst.integers(0, 400), max_size=6), hst.binary(max_size=64))
def test_any_split_gives_the_same_request_and_leftover(cuts, tail):
    hello = ClientHandshake(TOKEN, "split").data_to_send() + tail
    server = ServerHandshake(ft.ServerConfig())
    for part in _split(hello, [c % (len(hello) + 1) for c in cuts]):
        server.receive_data(part)
    assert server.request is not None and server.request.tunnel_id == "split" and server.leftover == tail
