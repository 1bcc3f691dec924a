"""The server: ``TunnelServer``, the ``SessionRegistry`` seam with its in-process default, and
the public ingresses (TCP ports, and HTTP routed by Host)."""

from __future__ import annotations

from .http import HttpIngress, normalize_host
from .ingress import Ingress, TcpIngress
from .registry import Claim, LocalRegistry, LocalRoute, Route, SessionRegistry, SessionStore
from .server import ServerConnection, TunnelServer

__all__ = ["HttpIngress", "normalize_host", "Ingress", "TcpIngress", "Claim", "LocalRegistry", "LocalRoute",
           "Route", "SessionRegistry", "SessionStore", "ServerConnection", "TunnelServer"]
