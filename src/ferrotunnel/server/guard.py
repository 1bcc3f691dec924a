"""Per-tunnel access at the server's ingresses (the rules a client announced with ``access/1``,
see ``ferrotunnel.access``): which ingress kind may reach a tunnel, from which addresses, and
with which HTTP basic credentials. Everything is decided before a stream is opened, so a refused
visitor's bytes never reach the tunnel."""

from __future__ import annotations

import re
from typing import Any, Optional, Tuple

from ..access import TunnelAccess, access_from_capabilities
from ..errors import FerroTunnelError
from ..frames import Protocol

__all__ = ["AccessRefused", "REALM", "route_access", "refusal", "kind_of", "authorization_values",
           "strip_authorization", "challenge"]

#: The realm named in ``WWW-Authenticate`` when a tunnel asks for basic credentials.
REALM = "ferrotunnel"

# a field line of a head llhttp accepted: "Name:value\r\n" (the head's first line is the request line)
# (the value with its surrounding whitespace, stripped after: see http1._FIELDS)
_AUTH_LINE = re.compile(rb"\r\nauthorization:([^\r\n]*)(?=\r\n)", re.IGNORECASE)


class AccessRefused(FerroTunnelError):
    """A visitor the tunnel's rules do not admit. ``status`` is the HTTP answer ("401 ..." when
    credentials are missing or wrong, "403 ..." for an address outside the allow list)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def route_access(route: Any) -> Optional[TunnelAccess]:
    """The access rules of the tunnel a route leads to, when this node knows them (a session of
    this process: from its handshake capabilities; a route that carries them: its ``access``, e.g.
    a cluster route with the rules the owning node published, checked here before the stream opens)."""
    access = getattr(route, "access", None)
    if isinstance(access, TunnelAccess):
        return access
    caps = getattr(getattr(route, "session", None), "capabilities", None)
    return access_from_capabilities(tuple(caps)) if caps else None


def kind_of(protocol: Protocol) -> str:
    """The ingress kind ("http" or "tcp") a stream of ``protocol`` comes from."""
    return "tcp" if protocol == Protocol.TCP else "http"


def refusal(access: TunnelAccess, kind: str, visitor: Any,
            authorization: Optional[Tuple[bytes, ...]] = None) -> Optional[AccessRefused]:
    """Why ``access`` refuses a visitor at an ingress of ``kind``, or None. ``authorization``: the
    request's Authorization values (HTTP only; None elsewhere). A tunnel with basic auth is thus
    never served at a TCP ingress (it could not ask for the credentials)."""
    if not access.admits(visitor):
        return AccessRefused("403 Forbidden", "your address is not allowed to reach this tunnel")
    if access.digest is not None:  # (a TCP visitor has no credentials)
        values = authorization or ()
        if len(values) != 1 or not access.authorized(values[0]):
            return AccessRefused("401 Unauthorized", "this tunnel needs credentials (HTTP basic auth)")
    return None


def authorization_values(head: bytes) -> Tuple[bytes, ...]:
    """The values of the Authorization fields of a request head."""
    return tuple(v.strip(b" \t") for v in _AUTH_LINE.findall(head))


def strip_authorization(head: bytes) -> bytes:
    """``head`` without its Authorization fields (the credentials the ingress consumed)."""
    return _AUTH_LINE.sub(b"", head)


def challenge() -> str:
    """The header line that asks a browser for basic credentials."""
    return f'WWW-Authenticate: Basic realm="{REALM}", charset="UTF-8"\r\n'
