"""Exception hierarchy of ferrotunnel: everything raised on purpose derives from FerroTunnelError."""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "FerroTunnelError",
    "FrameError",
    "HandshakeError",
    "AuthenticationError",
    "RetryableHandshakeError",
    "TlsVerificationError",
    "SuspectedMisconfiguration",
    "StreamClosedError",
    "StreamResetError",
    "LimitExceededError",
    "TunnelTimeoutError",
    "ConnectionLostError",
    "PeerUnsupportedError",
]


class FerroTunnelError(Exception):
    """Base class of every error ferrotunnel raises on purpose."""


class FrameError(FerroTunnelError, ValueError):
    """Bytes on the wire (or a frame to encode) that break FerroTunnel protocol v1."""


class HandshakeError(FerroTunnelError):
    """The tunnel handshake failed (version mismatch, unexpected reply, closed early).

    ``status`` is the ``HandshakeStatus`` the server answered with (None if it never answered);
    ``reason`` is the server's explanation when it sent one."""

    def __init__(self, message: str, status: Optional[Any] = None, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class RetryableHandshakeError(HandshakeError):
    """The server refused this attempt for a passing reason (RateLimited, TunnelIdTaken); retry later.

    ``retry_after`` (seconds) is set when the server said when to try again: a cluster node that
    is handing the tunnel id over from another node ("handover pending") asks for a quick retry."""

    retry_after: Optional[float] = None


class TlsVerificationError(HandshakeError):
    """The server's TLS certificate failed verification: a configuration error, not retried."""


class AuthenticationError(HandshakeError):
    """The server rejected the token. Not retried: fix the token."""


class StreamClosedError(FerroTunnelError):
    """Writing to a stream that was closed, or reading from one that was aborted."""


class StreamResetError(StreamClosedError):
    """The peer (or the session going down) reset the stream; data in flight is lost. ``code``:
    the ``ErrorCode`` the peer gave with its reset (None when it gave none)."""

    def __init__(self, *args: Any, code: Any = None) -> None:
        super().__init__(*args)
        self.code = code


class ConnectionLostError(StreamResetError):
    """The tunnel connection carrying the stream or session went away."""


class LimitExceededError(FerroTunnelError):
    """A configured limit (streams, sessions, buffers, rates) refused the operation."""


class TunnelTimeoutError(FerroTunnelError, TimeoutError):
    """A tunnel operation did not complete within its configured time."""


class PeerUnsupportedError(FerroTunnelError):
    """The peer did not announce the extension this operation needs (e.g. a Rust server and client-opened streams)."""


class SuspectedMisconfiguration(ConnectionLostError):
    """A failed attempt that looks like a setting that does not match the server (TLS on one side
    only, a client certificate it refuses, a port that is not its tunnel port). Retried a few
    times in case it was a passing fault, then ``TunnelClient.connect_and_run`` gives up."""
