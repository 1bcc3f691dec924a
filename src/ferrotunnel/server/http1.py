"""HTTP/1.1 message framing for the HTTP ingress, both ways, without touching message bodies.

Requests: every head on a visitor's connection is parsed with httptools (llhttp) and checked as
RFC 9112 asks (one Host, a valid Host, no whitespace before a colon, no obs-fold, no
Transfer-Encoding together with Content-Length, chunked last); its body is delimited by
Content-Length or by the chunked coding (``Chunked``), so the next head is found wherever it
starts. ``forwarded_head`` adds X-Forwarded-For/-Proto/-Host. A plain head (``parse_plain``: a
common method, an origin-form target, ordinary fields, no Connection/Upgrade/Transfer-Encoding)
is one llhttp would take as it is: it is read by ``scan_plain`` alone (the compiled HTTP kernel, or
its twin's regular expressions), with the same result, and ``PlainHeads`` reads a head that
repeats the last one of its connection only once.

Responses (``http_framing``): ``ResponseTracker`` follows the responses coming back on a tunnel
stream (status line, Content-Length, chunked, no body for HEAD/1xx/204/304, close-delimited, 101
Switching Protocols), so the ingress knows when every request sent on a stream has been answered
— the moment a keep-alive connection may move to another tunnel's stream.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple

import httptools

from .http_framing import (MAX_CHUNK_LINE, MAX_RESPONSE_HEAD, MAX_TRAILERS, Chunked, HeadError, ResponseTracker,
                           rewrite_repeat, scan_plain)

__all__ = ["HeadError", "Request", "parse_request", "parse_plain", "PlainHeads", "parse_request_llhttp",
           "check_partial", "Chunked", "ResponseTracker", "rewrite_repeat", "forwarded_head", "forwarded_lines",
           "head_end", "MAX_CHUNK_LINE", "MAX_TRAILERS", "MAX_RESPONSE_HEAD"]

#: More than any request head the ingress takes.
MAX_HEAD_BYTES = 1 << 30

#: A field line that starts with whitespace: obs-fold (or whitespace before the first field).
_OBS_FOLD = re.compile(rb"\n[ \t]")
#: Whitespace between a field name and the colon (the name is everything before the first colon).
_SPACE_COLON = re.compile(rb"\n[^:\r\n]*[ \t]:")
#: method SP request-target SP HTTP-version CRLF (the method a token).
REQUEST_LINE = re.compile(rb"(?:\r\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^ \r\n]+ HTTP/[0-9]\.[0-9]\r\n")
#: An X-Forwarded-For/-Proto/-Host field line (with the CRLF before it).
_XF_LINE = re.compile(rb"\r\nx-forwarded-(?:for|proto|host)[ \t]*:[^\r\n]*", re.IGNORECASE)
#: The request fields the ingress reads (name, value with the whitespace around it: stripped after,
#: since a lazy value before optional whitespace backtracks quadratically on a long run of spaces,
#: seconds for one 16 KiB head); Connection only tells the plain heads (``parse_plain``) from the others.
_FIELDS = re.compile(rb"\r\n(host|content-length|transfer-encoding|upgrade|(?:proxy-)?connection|"
                     rb"x-forwarded-(?:for|proto|host)):([^\r\n]*)(?=\r\n)", re.IGNORECASE)


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

    def __init__(self, parser: bool = True) -> None:
        self.url = b""
        self.hosts: Tuple[bytes, ...] = ()
        self.upgrade = False
        self.te: Tuple[bytes, ...] = ()
        self.cl: Tuple[bytes, ...] = ()
        self.xff: Tuple[bytes, ...] = ()
        self.xfp: Tuple[bytes, ...] = ()
        self.xfh: Tuple[bytes, ...] = ()
        self.complete = False
        self.method = b""
        self.keep_alive = True
        self.parser = httptools.HttpRequestParser(self) if parser else None

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.complete = True  # read now: once the message is complete llhttp starts on the next one
        self.keep_alive = self.parser.should_keep_alive()
        self.method = self.parser.get_method()

    def fields(self, head: Any, start: int = 0, stop: int = MAX_HEAD_BYTES) -> bool:
        """Collect Host, Content-Length, Transfer-Encoding, Upgrade and X-Forwarded-* from a head
        llhttp accepted, or a plain one (so every field line is ``name:value`` with a token name),
        at ``head[start:stop]``. True if llhttp could have told nothing more: no Transfer-Encoding,
        Upgrade or Connection, at most one Content-Length, of at most 18 digits."""
        plain = True
        for name, value in _FIELDS.findall(head, start, stop):
            n = name.lower()
            value = value.strip(b" \t")
            if n == b"host":
                self.hosts += (value,)
            elif n == b"content-length":
                plain = plain and not self.cl and value.isdigit() and len(value) <= 18
                self.cl += (value,)
            elif n == b"x-forwarded-for":
                self.xff += (value,)
            elif n == b"x-forwarded-proto":
                self.xfp += (value,)
            elif n == b"x-forwarded-host":
                self.xfh += (value,)
            else:
                plain = False
                if n == b"transfer-encoding":
                    self.te += (value,)
                elif n == b"upgrade":
                    self.upgrade = self.upgrade or bool(value)
        return plain

    def body(self) -> Any:
        """How the body is delimited: an int (Content-Length, 0 for none) or "chunked"; HeadError
        for what RFC 9112 §6 asks a server to refuse (the classic request-smuggling shapes), and for
        an upgrade (or CONNECT) with a body: what follows it could not be told from raw bytes."""
        if self.upgrade and (self.te or any(v.strip(b" \t") not in (b"", b"0") for v in self.cl)):
            raise HeadError("400 Bad Request", "an upgrade or CONNECT request with a body is not supported")
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


def parse_plain(data: Any, start: int, stop: int) -> Optional[Request]:
    """``data[start:stop]`` parsed if it is exactly one plain request head (``scan_plain``: a
    common method, an origin-form target of RFC 3986 path and query characters, HTTP/1.0 or 1.1,
    token-named fields with VCHAR/SP/HTAB values, and no field that changes llhttp's view of it:
    see ``Request.fields``), else None: such a head is one llhttp accepts, and the result is the
    one ``parse_request`` gives. HeadError for more than one Host."""
    got = scan_plain(data, start, stop)
    if got is None:
        return None
    if len(got[3]) > 1:
        raise HeadError("400 Bad Request", "more than one Host header")
    req = Request.__new__(Request)  # every slot set here: what __init__ would set, then the head's
    req.method, req.url, req.keep_alive, req.hosts, req.cl, req.xff, req.xfp, req.xfh = got
    req.upgrade, req.te, req.complete, req.parser = False, (), True, None
    return req


class PlainHeads:
    """The plain request heads (``parse_plain``) of one connection, the last one remembered: a
    client that repeats its head (most keep-alive traffic: polling, the same call again) has it
    parsed once. A Request is only read once parsed, so the same one serves each repeat."""

    __slots__ = ("last", "req", "framing", "answer", "host", "bare", "quick")

    def __init__(self) -> None:
        self.last = b""  # the last one, as the visitor sent it
        self.req: Optional[Request] = None
        self.framing = 0  # its body length (``Request.body``)
        self.answer: Tuple[bytes, bool] = (b"", False)  # what ResponseTracker.pending expects for it
        self.host = b""  # its Host
        self.bare = False  # keep-alive, without a body: once sent, the next head follows
        #: ``answer``, unless the method is HEAD: a response to it that repeats the last one
        #: (``ResponseTracker.known``) is the whole answer, body included
        self.quick: Optional[Tuple[bytes, bool]] = None

    def parse(self, data: Any, start: int, stop: int) -> Optional[Request]:
        """The plain head at ``data[start:stop]`` if it has one Host and no X-Forwarded-* field
        (remembered as the last one); else None (and it is left to ``parse_request``)."""
        try:
            req = parse_plain(data, start, stop)
        except HeadError:
            return None
        if req is None or not req.hosts or req.xff or req.xfp or req.xfh:
            return None
        self.last, self.req, self.framing = bytes(data[start:stop]), req, req.body()
        self.answer, self.host = (req.method, req.upgrade), req.hosts[0]
        self.bare = not self.framing and req.keep_alive
        self.quick = self.answer if req.method != b"HEAD" else None
        return req

    def rewrite(self, buf: bytearray, start: int, nbytes: int, host: bytes, lines: bytes) -> Optional[Request]:
        """The ``nbytes`` at ``buf[start:]`` if they are one plain head (``parse``) with Host
        ``host``, with ``lines`` (X-Forwarded-* lines and the empty line) written over its empty
        line (``buf`` has room for them); else None, and ``buf`` is left as it was."""
        stop = start + nbytes
        if stop - 2 + len(lines) > len(buf):
            return None
        req = self.parse(buf, start, stop)
        if req is None or req.hosts[0] != host:
            return None
        buf[stop - 2:stop - 2 + len(lines)] = lines  # as long as what it replaces: same size
        return req


def parse_request(head: bytes) -> Request:
    """Parse one complete request head (up to and including its empty line); HeadError if it is
    malformed or not allowed."""
    req = parse_plain(head, 0, len(head))
    return req if req is not None else parse_request_llhttp(head)


def parse_request_llhttp(head: bytes) -> Request:
    """``parse_request`` for any head: checked by llhttp."""
    req = Request()
    assert req.parser is not None
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
    if req.te and _before_11(req.parser.get_http_version()):
        # RFC 9112 §6.1: its framing is to be treated as faulty. Refused rather than forwarded and
        # then closed: an app may read the body of a 1.0 message without the chunked coding, and
        # then what the chunks carry are requests on the stream that no routing or access rule saw
        raise HeadError("400 Bad Request", "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
    req.url = head.lstrip(b"\r\n").split(b" ", 2)[1]
    if req.method == b"CONNECT":
        req.upgrade = True
    return req


def _before_11(version: str) -> bool:
    """Whether llhttp's ``major.minor`` is an HTTP version older than 1.1."""
    major, _, minor = version.partition(".")
    return (int(major or 0), int(minor or 0)) < (1, 1)


def check_partial(req: Request, data: bytes, head: bytes) -> None:
    """Parse on in an incomplete head (``data`` new, ``head`` all so far): HeadError as soon as
    it cannot become a valid one."""
    assert req.parser is not None
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
        xff = b", ".join((*req.xff, client.encode()))
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
