"""How big the Data frames this side sends are: ``max_chunk`` (256 KiB) toward a peer with flow
control that announced (``frames/1=N``) the largest frame it accepts, within N, and
``solo_max_chunk`` (1 MiB) there for a stream whose frames are the only ones queued;
``legacy_max_chunk`` (64 KiB) toward any other peer (a Rust FerroTunnel peer, an older peer of this
package), on both the queued path and the small-write fast path; bad values are refused by name."""

from __future__ import annotations

import pytest

from ferrotunnel import frames as F
import pathlib

from ferrotunnel.config import ClientConfig, ServerConfig, StreamConfig
from ferrotunnel.protocol import SessionCore
from ferrotunnel.protocol.extensions import FRAMES_CAPABILITY, client_capabilities, negotiate, server_capabilities
from test_core import Recorder, caps, pump

OWN_HEADER = F.DATA_HEADER_SIZE - F.FRAME_PREFIX_SIZE  # a Data frame's bytes after its length prefix
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

KiB = 1024


def pair_with_frames(flow, window, **cfg):
    """test_core's pair, each end also announcing the largest frame it accepts (frames/1)."""
    config = StreamConfig(initial_window=window, max_window=window * 4, **cfg)
    peer = caps(True, window if flow else None) + [f"{FRAMES_CAPABILITY}={config.max_frame_size}"]
    rc, rs = Recorder(), Recorder()
    client = SessionCore(is_client=True, config=config, listener=rc, now=0.0, peer_capabilities=peer)
    server = SessionCore(is_client=False, config=config, listener=rs, now=0.0, peer_capabilities=peer)
    rc.core, rs.core = client, server
    return client, server, rc, rs


def data_sizes(frames):
    return [len(f.data) for f in frames if isinstance(f, F.Data)]


def test_defaults_are_named_and_documented():
    c = StreamConfig()
    assert (c.max_chunk, c.legacy_max_chunk, c.read_buffer_size) == (256 * KiB, 64 * KiB, 1024 * KiB)
    assert c.solo_max_chunk == 1024 * KiB
    readme = README.read_text(encoding="utf-8")
    assert "| `max_chunk` | 256 KiB |" in readme and "| `legacy_max_chunk` | 64 KiB |" in readme
    assert "| `solo_max_chunk` | 1 MiB |" in readme
    assert "`frames/1=N`" in readme


@pytest.mark.parametrize("flow, biggest", [(True, 1024 * KiB), (False, 64 * KiB)])
def test_frame_size_follows_the_peer(flow, biggest):
    """One 4 MiB write of a stream alone leaves in frames of exactly the chunk size for the peer
    (the window is big enough that credit never cuts a frame short), and arrives whole."""
    client, server, rc, rs = pair_with_frames(flow, 4 << 20, stream_send_buffer=8 << 20)
    st = server.open_stream()
    payload = bytes(range(256)) * 16384  # 4 MiB
    server.send(st, payload)
    sent, _ = pump(server, client)
    sizes = data_sizes(sent)
    assert sizes == [biggest] * (len(payload) // biggest)
    assert server.solo_chunk == biggest
    assert server.max_chunk == (256 * KiB if flow else 64 * KiB)
    assert bytes(rc.data[st.id]) == payload


def test_a_smaller_max_chunk_is_kept_for_both_kinds_of_peer():
    for flow in (True, False):
        client, server, rc, rs = pair_with_frames(flow, 1 << 20, max_chunk=10 * KiB, solo_max_chunk=10 * KiB)
        st = server.open_stream()
        server.send(st, b"y" * (35 * KiB))
        sent, _ = pump(server, client)
        assert data_sizes(sent) == [10 * KiB] * 3 + [5 * KiB]


def test_the_fast_path_takes_only_what_fits_one_frame_for_the_peer():
    for flow, limit in ((True, 256 * KiB), (False, 64 * KiB)):
        client, server, rc, rs = pair_with_frames(flow, 1 << 20)
        st = server.open_stream()
        pump(server, client)
        assert not server.send_now(st, limit + 1)
        assert server.send_now(st, limit)


@pytest.mark.parametrize("cls", [StreamConfig, ServerConfig, ClientConfig])
@pytest.mark.parametrize("field", ["max_chunk", "legacy_max_chunk", "solo_max_chunk"])
@pytest.mark.parametrize("bad", [0, -1, F.MAX_FRAME_SIZE])
def test_bad_chunk_sizes_are_refused_by_name(cls, field, bad):
    with pytest.raises(ValueError, match=field):
        cls(**{field: bad})


def test_both_ends_announce_the_largest_frame_they_accept():
    for make in (client_capabilities, server_capabilities):
        assert f"{FRAMES_CAPABILITY}={16 * 1024 * 1024}" in make(StreamConfig())
        assert f"{FRAMES_CAPABILITY}={300 * KiB}" in make(StreamConfig(max_frame_size=300 * KiB))


def core_toward(peer_caps, solo=False, **cfg):
    core = SessionCore(is_client=False, config=StreamConfig(**cfg), listener=Recorder(), now=0.0,
                       peer_capabilities=peer_caps)
    return core.solo_chunk if solo else core.max_chunk


def test_big_frames_go_only_to_a_peer_that_announced_it_takes_them():
    flow = caps(True, 4096)  # this package's capabilities with flow control, without frames/1
    assert core_toward(flow) == 64 * KiB  # an older peer of this package: 64 KiB frames
    assert core_toward(flow + [f"{FRAMES_CAPABILITY}={16 << 20}"]) == 256 * KiB
    assert core_toward(flow + [f"{FRAMES_CAPABILITY}={16 << 20}"], max_chunk=1 << 20) == 1 << 20
    # within what the peer accepts: its max_frame_size minus the Data frame's own header bytes
    assert core_toward(flow + [f"{FRAMES_CAPABILITY}={100 * KiB}"]) == 100 * KiB - OWN_HEADER
    assert core_toward(flow + [f"{FRAMES_CAPABILITY}=7"]) == 1  # the smallest that carries a byte
    # without flow control (a Rust peer, or flow switched off) never above legacy_max_chunk
    assert core_toward(caps(False) + [f"{FRAMES_CAPABILITY}={16 << 20}"]) == 64 * KiB
    assert core_toward(["basic", "tcp"]) == 64 * KiB
    # a malformed announcement counts as none
    for bad in ("x", "", "-5", "0", "6", str((16 << 20) + 1), "1" * 40, "1e6", "\u00b2", "\u0661\u0660\u0660\u0660\u0660\u0660"):
        assert negotiate(StreamConfig(), [f"{FRAMES_CAPABILITY}={bad}"]).get("frames") is None
        assert core_toward(flow + [f"{FRAMES_CAPABILITY}={bad}"]) == 64 * KiB


def test_a_peer_with_a_small_max_frame_size_gets_frames_it_accepts():
    """The receiving end's max_frame_size is below our max_chunk: a bulk write still arrives whole
    (before the announcement the sender's frames broke such a session with 'frame too large')."""
    config_small = StreamConfig(initial_window=1 << 20, max_window=4 << 20, max_frame_size=100 * KiB)
    config_big = StreamConfig(initial_window=1 << 20, max_window=4 << 20, max_chunk=1 << 20)
    rc, rs = Recorder(), Recorder()
    client = SessionCore(is_client=True, config=config_small, listener=rc, now=0.0,
                         peer_capabilities=server_capabilities(config_big))
    server = SessionCore(is_client=False, config=config_big, listener=rs, now=0.0,
                         peer_capabilities=client_capabilities(config_small))
    rc.core, rs.core = client, server
    st = server.open_stream()
    payload = bytes(range(256)) * 4096
    server.send(st, payload)
    sent, _ = pump(server, client)
    assert max(data_sizes(sent)) == 100 * KiB - OWN_HEADER
    assert bytes(rc.data[st.id]) == payload and not rc.errors


def test_solo_frames_follow_the_same_peer_rules():
    flow = caps(True, 4096)
    frames = [f"{FRAMES_CAPABILITY}={16 << 20}"]
    assert core_toward(flow + frames, solo=True) == 1 << 20
    assert core_toward(flow + frames, solo=True, solo_max_chunk=3 << 20) == 3 << 20
    assert core_toward(flow + [f"{FRAMES_CAPABILITY}={100 * KiB}"], solo=True) == 100 * KiB - OWN_HEADER
    assert core_toward(flow, solo=True) == 64 * KiB  # no frames/1: as max_chunk
    assert core_toward(caps(False) + frames, solo=True) == 64 * KiB  # no flow control: as max_chunk
    assert core_toward(["basic", "tcp"], solo=True) == 64 * KiB
    # never below max_chunk
    assert core_toward(flow + frames, solo=True, solo_max_chunk=10 * KiB) == 256 * KiB


def test_streams_sharing_the_session_get_max_chunk_frames():
    """A stream alone queues big frames; once another stream's frames wait too, new frames are
    max_chunk, and round-robin gives the other stream one frame per turn: it waits behind one
    big frame per turn while they last."""
    client, server, rc, rs = pair_with_frames(True, 4 << 20, stream_send_buffer=8 << 20)
    a, b = server.open_stream(), server.open_stream()
    pump(server, client)
    server.send(a, b"a" * (2 << 20))  # alone: two 1 MiB frames queued
    server.send(b, b"b" * (1 << 20))  # a's frames wait: b's are 256 KiB
    sent, _ = pump(server, client)
    order = [(f.stream_id, len(f.data)) for f in sent if isinstance(f, F.Data)]
    assert order[:4] == [(a.id, 1 << 20), (b.id, 256 * KiB), (a.id, 1 << 20), (b.id, 256 * KiB)]
    assert [n for sid, n in order if sid == a.id] == [1 << 20] * 2
    assert [n for sid, n in order if sid == b.id] == [256 * KiB] * 4
    assert bytes(rc.data[a.id]) == b"a" * (2 << 20) and bytes(rc.data[b.id]) == b"b" * (1 << 20)


def test_priorities_still_order_what_is_queued():
    """A LOW bulk stream alone queues big frames; a CRITICAL stream that sends then gets
    max_chunk frames and they leave first."""
    client, server, rc, rs = pair_with_frames(True, 4 << 20, stream_send_buffer=8 << 20)
    bulk = server.open_stream(priority=F.StreamPriority.LOW)
    urgent = server.open_stream(priority=F.StreamPriority.CRITICAL)
    pump(server, client)
    server.send(bulk, b"l" * (2 << 20))
    server.send(urgent, b"c" * (512 * KiB))
    sent, _ = pump(server, client)
    order = [(f.stream_id, len(f.data)) for f in sent if isinstance(f, F.Data)]
    assert order == [(urgent.id, 256 * KiB)] * 2 + [(bulk.id, 1 << 20)] * 2
