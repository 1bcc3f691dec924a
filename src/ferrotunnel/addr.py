"""Network addresses as the public API takes them: ``"host:port"`` (``"[v6]:port"`` for IPv6) or a
``(host, port)`` tuple, checked in one place so that every wrong value fails at once with an
error that names the argument and the forms accepted."""

from __future__ import annotations

import ipaddress
from typing import Any, Tuple, Union

__all__ = ["Address", "as_address", "parse_address", "format_address", "format_peer", "IPV6_PREFIX", "peer_host",
           "address_key"]

#: The per-address limits (the auth-failure throttle, pending handshakes, ports on request,
#: connections awaiting a PROXY header) count an IPv6 address under its prefix of this length (one
#: host is usually given a /64: rotating within it must not escape them).
IPV6_PREFIX = 64

#: What the public API accepts wherever it takes an address.
Address = Union[str, Tuple[str, int]]

_FORMS = "'HOST:PORT' (e.g. '127.0.0.1:8000', '[::1]:8000') or a (host, port) tuple"


def _port_range(bind: bool) -> str:
    return "0..65535 (0: any free port)" if bind else "1..65535"


def parse_address(addr: str, *, bind: bool = False) -> Tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` to ``(host, port)``; ValueError saying what is wrong otherwise.
    With ``bind`` port 0 (any free port) is allowed."""
    host, sep, port = addr.rpartition(":")
    low = 0 if bind else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
        raise ValueError(f"address must be HOST:PORT with a port in {_port_range(bind)}, got {addr!r}")
    if "/" in host:
        raise ValueError(f"address must be HOST:PORT without a scheme or path (e.g. 127.0.0.1:7835), got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"address has an empty IPv6 host between the brackets: {addr!r}")
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"an IPv6 address must be written in brackets, as in [::1]:7835, got {addr!r}")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    """(host, port) as ``HOST:PORT``, an IPv6 host in brackets: what ``parse_address`` reads."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def as_address(value: object, what: str = "address", *, bind: bool = False) -> Tuple[str, int]:
    """``value`` (``"host:port"``, ``"[v6]:port"`` or ``(host, port)``) as a ``(host, port)`` tuple.

    ``what`` names the argument in the error: TypeError for a value of another kind, ValueError
    for a malformed one (no port, a port out of range, a scheme such as ``http://``, an IPv6
    address without brackets). With ``bind`` (an address to listen on) port 0, any free port, is
    allowed, and so is an empty host in the tuple form (every interface)."""
    if isinstance(value, str):
        try:
            return parse_address(value, bind=bind)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}; accepted: {_FORMS}") from None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{what} must be {_FORMS}; got a {type(value).__name__} of {len(value)} items: "
                             f"{value!r}")
        host, port = value
        if not isinstance(host, str):
            raise TypeError(f"{what}: the host must be a str, got {type(host).__name__} in {value!r}; "
                            f"accepted: {_FORMS}")
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"{what}: the port must be an int, got {type(port).__name__} in {value!r}; "
                            f"accepted: {_FORMS}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host and not bind:
            raise ValueError(f"{what}: the host is empty in {value!r}; accepted: {_FORMS}")
        if not (0 if bind else 1) <= port <= 65535:
            raise ValueError(f"{what}: the port must be in {_port_range(bind)}, got {port} in {value!r}")
        if "/" in host:
            raise ValueError(f"{what}: the host must be a name or an IP address without a scheme or path, "
                             f"got {host!r}")
        return host, port
    raise TypeError(f"{what} must be {_FORMS}, got {type(value).__name__}: {value!r}")


def format_peer(peer: object) -> str:
    """A peer address as logs show it: ``HOST:PORT`` (``[V6]:PORT``) for a (host, port, ...)
    tuple, else its text."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_address(str(peer[0]), int(peer[1]))
    return str(peer)


def peer_host(peer: Any) -> str:
    """The host of a peer address (a (host, port, ...) tuple, or anything else as text)."""
    return peer[0] if isinstance(peer, tuple) else str(peer)


def address_key(peer: Any) -> str:
    """The key ``peer``'s address is counted under by the per-address limits: an IPv4-mapped IPv6
    address as its IPv4 address, another IPv6 address as its ``IPV6_PREFIX`` network."""
    host = peer_host(peer)
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
