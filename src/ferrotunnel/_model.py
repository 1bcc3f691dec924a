"""Frame types and enums of FerroTunnel protocol v1, shared by the compiled codec and its twin.

Field order of every class is the wire order (PROTOCOL.md 2.4), so positional construction
follows the protocol; keyword construction is the documented style.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_DATA_PAYLOAD",
    "MAX_STRING",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_METADATA",
    "MAX_CAPABILITIES_WIRE",
    "DATA_HEADER_SIZE",
    "FRAME_PREFIX_SIZE",
    "DATA_FRAME_OVERHEAD",
    "FRAME_TYPE_CONTROL",
    "FRAME_TYPE_DATA",
    "VARIANT_HANDSHAKE",
    "VARIANT_HANDSHAKE_ACK",
    "PROTOCOL_VERSION",
    "FLAG_END_OF_STREAM",
    "FLAG_PARTIAL",
    "Protocol",
    "StreamPriority",
    "HandshakeStatus",
    "RegisterStatus",
    "StreamStatus",
    "CloseReason",
    "ErrorCode",
    "Handshake",
    "HandshakeAck",
    "Register",
    "RegisterAck",
    "OpenStream",
    "StreamAck",
    "Data",
    "CloseStream",
    "Heartbeat",
    "HeartbeatAck",
    "Error",
    "PluginData",
    "Frame",
    "BytesLike",
]

#: Largest allowed value of the 4-byte length prefix (type byte + body), PROTOCOL.md 1.2.
MAX_FRAME_SIZE = 16 * 1024 * 1024
#: The u32 length prefix in front of every frame (it counts the type byte and the body, not itself).
FRAME_PREFIX_SIZE = 4
#: Type byte of control frames (bincode body) and data frames (stream id, flags, payload).
FRAME_TYPE_CONTROL = 0x00
FRAME_TYPE_DATA = 0x01
#: Data frame header: length (4) + type (1) + stream id (4) + flags (1).
DATA_HEADER_SIZE = 10
#: Wire index of the Handshake and HandshakeAck control variants (one varint byte each).
VARIANT_HANDSHAKE = 0
VARIANT_HANDSHAKE_ACK = 1
#: The length-prefix value of an empty data frame (type, stream id, flags): a frame of length N
#: carries N minus this of payload.
DATA_FRAME_OVERHEAD = DATA_HEADER_SIZE - FRAME_PREFIX_SIZE
#: Largest payload one data frame can carry.
MAX_DATA_PAYLOAD = MAX_FRAME_SIZE - DATA_FRAME_OVERHEAD
PROTOCOL_VERSION = 1
FLAG_END_OF_STREAM = 0x01
#: Not a wire flag (the wire's flags are one byte): ``FrameDecoder.feed_raw`` passes it with every
#: piece of a data frame split across reads except the last.
FLAG_PARTIAL = 0x100

# Decode caps of control frames, enforced by ``decode_control`` before it allocates, so that no
# control frame costs more than its own size plus a small constant to decode. Real peers stay far
# below them: a Rust Handshake carries 2 capabilities and a token of at most 256 bytes, the Rust
# opener sends no headers, and a Rust server answers with 1 capability.
#: Longest String field (token, tunnel id, names, URLs, messages, each header name or value), in UTF-8 bytes.
MAX_STRING = 64 * 1024
#: Most headers in one OpenStream.
MAX_HEADERS = 256
#: Most header bytes in one OpenStream: names plus values, in UTF-8 bytes.
MAX_HEADER_BYTES = 64 * 1024
#: Most metadata entries in one Register (entries on the wire, duplicates included).
MAX_METADATA = 256
#: Most capabilities in one Handshake or HandshakeAck as decoded from the wire (the handshake
#: then keeps at most ``protocol.extensions.MAX_CAPABILITIES`` of them).
MAX_CAPABILITIES_WIRE = 256

BytesLike = Union[bytes, bytearray, memoryview]


class Protocol(enum.IntEnum):
    """Application protocol of a stream (1.0.2 numbering: TCP is 4)."""

    HTTP = 0
    HTTPS = 1
    WEB_SOCKET = 2
    GRPC = 3
    TCP = 4


class StreamPriority(enum.IntEnum):
    """Wire values; drain order is CRITICAL, HIGH, NORMAL, LOW (not numeric order)."""

    NORMAL = 0
    LOW = 1
    HIGH = 2
    CRITICAL = 3


class HandshakeStatus(enum.IntEnum):
    SUCCESS = 0
    INVALID_TOKEN = 1
    UNSUPPORTED_VERSION = 2
    VERSION_MISMATCH = 3
    RATE_LIMITED = 4
    TUNNEL_ID_TAKEN = 5


class RegisterStatus(enum.IntEnum):
    SUCCESS = 0
    SERVICE_NAME_TAKEN = 1
    INVALID_SERVICE_NAME = 2
    QUOTA_EXCEEDED = 3


class StreamStatus(enum.IntEnum):
    ACCEPTED = 0
    REJECTED = 1
    BACKPRESSURE_APPLIED = 2


class CloseReason(enum.IntEnum):
    """`ERROR` carries a message (CloseStream.message) on the wire."""

    NORMAL = 0
    TIMEOUT = 1
    ERROR = 2
    LOCAL_SERVICE_UNREACHABLE = 3
    PROTOCOL_VIOLATION = 4


class ErrorCode(enum.IntEnum):
    """Wire indices are 0-based although the Rust source declares 1..7 (PROTOCOL.md 2.6)."""

    PROTOCOL_ERROR = 0
    AUTHENTICATION_FAILED = 1
    SESSION_NOT_FOUND = 2
    STREAM_NOT_FOUND = 3
    TIMEOUT = 4
    INTERNAL_SERVER_ERROR = 5
    SERVICE_UNAVAILABLE = 6


@dataclass(slots=True)
class Handshake:
    token: str = field(repr=False)  # the secret never appears in a repr
    tunnel_id: Optional[str] = None
    min_version: int = PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION
    capabilities: Sequence[str] = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Handshake):
            return NotImplemented
        return (
            self.token == other.token
            and self.tunnel_id == other.tunnel_id
            and self.min_version == other.min_version
            and self.max_version == other.max_version
            and list(self.capabilities) == list(other.capabilities)
        )


@dataclass(slots=True)
class HandshakeAck:
    session_id: uuid.UUID
    status: HandshakeStatus
    version: int = PROTOCOL_VERSION
    server_capabilities: Sequence[str] = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HandshakeAck):
            return NotImplemented
        return (
            self.session_id == other.session_id
            and self.status == other.status
            and self.version == other.version
            and list(self.server_capabilities) == list(other.server_capabilities)
        )


@dataclass(slots=True)
class Register:
    service_name: str
    protocol: Protocol
    metadata: dict = field(default_factory=dict)


@dataclass(slots=True)
class RegisterAck:
    public_url: str
    status: RegisterStatus


@dataclass(slots=True)
class OpenStream:
    stream_id: int
    protocol: Protocol
    headers: Sequence[Tuple[str, str]] = ()
    body_hint: Optional[int] = None
    priority: StreamPriority = StreamPriority.NORMAL

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpenStream):
            return NotImplemented
        return (
            self.stream_id == other.stream_id
            and self.protocol == other.protocol
            and [tuple(h) for h in self.headers] == [tuple(h) for h in other.headers]
            and self.body_hint == other.body_hint
            and self.priority == other.priority
        )


@dataclass(slots=True)
class StreamAck:
    stream_id: int
    status: StreamStatus


@dataclass(slots=True, repr=False)
class Data:
    """A data frame. Decoded payloads are memoryviews of the received bytes."""

    stream_id: int
    data: BytesLike
    end_of_stream: bool = False

    def __repr__(self) -> str:
        return f"Data(stream_id={self.stream_id}, len={len(self.data)}, end_of_stream={self.end_of_stream})"


@dataclass(slots=True)
class CloseStream:
    stream_id: int
    reason: CloseReason = CloseReason.NORMAL
    message: Optional[str] = None  # the text of CloseReason.ERROR, else None


@dataclass(slots=True)
class Heartbeat:
    timestamp: int


@dataclass(slots=True)
class HeartbeatAck:
    timestamp: int


@dataclass(slots=True)
class Error:
    stream_id: Optional[int]
    code: ErrorCode
    message: str


@dataclass(slots=True, repr=False)
class PluginData:
    plugin_id: str
    data: BytesLike

    def __repr__(self) -> str:
        return f"PluginData(plugin_id={self.plugin_id!r}, len={len(self.data)})"


Frame = Union[
    Handshake,
    HandshakeAck,
    Register,
    RegisterAck,
    OpenStream,
    StreamAck,
    Data,
    CloseStream,
    Heartbeat,
    HeartbeatAck,
    Error,
    PluginData,
]
