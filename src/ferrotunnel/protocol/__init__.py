"""The protocol layer, sans-IO: handshake, negotiated extensions, stream states, flow windows,
keepalive, rate limits and the session core. Nothing here imports asyncio or touches a socket:
bytes and the time go in, bytes and events come out."""

from __future__ import annotations

from .core import SessionCore
from .listener import NULL_LISTENER, CoreListener
from .extensions import EXT_CAPABILITY, EXTENSIONS, Extension, Negotiated, negotiate
from .flow import FLOW_CAPABILITY, FLOW_PLUGIN_ID, FlowWindows, flow_capability, parse_flow_capability
from .handshake import ClientHandshake, HandshakeRequest, HandshakeResult, ServerHandshake
from .keepalive import Keepalive
from .ratelimit import RatePolicy, TokenBucket
from .streams import CoreStream, StreamEvent, StreamState, StreamStateError, transition

__all__ = [
    "SessionCore", "CoreListener", "NULL_LISTENER", "CoreStream",
    "ClientHandshake", "ServerHandshake", "HandshakeRequest", "HandshakeResult",
    "EXTENSIONS", "Extension", "Negotiated", "negotiate", "EXT_CAPABILITY",
    "FLOW_CAPABILITY", "FLOW_PLUGIN_ID", "FlowWindows", "flow_capability", "parse_flow_capability",
    "Keepalive", "RatePolicy", "TokenBucket",
    "StreamState", "StreamEvent", "StreamStateError", "transition",
]
