"""How big the Data frames this side sends are: ``max_chunk`` (1 MiB) toward a peer with flow
control, ``legacy_max_chunk`` (64 KiB) toward one without (a Rust FerroTunnel peer), on both the
queued path and the small-write fast path; bad values are refused by name."""

from __future__ import annotations

import pytest

from ferrotunnel import frames as F
from ferrotunnel.config import ClientConfig, ServerConfig, StreamConfig
from test_core import pair, pump

KiB = 1024


def data_sizes(frames):
    return [len(f.data) for f in frames if isinstance(f, F.Data)]


def test_defaults_are_named_and_documented():
    c = StreamConfig()
    assert (c.max_chunk, c.legacy_max_chunk, c.read_buffer_size) == (1024 * KiB, 64 * KiB, 1024 * KiB)
    with open("README.md", encoding="utf-8") as f:
        readme = f.read()
    assert "| `max_chunk` | 1 MiB |" in readme and "| `legacy_max_chunk` | 64 KiB |" in readme


@pytest.mark.parametrize("flow, biggest", [(True, 1024 * KiB), (False, 64 * KiB)])
def test_frame_size_follows_the_peer(flow, biggest):
    """One 4 MiB write leaves in frames of exactly the chunk size for the peer (the window is big
    enough that credit never cuts a frame short), and arrives whole."""
    client, server, rc, rs = pair(flow=flow, window=4 << 20, stream_send_buffer=8 << 20)
    st = server.open_stream()
    payload = bytes(range(256)) * 16384  # 4 MiB
    server.send(st, payload)
    sent, _ = pump(server, client)
    sizes = data_sizes(sent)
    assert sizes == [biggest] * (len(payload) // biggest)
    assert server.max_chunk == biggest
    assert bytes(rc.data[st.id]) == payload


def test_a_smaller_max_chunk_is_kept_for_both_kinds_of_peer():
    for flow in (True, False):
        client, server, rc, rs = pair(flow=flow, window=1 << 20, max_chunk=10 * KiB)
        st = server.open_stream()
        server.send(st, b"y" * (35 * KiB))
        sent, _ = pump(server, client)
        assert data_sizes(sent) == [10 * KiB] * 3 + [5 * KiB]


def test_the_fast_path_takes_only_what_fits_one_frame_for_the_peer():
    for flow, limit in ((True, 1024 * KiB), (False, 64 * KiB)):
        client, server, rc, rs = pair(flow=flow, window=1 << 20)
        st = server.open_stream()
        pump(server, client)
        assert not server.send_now(st, limit + 1)
        assert server.send_now(st, limit)


@pytest.mark.parametrize("cls", [StreamConfig, ServerConfig, ClientConfig])
@pytest.mark.parametrize("field", ["max_chunk", "legacy_max_chunk"])
@pytest.mark.parametrize("bad", [0, -1, F.MAX_FRAME_SIZE])
def test_bad_chunk_sizes_are_refused_by_name(cls, field, bad):
    with pytest.raises(ValueError, match=field):
        cls(**{field: bad})
