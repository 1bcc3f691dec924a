"""asyncio adapters: the tunnel connection protocol, virtual streams, the session facades,
transports (TCP, and server-side TLS over memory BIOs) and the bridges between a stream and a
TCP socket. Everything here moves bytes between the protocol layer and the event loop."""

from __future__ import annotations

from .bridge import IdleSweeper, TcpBridge
from .dial import forward
from .connection import ConnectionPhase, StreamHandler, TunnelConnection
from .session import Multiplexer, Session, SessionStats
from .stream import StreamSink, VirtualStream
from .transport import TcpTransport, TlsTransport, Transport

__all__ = ["IdleSweeper", "TcpBridge", "forward", "ConnectionPhase", "StreamHandler", "TunnelConnection",
           "Multiplexer", "Session", "SessionStats", "StreamSink", "VirtualStream", "TcpTransport",
           "TlsTransport", "Transport"]
