# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled wire codec of FerroTunnel protocol v1 (twin: ``_frames_py.py``, same names and behaviour).

Import ``ferrotunnel.frames``, which picks this module or the twin.
"""

import uuid

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.bytearray cimport (
    PyByteArray_AS_STRING, PyByteArray_FromStringAndSize, PyByteArray_GET_SIZE, PyByteArray_Resize,
)
from libc.string cimport memcpy
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    ctypedef object (*allocfunc)(PyTypeObject*, Py_ssize_t)
    ctypedef struct _TypeAlloc "PyTypeObject":
        allocfunc tp_alloc

from . import _model
from ._model import (
    FLAG_PARTIAL, MAX_CAPABILITIES_WIRE, MAX_DATA_PAYLOAD, MAX_FRAME_SIZE, MAX_HEADER_BYTES, MAX_HEADERS, MAX_METADATA,
    MAX_STRING,
    CloseReason, CloseStream, Data, Error, ErrorCode, Handshake, HandshakeAck, HandshakeStatus,
    Heartbeat, HeartbeatAck, OpenStream, PluginData, Protocol, Register, RegisterAck,
    RegisterStatus, StreamAck, StreamPriority, StreamStatus,
)
from .errors import FrameError

__all__ = [
    "encode", "encode_data_header", "encode_data_header_into", "decode_control",
    "scan_frames", "FrameDecoder", "SCAN_FIELDS",
]

SCAN_FIELDS = 5
cdef Py_ssize_t _SCAN_FIELDS = 5
cdef uint64_t _U32_MAX = 0xFFFFFFFF
cdef object _U64_MAX = 0xFFFFFFFFFFFFFFFF
cdef Py_ssize_t _MAX_FRAME = MAX_FRAME_SIZE
cdef Py_ssize_t _MAX_PAYLOAD = MAX_DATA_PAYLOAD
# decode caps of control frames (_model.py says why and how much)
cdef Py_ssize_t _MAX_STRING = MAX_STRING
cdef Py_ssize_t _MAX_HEADERS = MAX_HEADERS
cdef Py_ssize_t _MAX_HEADER_BYTES = MAX_HEADER_BYTES
cdef Py_ssize_t _MAX_METADATA = MAX_METADATA
cdef Py_ssize_t _MAX_CAPS = MAX_CAPABILITIES_WIRE
# DATA_HEADER_SIZE is a C constant (_frames.pxd): it must not drift from the model the twin uses
if DATA_HEADER_SIZE != _model.DATA_HEADER_SIZE:
    raise ImportError(f"_frames.pxd DATA_HEADER_SIZE {DATA_HEADER_SIZE} != _model's {_model.DATA_HEADER_SIZE}")

cdef dict _ENUMS = {
    "HandshakeStatus": HandshakeStatus, "RegisterStatus": RegisterStatus,
    "StreamStatus": StreamStatus, "Protocol": Protocol, "CloseReason": CloseReason,
    "ErrorCode": ErrorCode, "StreamPriority": StreamPriority,
}
# member lookup by index without going through EnumMeta.__call__
cdef dict _MEMBERS = {name: tuple(cls) for name, cls in _ENUMS.items()}
cdef tuple _CLOSE = tuple(CloseReason)
cdef object _CLOSE_ERROR = CloseReason.ERROR
cdef object _DataT = Data


cdef Py_ssize_t _slot_offset(object cls, str name) except -1:
    descr = cls.__dict__[name]
    if type(descr).__name__ != "member_descriptor":
        raise TypeError(f"{cls.__name__}.{name} is not a slot")
    return (<PyMemberDescrObject*>descr).d_member.offset


# Data frames are built without running the dataclass __init__: allocate the instance and store
# the three slots directly (the same result, a fraction of the cost on the per-frame path).
cdef Py_ssize_t _OFF_SID = _slot_offset(Data, "stream_id")
cdef Py_ssize_t _OFF_DATA = _slot_offset(Data, "data")
cdef Py_ssize_t _OFF_EOS = _slot_offset(Data, "end_of_stream")


cdef inline void _put_slot(object obj, Py_ssize_t off, object value):
    # only used on freshly allocated instances, whose slots are still NULL
    Py_INCREF(value)
    (<PyObject**>((<char*><PyObject*>obj) + off))[0] = <PyObject*>value


cdef inline object _make_data(uint32_t sid, object payload, bint eos):
    obj = (<_TypeAlloc*>(<PyTypeObject*>_DataT)).tp_alloc(<PyTypeObject*>_DataT, 0)
    _put_slot(obj, _OFF_SID, sid)
    _put_slot(obj, _OFF_DATA, payload)
    _put_slot(obj, _OFF_EOS, True if eos else False)
    return obj


# ------------------------------------------------------------------ encoding


cdef class _Writer:
    cdef bytearray out

    def __cinit__(self):
        self.out = bytearray(b"\0\0\0\0\0")

    cdef void byte(self, uint8_t b):
        self.out.append(b)

    cdef varint(self, object v, object limit, str what):
        cdef uint64_t x
        if type(v) is bool or not isinstance(v, int) or v < 0 or v > limit:
            raise FrameError(f"{what} must be an integer in 0..{limit}, got {v!r}")
        x = v
        cdef unsigned char tmp[9]
        cdef int n
        if x <= 250:
            self.out.append(<uint8_t>x)
            return
        if x <= 0xFFFF:
            tmp[0] = 0xFB; tmp[1] = x & 0xFF; tmp[2] = (x >> 8) & 0xFF; n = 3
        elif x <= 0xFFFFFFFF:
            tmp[0] = 0xFC; n = 5
            for i in range(4):
                tmp[1 + i] = (x >> (8 * i)) & 0xFF
        else:
            tmp[0] = 0xFD; n = 9
            for i in range(8):
                tmp[1 + i] = (x >> (8 * i)) & 0xFF
        self.out += PyBytes_FromStringAndSize(<char*>tmp, n)

    cdef u8(self, object v, str what):
        if type(v) is bool or not isinstance(v, int) or not 0 <= v <= 255:
            raise FrameError(f"{what} must be an integer in 0..255, got {v!r}")
        self.out.append(v)

    cdef string(self, object s, str what):
        if not isinstance(s, str):
            raise FrameError(f"{what} must be a str, got {type(s).__name__}")
        try:
            b = (<str>s).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FrameError(f"{what} is not encodable as UTF-8: {exc.reason}") from None
        self.varint(len(b), _U64_MAX, what + " length")
        self.out += b

    cdef raw(self, object b, str what):
        try:
            mv = memoryview(b)
        except TypeError:
            raise FrameError(f"{what} must be bytes-like, got {type(b).__name__}") from None
        self.varint(mv.nbytes, _U64_MAX, what + " length")
        self.out += mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv

    cdef enum_(self, object v, str enum_name):
        cls = _ENUMS[enum_name]
        if type(v) is cls:  # a member already (the usual case): no lookup by value
            self.out.append(v._value_)
            return
        try:
            member = cls(v)
        except (ValueError, TypeError):
            raise FrameError(f"{v!r} is not a valid {enum_name}") from None
        self.out.append(int(member))

    cdef str_list(self, object items, str what):
        items = list(items)
        self.varint(len(items), _U64_MAX, what + " count")
        for s in items:
            self.string(s, what)


cdef _encode_body(object frame, _Writer w):
    t = type(frame)
    if t is Heartbeat or t is HeartbeatAck:
        w.byte(8 if t is Heartbeat else 9)
        w.varint(frame.timestamp, _U64_MAX, "timestamp")
    elif t is CloseStream:
        w.byte(7)
        w.varint(frame.stream_id, _U32_MAX, "stream_id")
        w.enum_(frame.reason, "CloseReason")
        if frame.reason == _CLOSE_ERROR:
            w.string(frame.message if frame.message is not None else "", "message")
        elif frame.message is not None:
            raise FrameError("CloseStream.message is only carried by CloseReason.ERROR")
    elif t is OpenStream:
        w.byte(4)
        w.varint(frame.stream_id, _U32_MAX, "stream_id")
        w.enum_(frame.protocol, "Protocol")
        headers = list(frame.headers)
        w.varint(len(headers), _U64_MAX, "headers count")
        for h in headers:
            try:
                k, v = h
            except (TypeError, ValueError):
                raise FrameError(f"each header must be a (name, value) pair, got {h!r}") from None
            w.string(k, "header name")
            w.string(v, "header value")
        if frame.body_hint is None:
            w.byte(0)
        else:
            w.byte(1)
            w.varint(frame.body_hint, _U64_MAX, "body_hint")
        w.enum_(frame.priority, "StreamPriority")
    elif t is Handshake:
        w.byte(0)
        w.string(frame.token, "token")
        if frame.tunnel_id is None:
            w.byte(0)
        else:
            w.byte(1)
            w.string(frame.tunnel_id, "tunnel_id")
        w.u8(frame.min_version, "min_version")
        w.u8(frame.max_version, "max_version")
        w.str_list(frame.capabilities, "capabilities")
    elif t is HandshakeAck:
        w.byte(1)
        sid = frame.session_id
        if not isinstance(sid, uuid.UUID):
            raise FrameError(f"session_id must be a uuid.UUID, got {type(sid).__name__}")
        w.byte(16)
        w.out += sid.bytes
        w.enum_(frame.status, "HandshakeStatus")
        w.u8(frame.version, "version")
        w.str_list(frame.server_capabilities, "server_capabilities")
    elif t is Register:
        w.byte(2)
        w.string(frame.service_name, "service_name")
        w.enum_(frame.protocol, "Protocol")
        items = list(dict(frame.metadata).items())
        w.varint(len(items), _U64_MAX, "metadata count")
        for k, v in items:
            w.string(k, "metadata key")
            w.string(v, "metadata value")
    elif t is RegisterAck:
        w.byte(3)
        w.string(frame.public_url, "public_url")
        w.enum_(frame.status, "RegisterStatus")
    elif t is StreamAck:
        w.byte(5)
        w.varint(frame.stream_id, _U32_MAX, "stream_id")
        w.enum_(frame.status, "StreamStatus")
    elif t is Error:
        w.byte(10)
        if frame.stream_id is None:
            w.byte(0)
        else:
            w.byte(1)
            w.varint(frame.stream_id, _U32_MAX, "stream_id")
        w.enum_(frame.code, "ErrorCode")
        w.string(frame.message, "message")
    elif t is PluginData:
        w.byte(11)
        w.string(frame.plugin_id, "plugin_id")
        w.raw(frame.data, "data")
    else:
        raise FrameError(f"cannot encode {t.__name__}: not a FerroTunnel frame")


cdef inline uint32_t _get_be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef _check_data(object stream_id, Py_ssize_t payload_len):
    if type(stream_id) is bool or not isinstance(stream_id, int) or not 0 <= stream_id <= _U32_MAX:
        raise FrameError(f"stream_id must be an integer in 0..{_U32_MAX}, got {stream_id!r}")
    if payload_len < 0 or payload_len > _MAX_PAYLOAD:
        raise FrameError(f"data payload of {payload_len} bytes exceeds the maximum of {_MAX_PAYLOAD}")


def encode_data_header(stream_id, Py_ssize_t payload_len, bint end_of_stream=False):
    """The 10-byte wire header of a data frame carrying ``payload_len`` bytes."""
    _check_data(stream_id, payload_len)
    return data_header(<uint32_t>stream_id, payload_len, end_of_stream)


def encode_data_header_into(buf, Py_ssize_t offset, stream_id, Py_ssize_t payload_len, bint end_of_stream=False):
    """Write a data frame header into writable ``buf`` at ``offset``; return the offset after it."""
    _check_data(stream_id, payload_len)
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
    try:
        if offset < 0 or offset + DATA_HEADER_SIZE > view.len:
            raise FrameError(f"no room for a {DATA_HEADER_SIZE}-byte header at offset {offset} of {view.len}")
        write_data_header(<unsigned char*>view.buf + offset, <uint32_t>stream_id, payload_len, end_of_stream)
    finally:
        PyBuffer_Release(&view)
    return offset + DATA_HEADER_SIZE


def encode(frame):
    """The whole wire frame (length prefix included), in minimal encoding."""
    cdef Py_buffer view
    cdef bytes out
    cdef unsigned char* p
    if type(frame) is _DataT:
        payload = frame.data
        try:
            PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        except (TypeError, BufferError):
            raise FrameError(f"Data.data must be bytes-like, got {type(payload).__name__}") from None
        try:
            _check_data(frame.stream_id, view.len)
            out = PyBytes_FromStringAndSize(NULL, view.len + DATA_HEADER_SIZE)
            p = <unsigned char*>PyBytes_AS_STRING(out)
            write_data_header(p, <uint32_t>frame.stream_id, view.len, bool(frame.end_of_stream))
            memcpy(p + DATA_HEADER_SIZE, view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return out
    cdef _Writer w = _Writer()
    _encode_body(frame, w)
    cdef Py_ssize_t n = PyByteArray_GET_SIZE(w.out) - 4
    if n > _MAX_FRAME:
        raise FrameError(f"frame too large: {n} bytes (max {_MAX_FRAME})")
    _put_be32(<unsigned char*>PyByteArray_AS_STRING(w.out), <uint32_t>n)
    return bytes(w.out)


# ------------------------------------------------------------------ decoding


cdef class _Reader:
    cdef bytes b
    cdef const unsigned char* p
    cdef Py_ssize_t pos, end

    def __cinit__(self, bytes b):
        self.b = b
        self.p = <const unsigned char*>PyBytes_AS_STRING(b)
        self.pos = 0
        self.end = len(b)

    cdef need(self, Py_ssize_t n, str what):
        if self.end - self.pos < n:
            raise FrameError(f"unexpected end of control frame reading {what}: need {n} more bytes, have {self.end - self.pos}")

    cdef int u8(self, str what) except -1:
        self.need(1, what)
        self.pos += 1
        return self.p[self.pos - 1]

    cdef object varint(self, bint wide, str what):
        cdef int m = self.u8(what)
        cdef uint64_t v = 0
        cdef int i, n
        if m < 251:
            return m
        if m == 0xFB:
            n = 2
        elif m == 0xFC:
            n = 4
        elif m == 0xFD and wide:
            n = 8
        else:
            raise FrameError(f"invalid varint marker 0x{m:02x} for {what} ({'u64' if wide else 'u32'})")
        self.need(n, what)
        for i in range(n):
            v |= (<uint64_t>self.p[self.pos + i]) << (8 * i)
        self.pos += n
        return v

    cdef Py_ssize_t length(self, str what) except -1:
        n = self.varint(True, what + " length")
        if n > self.end - self.pos:
            raise FrameError(f"{what} length {n} exceeds the {self.end - self.pos} bytes left in the frame")
        return n

    cdef Py_ssize_t str_len(self, str what) except -1:
        # the cap before the bytes left: a String never costs more than MAX_STRING
        n = self.varint(True, what + " length")
        if n > _MAX_STRING:
            raise FrameError(f"{what} length {n} exceeds MAX_STRING ({_MAX_STRING})")
        if n > self.end - self.pos:
            raise FrameError(f"{what} length {n} exceeds the {self.end - self.pos} bytes left in the frame")
        return n

    cdef str text(self, Py_ssize_t n, str what):
        cdef Py_ssize_t start = self.pos
        self.pos += n
        try:
            return self.b[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(f"{what} is not valid UTF-8") from None

    cdef str string(self, str what):
        return self.text(self.str_len(what), what)

    cdef bytes raw(self, str what):
        cdef Py_ssize_t n = self.length(what)
        self.pos += n
        return PyBytes_FromStringAndSize(<const char*>self.p + self.pos - n, n)

    cdef Py_ssize_t count(self, str what, Py_ssize_t cap, str cap_name) except -1:
        # the named cap first; then, as every element takes at least one byte, a count above the
        # bytes left is a lie
        n = self.varint(True, what + " count")
        if n > cap:
            raise FrameError(f"{what} count {n} exceeds {cap_name} ({cap})")
        if n > self.end - self.pos:
            raise FrameError(f"{what} count {n} exceeds the {self.end - self.pos} bytes left in the frame")
        return n

    cdef bint tag(self, str what) except -1:
        cdef int t = self.u8(what)
        if t > 1:
            raise FrameError(f"invalid {what} value {t} (expected 0 or 1)")
        return t == 1

    cdef object enum_(self, str enum_name):
        cdef tuple members = _MEMBERS[enum_name]
        idx = self.varint(False, enum_name)
        if idx >= len(members):
            raise FrameError(f"invalid {enum_name} variant index {idx} (expected 0..{len(members) - 1})")
        return members[idx]

    cdef list str_list(self, str what):
        cdef Py_ssize_t n = self.count(what, _MAX_CAPS, "MAX_CAPABILITIES_WIRE")
        return [self.string(what) for _ in range(n)]

    cdef list headers(self):
        cdef Py_ssize_t n = self.count("headers", _MAX_HEADERS, "MAX_HEADERS")
        cdef Py_ssize_t i, kn, vn, total = 0
        cdef list out = []
        for i in range(n):
            kn = self.str_len("header name")
            total += kn
            if total > _MAX_HEADER_BYTES:
                raise FrameError(f"header bytes {total} exceed MAX_HEADER_BYTES ({_MAX_HEADER_BYTES})")
            k = self.text(kn, "header name")
            vn = self.str_len("header value")
            total += vn
            if total > _MAX_HEADER_BYTES:
                raise FrameError(f"header bytes {total} exceed MAX_HEADER_BYTES ({_MAX_HEADER_BYTES})")
            out.append((k, self.text(vn, "header value")))
        return out


def decode_control(body):
    """Decode the body of a control frame (the bytes after the type byte)."""
    cdef _Reader r = _Reader(bytes(body))
    idx = r.varint(False, "frame variant")
    if idx == 8:
        return Heartbeat(r.varint(True, "timestamp"))
    if idx == 9:
        return HeartbeatAck(r.varint(True, "timestamp"))
    if idx == 7:
        sid = r.varint(False, "stream_id")
        reason = r.enum_("CloseReason")
        msg = r.string("close message") if reason is _CLOSE_ERROR else None
        return CloseStream(sid, reason, msg)
    if idx == 4:
        sid = r.varint(False, "stream_id")
        proto = r.enum_("Protocol")
        headers = r.headers()
        hint = r.varint(True, "body_hint") if r.tag("Option tag") else None
        return OpenStream(sid, proto, headers, hint, r.enum_("StreamPriority"))
    if idx == 6:
        sid = r.varint(False, "stream_id")
        payload = r.raw("data")
        return Data(sid, payload, r.tag("bool"))
    if idx == 0:
        token = r.string("token")
        tid = r.string("tunnel_id") if r.tag("Option tag") else None
        lo = r.u8("min_version")
        hi = r.u8("max_version")
        return Handshake(token, tid, lo, hi, r.str_list("capability"))
    if idx == 1:
        n = r.varint(True, "session_id length")
        if n != 16:
            raise FrameError(f"session_id UUID must be 16 bytes, got a length of {n}")
        r.need(16, "session_id")
        sid_u = uuid.UUID(bytes=r.b[r.pos:r.pos + 16])
        r.pos += 16
        status = r.enum_("HandshakeStatus")
        version = r.u8("version")
        return HandshakeAck(sid_u, status, version, r.str_list("server capability"))
    if idx == 2:
        name = r.string("service_name")
        proto = r.enum_("Protocol")
        meta = {}
        for _ in range(r.count("metadata", _MAX_METADATA, "MAX_METADATA")):
            k = r.string("metadata key")
            meta[k] = r.string("metadata value")
        return Register(name, proto, meta)
    if idx == 3:
        url = r.string("public_url")
        return RegisterAck(url, r.enum_("RegisterStatus"))
    if idx == 5:
        sid = r.varint(False, "stream_id")
        return StreamAck(sid, r.enum_("StreamStatus"))
    if idx == 10:
        esid = r.varint(False, "stream_id") if r.tag("Option tag") else None
        code = r.enum_("ErrorCode")
        return Error(esid, code, r.string("message"))
    if idx == 11:
        pid = r.string("plugin_id")
        return PluginData(pid, r.raw("data"))
    raise FrameError(f"unknown frame variant index {idx} (expected 0..11)")


cdef inline int _ba_append(bytearray ba, const void* src, Py_ssize_t n) except -1:
    # one copy straight from the caller's buffer (no temporary bytes object)
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(ba)
    PyByteArray_Resize(ba, old + n)
    memcpy(PyByteArray_AS_STRING(ba) + old, src, n)
    return 0


cdef int _check_header(uint32_t length, int ftype, Py_ssize_t max_frame_size,
                       Py_ssize_t max_control=_MAX_FRAME) except -1:
    # max_control: the control frame limit, at most max_frame_size (see FrameDecoder)
    if length == 0:
        raise FrameError("frame length must be at least 1")
    if length > max_frame_size:
        raise FrameError(f"frame too large: {length} bytes (max {max_frame_size})")
    if ftype > 1:
        raise FrameError(f"unknown frame type 0x{ftype:02x} (expected 0x00 control or 0x01 data)")
    if ftype == 1 and length < DATA_BODY_PREFIX:
        raise FrameError(f"data frame too short: length {length}, need at least {DATA_BODY_PREFIX}")
    if ftype == 0 and length > max_control:
        raise FrameError(f"control frame too large: {length} bytes exceeds max_control_frame ({max_control})")
    return 0


cdef object _byte_view(object data):
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def scan_frames(buf, out, Py_ssize_t max_frame_size=MAX_FRAME_SIZE):
    """Locate whole frames in ``buf`` without building objects (see the twin for the layout)."""
    cdef Py_buffer ib, ob
    cdef const unsigned char* p
    cdef uint32_t* o
    cdef Py_ssize_t n, pos = 0, count = 0, cap, k
    cdef uint32_t length
    cdef int ftype
    PyObject_GetBuffer(buf, &ib, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(out, &ob, PyBUF_SIMPLE | PyBUF_WRITABLE)
    except BaseException:
        PyBuffer_Release(&ib)
        raise
    try:
        p = <const unsigned char*>ib.buf
        n = ib.len
        o = <uint32_t*>ob.buf
        cap = (ob.len // 4) // _SCAN_FIELDS
        while count < cap and n - pos >= 5:
            length = _get_be32(p + pos)
            ftype = p[pos + 4]
            if length == 0 or length > max_frame_size or ftype > 1 or (ftype == 1 and length < DATA_BODY_PREFIX):
                _check_header(length, ftype, max_frame_size)
            if pos + 4 + <Py_ssize_t>length > n:
                break
            k = count * _SCAN_FIELDS
            if ftype == 1:
                o[k] = 1
                o[k + 1] = _get_be32(p + pos + 5)
                o[k + 2] = p[pos + 9]
                o[k + 3] = <uint32_t>(pos + DATA_HEADER_SIZE)
                o[k + 4] = length - DATA_BODY_PREFIX
            else:
                o[k] = 0
                o[k + 1] = 0
                o[k + 2] = 0
                o[k + 3] = <uint32_t>(pos + 5)
                o[k + 4] = length - 1
            count += 1
            pos += 4 + length
    finally:
        PyBuffer_Release(&ob)
        PyBuffer_Release(&ib)
    return count, pos


cdef class FrameDecoder:
    """Incremental decoder: feed any split of the byte stream, get complete frames back.

    Ownership: a frame that arrives whole within one ``feed`` call has its payload returned as a
    zero-copy ``memoryview`` of the buffer you passed, so you must not overwrite a mutable buffer
    (e.g. the one a ``BufferedProtocol`` read into) while any returned frame still views it.
    The decoder itself keeps no view of your buffer after ``feed`` returns: a partial frame's
    bytes are copied into storage the decoder owns, and a frame completed from that storage views
    a buffer that nothing else writes, so returned frames stay valid forever.

    Limits, both checked from the 5-byte header before any of the frame's body is buffered:
    ``max_frame_size`` bounds every frame's length prefix; ``max_control_frame`` (None: no limit
    beyond ``max_frame_size``) bounds control frames (type 0x00) only.
    """

    cdef bytearray _buf
    cdef Py_ssize_t _want
    # feed_raw only: a Data frame whose payload is being passed on as it arrives (see feed_raw)
    cdef Py_ssize_t _rem
    cdef uint32_t _rsid
    cdef int _rflags
    cdef Py_ssize_t _maxc  # the control limit the header check applies, at most max_frame_size
    cdef readonly Py_ssize_t max_frame_size
    cdef readonly object max_control_frame

    def __init__(self, Py_ssize_t max_frame_size=MAX_FRAME_SIZE, max_control_frame=None):
        if not DATA_BODY_PREFIX <= max_frame_size <= _MAX_FRAME:
            raise ValueError(f"max_frame_size must be in {DATA_BODY_PREFIX}..{_MAX_FRAME}, got {max_frame_size}")
        if max_control_frame is not None and max_control_frame < 1:
            raise ValueError(f"max_control_frame must be at least 1 (or None), got {max_control_frame}")
        self.max_frame_size = max_frame_size
        self.max_control_frame = max_control_frame
        # over max_frame_size, that one speaks first
        self._maxc = max_frame_size if max_control_frame is None else min(max_control_frame, max_frame_size)
        self._buf = bytearray()
        self._want = 0
        self._rem = 0

    @property
    def pending_payload(self):
        """feed_raw: bytes still to come of a data frame whose payload is being passed on in pieces
        (0 between frames). Read in ``on_data``, it says whether that piece is the frame's last."""
        return self._rem

    @property
    def buffered(self):
        """Bytes of an incomplete frame held by the decoder."""
        return len(self._buf)

    def feed(self, data):
        cdef list out = []
        self._run(data, None, None, out)
        return out

    def feed_raw(self, data, on_data, on_control):
        """Fast path: ``on_data(stream_id, flags, payload_view)`` per data frame (no frame object),
        ``on_control(frame)`` per control frame, in wire order. A data frame split across calls is
        passed on as it arrives, in pieces (views of the caller's buffer, never copied): every
        piece but the last has flags FLAG_PARTIAL, the last the frame's flags (it may be empty)."""
        self._run(data, on_data, on_control, None)

    cdef _run(self, object data, object on_data, object on_control, list out):
        cdef Py_buffer view
        cdef Py_ssize_t n, pos = 0, take, need, blen
        cdef const unsigned char* hp
        cdef bytearray buf
        if type(data) is memoryview and (<object>data).format != "B":
            data = _byte_view(data)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if self._rem:  # the rest of a data frame's payload (feed_raw)
                take = self._rem if self._rem < n else n
                self._rem -= take
                if self._rem == 0 or take:
                    on_data(self._rsid, FLAG_PARTIAL if self._rem else self._rflags, _byte_view(data)[:take])
                pos = take
                if self._rem or pos == n:
                    return
            buf = self._buf
            blen = PyByteArray_GET_SIZE(buf)
            if blen and blen < DATA_HEADER_SIZE and out is None and blen + n - pos >= DATA_HEADER_SIZE and (
                    blen >= 5 and PyByteArray_AS_STRING(buf)[4] == 1 or blen < 5 and (
                    (<const unsigned char*>view.buf)[pos + 4 - blen] == 1)):
                # a data frame whose header straddles the calls: its payload is passed on as it arrives
                take = DATA_HEADER_SIZE - blen
                _ba_append(buf, <const char*>view.buf + pos, take)
                pos += take
                hp = <const unsigned char*>PyByteArray_AS_STRING(buf)
                _check_header(_get_be32(hp), hp[4], self.max_frame_size, self._maxc)
                self._rsid = _get_be32(hp + 5)
                self._rflags = hp[9]
                self._rem = <Py_ssize_t>_get_be32(hp) + 4 - DATA_HEADER_SIZE
                self._buf = bytearray()
                self._want = 0
                if self._rem == 0:  # an empty data frame
                    on_data(self._rsid, self._rflags, _byte_view(data)[pos:pos])
                self._run(_byte_view(data)[pos:], on_data, on_control, out)
                return
            if blen:
                if blen < 5:
                    take = min(5 - blen, n)
                    _ba_append(buf, view.buf, take)
                    pos = take
                    if blen + take < 5:
                        return
                    hp = <const unsigned char*>PyByteArray_AS_STRING(buf)
                    _check_header(_get_be32(hp), hp[4], self.max_frame_size, self._maxc)
                    self._want = <Py_ssize_t>_get_be32(hp) + 4
                need = self._want - PyByteArray_GET_SIZE(buf)
                if n - pos < need:
                    _ba_append(buf, <const char*>view.buf + pos, n - pos)
                    return
                _ba_append(buf, <const char*>view.buf + pos, need)
                pos += need
                self._buf = bytearray()
                self._want = 0
                self._frames(buf, <const unsigned char*>PyByteArray_AS_STRING(buf), 0,
                             PyByteArray_GET_SIZE(buf), on_data, on_control, out)
            if pos < n:
                pos = self._frames(data, <const unsigned char*>view.buf, pos, n, on_data, on_control, out)
            if pos < n:
                self._buf = PyByteArray_FromStringAndSize(<const char*>view.buf + pos, n - pos)
                if n - pos >= 5:
                    self._want = <Py_ssize_t>_get_be32(<const unsigned char*>view.buf + pos) + 4
        finally:
            PyBuffer_Release(&view)

    cdef Py_ssize_t _frames(self, object owner, const unsigned char* p, Py_ssize_t pos, Py_ssize_t n,
                            object on_data, object on_control, list out) except -1:
        cdef uint32_t length, sid
        cdef int ftype, flags
        cdef Py_ssize_t end
        cdef Py_ssize_t maxf = self.max_frame_size
        cdef Py_ssize_t maxc = self._maxc
        mv = None
        while n - pos >= 5:
            length = _get_be32(p + pos)
            ftype = p[pos + 4]
            if (length == 0 or length > maxf or ftype > 1 or (ftype == 1 and length < DATA_BODY_PREFIX)
                    or (ftype == 0 and length > maxc)):
                _check_header(length, ftype, maxf, maxc)
            end = pos + 4 + length
            if end > n:
                if ftype == 1 and out is None and n - pos >= DATA_HEADER_SIZE:
                    # feed_raw: pass on what arrived of the payload now, the rest as it comes
                    self._rsid = _get_be32(p + pos + 5)
                    self._rflags = p[pos + 9]
                    self._rem = end - n
                    if n - pos > DATA_HEADER_SIZE:
                        if mv is None:
                            mv = memoryview(owner)
                            if mv.format != "B" or mv.ndim != 1:
                                mv = mv.cast("B")
                        on_data(self._rsid, FLAG_PARTIAL, mv[pos + DATA_HEADER_SIZE:n])
                    return n
                break
            if mv is None:
                mv = memoryview(owner)
                if mv.format != "B" or mv.ndim != 1:
                    mv = mv.cast("B")
            if ftype == 1:
                sid = _get_be32(p + pos + 5)
                flags = p[pos + 9]
                payload = mv[pos + DATA_HEADER_SIZE:end]
                if out is not None:
                    out.append(_make_data(sid, payload, flags & 1))
                else:
                    on_data(sid, flags, payload)
            else:
                frame = decode_control(PyBytes_FromStringAndSize(<const char*>p + pos + 5, length - 1))
                if out is not None:
                    out.append(frame)
                elif type(frame) is _DataT:
                    on_data(frame.stream_id, 1 if frame.end_of_stream else 0, memoryview(frame.data))
                else:
                    on_control(frame)
            pos = end
        return pos
