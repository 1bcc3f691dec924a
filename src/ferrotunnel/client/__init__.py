"""The client: ``TunnelClient`` (dial, handshake, serve streams, reconnect with backoff)."""

from __future__ import annotations

from .client import ClientConnection, TunnelClient, parse_address
from .reconnect import Backoff

__all__ = ["ClientConnection", "TunnelClient", "parse_address", "Backoff"]
