"""HttpIngress: a public HTTP/1.1 reverse proxy that routes every request by its own Host header.

Every request head on a visitor's connection is parsed with httptools (llhttp), bounded in size
(``max_head``; the first one also in time, ``head_timeout``) and checked as RFC 9112 asks (see
``http1``). A request with an absolute-form target (``GET http://app.example/ HTTP/1.1``) is
routed by the target's authority, otherwise by Host; the name is normalised as the Rust server
does (port stripped, lower-cased, one trailing dot dropped), ``.<domain>`` is dropped when the
ingress has a domain, and the result is matched against the live sessions' tunnel ids.

A keep-alive request for the tunnel of the connection's current stream goes on that stream; one
for another tunnel waits until every response owed on the current stream has reached the
visitor, then gets a stream to its own tunnel (so no request ever reaches another tunnel's app,
and responses keep their order). Each head gets X-Forwarded-For, -Proto and -Host (appended to
what a trusted front proxy, ``--trusted-proxy``, sent; replacing what anyone else sent); bodies
(Content-Length, chunked) pass unchanged, only delimited, and after a 101 (a WebSocket) or a 2xx
to CONNECT the connection is a raw byte pipe both ways.

``/health`` is answered locally only for a request that does not route to a tunnel (no Host, or
no tunnel for it): an app behind a tunnel gets its own ``/health``. Public visitors need no token.
Whatever a visitor sent appears in log lines and error bodies only escaped (``printable``).

A tunnel stream that is reset, or whose session dies, before any response byte reached the
visitor becomes a 502; after that the visitor's connection is aborted with a RST, so a truncated
response is not taken for a complete one.

The visitor connections are ``http_bridge.HttpBridge``; request heads are read in ``http1``,
bodies and responses followed in ``http_framing``, names and the ingress's own answers are in
``http_names``.
"""

from __future__ import annotations

from typing import Any, Optional

from ..addr import Address
from ..aio.bridge import TcpBridge
from .http_bridge import HttpBridge
from .http_names import normalize_host, parse_authority, printable, strip_suffix
from .ingress import Ingress
from .server import TunnelServer

__all__ = ["HttpIngress", "HttpBridge", "normalize_host", "parse_authority", "printable"]

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0


class HttpIngress(Ingress):
    """A public HTTP port routed by Host (or an absolute-form target's authority) to the session
    whose tunnel id matches."""

    kind = "HTTP ingress"

    def __init__(self, server: TunnelServer, address: Address, *, max_head: int = MAX_HEAD,
                 head_timeout: float = HEAD_TIMEOUT, priority: Any = None, domain: Optional[str] = None) -> None:
        super().__init__(server, address, priority)
        self.max_head = max_head
        self.head_timeout = head_timeout
        self.responses: dict = {}
        #: ``<tunnel-id>.<domain>`` routes to the tunnel ``<tunnel-id>`` (a bare id still works)
        self.domain = normalize_host(domain) if domain else None
        self._suffix = "." + self.domain if self.domain else ""
        #: what X-Forwarded-Proto says
        self.scheme = "http"

    def tunnel_for(self, name: str) -> str:
        """The tunnel id a normalised Host names: ``<id>.<domain>`` -> ``<id>``, else itself."""
        return strip_suffix(name, self._suffix)

    def sni_tunnel(self, transport: Any) -> Optional[str]:
        """The tunnel a connection's TLS server name names (the HTTPS ingress); None here."""
        return None

    def protocol_factory(self) -> TcpBridge:
        """An ``HttpBridge`` for one visitor connection: it parses each request head and routes
        the request by its Host (see this module's docstring)."""
        return HttpBridge(self)
