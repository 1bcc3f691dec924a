"""ferrotunnel: a reverse-tunnel library speaking FerroTunnel protocol v1, with a Cython hot path."""

from __future__ import annotations

from .frames import (
    MAX_FRAME_SIZE,
    CloseReason,
    ErrorCode,
    HandshakeStatus,
    Protocol,
    RegisterStatus,
    StreamPriority,
    StreamStatus,
)
from .errors import (
    AuthenticationError,
    ConnectionLostError,
    FerroTunnelError,
    FrameError,
    HandshakeError,
    LimitExceededError,
    StreamClosedError,
    StreamResetError,
    TunnelTimeoutError,
)

from .auth import constant_time_eq, hash_token, validate_token_format
from .config import BackoffConfig, ClientConfig, RateLimits, ServerConfig, StreamConfig
from .errors import PeerUnsupportedError, RetryableHandshakeError, TlsVerificationError
from . import tls
from .protocol import (
    ClientHandshake,
    HandshakeRequest,
    HandshakeResult,
    ServerHandshake,
    StreamEvent,
    StreamState,
)
from .addr import Address, as_address
from .aio import (Multiplexer, Session, SessionStats, StreamHandler, StreamSink, TcpTransport, TlsTransport,
                  VirtualStream, forward)
from .aio.stream import READ_LINE_LIMIT, READ_TO_EOF_LIMIT
from .aio.streaminfo import BytesLike
from .server import (
    HttpIngress,
    LocalRegistry,
    LocalRoute,
    Route,
    SessionRegistry,
    SessionStore,
    TcpIngress,
    TunnelServer,
)
from .server.https import HttpsIngress
from .server.public import PublicEndpoint
from .client import Backoff, Tunnel, TunnelClient

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "TunnelServer",
    "TunnelClient",
    "Tunnel",
    "TcpIngress",
    "HttpIngress",
    "HttpsIngress",
    "PublicEndpoint",
    "Session",
    "SessionStats",
    "SessionStore",
    "SessionRegistry",
    "LocalRegistry",
    "Route",
    "LocalRoute",
    "ClientHandshake",
    "ServerHandshake",
    "HandshakeRequest",
    "HandshakeResult",
    "StreamState",
    "StreamEvent",
    "StreamSink",
    "Multiplexer",
    "VirtualStream",
    "StreamHandler",
    "BytesLike",
    "READ_TO_EOF_LIMIT",
    "READ_LINE_LIMIT",
    "Address",
    "as_address",
    "forward",
    "ServerConfig",
    "ClientConfig",
    "StreamConfig",
    "RateLimits",
    "Backoff",
    "BackoffConfig",
    "TcpTransport",
    "TlsTransport",
    "constant_time_eq",
    "hash_token",
    "validate_token_format",
    "PeerUnsupportedError",
    "RetryableHandshakeError",
    "TlsVerificationError",
    "tls",
    "MAX_FRAME_SIZE",
    "CloseReason",
    "ErrorCode",
    "HandshakeStatus",
    "Protocol",
    "RegisterStatus",
    "StreamPriority",
    "StreamStatus",
    "AuthenticationError",
    "ConnectionLostError",
    "FerroTunnelError",
    "FrameError",
    "HandshakeError",
    "LimitExceededError",
    "StreamClosedError",
    "StreamResetError",
    "TunnelTimeoutError",
]
