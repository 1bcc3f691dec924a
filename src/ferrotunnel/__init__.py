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

__version__ = "0.1.0"

__all__ = [
    "__version__",
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
