"""Pure-Python twin of the compiled HTTP/1.1 framing kernel (``http_kernel.pyx``): same names, same
behaviour, the same steps in the same order; where the compiled module scans bytes in C loops, this
one uses regular expressions and ``bytes.find`` (which is what is fast in Python). Tests run both
against each other and against llhttp (tests/test_http_kernel.py).

``scan_plain`` reads a plain request head (see ``server.http1.parse_plain``); ``rewrite_repeat``
writes the X-Forwarded-* lines over the empty line of a read that repeats the last one; ``Chunked`` finds
where a chunked body ends (RFC 9112 §7.1); ``ResponseTracker`` follows the responses on a tunnel
stream to the requests sent on it (status line, Content-Length, chunked, no body for
HEAD/1xx/204/304, close-delimited, 101 Switching Protocols). ``HeadError`` and the limits are
defined here once and shared by both kernels.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Deque, List, Optional, Tuple

__all__ = ["HeadError", "scan_plain", "rewrite_repeat", "Chunked", "ResponseTracker", "MAX_CHUNK_LINE",
           "MAX_TRAILERS", "MAX_RESPONSE_HEAD"]

#: Longest chunk-size line (with extensions) and most trailer bytes accepted in a chunked body.
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16 * 1024
#: A response head longer than this stops the tracking of that stream's responses (the stream
#: then keeps the connection to itself until it ends).
MAX_RESPONSE_HEAD = 64 * 1024

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: A control byte other than HTAB (a chunk-size line may hold none).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: A line end that is not CRLF, or a field line folded onto the one before (obs-fold).
_BARE_LF = re.compile(rb"(?<!\r)\n|\n[ \t]")
#: A response's status line and the fields that delimit its body.
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})[ \r]")
#: (values with their surrounding whitespace, stripped after: a lazy value before optional whitespace
#: backtracks quadratically on a long run of spaces)
_RESPONSE_FIELDS = re.compile(rb"\r\n(content-length|transfer-encoding)[ \t]*:([^\r\n]*)(?=\r\n)", re.IGNORECASE)
#: A plain request head, which llhttp takes as it is: a common method, an origin-form target of
#: RFC 3986 path and query characters, HTTP/1.0 or 1.1, token-named fields with VCHAR/SP/HTAB values.
_PLAIN_HEAD = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) "
                         rb"HTTP/1\.([01])\r\n(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t -~]*\r\n)*\r\n")
#: The request fields a plain head is read for (name, value without the whitespace around it);
#: Transfer-Encoding, Upgrade and (Proxy-)Connection make a head not plain.
_FIELDS = re.compile(rb"\r\n(host|content-length|transfer-encoding|upgrade|(?:proxy-)?connection|"
                     rb"x-forwarded-(?:for|proto|host)):([^\r\n]*)(?=\r\n)", re.IGNORECASE)

Plain = Tuple[bytes, bytes, bool, Tuple[bytes, ...], Tuple[bytes, ...], Tuple[bytes, ...], Tuple[bytes, ...],
              Tuple[bytes, ...]]


def scan_plain(data: Any, start: int, stop: int) -> Optional[Plain]:
    """``data[start:stop]`` read if it is exactly one plain request head: (method, target,
    keep-alive (HTTP/1.1), Host values, Content-Length values, X-Forwarded-For, -Proto, -Host
    values); None if it is not one, or has a field that changes llhttp's view of it (Transfer-Encoding,
    Upgrade, Connection, Proxy-Connection, more than one Content-Length, one that is not 1 to 18
    digits)."""
    m = _PLAIN_HEAD.fullmatch(data, start, stop)
    if m is None:
        return None
    hosts: Tuple[bytes, ...] = ()
    cl: Tuple[bytes, ...] = ()
    xff: Tuple[bytes, ...] = ()
    xfp: Tuple[bytes, ...] = ()
    xfh: Tuple[bytes, ...] = ()
    for name, value in _FIELDS.findall(data, start, stop):
        n = name.lower()
        value = value.strip(b" \t")
        if n == b"host":
            hosts += (value,)
        elif n == b"content-length":
            if cl or not value.isdigit() or len(value) > 18:
                return None
            cl += (value,)
        elif n == b"x-forwarded-for":
            xff += (value,)
        elif n == b"x-forwarded-proto":
            xfp += (value,)
        elif n == b"x-forwarded-host":
            xfh += (value,)
        else:
            return None
    return m[1], m[2], m[3] == b"1", hosts, cl, xff, xfp, xfh


def rewrite_repeat(buf: bytearray, start: int, nbytes: int, last: bytes, lines: bytes) -> int:
    """If the ``nbytes`` read at ``buf[start:]`` are exactly ``last`` (a request head, up to its
    empty line) and ``buf`` has room after them for ``lines``, write ``lines`` over the empty line
    (its last two bytes) and return the new length, ``nbytes - 2 + len(lines)``; else -1 and
    ``buf`` is left as it was."""
    stop = start + nbytes
    if (len(last) < 2 or nbytes != len(last) or start < 0 or stop - 2 + len(lines) > len(buf)
            or not buf.startswith(last, start)):
        return -1
    buf[stop - 2:stop - 2 + len(lines)] = lines
    return nbytes - 2 + len(lines)


class HeadError(Exception):
    """A request the ingress answers itself: ``status`` (e.g. "400 Bad Request") and why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _check_trailers(section: bytes) -> None:
    """The trailer section (field lines and the empty line) must use CRLF only, without folding:
    a peer that ends it at a bare LF would read what follows as a new request."""
    crlf = section.count(b"\r\n")
    if section.count(b"\n") != crlf or section.count(b"\r") != crlf or b"\n " in section or b"\n\t" in section:
        raise HeadError("400 Bad Request", "malformed chunked trailers (a bare CR or LF, or a folded line)")


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
                if _CTL.search(line, 0, len(line) - 2):  # a bare CR in an extension: a peer may end the line there
                    raise HeadError("400 Bad Request", "malformed chunk-size line (a control character)")
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
                _check_trailers(bytes(self.line[:stop]))
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

    __slots__ = ("pending", "state", "left", "chunked", "head", "raw", "lost", "answered_upgrade", "known",
                 "known_left")

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
        #: the last response head with a Content-Length body (``known_left`` bytes) that answered
        #: a request other than HEAD, CONNECT or an upgrade: a repeat of it is not parsed again
        self.known = b""
        self.known_left = 0

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
        known = self.known
        if (known and n == len(known) + self.known_left and self.state == self.HEAD and self.pending and not self.head
                and type(data) is bytes and data.startswith(known) and not self.raw and not self.lost):
            method, upgrade = self.pending[0]  # one whole response, a repeat of the last: as the first
            if not upgrade and method != b"HEAD" and method != b"CONNECT":
                self.pending.popleft()
                return n
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
        if not before and type(data) is bytes:  # most heads: found in place, nothing copied
            known = self.known
            if known and data.startswith(known, pos) and self.pending:
                method, upgrade = self.pending[0]
                if not upgrade and method != b"HEAD" and method != b"CONNECT":
                    self.left = self.known_left
                    if self.left:
                        self.state = self.LENGTH
                    else:
                        self._done()
                    return pos + len(known)
            end = data.find(b"\r\n\r\n", pos, pos + MAX_RESPONSE_HEAD + 4)
            if end >= 0:
                self._answer(data, pos, end + 4)
                return end + 4
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
        self._answer(head, 0, len(head))
        return pos + end + 4 - before

    def _answer(self, head: bytes, start: int, stop: int) -> None:
        """A complete response head, at ``head[start:stop]``: what its body is, and whether it
        answers the request owed."""
        m = _STATUS_LINE.match(head, start, stop)
        if m is None or _BARE_LF.search(head, start, stop) is not None:  # unreadable, or read two ways
            self.lost = True
            return
        status = int(m[1])
        method, upgrade = self.pending[0] if self.pending else (b"", False)
        if 100 <= status < 200 and status != 101:
            return  # interim: the final answer follows
        if upgrade and self.pending:
            switched = status == 101 or (method == b"CONNECT" and 200 <= status < 300)
            self.answered_upgrade = switched
            if switched:
                self.pending.popleft()
                self.raw = True
                return
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            self._done()
            return
        fields = [(n, v.strip(b" \t")) for n, v in _RESPONSE_FIELDS.findall(head, start, stop)]
        if len(fields) == 1 and fields[0][0].lower() == b"content-length":  # the common case
            cl: List[bytes] = [fields[0][1]]
            te: List[bytes] = []
        else:
            cl, te = [], []
            for name, value in fields:
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
            if not value.isdigit() or len(value) > 18 or any(v != value for v in cl):
                self.lost = True
                return
            self.left = int(value)
            if not upgrade and method != b"HEAD" and method != b"CONNECT" and self.pending:
                self.known, self.known_left = bytes(head[start:stop]), self.left
            if self.left:
                self.state = self.LENGTH
            else:
                self._done()
        else:
            self.state = self.UNTIL_EOF

    def _done(self) -> None:
        self.state = self.HEAD
        self.chunked = None
        if self.pending:
            self.pending.popleft()
