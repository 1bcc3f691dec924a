"""Watching HTTP/1.1 go by, for the request inspector, without touching a byte.

``MessageFramer`` splits one direction of a connection into messages, byte-exact (heads parsed by
httptools; bodies delimited by Content-Length, chunked coding or the end of the connection, as RFC
9112 says, which also covers HEAD, 1xx, 204, 304 and CONNECT answers). ``ExchangeTracker`` pairs
requests and responses in order (keep-alive and pipelining) and records them in a ``RequestLog``.
``InspectingBridge`` is the forwarding bridge with a tracker looking at both directions: bytes
still go tunnel to socket and back exactly as ``forward`` sends them.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Deque, List, Optional, Tuple

import httptools

from ..aio.bridge import TcpBridge
from ..frames import DATA_HEADER_SIZE
from .inspect_store import DONE, HEAD_LIMIT, INCOMPLETE, UPGRADED, Exchange, RequestLog

__all__ = ["Head", "parse_head", "MessageFramer", "ExchangeTracker", "InspectingBridge", "PIPELINE_LIMIT"]

log = logging.getLogger("ferrotunnel.inspect")

#: Requests of one connection waiting for their responses that the inspector follows; a client
#: that pipelines more is still relayed, but that connection is not recorded from there on.
PIPELINE_LIMIT = 64
#: Longest chunk-size or trailer line of a chunked body the framer reads.
CHUNK_LINE_LIMIT = 4096

# body framings
NONE, LENGTH, CHUNKED, TO_CLOSE, OPAQUE, INTERIM = range(6)
# framer states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _TO_CLOSE, _OPAQUE, _BROKEN = range(9)


class Head:
    """A parsed request or response head: ``raw`` as on the wire, header names in lower case."""

    __slots__ = ("raw", "method", "target", "status", "version", "headers")

    def __init__(self, raw: bytes, method: str, target: str, status: int, version: str,
                 headers: List[Tuple[str, str]]) -> None:
        self.raw, self.method, self.target, self.status = raw, method, target, status
        self.version, self.headers = version, headers

    def values(self, name: str) -> List[str]:
        return [v for n, v in self.headers if n == name]

    def tokens(self, name: str) -> List[str]:
        """The comma-separated tokens of every ``name`` field, lower case."""
        return [t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()]


class _Collect:
    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: List[Tuple[str, str]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(raw: bytes, is_request: bool) -> Head:
    """Parse one whole head (ending in CRLF CRLF) with httptools; ValueError if it is not HTTP/1.x."""
    c = _Collect()
    parser: Any = httptools.HttpRequestParser(c) if is_request else httptools.HttpResponseParser(c)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass  # an upgrade request or 101: the head itself was read whole
    except httptools.HttpParserError as exc:
        raise ValueError(f"not an HTTP/1.x head: {exc}") from None
    if not c.complete:
        raise ValueError("incomplete HTTP head")
    if is_request:
        return Head(raw, parser.get_method().decode("latin-1"), c.url.decode("latin-1"), 0,
                    parser.get_http_version(), c.headers)
    return Head(raw, "", "", parser.get_status_code(), parser.get_http_version(), c.headers)


def request_framing(head: Head) -> Tuple[int, int]:
    """(framing, length) of a request's body; ValueError for one that cannot be delimited."""
    if head.method == "CONNECT":
        return OPAQUE, 0
    upgrade = bool(head.values("upgrade")) and "upgrade" in head.tokens("connection")
    te = head.tokens("transfer-encoding")
    if te:
        if te[-1] != "chunked":
            raise ValueError("a request body without a final chunked coding")
        return (OPAQUE if upgrade else CHUNKED), 0
    lengths = {v.strip() for v in head.values("content-length")}
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        raise ValueError("bad Content-Length")
    if upgrade:
        return OPAQUE, 0
    return (LENGTH, int(lengths.pop())) if lengths else (NONE, 0)


def response_framing(head: Head, method: str) -> Tuple[int, int]:
    """(framing, length) of a response's body, answering a ``method`` request (RFC 9112 6.3)."""
    status = head.status
    if status == 101 or (method == "CONNECT" and 200 <= status < 300):
        return OPAQUE, 0
    if 100 <= status < 200:
        return INTERIM, 0
    if method == "HEAD" or status in (204, 304):
        return NONE, 0
    te = head.tokens("transfer-encoding")
    if te:
        return (CHUNKED, 0) if te[-1] == "chunked" else (TO_CLOSE, 0)
    lengths = {v.strip() for v in head.values("content-length")}
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        raise ValueError("bad Content-Length")
    return (LENGTH, int(lengths.pop())) if lengths else (TO_CLOSE, 0)


class MessageFramer:
    """One direction of an HTTP/1.1 connection, message by message. ``on_head(head)`` returns the
    body's (framing, length); ``on_body(view)`` gets every body byte as on the wire (chunk framing
    too; a view to copy from, not keep); ``on_end()`` ends a message. Anything that is not HTTP
    stops the framer (``broken``); after an upgrade it only passes bytes by (``opaque``)."""

    def __init__(self, is_request: bool, on_head: Callable[[Head], Tuple[int, int]],
                 on_body: Callable[[memoryview], None], on_end: Callable[[], None],
                 head_limit: int = HEAD_LIMIT) -> None:
        self.is_request = is_request
        self.on_head, self.on_body, self.on_end = on_head, on_body, on_end
        self.head_limit = head_limit
        self.state = _HEAD
        self._buf = bytearray()
        self._remaining = 0

    @property
    def broken(self) -> bool:
        return self.state == _BROKEN

    @property
    def opaque(self) -> bool:
        return self.state == _OPAQUE

    @property
    def active(self) -> bool:
        return self.state != _OPAQUE and self.state != _BROKEN

    @property
    def chunked(self) -> bool:
        """In a chunked body (whose every chunk costs Python calls to follow)."""
        return _CHUNK_SIZE <= self.state <= _TRAILER

    def stop(self) -> None:
        self.state = _BROKEN
        self._buf = bytearray()

    def feed(self, data: memoryview) -> None:
        pos, n = 0, len(data)
        while pos < n:
            st = self.state
            if st == _BROKEN or st == _OPAQUE:
                return
            if st == _HEAD:
                pos = self._head(data, pos)
            elif st == _LENGTH or st == _CHUNK_DATA or st == _CHUNK_CRLF:
                take = min(self._remaining, n - pos)
                piece = data[pos:pos + take]
                if st == _CHUNK_CRLF and bytes(piece) != b"\r\n"[2 - self._remaining:2 - self._remaining + take]:
                    self.stop()
                    return
                self.on_body(piece)
                pos += take
                self._remaining -= take
                if self.state == _BROKEN:  # (the tracker stopped following in on_body)
                    return
                if not self._remaining:
                    if st == _LENGTH:
                        self._end()
                    elif st == _CHUNK_DATA:
                        self.state, self._remaining = _CHUNK_CRLF, 2
                    else:
                        self.state = _CHUNK_SIZE
            elif st == _TO_CLOSE:
                self.on_body(data[pos:])
                return
            else:  # a chunk-size line or a trailer line
                pos = self._line(data, pos)

    def _head(self, data: memoryview, pos: int) -> int:
        buf = self._buf
        if not buf and self.is_request:  # empty lines before a request line are allowed
            while pos < len(data) and data[pos] in (13, 10):
                pos += 1
            if pos == len(data):
                return pos
        old = len(buf)
        buf += data[pos:pos + self.head_limit + 4 - old]
        end = buf.find(b"\r\n\r\n", max(0, old - 3))
        if end < 0:
            if len(buf) > self.head_limit:
                self.stop()
            return len(data)
        end += 4
        raw = bytes(buf[:end])
        self._buf = bytearray()
        try:
            framing, length = self.on_head(parse_head(raw, self.is_request))
        except ValueError as exc:
            log.debug("inspector: stops following a connection: %s", exc)
            self.stop()
            return len(data)
        pos += end - old
        if framing == LENGTH and length:
            self.state, self._remaining = _LENGTH, length
        elif framing == CHUNKED:
            self.state = _CHUNK_SIZE
        elif framing == TO_CLOSE:
            self.state = _TO_CLOSE
        elif framing == OPAQUE:
            self.state = _OPAQUE
            self.on_end()
        elif framing == INTERIM:
            pass  # a 1xx: the final response follows
        else:
            self._end()
        return pos

    def _line(self, data: memoryview, pos: int) -> int:
        buf = self._buf
        old = len(buf)
        buf += data[pos:pos + CHUNK_LINE_LIMIT + 2 - old]
        end = buf.find(b"\r\n", max(0, old - 1))
        if end < 0:
            if len(buf) > CHUNK_LINE_LIMIT:
                self.stop()
            return len(data)
        line = bytes(buf[:end])
        self._buf = bytearray()
        self.on_body(memoryview(line + b"\r\n"))  # the whole line, also its part from earlier reads
        pos += end + 2 - old
        if self.state == _BROKEN:  # (the tracker stopped following in on_body)
            return len(data)
        if self.state == _TRAILER:
            if not line:
                self._end()
            return pos
        size = line.split(b";", 1)[0].strip()
        if not size or size.strip(b"0123456789abcdefABCDEF"):
            self.stop()
            return len(data)
        self._remaining = int(size, 16)
        self.state = _CHUNK_DATA if self._remaining else _TRAILER
        return pos

    def _end(self) -> None:
        self.state = _HEAD
        self.on_end()

    def eof(self) -> None:
        """The connection's end: a body that runs to the close is complete."""
        if self.state == _TO_CLOSE:
            self._end()
        self.stop()


#: A chunked request body past the capture (``BODY_LIMIT``) whose pieces (chunk-size lines, data,
#: CRLFs) average under ``TINY_CHUNK_BYTES`` over at least ``TINY_CHUNK_PIECES`` of them ends its
#: connection's recording: each piece costs Python calls, and a visitor's tiny chunks would stall
#: the client's event loop (1-byte chunks ran at 0.7 MB/s). 64 KiB chunks average 21 KiB a piece.
TINY_CHUNK_PIECES, TINY_CHUNK_BYTES = 256, 256


class ExchangeTracker:
    """Both directions of one connection between a tunnel stream and the local service: each
    request becomes an ``Exchange`` in ``log`` when its head is seen and is finished by its
    response, in order. Never raises; on anything it cannot follow it stops recording."""

    def __init__(self, log: RequestLog, tunnel: str, visitor: Optional[str], local_addr: Tuple[str, int],
                 proxy_protocol: Optional[str] = None, replay_of: Optional[int] = None) -> None:
        self.log = log
        self.tunnel, self.visitor, self.local_addr = tunnel, visitor, local_addr
        self.proxy_protocol, self.replay_of = proxy_protocol, replay_of
        self.pending: Deque[Exchange] = collections.deque()
        #: The first exchange recorded (what a replay made); later ones are only in the log.
        self.first: Optional[Exchange] = None
        self._req: Optional[Exchange] = None  # the request whose body is being read
        self._resp: Optional[Exchange] = None  # the exchange whose response body is being read
        self._pieces = self._piece_bytes = 0  # body pieces of the current request past the capture
        self.requests = MessageFramer(True, self._request_head, self._request_body, self._request_end)
        self.responses = MessageFramer(False, self._response_head, self._response_body, self._response_end)

    @property
    def following(self) -> bool:
        """Whether anything more is to be seen (False once stopped, or after an upgrade)."""
        return self.requests.active or self.responses.active

    def request_data(self, data: memoryview) -> None:
        self._feed(self.requests, data)

    def response_data(self, data: memoryview) -> None:
        self._feed(self.responses, data)

    def _feed(self, framer: "MessageFramer", data: memoryview) -> None:
        try:
            framer.feed(data)
        except Exception:  # a bug here must never cost the relayed bytes
            log.exception("inspector: stops following a connection")
            framer.stop()
        if framer.broken:  # one side lost: the pairing of the other cannot be trusted either
            self.stop()

    def response_eof(self) -> None:
        """The local service's side ended: a response running to the close is complete."""
        try:
            self.responses.eof()
        except Exception:
            log.exception("inspector: stops following a connection")
        self.stop()

    def stop(self) -> None:
        """Stop following: requests still waiting for a response are marked incomplete."""
        self.requests.stop()
        self.responses.stop()
        for ex in self.pending:
            ex.finish(INCOMPLETE)
        self.pending.clear()

    # -- requests
    def _request_head(self, head: Head) -> Tuple[int, int]:
        framing = request_framing(head)
        if len(self.pending) >= PIPELINE_LIMIT:
            raise ValueError(f"more than {PIPELINE_LIMIT} pipelined requests")
        visitor = self.visitor
        if visitor is None:  # the HTTP ingress names the visitor last in X-Forwarded-For
            xff = head.tokens("x-forwarded-for")
            visitor = xff[-1] if xff else None
        ex = self.log.new(self.tunnel, visitor, self.local_addr, self.proxy_protocol, head.method, head.target,
                          head.raw, framing[0] == OPAQUE, self.replay_of)
        self.pending.append(ex)
        self._pieces = self._piece_bytes = 0
        if self.first is None:
            self.first = ex
        self._req = ex
        return framing

    def _request_body(self, data: memoryview) -> None:
        req = self._req
        if req is not None:
            req.request_body_data(data)
            if self.requests.chunked and req.request_size - len(req.request_head) > self.log.body_limit:
                # past what is captured, following costs Python calls per chunk: tiny chunks (a
                # stranger's, most likely) end this connection's recording; ordinary ones do not
                self._pieces += 1
                self._piece_bytes += len(data)
                if self._pieces >= TINY_CHUNK_PIECES and self._piece_bytes < TINY_CHUNK_BYTES * self._pieces:
                    self.requests.stop()

    def _request_end(self) -> None:
        if self._req is not None:
            self._req.request_end()
            self._req = None

    # -- responses
    def _response_head(self, head: Head) -> Tuple[int, int]:
        if not self.pending:
            raise ValueError("a response nobody asked for")
        ex = self.pending[0]
        framing = response_framing(head, ex.method)
        if framing[0] != INTERIM:
            ex.response_started(head.status, head.raw)
            self._resp = ex
        return framing

    def _response_body(self, data: memoryview) -> None:
        if self._resp is not None:
            self._resp.response_body_data(data)

    def _response_end(self) -> None:
        ex = self._resp
        if ex is None:
            return
        self._resp = None
        self.pending.popleft()
        ex.finish(UPGRADED if self.responses.opaque else DONE)
        if self.responses.opaque:  # what follows is not HTTP, either way
            self.requests.stop()


class InspectingBridge(TcpBridge):
    """``TcpBridge`` (tunnel stream to local TCP) that shows both directions to a tracker first."""

    __slots__ = ("tracker",)

    def __init__(self, tracker: Optional[ExchangeTracker]) -> None:
        super().__init__()
        self.tracker = tracker

    def tunnel_data(self, payload: memoryview) -> None:
        t = self.tracker
        if t is not None and not self.finished:
            t.request_data(payload)
            if not t.following:
                self.tracker = None
                t.stop()
        super().tunnel_data(payload)

    def buffer_updated(self, nbytes: int) -> None:
        t = self.tracker
        if t is not None:
            t.response_data(memoryview(self.read_buffer())[DATA_HEADER_SIZE:DATA_HEADER_SIZE + nbytes])
            if not t.following:
                self.tracker = None
                t.stop()
        super().buffer_updated(nbytes)

    def eof_received(self) -> bool:
        t, self.tracker = self.tracker, None
        if t is not None:
            t.response_eof()
        return super().eof_received()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        t, self.tracker = self.tracker, None
        if t is not None:
            t.response_eof()
        super().connection_lost(exc)
