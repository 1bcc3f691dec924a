"""ferrotunnel: a reverse-tunnel library speaking FerroTunnel protocol v1, with a Cython hot path."""

from __future__ import annotations

from ._model import (
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
from .backoff import Backoff, BackoffConfig
from .config import ClientConfig, RateLimits, ServerConfig, StreamConfig
from .errors import PeerUnsupportedError, RetryableHandshakeError, TlsVerificationError
from . import tls
from .forward import forward
from .session import Multiplexer, Session, VirtualStream
from .server import SessionStore, TunnelServer
from .client import TunnelClient
from .ingress import TcpIngress
from .http import HttpIngress
from .transport import TcpTransport, TlsTransport

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "TunnelServer",
    "TunnelClient",
    "TcpIngress",
    "HttpIngress",
    "Session",
    "SessionStore",
    "Multiplexer",
    "VirtualStream",
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
