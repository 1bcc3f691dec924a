"""HttpsIngress: the HTTP ingress behind TLS for visitors (``--https-bind``, ``--https-cert``,
``--https-key``; a wildcard certificate for the domain, e.g. from ``ferrotunnel certs --domain``).

TLS is terminated here (TLS 1.2 or 1.3); each connection's SNI name is kept (``sni_callback``),
requests are routed by SNI, then Host: a request whose Host names another tunnel than the SNI did
gets 421 Misdirected Request (RFC 9110 §15.5.20), so a connection opened for one tunnel's name
cannot be used to reach another. Without SNI, Host alone routes. Everything else is the HTTP
ingress's: X-Forwarded-Proto says ``https``. The server's ingress caps (``ingress_max_per_address``,
``ingress_max_connections``, ``ingress_fd_reserve``) count a connection from its accept, before
the TLS handshake (``aio/listen.py``), which must finish within ``TLS_HANDSHAKE_TIMEOUT``.
"""

from __future__ import annotations

import ssl
from typing import Any, Optional

from ..addr import Address
from .http import HttpIngress
from .http_names import normalize_host
from .server import TunnelServer

__all__ = ["HttpsIngress", "SNI_ATTRIBUTE"]

#: The attribute of the connection's ``ssl.SSLObject`` that holds its SNI name (lower case).
SNI_ATTRIBUTE = "ferrotunnel_sni"


def _remember_sni(sslobj: Any, name: Optional[str], ctx: ssl.SSLContext) -> None:
    setattr(sslobj, SNI_ATTRIBUTE, name.lower() if name else None)


class HttpsIngress(HttpIngress):
    """A public HTTPS port: TLS with ``certfile``/``keyfile``, then the HTTP ingress."""

    kind = "HTTPS ingress"

    def __init__(self, server: TunnelServer, address: Address, certfile: str, keyfile: str,
                 **kwargs: Any) -> None:
        super().__init__(server, address, **kwargs)
        self.scheme = "https"
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile, keyfile)  # OSError / ssl.SSLError for a bad pair: the caller's usage error
        ctx.sni_callback = _remember_sni
        self.ssl_context = ctx

    def sni_tunnel(self, transport: Any) -> Optional[str]:
        """The tunnel id the connection's SNI names (None: no SNI, or not TLS)."""
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        name = getattr(sslobj, SNI_ATTRIBUTE, None) if sslobj is not None else None
        return self.tunnel_for(normalize_host(name)) if name else None

    def describe(self) -> str:
        """How requests are routed, for the log line: ``"-> by SNI, then Host header"``."""
        return "-> by SNI, then Host header"
