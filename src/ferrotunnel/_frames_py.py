"""Pure-Python twin of the compiled wire codec (`_frames.pyx`): same names, same behaviour.

Selected by ``FERROTUNNEL_NO_EXTENSIONS=1`` or when the extension is missing; import
``ferrotunnel.frames`` rather than this module.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any, Callable, List, Optional, Tuple

from ._model import (
    DATA_HEADER_SIZE,
    FLAG_END_OF_STREAM,
    FLAG_PARTIAL,
    MAX_CAPABILITIES_WIRE,
    MAX_DATA_PAYLOAD,
    MAX_FRAME_SIZE,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_METADATA,
    MAX_STRING,
    CloseReason,
    CloseStream,
    Data,
    Error,
    ErrorCode,
    Frame,
    Handshake,
    HandshakeAck,
    HandshakeStatus,
    Heartbeat,
    HeartbeatAck,
    OpenStream,
    PluginData,
    Protocol,
    Register,
    RegisterAck,
    RegisterStatus,
    StreamAck,
    StreamPriority,
    StreamStatus,
)
from .errors import FrameError

__all__ = [
    "encode",
    "encode_data_header",
    "encode_data_header_into",
    "decode_control",
    "scan_frames",
    "FrameDecoder",
    "SCAN_FIELDS",
]

_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
#: Entries ``scan_frames`` writes per frame: type, stream id, flags, body offset, body length.
SCAN_FIELDS = 5

#: What a data frame's length counts before the payload (type, stream id, flags): the length
#: prefix does not count itself.
DATA_BODY_PREFIX = DATA_HEADER_SIZE - 4

_HDR = struct.Struct(">IB")
_DATA_HDR = struct.Struct(">IBIB")  # length, type, stream id, flags: DATA_HEADER_SIZE bytes
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_ENUMS = {
    "HandshakeStatus": HandshakeStatus,
    "RegisterStatus": RegisterStatus,
    "StreamStatus": StreamStatus,
    "Protocol": Protocol,
    "CloseReason": CloseReason,
    "ErrorCode": ErrorCode,
    "StreamPriority": StreamPriority,
}
_NUM_VARIANTS = 12


# --------------------------------------------------------------------------- encoding


def _put_varint(out: bytearray, v: Any, limit: int, what: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > limit:
        raise FrameError(f"{what} must be an integer in 0..{limit}, got {v!r}")
    if v <= 250:
        out.append(v)
    elif v <= 0xFFFF:
        out.append(0xFB)
        out += _U16.pack(v)
    elif v <= _U32_MAX:
        out.append(0xFC)
        out += _U32.pack(v)
    else:
        out.append(0xFD)
        out += _U64.pack(v)


def _put_u8(out: bytearray, v: Any, what: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255:
        raise FrameError(f"{what} must be an integer in 0..255, got {v!r}")
    out.append(v)


def _put_str(out: bytearray, s: Any, what: str) -> None:
    if not isinstance(s, str):
        raise FrameError(f"{what} must be a str, got {type(s).__name__}")
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FrameError(f"{what} is not encodable as UTF-8: {exc.reason}") from None
    _put_varint(out, len(b), _U64_MAX, what + " length")
    out += b


def _put_bytes(out: bytearray, b: Any, what: str) -> None:
    try:
        mv = memoryview(b)
    except TypeError:
        raise FrameError(f"{what} must be bytes-like, got {type(b).__name__}") from None
    _put_varint(out, mv.nbytes, _U64_MAX, what + " length")
    out += mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _put_enum(out: bytearray, v: Any, enum_name: str) -> None:
    cls = _ENUMS[enum_name]
    if type(v) is cls:  # a member already (the usual case): no lookup by value
        out.append(v._value_)
        return
    try:
        member = cls(v)
    except (ValueError, TypeError):
        raise FrameError(f"{v!r} is not a valid {enum_name}") from None
    out.append(int(member))


def _put_str_list(out: bytearray, items: Any, what: str) -> None:
    items = list(items)
    _put_varint(out, len(items), _U64_MAX, what + " count")
    for s in items:
        _put_str(out, s, what)


def _put_bool(out: bytearray, v: Any, what: str) -> None:
    if not isinstance(v, (bool, int)) or v not in (0, 1):
        raise FrameError(f"{what} must be a bool, got {v!r}")
    out.append(1 if v else 0)


def _encode_body(frame: Any, out: bytearray) -> None:
    t = type(frame)
    if t is Heartbeat or t is HeartbeatAck:
        out.append(8 if t is Heartbeat else 9)
        _put_varint(out, frame.timestamp, _U64_MAX, "timestamp")
    elif t is CloseStream:
        out.append(7)
        _put_varint(out, frame.stream_id, _U32_MAX, "stream_id")
        _put_enum(out, frame.reason, "CloseReason")
        if frame.reason == CloseReason.ERROR:
            _put_str(out, frame.message if frame.message is not None else "", "message")
        elif frame.message is not None:
            raise FrameError("CloseStream.message is only carried by CloseReason.ERROR")
    elif t is OpenStream:
        out.append(4)
        _put_varint(out, frame.stream_id, _U32_MAX, "stream_id")
        _put_enum(out, frame.protocol, "Protocol")
        headers = list(frame.headers)
        _put_varint(out, len(headers), _U64_MAX, "headers count")
        for h in headers:
            try:
                k, v = h
            except (TypeError, ValueError):
                raise FrameError(f"each header must be a (name, value) pair, got {h!r}") from None
            _put_str(out, k, "header name")
            _put_str(out, v, "header value")
        if frame.body_hint is None:
            out.append(0)
        else:
            out.append(1)
            _put_varint(out, frame.body_hint, _U64_MAX, "body_hint")
        _put_enum(out, frame.priority, "StreamPriority")
    elif t is Handshake:
        out.append(0)
        _put_str(out, frame.token, "token")
        if frame.tunnel_id is None:
            out.append(0)
        else:
            out.append(1)
            _put_str(out, frame.tunnel_id, "tunnel_id")
        _put_u8(out, frame.min_version, "min_version")
        _put_u8(out, frame.max_version, "max_version")
        _put_str_list(out, frame.capabilities, "capabilities")
    elif t is HandshakeAck:
        out.append(1)
        sid = frame.session_id
        if not isinstance(sid, uuid.UUID):
            raise FrameError(f"session_id must be a uuid.UUID, got {type(sid).__name__}")
        out.append(16)
        out += sid.bytes
        _put_enum(out, frame.status, "HandshakeStatus")
        _put_u8(out, frame.version, "version")
        _put_str_list(out, frame.server_capabilities, "server_capabilities")
    elif t is Register:
        out.append(2)
        _put_str(out, frame.service_name, "service_name")
        _put_enum(out, frame.protocol, "Protocol")
        items = list(dict(frame.metadata).items())
        _put_varint(out, len(items), _U64_MAX, "metadata count")
        for k, v in items:
            _put_str(out, k, "metadata key")
            _put_str(out, v, "metadata value")
    elif t is RegisterAck:
        out.append(3)
        _put_str(out, frame.public_url, "public_url")
        _put_enum(out, frame.status, "RegisterStatus")
    elif t is StreamAck:
        out.append(5)
        _put_varint(out, frame.stream_id, _U32_MAX, "stream_id")
        _put_enum(out, frame.status, "StreamStatus")
    elif t is Error:
        out.append(10)
        if frame.stream_id is None:
            out.append(0)
        else:
            out.append(1)
            _put_varint(out, frame.stream_id, _U32_MAX, "stream_id")
        _put_enum(out, frame.code, "ErrorCode")
        _put_str(out, frame.message, "message")
    elif t is PluginData:
        out.append(11)
        _put_str(out, frame.plugin_id, "plugin_id")
        _put_bytes(out, frame.data, "data")
    else:
        raise FrameError(f"cannot encode {t.__name__}: not a FerroTunnel frame")


def data_header(stream_id: int, payload_len: int, end_of_stream: bool) -> bytes:
    """``encode_data_header`` without the checks, for callers that validated (the scheduler)."""
    return _DATA_HDR.pack(payload_len + DATA_BODY_PREFIX, 1, stream_id, FLAG_END_OF_STREAM if end_of_stream else 0)


def encode_data_header(stream_id: int, payload_len: int, end_of_stream: bool = False) -> bytes:
    """The 10-byte wire header of a data frame carrying ``payload_len`` bytes."""
    _check_data(stream_id, payload_len)
    return data_header(stream_id, payload_len, end_of_stream)


def encode_data_header_into(
    buf: Any, offset: int, stream_id: int, payload_len: int, end_of_stream: bool = False
) -> int:
    """Write a data frame header into writable ``buf`` at ``offset``; return the offset after it."""
    _check_data(stream_id, payload_len)
    if memoryview(buf).readonly:  # the compiled twin's error for a read-only buffer
        raise BufferError("Object is not writable.")
    if offset < 0 or offset + DATA_HEADER_SIZE > len(buf):
        raise FrameError(f"no room for a {DATA_HEADER_SIZE}-byte header at offset {offset} of {len(buf)}")
    # data_header's fields, written in place (a call through it would cost more than the pack)
    _DATA_HDR.pack_into(buf, offset, payload_len + DATA_BODY_PREFIX, 1, stream_id, FLAG_END_OF_STREAM if end_of_stream else 0)
    return offset + DATA_HEADER_SIZE


def _check_data(stream_id: Any, payload_len: int) -> None:
    # (bool is an int to Python, not to the compiled twin's typed argument: refused by both)
    if not isinstance(stream_id, int) or isinstance(stream_id, bool) or not 0 <= stream_id <= _U32_MAX:
        raise FrameError(f"stream_id must be an integer in 0..{_U32_MAX}, got {stream_id!r}")
    if payload_len < 0 or payload_len > MAX_DATA_PAYLOAD:
        raise FrameError(f"data payload of {payload_len} bytes exceeds the maximum of {MAX_DATA_PAYLOAD}")


def encode(frame: Frame) -> bytes:
    """The whole wire frame (length prefix included), in minimal encoding."""
    if type(frame) is Data:
        payload = frame.data
        try:
            view = memoryview(payload)
        except TypeError:
            view = None
        if view is None or not view.c_contiguous:  # (the compiled twin takes contiguous buffers only)
            raise FrameError(f"Data.data must be bytes-like, got {type(payload).__name__}") from None
        n = view.nbytes
        _check_data(frame.stream_id, n)
        return data_header(frame.stream_id, n, bool(frame.end_of_stream)) + bytes(payload)
    out = bytearray(b"\0\0\0\0\0")
    _encode_body(frame, out)
    n = len(out) - 4
    if n > MAX_FRAME_SIZE:
        raise FrameError(f"frame too large: {n} bytes (max {MAX_FRAME_SIZE})")
    struct.pack_into(">I", out, 0, n)
    return bytes(out)


# --------------------------------------------------------------------------- decoding


class _Reader:
    __slots__ = ("b", "pos", "end")

    def __init__(self, b: bytes) -> None:
        self.b = b
        self.pos = 0
        self.end = len(b)

    def need(self, n: int, what: str) -> None:
        if self.end - self.pos < n:
            raise FrameError(f"unexpected end of control frame reading {what}: need {n} more bytes, have {self.end - self.pos}")

    def u8(self, what: str) -> int:
        self.need(1, what)
        v = self.b[self.pos]
        self.pos += 1
        return v

    def varint(self, wide: bool, what: str) -> int:
        m = self.u8(what)
        if m < 251:
            return m
        if m == 0xFB:
            self.need(2, what)
            v = _U16.unpack_from(self.b, self.pos)[0]
            self.pos += 2
            return v
        if m == 0xFC:
            self.need(4, what)
            v = _U32.unpack_from(self.b, self.pos)[0]
            self.pos += 4
            return v
        if m == 0xFD and wide:
            self.need(8, what)
            v = _U64.unpack_from(self.b, self.pos)[0]
            self.pos += 8
            return v
        raise FrameError(f"invalid varint marker 0x{m:02x} for {what} ({'u64' if wide else 'u32'})")

    def length(self, what: str) -> int:
        n = self.varint(True, what + " length")
        if n > self.end - self.pos:
            raise FrameError(f"{what} length {n} exceeds the {self.end - self.pos} bytes left in the frame")
        return n

    def str_len(self, what: str) -> int:
        # the cap before the bytes left: a String never costs more than MAX_STRING
        n = self.varint(True, what + " length")
        if n > MAX_STRING:
            raise FrameError(f"{what} length {n} exceeds MAX_STRING ({MAX_STRING})")
        if n > self.end - self.pos:
            raise FrameError(f"{what} length {n} exceeds the {self.end - self.pos} bytes left in the frame")
        return n

    def text(self, n: int, what: str) -> str:
        raw = self.b[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(f"{what} is not valid UTF-8") from None

    def string(self, what: str) -> str:
        return self.text(self.str_len(what), what)

    def raw(self, what: str) -> bytes:
        n = self.length(what)
        raw = self.b[self.pos : self.pos + n]
        self.pos += n
        return raw

    def count(self, what: str, cap: int, cap_name: str) -> int:
        # the named cap first; then, as every element takes at least one byte, a count above the
        # bytes left is a lie
        n = self.varint(True, what + " count")
        if n > cap:
            raise FrameError(f"{what} count {n} exceeds {cap_name} ({cap})")
        if n > self.end - self.pos:
            raise FrameError(f"{what} count {n} exceeds the {self.end - self.pos} bytes left in the frame")
        return n

    def tag(self, what: str) -> bool:
        t = self.u8(what)
        if t > 1:
            raise FrameError(f"invalid {what} value {t} (expected 0 or 1)")
        return t == 1

    def enum(self, enum_name: str) -> Any:
        cls = _ENUMS[enum_name]
        idx = self.varint(False, enum_name)
        try:
            return cls(idx)
        except ValueError:
            raise FrameError(f"invalid {enum_name} variant index {idx} (expected 0..{len(cls) - 1})") from None

    def str_list(self, what: str) -> List[str]:
        return [self.string(what) for _ in range(self.count(what, MAX_CAPABILITIES_WIRE, "MAX_CAPABILITIES_WIRE"))]

    def headers(self) -> List[Tuple[str, str]]:
        n = self.count("headers", MAX_HEADERS, "MAX_HEADERS")
        out = []
        total = 0
        for _ in range(n):
            kn = self.str_len("header name")
            total += kn
            if total > MAX_HEADER_BYTES:
                raise FrameError(f"header bytes {total} exceed MAX_HEADER_BYTES ({MAX_HEADER_BYTES})")
            k = self.text(kn, "header name")
            vn = self.str_len("header value")
            total += vn
            if total > MAX_HEADER_BYTES:
                raise FrameError(f"header bytes {total} exceed MAX_HEADER_BYTES ({MAX_HEADER_BYTES})")
            out.append((k, self.text(vn, "header value")))
        return out


def decode_control(body: Any) -> Frame:
    """Decode the body of a control frame (the bytes after the type byte)."""
    r = _Reader(bytes(body))
    idx = r.varint(False, "frame variant")
    if idx == 8:
        return Heartbeat(r.varint(True, "timestamp"))
    if idx == 9:
        return HeartbeatAck(r.varint(True, "timestamp"))
    if idx == 7:
        sid = r.varint(False, "stream_id")
        reason = r.enum("CloseReason")
        msg = r.string("close message") if reason == CloseReason.ERROR else None
        return CloseStream(sid, reason, msg)
    if idx == 4:
        sid = r.varint(False, "stream_id")
        proto = r.enum("Protocol")
        headers = r.headers()
        hint = r.varint(True, "body_hint") if r.tag("Option tag") else None
        return OpenStream(sid, proto, headers, hint, r.enum("StreamPriority"))
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
        sid_u = uuid.UUID(bytes=r.b[r.pos : r.pos + 16])
        r.pos += 16
        status = r.enum("HandshakeStatus")
        version = r.u8("version")
        return HandshakeAck(sid_u, status, version, r.str_list("server capability"))
    if idx == 2:
        name = r.string("service_name")
        proto = r.enum("Protocol")
        meta = {}
        for _ in range(r.count("metadata", MAX_METADATA, "MAX_METADATA")):
            k = r.string("metadata key")
            meta[k] = r.string("metadata value")
        return Register(name, proto, meta)
    if idx == 3:
        url = r.string("public_url")
        return RegisterAck(url, r.enum("RegisterStatus"))
    if idx == 5:
        sid = r.varint(False, "stream_id")
        return StreamAck(sid, r.enum("StreamStatus"))
    if idx == 10:
        esid = r.varint(False, "stream_id") if r.tag("Option tag") else None
        code = r.enum("ErrorCode")
        return Error(esid, code, r.string("message"))
    if idx == 11:
        pid = r.string("plugin_id")
        return PluginData(pid, r.raw("data"))
    raise FrameError(f"unknown frame variant index {idx} (expected 0..{_NUM_VARIANTS - 1})")


def _check_header(length: int, ftype: int, max_frame_size: int, max_control: int = MAX_FRAME_SIZE) -> None:
    """``max_control``: the control frame limit, at most ``max_frame_size`` (see FrameDecoder)."""
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


def _as_bytes_view(data: Any) -> memoryview:
    mv = memoryview(data)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    elif mv.format != "B":
        mv = mv.cast("B")
    return mv


def scan_frames(buf: Any, out: Any, max_frame_size: int = MAX_FRAME_SIZE) -> Tuple[int, int]:
    """Locate whole frames in ``buf`` without building objects.

    For each complete frame, writes ``SCAN_FIELDS`` unsigned integers into ``out`` (a writable
    uint32 buffer such as ``array('I')``): type (0 control, 1 data), stream id (data frames,
    else 0), flags (data frames, else 0), body offset and body length (the payload for data, the
    bincode body for control). Stops at an incomplete frame or when ``out`` is full and returns
    ``(frames, bytes consumed)``. Raises ``FrameError`` on a bad header.
    """
    mv = _as_bytes_view(buf)
    ob = memoryview(out).cast("B")
    if ob.readonly:
        raise BufferError("Object is not writable.")
    o = ob[:len(ob) - len(ob) % 4].cast("I")  # whole 4-byte words only, as the compiled twin counts
    cap = len(o) // SCAN_FIELDS
    n = len(mv)
    pos = 0
    count = 0
    unpack = _HDR.unpack_from
    while count < cap and n - pos >= 5:
        length, ftype = unpack(mv, pos)
        _check_header(length, ftype, max_frame_size)
        end = pos + 4 + length
        if end > n:
            break
        k = count * SCAN_FIELDS
        if ftype == 1:
            o[k] = 1
            o[k + 1] = int.from_bytes(mv[pos + 5 : pos + 9], "big")
            o[k + 2] = mv[pos + 9]
            o[k + 3] = pos + DATA_HEADER_SIZE
            o[k + 4] = length - DATA_BODY_PREFIX
        else:
            o[k] = 0
            o[k + 1] = 0
            o[k + 2] = 0
            o[k + 3] = pos + 5
            o[k + 4] = length - 1
        count += 1
        pos = end
    return count, pos


class FrameDecoder:
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

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE, max_control_frame: Optional[int] = None) -> None:
        if not DATA_BODY_PREFIX <= max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in {DATA_BODY_PREFIX}..{MAX_FRAME_SIZE}, got {max_frame_size}")
        if max_control_frame is not None and max_control_frame < 1:
            raise ValueError(f"max_control_frame must be at least 1 (or None), got {max_control_frame}")
        self.max_frame_size = max_frame_size
        self.max_control_frame = max_control_frame
        # the control limit the header check applies (over max_frame_size, that one speaks first)
        self._maxc = max_frame_size if max_control_frame is None else min(max_control_frame, max_frame_size)
        self._buf = bytearray()
        self._want = 0  # total bytes (prefix included) of the pending frame, 0 = unknown yet
        # feed_raw only: a data frame whose payload is passed on as it arrives (see feed_raw)
        self._rem = 0
        self._rsid = 0
        self._rflags = 0

    @property
    def pending_payload(self) -> int:
        """feed_raw: bytes still to come of a data frame whose payload is being passed on in pieces
        (0 between frames). Read in ``on_data``, it says whether that piece is the frame's last."""
        return self._rem

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held by the decoder."""
        return len(self._buf)

    def feed(self, data: Any) -> List[Frame]:
        out: List[Frame] = []
        self._run(data, None, None, out)
        return out

    def feed_raw(
        self,
        data: Any,
        on_data: Callable[[int, int, memoryview], Any],
        on_control: Callable[[Frame], Any],
    ) -> None:
        """Fast path: ``on_data(stream_id, flags, payload_view)`` per data frame (no frame object),
        ``on_control(frame)`` per control frame, in wire order. A data frame split across calls is
        passed on as it arrives, in pieces (views of the caller's buffer, never copied): every
        piece but the last has flags FLAG_PARTIAL, the last the frame's flags (it may be empty)."""
        self._run(data, on_data, on_control, None)

    def _run(self, data: Any, on_data: Any, on_control: Any, out: Optional[List[Frame]]) -> None:
        mv = _as_bytes_view(data)
        n = len(mv)
        pos = 0
        if self._rem:  # the rest of a data frame's payload (feed_raw)
            take = min(self._rem, n)
            self._rem -= take
            if self._rem == 0 or take:
                on_data(self._rsid, FLAG_PARTIAL if self._rem else self._rflags, mv[:take])
            pos = take
            if self._rem or pos == n:
                return
        buf = self._buf
        blen = len(buf)
        if (blen and blen < DATA_HEADER_SIZE and out is None and blen + n - pos >= DATA_HEADER_SIZE
                and (buf[4] if blen >= 5 else mv[pos + 4 - blen]) == 1):
            # a data frame whose header straddles the calls: its payload is passed on as it arrives
            take = DATA_HEADER_SIZE - blen
            buf += mv[pos:pos + take]
            pos += take
            length, ftype = _HDR.unpack_from(buf, 0)
            _check_header(length, ftype, self.max_frame_size, self._maxc)
            _, _, self._rsid, self._rflags = _DATA_HDR.unpack_from(buf, 0)
            self._rem = length + 4 - DATA_HEADER_SIZE
            self._buf = bytearray()
            self._want = 0
            if self._rem == 0:  # an empty data frame
                on_data(self._rsid, self._rflags, mv[pos:pos])
            self._run(mv[pos:], on_data, on_control, out)
            return
        if buf:
            if len(buf) < 5:
                take = min(5 - len(buf), n)
                buf += mv[:take]
                pos = take
                if len(buf) < 5:
                    return
                length, ftype = _HDR.unpack_from(buf, 0)
                _check_header(length, ftype, self.max_frame_size, self._maxc)
                self._want = length + 4
            need = self._want - len(buf)
            if n - pos < need:
                buf += mv[pos:]
                return
            buf += mv[pos : pos + need]
            pos += need
            self._buf = bytearray()
            self._want = 0
            self._frames(memoryview(buf), 0, len(buf), on_data, on_control, out)
        pos = self._frames(mv, pos, n, on_data, on_control, out)
        if pos < n:
            self._buf = bytearray(mv[pos:])
            if n - pos >= 5:
                length, ftype = _HDR.unpack_from(mv, pos)
                self._want = length + 4

    def _frames(self, mv: memoryview, pos: int, n: int, on_data: Any, on_control: Any, out: Any) -> int:
        unpack = _DATA_HDR.unpack_from
        maxf = self.max_frame_size
        maxc = self._maxc
        while n - pos >= 5:
            length, ftype = _HDR.unpack_from(mv, pos)
            _check_header(length, ftype, maxf, maxc)
            end = pos + 4 + length
            if end > n:
                if ftype == 1 and out is None and n - pos >= DATA_HEADER_SIZE:
                    # feed_raw: pass on what arrived of the payload now, the rest as it comes
                    _, _, self._rsid, self._rflags = unpack(mv, pos)
                    self._rem = end - n
                    if n - pos > DATA_HEADER_SIZE:
                        on_data(self._rsid, FLAG_PARTIAL, mv[pos + DATA_HEADER_SIZE:n])
                    return n
                break
            if ftype == 1:
                _, _, sid, flags = unpack(mv, pos)
                payload = mv[pos + DATA_HEADER_SIZE : end]
                if out is not None:
                    out.append(Data(sid, payload, bool(flags & FLAG_END_OF_STREAM)))
                else:
                    on_data(sid, flags, payload)
            else:
                frame = decode_control(mv[pos + 5 : end])
                if out is not None:
                    out.append(frame)
                elif type(frame) is Data:
                    on_data(frame.stream_id, FLAG_END_OF_STREAM if frame.end_of_stream else 0, memoryview(frame.data))
                else:
                    on_control(frame)
            pos = end
        return pos
