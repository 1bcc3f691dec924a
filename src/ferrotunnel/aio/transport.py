"""Tunnel transports: plain TCP, or TLS over TCP via an ``ssl.SSLContext``."""

from __future__ import annotations

import socket
import ssl
from typing import Any, Optional, Tuple, Union

__all__ = ["Transport", "TcpTransport", "TlsTransport", "resolve_transport", "bound_address", "tune_socket",
           "is_loopback_peer"]


def tune_socket(sock: Any) -> None:
    """Keepalive on a tunnel or forwarded socket (TCP_NODELAY is on already: uvloop and asyncio set
    it on every TCP transport). uvloop hands out a stand-in (``PseudoSocket``) whose every
    ``setsockopt`` makes and drops a ``socket.socket``, and whose ``family``/``type`` build enum
    members: the options go through one socket object made from the bare descriptor instead (its
    recorded family does not matter to ``setsockopt``; a non-TCP socket refuses the TCP options).

    On a listening socket it tunes every connection accepted from it: on Linux an accepted TCP
    socket inherits these options from its listener (``listen`` tunes its sockets, and an ingress's
    bridges skip the call: one Python socket object and four system calls less per visitor)."""
    try:
        real = sock if isinstance(sock, socket.socket) else socket.socket(_AF_INET, _SOCK_STREAM, 0, sock.fileno())
    except (OSError, ValueError, AttributeError):  # closed already, or not a socket
        return
    try:
        real.setsockopt(_SOL_SOCKET, _SO_KEEPALIVE, 1)
        if _KEEPIDLE is not None and _KEEPINTVL is not None:
            real.setsockopt(_IPPROTO_TCP, _KEEPIDLE, 30)
            real.setsockopt(_IPPROTO_TCP, _KEEPINTVL, 10)
    except OSError:  # not fatal: a socket type without these options
        pass
    finally:
        if real is not sock:
            real.detach()  # the descriptor stays the transport's


def is_loopback_peer(peer: Any) -> bool:
    """Whether a connection's peer address (``get_extra_info("peername")``) is on this host's
    loopback. Keepalive on such a connection detects nothing (the probes are answered by the
    local kernel, even for a hung process; a dead one's connections are closed by the kernel), so
    a dialed loopback connection skips ``tune_socket``: one socket object and four system calls
    less per forwarded stream."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    host = peer[0]
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")


_AF_INET, _SOCK_STREAM, _SOL_SOCKET, _SO_KEEPALIVE, _IPPROTO_TCP = (
    int(socket.AF_INET), int(socket.SOCK_STREAM), socket.SOL_SOCKET, socket.SO_KEEPALIVE, socket.IPPROTO_TCP)
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", None)
_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)


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
