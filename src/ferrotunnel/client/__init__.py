"""The client: ``TunnelClient`` (dial, handshake, serve streams, reconnect with backoff)."""

from __future__ import annotations

from .client import ClientConnection, TunnelClient, parse_address
from .reconnect import Backoff
from .tunnels import Tunnel

__all__ = ["ClientConnection", "TunnelClient", "Tunnel", "parse_address", "Backoff"]
