# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled HTTP/1.1 framing kernel of the HTTP ingress; its pure-Python twin is ``http_kernel_py``
(same names, same behaviour, the same steps in the same order). Where the twin uses regular
expressions and ``bytes.find``, this module scans the bytes in C loops through the buffer protocol
(bytes, bytearray or memoryview alike), without copying them.

``scan_plain`` reads a plain request head (see ``server.http1.parse_plain``); ``rewrite_repeat``
writes the X-Forwarded-* lines over the empty line of a read that repeats the last one; ``Chunked`` finds
where a chunked body ends (RFC 9112 §7.1); ``ResponseTracker`` follows the responses on a tunnel
stream to the requests sent on it. ``HeadError`` and the limits come from the twin: one class,
one set of numbers for both.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.string cimport memchr, memcmp, memcpy

import collections

from ferrotunnel.http_kernel_py import MAX_CHUNK_LINE, MAX_RESPONSE_HEAD, MAX_TRAILERS, HeadError

__all__ = ["HeadError", "scan_plain", "rewrite_repeat", "Chunked", "ResponseTracker", "MAX_CHUNK_LINE",
           "MAX_TRAILERS", "MAX_RESPONSE_HEAD"]

ctypedef const unsigned char uchar

cdef Py_ssize_t C_MAX_CHUNK_LINE = MAX_CHUNK_LINE
cdef Py_ssize_t C_MAX_TRAILERS = MAX_TRAILERS
cdef Py_ssize_t C_MAX_RESPONSE_HEAD = MAX_RESPONSE_HEAD

# byte classes: 1 token (field name, RFC 9110 tchar), 2 origin-form target character, 4 field value
# character (HTAB, SP, VCHAR), 8 hex digit
cdef unsigned char CLASS[256]


cdef void _classes():
    cdef int c
    for c in range(256):
        CLASS[c] = 0
    for c in b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        CLASS[c] |= 1
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%":
        CLASS[c] |= 2
    CLASS[9] |= 4
    for c in range(32, 127):
        CLASS[c] |= 4
    for c in b"0123456789ABCDEFabcdef":
        CLASS[c] |= 8


_classes()

cdef bytes B_GET = b"GET", B_HEAD = b"HEAD", B_POST = b"POST", B_PUT = b"PUT", B_DELETE = b"DELETE"
cdef bytes B_OPTIONS = b"OPTIONS", B_PATCH = b"PATCH", B_CONNECT = b"CONNECT"


cdef inline bint _is(uchar* p, Py_ssize_t n, const char* lower, Py_ssize_t m) noexcept:
    """p[:n], ASCII letters lower-cased, equals ``lower``."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if n != m:
        return False
    for i in range(n):
        c = p[i]
        if 65 <= c <= 90:
            c |= 0x20
        if c != <unsigned char>lower[i]:
            return False
    return True


cdef inline Py_ssize_t _find_end(uchar* buf, Py_ssize_t pos, Py_ssize_t stop) noexcept:
    """Where b"\\r\\n\\r\\n" starts in buf[pos:stop], or -1."""
    cdef uchar* p
    while stop - pos >= 4:
        p = <uchar*>memchr(buf + pos, 13, stop - pos - 3)
        if p == NULL:
            return -1
        if p[1] == 10 and p[2] == 13 and p[3] == 10:
            return p - buf
        pos = p - buf + 1
    return -1


cdef inline bint _digits(uchar* p, Py_ssize_t n) noexcept:
    """bytes.isdigit(): one or more ASCII digits."""
    cdef Py_ssize_t i
    if n == 0:
        return False
    for i in range(n):
        if not 48 <= p[i] <= 57:
            return False
    return True


def scan_plain(data, Py_ssize_t start, Py_ssize_t stop):
    """``data[start:stop]`` read if it is exactly one plain request head: (method, target,
    keep-alive (HTTP/1.1), Host values, Content-Length values, X-Forwarded-For, -Proto, -Host
    values); None if it is not one, or has a field that changes llhttp's view of it (Transfer-Encoding,
    Upgrade, Connection, Proxy-Connection, more than one Content-Length, one that is not 1 to 18
    digits)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if stop > view.len:
            stop = view.len
        if start < 0:
            start = 0
        if stop < start:
            return None
        return _scan_plain(<uchar*>view.buf + start, stop - start)
    finally:
        PyBuffer_Release(&view)


cdef object _scan_plain(uchar* p, Py_ssize_t n):
    cdef Py_ssize_t i, k, name, v0, v1
    cdef bytes method
    cdef tuple hosts = (), cl = (), xff = (), xfp = (), xfh = ()
    cdef object value
    # method SP
    if n >= 4 and memcmp(p, b"GET ", 4) == 0:
        method, i = B_GET, 4
    elif n >= 5 and memcmp(p, b"POST ", 5) == 0:
        method, i = B_POST, 5
    elif n >= 5 and memcmp(p, b"HEAD ", 5) == 0:
        method, i = B_HEAD, 5
    elif n >= 4 and memcmp(p, b"PUT ", 4) == 0:
        method, i = B_PUT, 4
    elif n >= 7 and memcmp(p, b"DELETE ", 7) == 0:
        method, i = B_DELETE, 7
    elif n >= 8 and memcmp(p, b"OPTIONS ", 8) == 0:
        method, i = B_OPTIONS, 8
    elif n >= 6 and memcmp(p, b"PATCH ", 6) == 0:
        method, i = B_PATCH, 6
    else:
        return None
    # an origin-form target SP HTTP/1.0 or 1.1 CRLF
    if i >= n or p[i] != 47:  # "/"
        return None
    k = i
    i += 1
    while i < n and CLASS[p[i]] & 2:
        i += 1
    target = PyBytes_FromStringAndSize(<char*>p + k, i - k)
    if n - i < 11 or p[i] != 32 or memcmp(p + i + 1, b"HTTP/1.", 7) != 0:
        return None
    i += 8
    if p[i] != 48 and p[i] != 49:
        return None
    keep_alive = p[i] == 49
    if p[i + 1] != 13 or p[i + 2] != 10:
        return None
    i += 3
    # token ":" value CRLF, until the empty line, which ends the range
    while True:
        if n - i >= 2 and p[i] == 13 and p[i + 1] == 10:
            if i + 2 != n:
                return None
            break
        name = i
        while i < n and CLASS[p[i]] & 1:
            i += 1
        if i == name or i >= n or p[i] != 58:  # ":"
            return None
        k = i - name
        i += 1
        v0 = i
        while i < n and CLASS[p[i]] & 4:
            i += 1
        if n - i < 2 or p[i] != 13 or p[i + 1] != 10:
            return None
        v1 = i
        i += 2
        if k != 4 and (k < 7 or k > 17):
            continue  # no field the ingress reads has such a name
        while v0 < v1 and (p[v0] == 32 or p[v0] == 9):
            v0 += 1
        while v1 > v0 and (p[v1 - 1] == 32 or p[v1 - 1] == 9):
            v1 -= 1
        if _is(p + name, k, b"host", 4):
            hosts += (PyBytes_FromStringAndSize(<char*>p + v0, v1 - v0),)
        elif _is(p + name, k, b"content-length", 14):
            if cl or not _digits(p + v0, v1 - v0) or v1 - v0 > 18:
                return None
            cl += (PyBytes_FromStringAndSize(<char*>p + v0, v1 - v0),)
        elif _is(p + name, k, b"x-forwarded-for", 15):
            xff += (PyBytes_FromStringAndSize(<char*>p + v0, v1 - v0),)
        elif _is(p + name, k, b"x-forwarded-proto", 17):
            xfp += (PyBytes_FromStringAndSize(<char*>p + v0, v1 - v0),)
        elif _is(p + name, k, b"x-forwarded-host", 16):
            xfh += (PyBytes_FromStringAndSize(<char*>p + v0, v1 - v0),)
        elif (_is(p + name, k, b"transfer-encoding", 17) or _is(p + name, k, b"upgrade", 7)
              or _is(p + name, k, b"connection", 10) or _is(p + name, k, b"proxy-connection", 16)):
            return None
    return method, target, keep_alive, hosts, cl, xff, xfp, xfh



def rewrite_repeat(bytearray buf not None, Py_ssize_t start, Py_ssize_t nbytes, bytes last not None,
                   bytes lines not None):
    """If the ``nbytes`` read at ``buf[start:]`` are exactly ``last`` (a request head, up to its
    empty line) and ``buf`` has room after them for ``lines``, write ``lines`` over the empty line
    (its last two bytes) and return the new length, ``nbytes - 2 + len(lines)``; else -1 and
    ``buf`` is left as it was."""
    cdef Py_ssize_t k = len(last), m = len(lines)
    cdef char* p = PyByteArray_AS_STRING(buf)
    if k < 2 or nbytes != k or start < 0 or start + nbytes - 2 + m > PyByteArray_GET_SIZE(buf):
        return -1
    if memcmp(p + start, <char*>last, k) != 0:
        return -1
    memcpy(p + start + nbytes - 2, <char*>lines, m)
    return nbytes - 2 + m


cdef object _chunk_size(bytes line):
    """The size of a chunk-size line (with its CRLF); HeadError if it is malformed."""
    cdef uchar* p = <uchar*>line
    cdef Py_ssize_t n = len(line), i = 0, e
    cdef unsigned long long size = 0
    cdef unsigned char c
    if n < 2 or p[n - 2] != 13:
        raise HeadError("400 Bad Request", "malformed chunked body (bare LF)")
    n -= 2
    while i < n:  # a bare CR (or another control byte) in an extension: a peer may end the line there
        c = p[i]
        if (c < 32 and c != 9) or c == 127:
            raise HeadError("400 Bad Request", "malformed chunk-size line (a control character)")
        i += 1
    i = 0
    e = 0
    while e < n and p[e] != 59:  # up to ";"
        e += 1
    while i < e and (p[i] == 32 or p[i] == 9):
        i += 1
    while e > i and (p[e - 1] == 32 or p[e - 1] == 9):
        e -= 1
    if e == i or e - i > 16:
        raise HeadError("400 Bad Request", "malformed chunk size")
    while i < e:
        c = p[i]
        if not CLASS[c] & 8:
            raise HeadError("400 Bad Request", "malformed chunk size")
        size = size * 16 + (c - 48 if c <= 57 else (c | 0x20) - 87)
        i += 1
    return size


def _check_trailers(bytes section):
    """The trailer section (field lines and the empty line) must use CRLF only, without folding:
    a peer that ends it at a bare LF would read what follows as a new request."""
    crlf = section.count(b"\r\n")
    if section.count(b"\n") != crlf or section.count(b"\r") != crlf or b"\n " in section or b"\n\t" in section:
        raise HeadError("400 Bad Request", "malformed chunked trailers (a bare CR or LF, or a folded line)")


cdef class Chunked:
    """Finds the end of a chunked body (RFC 9112 §7.1): chunk-size lines, data, trailers."""

    cdef public int state
    cdef public unsigned long long left
    cdef public bytearray line

    SIZE, DATA, DATA_END, TRAILER = range(4)

    def __init__(self):
        self.state = 0
        self.left = 0
        self.line = bytearray()

    def feed(self, data, Py_ssize_t pos):
        """Consume ``data[pos:]``: the offset just past the body's end, or -1 when all of it is
        body. HeadError for a malformed coding."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self._feed(<uchar*>view.buf, view.len, pos)
        finally:
            PyBuffer_Release(&view)

    cdef Py_ssize_t _feed(self, uchar* buf, Py_ssize_t n, Py_ssize_t pos) except? -2:
        cdef Py_ssize_t take, room, before, stop, end
        cdef uchar* cut
        cdef bytes line
        if pos < 0:
            pos = 0
        while pos < n:
            state = self.state
            if state == 1:  # DATA
                take = <Py_ssize_t>self.left if self.left < <unsigned long long>(n - pos) else n - pos
                self.left -= take
                pos += take
                if self.left == 0:
                    self.state = 2
            elif state == 2:  # DATA_END: the CRLF after a chunk's data
                take = 2 - len(self.line)
                if take > n - pos:
                    take = n - pos
                self.line += PyBytes_FromStringAndSize(<char*>buf + pos, take)
                pos += take
                if not b"\r\n".startswith(bytes(self.line)):
                    raise HeadError("400 Bad Request", "malformed chunked body (data longer than its size)")
                if len(self.line) == 2:
                    self.line = bytearray()
                    self.state = 0
            elif state == 0:  # SIZE
                room = C_MAX_CHUNK_LINE - len(self.line) + 1
                if room > n - pos:
                    room = n - pos
                cut = <uchar*>memchr(buf + pos, 10, room)
                if cut == NULL:
                    if len(self.line) + room > C_MAX_CHUNK_LINE:
                        raise HeadError("400 Bad Request", "chunk-size line too long")
                    self.line += PyBytes_FromStringAndSize(<char*>buf + pos, room)
                    return -1
                take = cut - (buf + pos) + 1
                if self.line:
                    self.line += PyBytes_FromStringAndSize(<char*>buf + pos, take)
                    line, self.line = bytes(self.line), bytearray()
                else:
                    line = PyBytes_FromStringAndSize(<char*>buf + pos, take)
                pos += take
                self.left = _chunk_size(line)
                self.state = 1 if self.left else 3
            else:  # TRAILER: field lines, then an empty line
                if not self.line and n - pos >= 2 and buf[pos] == 13 and buf[pos + 1] == 10:
                    self.state = 0
                    return pos + 2
                room = C_MAX_TRAILERS - len(self.line) + 4
                if room > n - pos:
                    room = n - pos
                before = len(self.line)
                self.line += PyBytes_FromStringAndSize(<char*>buf + pos, room)
                if self.line.startswith(b"\r\n"):
                    stop = 2
                else:
                    end = self.line.find(b"\r\n\r\n", max(0, before - 3))
                    stop = end + 4 if end >= 0 else -1
                if stop < 0:
                    if len(self.line) > C_MAX_TRAILERS:
                        raise HeadError("400 Bad Request", "chunked trailers too long")
                    return -1
                _check_trailers(bytes(self.line[:stop]))
                self.line = bytearray()
                self.state = 0
                return pos + stop - before
        return -1


class ResponseTracker:
    """Follows the responses on one stream to the requests sent on it (``sent(method, upgrade)``).
    ``feed`` takes response bytes in order and returns how many of them belong to responses still
    owed; ``idle`` says every request sent has its answer. After a 101 (or a 2xx to CONNECT)
    the stream is a raw byte pipe (``raw``); an unreadable response head ends the tracking
    (``lost``): from then on the stream's end is its only boundary."""

    # a Python class with slots, not an extension type: the ingress reads these attributes on every
    # response, and slot reads are what the interpreter makes fast; the work is in C functions below
    __slots__ = ("pending", "state", "left", "chunked", "head", "raw", "lost", "answered_upgrade", "known",
                 "known_left")

    HEAD, LENGTH, CHUNKED, UNTIL_EOF = range(4)

    def __init__(self):
        self.pending = collections.deque()
        self.state = 0
        self.left = 0
        self.chunked = None
        self.head = bytearray()
        self.raw = False
        self.lost = False
        self.answered_upgrade = None
        self.known = b""
        self.known_left = 0

    def sent(self, method, upgrade):
        self.pending.append((method, upgrade))

    @property
    def idle(self):
        """Every request sent has its complete answer, and nothing of another one has arrived."""
        return not self.pending and self.state == 0 and not self.head and not self.raw and not self.lost

    def feed(self, data, bint stop_when_idle=False):
        """Follow ``data``; returns the bytes consumed (all of them, unless ``stop_when_idle`` and
        the last owed response ended before the end of ``data``)."""
        cdef Py_buffer view
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return _tracker_feed(self, data, <uchar*>view.buf, view.len, stop_when_idle)
        finally:
            PyBuffer_Release(&view)


cdef Py_ssize_t _tracker_feed(self, data, uchar* buf, Py_ssize_t n, bint stop_when_idle) except -1:
    cdef Py_ssize_t pos = 0, end, take
    cdef bytes known = self.known
    cdef Py_ssize_t k = len(known)
    if (k and n == k + self.known_left and self.state == 0 and self.pending and not self.head
            and memcmp(buf, <uchar*>known, k) == 0 and not self.raw and not self.lost):
        method, upgrade = self.pending[0]  # one whole response, a repeat of the last: as the first
        if not upgrade and method != B_HEAD and method != B_CONNECT:
            self.pending.popleft()
            return n
    while pos < n:
        if self.raw or self.lost:
            return n
        state = self.state
        if state == 1:  # LENGTH
            take = self.left if self.left < n - pos else n - pos
            self.left -= take
            pos += take
            if self.left == 0:
                _tracker_done(self)
        elif state == 2:  # CHUNKED
            try:
                end = (<Chunked>self.chunked)._feed(buf, n, pos)
            except HeadError:
                self.lost = True
                return n
            if end < 0:
                return n
            pos = end
            _tracker_done(self)
        elif state == 3:  # UNTIL_EOF
            return n
        else:
            if stop_when_idle and not self.pending and not self.head:
                return pos
            pos = _tracker_head(self, data, buf, n, pos)
    return n


cdef Py_ssize_t _tracker_head(self, data, uchar* buf, Py_ssize_t n, Py_ssize_t pos) except -1:
    cdef Py_ssize_t before = len(self.head), end, limit
    cdef bytes known
    cdef Py_ssize_t k
    if not before:  # most heads: found in place, nothing copied
        known = self.known
        k = len(known)
        if k and n - pos >= k and memcmp(buf + pos, <uchar*>known, k) == 0 and self.pending:
            method, upgrade = self.pending[0]
            if not upgrade and method != B_HEAD and method != B_CONNECT:
                self.left = self.known_left
                if self.left:
                    self.state = 1
                else:
                    _tracker_done(self)
                return pos + k
        limit = pos + C_MAX_RESPONSE_HEAD + 4
        end = _find_end(buf, pos, limit if limit < n else n)
        if end >= 0:
            _tracker_answer(self, buf + pos, end + 4 - pos)
            return end + 4
        piece = PyBytes_FromStringAndSize(<char*>buf + pos, (limit if limit < n else n) - pos)
        self.head += piece
        if len(self.head) > C_MAX_RESPONSE_HEAD:
            self.lost = True
        return pos + len(piece)
    end = -1
    for window in (4096, C_MAX_RESPONSE_HEAD - before + 4):  # most heads are found in the first
        piece = bytes(data[pos:pos + window])
        end = (self.head + piece).find(b"\r\n\r\n", max(0, before - 3))
        if end >= 0 or len(piece) < window:
            break
    if end < 0:
        self.head += piece
        if len(self.head) > C_MAX_RESPONSE_HEAD:
            self.lost = True
        return pos + len(piece)
    head = bytes(self.head + piece[:end + 4 - before])
    self.head = bytearray()
    _tracker_answer(self, <uchar*>(<bytes>head), len(head))
    return pos + end + 4 - before


cdef int _tracker_answer(self, uchar* p, Py_ssize_t n) except -1:
    """A complete response head, at ``p[:n]``: what its body is, and whether it answers the
    request owed."""
    cdef Py_ssize_t j, q, v0, v1, c0 = 0, c1 = 0, ncl = 0
    cdef int status
    cdef bint same = True
    cdef long long length = 0
    cdef list te = []
    cdef tuple first
    cdef uchar* lf
    # the status line; then no line end that is not CRLF, no obs-fold: unreadable, or read two ways
    if (n < 13 or memcmp(p, b"HTTP/1.", 7) != 0 or (p[7] != 48 and p[7] != 49) or p[8] != 32
            or not 48 <= p[9] <= 57 or not 48 <= p[10] <= 57 or not 48 <= p[11] <= 57
            or (p[12] != 32 and p[12] != 13)):
        self.lost = True
        return 0
    j = 0
    while True:
        lf = <uchar*>memchr(p + j, 10, n - j)
        if lf == NULL:
            break
        j = lf - p
        if j == 0 or p[j - 1] != 13 or (j + 1 < n and (p[j + 1] == 32 or p[j + 1] == 9)):
            self.lost = True
            return 0
        j += 1
    status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
    first = self.pending[0] if self.pending else (b"", False)
    method, upgrade = first[0], first[1]
    if 100 <= status < 200 and status != 101:
        return 0  # interim: the final answer follows
    if upgrade and self.pending:
        switched = status == 101 or (method == B_CONNECT and 200 <= status < 300)
        self.answered_upgrade = switched
        if switched:
            self.pending.popleft()
            self.raw = True
            return 0
    if method == B_HEAD or status == 204 or status == 304 or 100 <= status < 200:
        _tracker_done(self)
        return 0
    # the fields that delimit the body: Content-Length, Transfer-Encoding (value without the
    # whitespace around it); every line ends with CRLF here
    j = 0
    while True:
        lf = <uchar*>memchr(p + j, 10, n - j)
        if lf == NULL:
            break
        q = lf - p + 1
        j = q
        if n - q >= 15 and _is(p + q, 14, b"content-length", 14):
            q += 14
            is_cl = True
        elif n - q >= 18 and _is(p + q, 17, b"transfer-encoding", 17):
            q += 17
            is_cl = False
        else:
            continue
        while q < n and (p[q] == 32 or p[q] == 9):
            q += 1
        if q >= n or p[q] != 58:
            continue
        q += 1
        while q < n and (p[q] == 32 or p[q] == 9):
            q += 1
        v0 = q
        while q < n and p[q] != 13 and p[q] != 10:
            q += 1
        if n - q < 2 or p[q] != 13 or p[q + 1] != 10:
            continue
        v1 = q
        while v1 > v0 and (p[v1 - 1] == 32 or p[v1 - 1] == 9):
            v1 -= 1
        if not is_cl:
            te.append(PyBytes_FromStringAndSize(<char*>p + v0, v1 - v0))
        elif ncl == 0:  # the first Content-Length value; every other one must be the same
            c0, c1, ncl = v0, v1, 1
        else:
            same = same and v1 - v0 == c1 - c0 and memcmp(p + v0, p + c0, c1 - c0) == 0
            ncl += 1
        j = q
    if te:
        codings = [c.strip(b" \t").lower() for c in b",".join(te).split(b",")]
        if codings[len(codings) - 1] == b"chunked":
            self.chunked = Chunked()
            self.state = 2
        else:
            self.state = 3
    elif ncl:
        if not _digits(p + c0, c1 - c0) or c1 - c0 > 18 or not same:
            self.lost = True
            return 0
        for j in range(c0, c1):
            length = length * 10 + (p[j] - 48)
        self.left = length
        if not upgrade and method != B_HEAD and method != B_CONNECT and self.pending:
            self.known, self.known_left = PyBytes_FromStringAndSize(<char*>p, n), self.left
        if self.left:
            self.state = 1
        else:
            _tracker_done(self)
    else:
        self.state = 3
    return 0


cdef int _tracker_done(self) except -1:
    self.state = 0
    self.chunked = None
    if self.pending:
        self.pending.popleft()
    return 0
