"""Tunnel transports: plain TCP, or TLS over TCP via an ``ssl.SSLContext``."""

from __future__ import annotations

import socket
import ssl
from typing import Any, Optional, Tuple, Union

__all__ = ["Transport", "TcpTransport", "TlsTransport", "resolve_transport", "bound_address", "tune_socket"]


def tune_socket(sock: Any) -> None:
    """TCP_NODELAY and keepalive on a tunnel or forwarded socket."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    except OSError:  # not fatal: a socket type without these options
        pass


def bound_address(server: Any, what: str) -> Tuple[str, int]:
    """(host, port) of a started listener (port 0 resolved); RuntimeError before it starts."""
    if server is None or not server.sockets:
        raise RuntimeError(f"the {what} is not started")
    host, port = server.sockets[0].getsockname()[:2]
    return host, port


class Transport:
    """How a tunnel connection is carried: the SSL contexts of the server and client sides."""

    is_tls = False

    def server_ssl(self) -> Optional[ssl.SSLContext]:
        """The context the server wraps accepted tunnel connections in; None: plain TCP."""
        return None

    def client_ssl(self) -> Optional[ssl.SSLContext]:
        """The context the client connects to the server with; None: plain TCP."""
        return None


class TcpTransport(Transport):
    """Plain TCP with TCP_NODELAY and keepalive (the default, ``tls=None``)."""


class TlsTransport(Transport):
    """TLS over TCP with the given context (``tls=ctx`` is shorthand for ``TlsTransport(ctx)``)."""

    is_tls = True

    def __init__(self, context: ssl.SSLContext) -> None:
        if not isinstance(context, ssl.SSLContext):
            raise TypeError("TlsTransport needs an ssl.SSLContext")
        self.context = context

    def server_ssl(self) -> Optional[ssl.SSLContext]:
        """The context given to the constructor (a server-side one, on a server)."""
        return self.context

    def client_ssl(self) -> Optional[ssl.SSLContext]:
        """The context given to the constructor (a client-side one, on a client)."""
        return self.context


def resolve_transport(tls: Union[None, ssl.SSLContext, Transport]) -> Transport:
    """The ``tls=`` argument as a ``Transport``: None -> ``TcpTransport``, an ``SSLContext`` ->
    ``TlsTransport``, a transport as it is."""
    if tls is None:
        return TcpTransport()
    if isinstance(tls, Transport):
        return tls
    return TlsTransport(tls)
