"""HTTP/1.1 message framing for the HTTP ingress, both ways, without touching message bodies.

Requests: every head on a visitor's connection is parsed with httptools (llhttp) and checked as
RFC 9112 asks (one Host, a valid Host, no whitespace before a colon, no obs-fold, no
Transfer-Encoding together with Content-Length, chunked last); its body is delimited by
Content-Length or by the chunked coding (``Chunked``), so the next head is found wherever it
starts. ``forwarded_head`` adds X-Forwarded-For/-Proto/-Host.

Responses: ``ResponseTracker`` follows the responses coming back on a tunnel stream (status line,
Content-Length, chunked, no body for HEAD/1xx/204/304, close-delimited, 101 Switching Protocols),
so the ingress knows when every request sent on a stream has been answered — the moment a
keep-alive connection may move to another tunnel's stream.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Deque, List, Optional, Tuple

import httptools

__all__ = ["HeadError", "Request", "parse_request", "check_partial", "Chunked", "ResponseTracker", "forwarded_head", "forwarded_lines",
           "head_end", "MAX_CHUNK_LINE", "MAX_TRAILERS", "MAX_RESPONSE_HEAD"]

#: Longest chunk-size line (with extensions) and most trailer bytes accepted in a chunked body.
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16 * 1024
#: A response head longer than this stops the tracking of that stream's responses (the stream
#: then keeps the connection to itself until it ends).
MAX_RESPONSE_HEAD = 64 * 1024

#: A field line that starts with whitespace: obs-fold (or whitespace before the first field).
_OBS_FOLD = re.compile(rb"\n[ \t]")
#: Whitespace between a field name and the colon (the name is everything before the first colon).
_SPACE_COLON = re.compile(rb"\n[^:\r\n]*[ \t]:")
#: method SP request-target SP HTTP-version CRLF (the method a token).
REQUEST_LINE = re.compile(rb"(?:\r\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/[0-9]\.[0-9]\r\n")
#: An X-Forwarded-For/-Proto/-Host field line (with the CRLF before it).
_XF_LINE = re.compile(rb"\r\nx-forwarded-(?:for|proto|host)[ \t]*:[^\r\n]*", re.IGNORECASE)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: The request fields the ingress reads (name, value without the whitespace around it).
_FIELDS = re.compile(rb"\r\n(host|content-length|transfer-encoding|upgrade|x-forwarded-(?:for|proto|host)):"
                     rb"[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)", re.IGNORECASE)
#: A response's status line and the fields that delimit its body.
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")
_RESPONSE_FIELDS = re.compile(rb"\r\n(content-length|transfer-encoding)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)",
                              re.IGNORECASE)


class HeadError(Exception):
    """A request the ingress answers itself: ``status`` (e.g. "400 Bad Request") and why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def head_violation(head: bytes) -> Optional[str]:
    """What RFC 9112 forbids in a request head that a lenient parser may let through: obs-fold
    (a field line starting with SP or HTAB, §5.2) and whitespace between a field name and the
    colon (§5.1). ``head`` is the head up to its end; None if neither is there."""
    if _OBS_FOLD.search(head):
        return "obs-fold (a header line starting with whitespace) is not allowed"
    if _SPACE_COLON.search(head):
        return "whitespace between a header name and the colon is not allowed"
    return None


def head_end(data: bytes) -> int:
    """Where a complete head (CRLF line ends, maybe empty lines first) ends; len(data) if not."""
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    return len(data) if end < 0 else end + 4


class Request:
    """One request head, as parsed: what routing, framing and forwarding need. llhttp checks the
    syntax (no Python callback per field: only the end of the head is reported); the few fields
    the ingress needs are then found in the raw head by one regular expression."""

    __slots__ = ("url", "hosts", "upgrade", "te", "cl", "xff", "xfp", "xfh", "complete", "parser", "method",
                 "keep_alive")

    def __init__(self) -> None:
        self.url = b""
        self.hosts: List[bytes] = []
        self.upgrade = False
        self.te: List[bytes] = []
        self.cl: List[bytes] = []
        self.xff: List[bytes] = []
        self.xfp: List[bytes] = []
        self.xfh: List[bytes] = []
        self.complete = False
        self.method = b""
        self.keep_alive = True
        self.parser = httptools.HttpRequestParser(self)

    def on_headers_complete(self) -> None:
        self.complete = True  # read now: once the message is complete llhttp starts on the next one
        self.keep_alive = self.parser.should_keep_alive()
        self.method = self.parser.get_method()

    def fields(self, head: bytes) -> None:
        """Collect Host, Content-Length, Transfer-Encoding, Upgrade and X-Forwarded-* from a head
        llhttp accepted (so every field line is ``name:value`` with a token name)."""
        for name, value in _FIELDS.findall(head):
            n = name.lower()
            if n == b"host":
                self.hosts.append(value)
            elif n == b"content-length":
                self.cl.append(value)
            elif n == b"transfer-encoding":
                self.te.append(value)
            elif n == b"upgrade":
                self.upgrade = self.upgrade or bool(value)
            elif n == b"x-forwarded-for":
                self.xff.append(value)
            elif n == b"x-forwarded-proto":
                self.xfp.append(value)
            else:
                self.xfh.append(value)

    def body(self) -> Any:
        """How the body is delimited: an int (Content-Length, 0 for none) or "chunked"; HeadError
        for what RFC 9112 §6 asks a server to refuse (the classic request-smuggling shapes)."""
        if self.te:
            if self.cl:
                raise HeadError("400 Bad Request", "both Transfer-Encoding and Content-Length")
            codings = [c.strip(b" \t").lower() for c in b",".join(self.te).split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise HeadError("400 Bad Request", "Transfer-Encoding must end with chunked, once")
            return "chunked"
        if self.cl:
            values = {v.strip(b" \t") for v in b",".join(self.cl).split(b",")}
            if len(values) != 1:
                raise HeadError("400 Bad Request", "conflicting Content-Length values")
            value = values.pop()
            if not value.isdigit() or len(value) > 18:
                raise HeadError("400 Bad Request", "invalid Content-Length")
            return int(value)
        return 0


def parse_request(head: bytes) -> Request:
    """Parse one complete request head (up to and including its empty line); HeadError if it is
    malformed or not allowed."""
    req = Request()
    try:
        req.parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except (httptools.HttpParserInvalidMethodError, httptools.HttpParserInvalidURLError):
        raise HeadError("400 Bad Request", "malformed request line") from None
    except httptools.HttpParserError as exc:
        if not REQUEST_LINE.match(head):
            raise HeadError("400 Bad Request", "malformed request line") from None
        raise HeadError("400 Bad Request", head_violation(head) or "malformed request head (%s)" % _ascii(exc)) from None
    if not req.complete:
        raise HeadError("400 Bad Request", "malformed request head")
    # llhttp takes an HTTP/0.9-style line ("GET /" without a version) and several spaces between
    # the parts; RFC 9112 §3 wants exactly method SP target SP version
    if not REQUEST_LINE.match(head):
        raise HeadError("400 Bad Request", "malformed request line")
    problem = head_violation(head)
    if problem is not None:
        raise HeadError("400 Bad Request", problem)
    req.fields(head)
    if len(req.hosts) > 1:
        raise HeadError("400 Bad Request", "more than one Host header")
    req.url = head.lstrip(b"\r\n").split(b" ", 2)[1]
    if req.method == b"CONNECT":
        req.upgrade = True
    return req


def check_partial(req: Request, data: bytes, head: bytes) -> None:
    """Parse on in an incomplete head (``data`` new, ``head`` all so far): HeadError as soon as
    it cannot become a valid one."""
    try:
        req.parser.feed_data(data)
    except httptools.HttpParserError:
        parse_request(head)  # raises the HeadError that says why
        raise HeadError("400 Bad Request", "malformed request head") from None


def _ascii(exc: BaseException) -> str:
    return str(exc).encode("ascii", "backslashreplace").decode("ascii")[:200]


def forwarded_head(head: bytes, req: Request, client: str, host: str, proto: str, trusted: bool) -> bytes:
    """``head`` with X-Forwarded-For/-Proto/-Host for the app: appended to what a trusted front
    proxy sent, replacing what anyone else sent."""
    if trusted:
        xff = b", ".join(req.xff + [client.encode()])
        xfp = req.xfp[-1] if req.xfp else proto.encode()
        xfh = req.xfh[-1] if req.xfh else host.encode()
    else:
        xff, xfp, xfh = client.encode(), proto.encode(), host.encode()
    if req.xff or req.xfp or req.xfh:
        head = _XF_LINE.sub(b"", head)
    return head[:-2] + forwarded_lines(xff, xfp, xfh)


def forwarded_lines(xff: bytes, proto: bytes, host: bytes) -> bytes:
    """The X-Forwarded-* field lines and the empty line that ends the head."""
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n\r\n" % (xff, proto, host)


class Chunked:
    """Finds the end of a chunked body (RFC 9112 §7.1): chunk-size lines, data, trailers."""

    __slots__ = ("state", "left", "line")

    SIZE, DATA, DATA_END, TRAILER = range(4)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.left = 0
        self.line = bytearray()

    def feed(self, data: Any, pos: int) -> int:
        """Consume ``data[pos:]``: the offset just past the body's end, or -1 when all of it is
        body. HeadError for a malformed coding."""
        n = len(data)
        while pos < n:
            state = self.state
            if state == self.DATA:
                take = min(self.left, n - pos)
                self.left -= take
                pos += take
                if self.left == 0:
                    self.state = self.DATA_END
            elif state == self.DATA_END:  # the CRLF after a chunk's data
                crlf = bytes(data[pos:pos + 2 - len(self.line)])
                self.line += crlf
                pos += len(crlf)
                if not b"\r\n".startswith(bytes(self.line)):
                    raise HeadError("400 Bad Request", "malformed chunked body (data longer than its size)")
                if len(self.line) == 2:
                    self.line = bytearray()
                    self.state = self.SIZE
            elif state == self.SIZE:
                room = MAX_CHUNK_LINE - len(self.line)
                piece = bytes(data[pos:pos + room + 1])
                cut = piece.find(b"\n")
                if cut < 0:
                    if len(self.line) + len(piece) > MAX_CHUNK_LINE:
                        raise HeadError("400 Bad Request", "chunk-size line too long")
                    self.line += piece
                    return -1
                self.line += piece[:cut + 1]
                pos += cut + 1
                line, self.line = bytes(self.line), bytearray()
                if not line.endswith(b"\r\n"):
                    raise HeadError("400 Bad Request", "malformed chunked body (bare LF)")
                size = line[:-2].split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size):
                    raise HeadError("400 Bad Request", "malformed chunk size")
                self.left = int(size, 16)
                self.state = self.DATA if self.left else self.TRAILER
            else:  # trailer section: field lines, then an empty line
                room = MAX_TRAILERS - len(self.line)
                piece = bytes(data[pos:pos + room + 4])
                before = len(self.line)
                self.line += piece
                if self.line.startswith(b"\r\n"):
                    stop = 2
                else:
                    end = self.line.find(b"\r\n\r\n", max(0, before - 3))
                    stop = end + 4 if end >= 0 else -1
                if stop < 0:
                    if len(self.line) > MAX_TRAILERS:
                        raise HeadError("400 Bad Request", "chunked trailers too long")
                    return -1
                self.line = bytearray()
                self.state = self.SIZE
                return pos + stop - before
        return -1


class ResponseTracker:
    """Follows the responses on one stream to the requests sent on it (``sent(method, upgrade)``).
    ``feed`` takes response bytes in order and returns how many of them belong to responses still
    owed; ``idle`` says every request sent has its answer. After a 101 (or a 2xx to CONNECT)
    the stream is a raw byte pipe (``raw``); an unreadable response head ends the tracking
    (``lost``): from then on the stream's end is its only boundary."""

    __slots__ = ("pending", "state", "left", "chunked", "head", "raw", "lost", "answered_upgrade")

    HEAD, LENGTH, CHUNKED, UNTIL_EOF = range(4)

    def __init__(self) -> None:
        self.pending: Deque[Tuple[bytes, bool]] = collections.deque()
        self.state = self.HEAD
        self.left = 0
        self.chunked: Optional[Chunked] = None
        self.head = bytearray()
        self.raw = False
        self.lost = False
        #: set when the answer to an upgrade request arrived: True (switched) or False (refused)
        self.answered_upgrade: Optional[bool] = None

    def sent(self, method: bytes, upgrade: bool) -> None:
        self.pending.append((method, upgrade))

    @property
    def idle(self) -> bool:
        """Every request sent has its complete answer, and nothing of another one has arrived."""
        return not self.pending and self.state == self.HEAD and not self.head and not self.raw and not self.lost

    def feed(self, data: Any, stop_when_idle: bool = False) -> int:
        """Follow ``data``; returns the bytes consumed (all of them, unless ``stop_when_idle`` and
        the last owed response ended before the end of ``data``)."""
        n = len(data)
        pos = 0
        while pos < n:
            if self.raw or self.lost:
                return n
            state = self.state
            if state == self.LENGTH:
                take = min(self.left, n - pos)
                self.left -= take
                pos += take
                if self.left == 0:
                    self._done()
            elif state == self.CHUNKED:
                assert self.chunked is not None
                try:
                    end = self.chunked.feed(data, pos)
                except HeadError:
                    self.lost = True
                    return n
                if end < 0:
                    return n
                pos = end
                self._done()
            elif state == self.UNTIL_EOF:
                return n
            else:
                if stop_when_idle and not self.pending and not self.head:
                    return pos
                pos = self._head(data, pos)
        return n

    def _head(self, data: Any, pos: int) -> int:
        before = len(self.head)
        end = -1
        for window in (4096, MAX_RESPONSE_HEAD - before + 4):  # most heads are found in the first
            piece = bytes(data[pos:pos + window])
            end = (self.head + piece).find(b"\r\n\r\n", max(0, before - 3)) if before else piece.find(b"\r\n\r\n")
            if end >= 0 or len(piece) < window:
                break
        if end < 0:
            self.head += piece
            if len(self.head) > MAX_RESPONSE_HEAD:
                self.lost = True
            return pos + len(piece)
        head = bytes(self.head + piece[:end + 4 - before]) if before else piece[:end + 4]
        self.head = bytearray()
        used = end + 4 - before
        m = _STATUS_LINE.match(head)
        if m is None:
            self.lost = True
            return pos + used
        status = int(m[1])
        method, upgrade = self.pending[0] if self.pending else (b"", False)
        if 100 <= status < 200 and status != 101:
            return pos + used  # interim: the final answer follows
        if upgrade and self.pending:
            switched = status == 101 or (method == b"CONNECT" and 200 <= status < 300)
            self.answered_upgrade = switched
            if switched:
                self.pending.popleft()
                self.raw = True
                return pos + used
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            self._done()
            return pos + used
        cl: List[bytes] = []
        te: List[bytes] = []
        for name, value in _RESPONSE_FIELDS.findall(head):
            (cl if name.lower() == b"content-length" else te).append(value)
        if te:
            codings = [c.strip(b" \t").lower() for c in b",".join(te).split(b",")]
            if codings[-1] == b"chunked":
                self.chunked = Chunked()
                self.state = self.CHUNKED
            else:
                self.state = self.UNTIL_EOF
        elif cl:
            value = cl[0]
            if not value.isdigit() or len(value) > 18:
                self.lost = True
                return pos + used
            self.left = int(value)
            if self.left:
                self.state = self.LENGTH
            else:
                self._done()
        else:
            self.state = self.UNTIL_EOF
        return pos + used

    def _done(self) -> None:
        self.state = self.HEAD
        self.chunked = None
        if self.pending:
            self.pending.popleft()
