"""A peer's OpenStream headers are kept with the stream for its life: at most
``MAX_KEPT_HEADER_BYTES`` of them (past that only this package's ``ft-`` headers). Before, all of
them were kept, up to the codec's ``MAX_HEADER_BYTES`` (64 KiB) per stream: about 100 KiB of Python
objects per stream for a peer that sent 60 headers of 1 KiB each on every stream."""

from __future__ import annotations

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.protocol.streams import MAX_KEPT_HEADER_BYTES

from test_core import pair


def _open(core, sid, headers):
    core.receive(F.encode(F.OpenStream(stream_id=sid, protocol=ft.Protocol.TCP, headers=headers)), 1.0)
    return core.streams[sid]


def test_big_headers_are_cut_to_this_packages_own():
    client, server, rc, rs = pair()
    bulky = [(f"x-{i}", "v" * 1000) for i in range(60)] + [("ft-visitor", "203.0.113.7:4242")]
    st = _open(client, 2, bulky)
    assert list(st.headers) == [("ft-visitor", "203.0.113.7:4242")]
    assert sum(len(k) + len(v) for k, v in st.headers) <= MAX_KEPT_HEADER_BYTES
    # the server keeps no more of what a client sends on the streams it opens
    st = _open(server, 1, bulky[:50] + [("ft-tunnel", "api"), ("ft-big", "w" * 5000)])
    assert list(st.headers) == [("ft-tunnel", "api")]


def test_headers_that_fit_are_kept_as_they_came():
    client, server, rc, rs = pair()
    few = [("ft-visitor", "198.51.100.1:1"), ("x-app", "a" * 3000), ("x-other", "b" * 3000)]
    assert list(_open(client, 2, few).headers) == few
    assert _open(client, 4, []).headers == ()


def test_long_names_of_our_own_headers_count_too():
    client, server, rc, rs = pair()
    sneaky = [(f"ft-{i}-" + "a" * 3900, "v") for i in range(16)] + [("ft-visitor", "192.0.2.9:9")]
    st = _open(client, 2, sneaky)
    assert list(st.headers) == [("ft-visitor", "192.0.2.9:9")]
