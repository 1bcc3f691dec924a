"""The HTTP ingress's quick way for a repeated request head (``HttpBridge.buffer_updated``: a read
that is exactly the connection's last plain head gets its X-Forwarded-* lines written in place)
and for a repeated response (``HttpBridge.tunnel_data``): on both loops and both kernels, a repeat
is routed by its own Host even when the connection was routed elsewhere since that head was
read, and the X-Forwarded-* lines it carries are those of its own Host."""

from __future__ import annotations

import asyncio
import types

from ferrotunnel.frames import DATA_HEADER_SIZE
from ferrotunnel.server.http1 import ResponseTracker, forwarded_lines
from ferrotunnel.server.http_bridge import HttpBridge
from test_http_proxy import get, response, two_tunnels


def test_a_repeat_of_an_earlier_head_after_another_host_goes_to_its_own_tunnel(run):
    """web's head is read the quick way, then a request for api that the quick way does not take
    (it carries X-Forwarded-For, so the last plain head stays web's) moves the connection to api:
    web's head again must go back to web, with X-Forwarded-Host: web, not on api's stream."""
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            for _ in range(3):
                w.write(get("web", "/same"))
                assert (await response(r))[1] == b"web GET /same "
            w.write(get("api", "/other", "X-Forwarded-For: 10.1.1.1\r\n"))
            assert (await response(r))[1] == b"api GET /other "
            for _ in range(3):
                w.write(get("web", "/same"))
                assert (await response(r))[1] == b"web GET /same "
            w.write(get("api", "/other", "X-Forwarded-For: 10.1.1.1\r\n"))
            assert (await response(r))[1] == b"api GET /other "
            w.close()
            assert len(apps["web"].heads) == 6 and len(set(apps["web"].heads)) == 1, apps["web"].heads
            assert apps["web"].heads[0].endswith(b"\r\nX-Forwarded-Host: web\r\n\r\n")
            assert len(apps["api"].heads) == 2
            assert all(h.endswith(b"\r\nX-Forwarded-Host: api\r\n\r\n") for h in apps["api"].heads)
    run(body)


def test_repeated_responses_to_head_and_get_keep_their_bodies_apart(run):
    """A HEAD answered with the very response head a GET got before has no body: the GET that
    follows must get its own body, not the bytes the quick way would count for the HEAD."""
    async def body():
        async with two_tunnels() as (ing, apps):
            r, w = await asyncio.open_connection(*ing.address)
            for _ in range(2):
                for method in (b"GET", b"HEAD", b"GET"):
                    w.write(b"%s /same HTTP/1.1\r\nHost: web\r\n\r\n" % method)
                    line, got = await response(r, head_only=method == b"HEAD")
                    assert line == b"HTTP/1.1 200 OK"
                    assert got == (b"" if method == b"HEAD" else b"web GET /same ")
            w.close()
            assert len(apps["web"].heads) == 6
    run(body)


class _Stream:
    """A tunnel stream stub: takes every frame at once."""
    stream_id = 1

    def __init__(self) -> None:
        self.sent: list = []

    def try_send_frame(self, buf: bytearray, n: int) -> bool:
        self.sent.append(bytes(buf[DATA_HEADER_SIZE:DATA_HEADER_SIZE + n]))
        return True

    def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def can_write(self) -> bool:
        return True

    def send_room(self) -> int:
        return 1 << 30

    def consumed(self, n: int) -> None:
        pass

    def defer_flush(self, sink: object) -> None:
        pass


class _Transport:
    def __init__(self) -> None:
        self.out = b""

    def write(self, data: bytes) -> None:
        self.out += bytes(data)

    def writelines(self, chunks: list) -> None:
        self.out += b"".join(bytes(c) for c in chunks)


def _bridge() -> HttpBridge:
    """An HttpBridge as after a first request routed to tunnel "web", on stub stream and transport."""
    bridge = HttpBridge(types.SimpleNamespace(max_head=16384))  # type: ignore[arg-type]
    bridge.stream, bridge.transport = _Stream(), _Transport()  # type: ignore[assignment]
    bridge._seen, bridge.tracker, bridge._tunnel = (b"web", "web", forwarded_lines(b"1.2.3.4", b"http", b"web")), \
        ResponseTracker(), "web"
    return bridge


def _read(bridge: HttpBridge, data: bytes) -> None:
    view = bridge.get_buffer(-1)
    view[:len(data)] = data
    bridge.buffer_updated(len(data))


def test_chunk_data_that_looks_like_a_whole_repeated_response_is_chunk_data():
    """A repeated GET answered with a chunked body whose data, in a tunnel read of its own, is a
    copy of the response the first GET got: it is body, not that request's whole answer."""
    bridge = _bridge()
    tracker = bridge.tracker
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n"
    first = answer + b"web GET /same  "
    pieces = [first, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(first), first,
              b"\r\n0\r\n\r\n"]
    _read(bridge, b"GET /same HTTP/1.1\r\nHost: web\r\n\r\n")
    bridge.tunnel_data(memoryview(pieces[0]))
    _read(bridge, b"GET /same HTTP/1.1\r\nHost: web\r\n\r\n")
    for piece in pieces[1:]:
        assert not tracker.idle
        bridge.tunnel_data(memoryview(piece))
    bridge.flush_out()
    assert tracker.idle and not tracker.lost and bridge.transport.out == b"".join(pieces)


def test_a_head_response_that_looks_like_a_whole_repeated_get_response_is_not_taken_for_one():
    """The last plain head is a HEAD and the next request (not plain: it names Connection) a GET.
    The app's answer to the HEAD is the response head it gave a GET before, and the tunnel read
    that brings it also holds as many bytes of the GET's answer as that GET's body had: the
    repeated-response quick way must not take the read for the HEAD's whole answer (the GET's
    answer would be misread, and the responses that follow handed to the wrong requests)."""
    bridge = _bridge()
    tracker = bridge.tracker

    def read(data: bytes) -> None:
        _read(bridge, data)

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n"
    read(b"GET /samex HTTP/1.1\r\nHost: web\r\n\r\n")
    bridge.tunnel_data(memoryview(answer + b"web GET /samex "))
    read(b"HEAD /same HTTP/1.1\r\nHost: web\r\n\r\n")
    read(b"GET /samex HTTP/1.1\r\nHost: web\r\nConnection: keep-alive\r\n\r\n")
    assert len(tracker.pending) == 2
    bridge.tunnel_data(memoryview(answer + answer[:15]))  # the HEAD's answer, the start of the GET's
    bridge.tunnel_data(memoryview(answer[15:] + b"web GET /samex "))
    bridge.flush_out()
    assert tracker.idle and not tracker.lost
    assert bridge.transport.out == answer + b"web GET /samex " + answer + answer + b"web GET /samex "
    sent = bridge.stream.sent
    assert len(sent) == 3 and all(h.endswith(b"X-Forwarded-Host: web\r\n\r\n") for h in sent)
